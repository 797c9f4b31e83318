"""Reading a CSC count matrix by rows, in linear time: its entries sorted into row-range files.

Ingest reads a dataset's cells in chunks of rows. A CSC matrix (column-major, as some tools and
conversions from R write ``X``) cannot be sliced by rows: a range of rows has entries in every
column, so a row slice through anndata reads all the matrix's entries, and reading a file of n
cells in chunks costs O(n^2) (4.6x the time of its CSR copy at 100,000 cells, 6.7x at
200,000: docs/benchmarks/data_prep.md). ``CscRows.write`` makes one pass over the matrix
instead, in blocks of whole columns, and appends each entry (row, column, value in the file's
dtype; 12-16 bytes) to the file of its row range; ``rows`` then reads a range's file back as
CSR. Both steps group entries with a stable counting sort, so a row's entries keep column order
and the rows come out as a CSR file of the same matrix stores them (duplicates kept, to be
summed and checked like any other file's).
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numba
import numpy as np
import scipy.sparse as sp

from utils.spans import compressed_spans

# stored counts of a row range at most, beyond one reader chunk of rows (~30 bytes each while
# the range is read back)
RANGE_ENTRIES = 1 << 22
BLOCK_ENTRIES = 1 << 21  # stored counts per block of columns read in the sorting pass


@numba.njit(cache=True, nogil=True)
def _by_range(rows, col_ptr, col0, values, rows_per, n_ranges):
    """A block of whole columns (``rows`` and ``values`` of its entries, ``col_ptr`` their
    column starts, the first column ``col0``) regrouped by row range, entries in their order
    within a range: (entries per range, rows, columns, values). A counting sort."""
    counts = np.zeros(n_ranges, np.int64)
    for r in rows:
        counts[r // rows_per] += 1
    fill = np.zeros(n_ranges, np.int64)
    for k in range(1, n_ranges):
        fill[k] = fill[k - 1] + counts[k - 1]
    out_rows = np.empty(rows.size, np.int32)
    out_cols = np.empty(rows.size, np.int32)
    out_values = np.empty(rows.size, values.dtype)
    for c in range(col_ptr.size - 1):
        for i in range(col_ptr[c] - col_ptr[0], col_ptr[c + 1] - col_ptr[0]):
            k = rows[i] // rows_per
            p = fill[k]
            fill[k] = p + 1
            out_rows[p] = rows[i]
            out_cols[p] = col0 + c
            out_values[p] = values[i]
    return counts, out_rows, out_cols, out_values


@numba.njit(cache=True, nogil=True)
def _group_rows(rows, cols, values, n_rows):
    """CSR (indptr, columns, values) of entries given by row, each row's entries in their given
    order: a counting sort that moves the entries as it goes."""
    indptr = np.zeros(n_rows + 1, np.int64)
    for r in rows:
        indptr[r + 1] += 1
    for r in range(n_rows):
        indptr[r + 1] += indptr[r]
    fill = indptr[:-1].copy()
    out_cols = np.empty(rows.size, np.int32)
    out_values = np.empty(rows.size, values.dtype)
    for i in range(rows.size):
        p = fill[rows[i]]
        fill[rows[i]] = p + 1
        out_cols[p] = cols[i]
        out_values[p] = values[i]
    return indptr, out_cols, out_values


class CscRows:
    """The rows of a CSC matrix from its entries sorted into files of consecutive row ranges.

    A range is a whole number of the reader's chunks of rows, as many as hold about
    ``RANGE_ENTRIES`` stored counts (at least one chunk); the reader keeps one range in memory.
    """

    def __init__(self, folder: Path, rows_per: int, shape: tuple[int, int], record: np.dtype):
        self.folder, self.rows_per, self.shape, self.record = folder, rows_per, shape, record
        self._cached: tuple[int, sp.csr_matrix | None] = (-1, None)

    @classmethod
    def write(cls, elem: h5py.Group, indptr: np.ndarray, shape: tuple[int, int], folder: Path,
              chunk_rows: int) -> CscRows:
        """Sort the entries of ``elem`` (an AnnData CSC group: ``indptr`` given, ``indices``,
        ``data``) into range files in ``folder``. Raises ValueError on a malformed matrix."""
        n, g = shape
        if indptr.shape != (g + 1,) or (g and (indptr[0] != 0 or np.any(np.diff(indptr) < 0))):
            raise ValueError(f"malformed CSC indptr (length {indptr.shape[0]} for {g} columns, "
                             "must start at 0 and never decrease)")
        chunks = RANGE_ENTRIES * n // max(int(indptr[-1]) * chunk_rows, 1)
        rows_per = chunk_rows * max(1, int(chunks))
        n_ranges = -(-n // rows_per)
        dtype = elem["data"].dtype
        if dtype.kind not in "biuf":
            raise ValueError(f"non-numeric dtype {dtype}")
        record = np.dtype([("row", "<i4"), ("col", "<i4"), ("value", dtype)])
        folder.mkdir(parents=True, exist_ok=True)
        for c0, c1 in compressed_spans(indptr, g, BLOCK_ENTRIES):
            a, b = int(indptr[c0]), int(indptr[c1])
            rows = np.asarray(elem["indices"][a:b])
            if rows.size and (rows.min() < 0 or rows.max() >= n):
                raise ValueError(f"a row index outside 0..{n - 1} in columns {c0}..{c1 - 1}")
            counts, r, c, v = _by_range(rows, indptr[c0 : c1 + 1], c0,
                                        np.asarray(elem["data"][a:b], dtype), rows_per,
                                        n_ranges)
            rec = np.empty(b - a, dtype=record)
            rec["row"], rec["col"], rec["value"] = r, c, v
            ends = np.cumsum(counts)
            for k in np.flatnonzero(counts):
                with open(folder / f"{k}.bin", "ab") as f:
                    f.write(rec[ends[k] - counts[k] : ends[k]].tobytes())
        return cls(folder, rows_per, shape, record)

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        """Rows [start, stop) as CSR (read in order, one range in memory at a time)."""
        parts = []
        for k in range(start // self.rows_per, (stop - 1) // self.rows_per + 1):
            lo = k * self.rows_per
            parts.append(self._range(k)[max(start, lo) - lo : min(stop, lo + self.rows_per) - lo])
        return parts[0] if len(parts) == 1 else sp.vstack(parts, format="csr")

    def _range(self, k: int) -> sp.csr_matrix:
        if self._cached[0] != k:
            self._cached = (k, None)  # the previous range's memory goes first
            lo, hi = k * self.rows_per, min(self.shape[0], (k + 1) * self.rows_per)
            file = self.folder / f"{k}.bin"
            rec = np.fromfile(file, self.record) if file.exists() else np.empty(0, self.record)
            ptr, cols, values = _group_rows(rec["row"] - lo, rec["col"], rec["value"], hi - lo)
            self._cached = (k, sp.csr_matrix((values, cols, ptr), shape=(hi - lo, self.shape[1])))
        return self._cached[1]
