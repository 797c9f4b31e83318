"""Ingest one .h5ad dataset: validated raw counts (CSR), QC, labels -> a resumable work artifact.

The input is streamed in chunks of cells straight from the HDF5 file, so peak memory depends on
the chunk size, not on the file size (a column-major CSC matrix is first sorted into row-range
files beside the output, in one pass: ``csc_rows``). Each output array is appended to its
``.npy`` while streaming (``atomic.NpyAppender``: the header is written last, in the space kept
for it); the whole artifact is written in a temporary folder that is renamed into place, with
``meta.json`` written last, so a killed run leaves either nothing or a complete artifact (which
a rerun loads instead of recomputing).

Which matrix holds the raw counts (``IngestConfig.counts_source="auto"``):
1. ``layers['counts']`` if present;
2. else ``X`` if its first chunk holds only non-negative integers;
3. else ``raw.X`` if present (X looks normalised);
4. else ``X`` (which then fails validation with a message naming the file).

Genes (``data_prep.genes``): each column becomes the organism's canonical gene (Ensembl id where
the file gives one, symbols mapped through the build's ``SymbolMap``); spike-ins and features that
are not gene expression are left out, columns naming the same gene are summed, and a cell's
expressed genes and library size are counted after that. A dataset measuring fewer than
``min_dataset_genes`` genes (a targeted panel) is rejected.

Cells: those with ``is_primary_data == False`` (CELLxGENE: the same cells published again in
another dataset) are dropped unless ``keep_non_primary``; then QC drops cells expressing fewer
than ``min_genes`` genes. ``meta["dropped"]`` counts both.

Organism: the sheet row's, else the file's (obs, then uns: ``organism_ontology_term_id``, then
``organism``), else ``IngestConfig.organism`` (``--organism``).

Labels (per kept cell, stored as per-dataset codes into sorted value lists, -1 = unknown):
- source column: the sheet's column for the class; else the CELLxGENE schema column (the
  human-readable ``<class>`` first, then ``<class>_ontology_term_id``); ``-`` in the sheet: none;
- empty, NaN, "unknown", "na", "n/a", "none", "null" (any case) are unknown;
- ``cell_culture``: ``"cell culture"`` for tissue_type "cell culture" / "primary cell culture" (or a
  true boolean), ``"not cell culture"`` for any other known value (tissue, organoid, false);
- ``organism``: the dataset organism's curie for every cell (one organism per dataset, since gene
  ids are namespaced by organism; a file whose obs lists several organisms is rejected).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
from anndata.io import read_elem

from utils import atomic

from .csc_rows import CscRows
from .genes import FileGenes, GenePlan, SymbolMap, describe_var, plan_genes
from .organisms import resolve_organism
from .shard_format import CLASSES, UNKNOWN, Organism
from .sheet import NO_LABEL, DatasetSpec

ARTIFACT_VERSION = 2
META = "meta.json"
UNKNOWN_VALUES = frozenset({"", "nan", "none", "null", "unknown", "na", "n/a", "<na>"})
CULTURE, NOT_CULTURE = "cell culture", "not cell culture"
_CULTURE_VALUES = frozenset({"cell culture", "primary cell culture", "true", "yes", "1"})
_NOT_CULTURE_VALUES = frozenset({"false", "no", "0"})
ORGANISM_FROM_SHEET = "give it in the sheet's 'organism' column or with --organism"
PRIMARY_COLUMN = "is_primary_data"


class DatasetError(ValueError):
    """A dataset that cannot be ingested; the message names the file and the problem."""

    def __init__(self, path: str | Path, problem: str):
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


@dataclass
class IngestConfig:
    min_genes: int = 200  # QC: drop cells with fewer expressed genes
    chunk_cells: int = 8192  # cells read per chunk while ingesting (bounds peak memory)
    counts_source: str = "auto"  # raw counts matrix: auto, X, raw (raw.X) or a layer name
    # reject datasets measuring fewer genes (targeted panels); the sheet's min_dataset_genes
    # column overrides it per dataset
    min_dataset_genes: int = 1000
    # keep cells with is_primary_data == False (CELLxGENE duplicates)
    keep_non_primary: bool = False
    # leave out gene symbols no Ensembl id is known for (off: they keep their own name)
    drop_unmapped_genes: bool = False
    # organism (name or NCBITaxon:N) of files with none in their sheet row, obs or uns
    organism: str | None = None

    def __post_init__(self):
        if self.min_genes < 0 or self.chunk_cells < 1 or self.min_dataset_genes < 0:
            raise ValueError(f"need min_genes >= 0 and chunk_cells >= 1, got {self}")

    def fingerprint(self) -> dict:
        """The settings that change the artifact (the chunk size does not)."""
        d = asdict(self)
        d.pop("chunk_cells")
        return d


@dataclass
class IngestedDataset:
    """A loaded ingest artifact; arrays are memory-mapped read-only."""

    dir: Path
    counts: sp.csr_matrix  # float32 raw counts [n_kept, n_genes], local gene columns
    genes: list[str]  # gene id of each column
    cells: np.ndarray  # int64 [n_kept] obs row in the input file
    nnz: np.ndarray  # int32 [n_kept] expressed genes
    total: np.ndarray  # float32 [n_kept] library size
    label_codes: np.ndarray  # int32 [n_kept, 9] codes into label_values, -1 unknown
    label_values: dict[str, list[str]]  # class -> per-dataset label strings
    meta: dict

    @property
    def name(self) -> str:
        return self.meta["name"]

    @property
    def organism(self) -> Organism:
        return Organism(self.meta["taxon"], self.meta["organism"], self.meta["organism_name"])

    @property
    def n_cells(self) -> int:
        return int(self.meta["n_kept"])

    def labels(self, cls: str) -> np.ndarray:
        """Per kept cell label strings of one class (object array, None where unknown)."""
        values = np.array([*self.label_values.get(cls, []), None], dtype=object)
        return values[self.label_codes[:, CLASSES.index(cls)]]

    @classmethod
    def load(cls, directory: str | Path) -> IngestedDataset:
        d = Path(directory)
        try:
            meta = json.loads((d / META).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{d}: no complete ingest artifact ({META} missing)") from None
        arr = {k: np.load(d / f"{k}.npy", mmap_mode="r") for k in _ARRAYS}
        genes = json.loads((d / "genes.json").read_text())
        n = int(meta["n_kept"])
        counts = sp.csr_matrix((n, len(genes)), dtype=np.float32)
        # Assign the memory-mapped buffers directly: the constructor would copy or upcast them.
        counts.data, counts.indices, counts.indptr = arr["data"], arr["indices"], arr["indptr"]
        return cls(
            dir=d,
            counts=counts,
            genes=genes,
            cells=arr["cells"],
            nnz=arr["nnz"],
            total=arr["total"],
            label_codes=arr["label_codes"],
            label_values=json.loads((d / "label_values.json").read_text()),
            meta=meta,
        )


_ARRAYS = ("indptr", "indices", "data", "cells", "nnz", "total", "label_codes")


def ingest_dataset(spec: DatasetSpec, out_dir: str | Path, cfg: IngestConfig,
                   symbols: SymbolMap | None = None) -> IngestedDataset:
    """Validate, QC and convert one dataset into ``out_dir`` (atomic; resumes when complete).

    ``symbols`` maps gene symbols to ids (the build's map, or just the part this file uses).
    A complete artifact written from the same file, sheet row, settings and symbol map is
    loaded, not recomputed. Raises DatasetError for unusable input.
    """
    out_dir = Path(out_dir)
    symbols = symbols or SymbolMap()
    fingerprint = _fingerprint(spec, cfg, symbols)
    if (out_dir / META).is_file():
        try:
            done = IngestedDataset.load(out_dir)
        except (OSError, ValueError, KeyError):
            done = None  # unreadable: rebuild it
        if done is not None and done.meta.get("fingerprint") == fingerprint:
            return done
    with atomic.atomic_dir(out_dir) as tmp:
        meta = _convert(spec, tmp, cfg, symbols)
        meta["fingerprint"] = fingerprint
        _write_json(tmp / META, meta)
    return IngestedDataset.load(out_dir)


def _fingerprint(spec: DatasetSpec, cfg: IngestConfig, symbols: SymbolMap) -> dict:
    try:
        size = spec.path.stat().st_size
    except OSError as e:
        raise DatasetError(spec.path, f"cannot read the file ({e.strerror or e})") from None
    described = spec.to_config()
    described.pop("multiplier")  # used by sampling only
    return {"version": ARTIFACT_VERSION, "spec": described, "file_bytes": size,
            "config": cfg.fingerprint(), "symbols": symbols.digest()}


def _convert(spec: DatasetSpec, tmp: Path, cfg: IngestConfig, symbols: SymbolMap) -> dict:
    path = spec.path
    if spec.min_genes is not None:
        cfg = replace(cfg, min_genes=spec.min_genes)
    if spec.min_dataset_genes is not None:
        cfg = replace(cfg, min_dataset_genes=spec.min_dataset_genes)
    with open_counts(path, cfg, spec.gene_column, spec.organism, symbols=symbols) as found:
        if len(found.genes) < cfg.min_dataset_genes:
            raise DatasetError(
                path, f"gene panel of {len(found.genes)} genes, fewer than min_dataset_genes "
                f"{cfg.min_dataset_genes} (a targeted panel? accept it with the sheet's "
                "min_dataset_genes column)")
        columns = _label_sources(spec, found.obs_columns, path)
        cells = found.stream(tmp)
        codes, values = _extract_labels(found.obs, columns, cells, found.organism)
    atomic.save_npy(tmp / "label_codes.npy", codes)
    _write_json(tmp / "genes.json", found.genes)
    _write_json(tmp / "label_values.json", values)
    n_input = found.shape[0]
    dropped = {"min_genes": int(n_input - found.n_non_primary - len(cells))}
    if found.n_non_primary:
        dropped["non_primary"] = found.n_non_primary
    fg = found.file_genes
    return {
        "name": spec.name,
        "path": str(path),
        "organism": found.organism.curie,
        "taxon": found.organism.taxon,
        "organism_name": found.organism.name,
        "counts_source": found.source,
        "label_columns": columns,
        "n_input": int(n_input),
        "n_kept": int(len(cells)),
        "n_genes": len(found.genes),
        "genes": {"n_var": len(fg.names), "id_source": fg.id_source,
                  "symbol_source": fg.symbol_source, **found.plan.counts},
        "dropped": dropped,
    }


@dataclass
class CountsFile:
    """An open .h5ad checked by ``open_counts``; its counts are validated as they stream."""

    path: Path
    obs: h5py.Group
    obs_columns: list[str]
    organism: Organism
    source: str  # the matrix holding the raw counts: "X", "raw.X" or "layers['<name>']"
    file_genes: FileGenes  # what each column of the matrix is
    plan: GenePlan  # the columns as the organism's canonical genes
    primary: np.ndarray | None  # bool per cell: kept by the is_primary_data rule (None: all)
    cfg: IngestConfig
    _reader: _RowReader = field(repr=False)

    @property
    def genes(self) -> list[str]:
        """Canonical gene of each column of the streamed counts."""
        return self.plan.genes

    @property
    def shape(self) -> tuple[int, int]:
        """(cells in the file, genes after mapping and merging)."""
        return self._reader.shape[0], len(self.plan.genes)

    @property
    def n_non_primary(self) -> int:
        return 0 if self.primary is None else int((~self.primary).sum())

    def stream(self, out_dir: Path, progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Validate, map to genes and QC the counts chunk by chunk into ``out_dir`` (CSR
        ``indptr``, ``indices``, ``data`` and per kept cell ``cells``, ``nnz``, ``total``, as
        ``.npy``); returns the kept obs rows. ``progress(n)`` is called after each chunk of
        ``n`` rows."""
        out = {
            "indptr": atomic.NpyAppender(out_dir / "indptr.npy", np.int64),
            "indices": atomic.NpyAppender(out_dir / "indices.npy", np.int32),
            "data": atomic.NpyAppender(out_dir / "data.npy", np.float32),
            "cells": atomic.NpyAppender(out_dir / "cells.npy", np.int64),
            "nnz": atomic.NpyAppender(out_dir / "nnz.npy", np.int32),
            "total": atomic.NpyAppender(out_dir / "total.npy", np.float32),
        }
        try:
            with self._reader.by_rows(out_dir / "csc-rows", self.cfg.chunk_cells) as reader:
                _append_kept_cells(reader, out, self.cfg, self.plan, self.primary, progress)
        except BaseException:
            for a in out.values():
                a.abort()
            raise
        for a in out.values():
            a.close()
        return np.load(out_dir / "cells.npy")


@contextmanager
def open_counts(path: str | Path, cfg: IngestConfig, gene_column: str | None = None,
                organism: Organism | str | None = None,
                organism_hint: str = ORGANISM_FROM_SHEET,
                symbols: SymbolMap | None = None) -> Iterator[CountsFile]:
    """Open an .h5ad and check what reading its counts needs, for ingest and pretrain.embed.

    Checks that it is AnnData; takes ``organism`` (resolved) or the file's one organism (obs,
    then uns), else ``cfg.organism`` (``organism_hint`` tells the user how to give one the file
    lacks); chooses the count matrix (see the module docstring); reads its genes (var names, or
    ``gene_column`` of var, one per column) and plans them as canonical genes through
    ``symbols``; reads ``is_primary_data`` unless ``cfg.keep_non_primary``. Raises DatasetError
    naming the file.
    """
    path = Path(path)
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise DatasetError(path, f"unreadable file, not HDF5/.h5ad ({e})") from None
    with f:
        for key in ("obs", "var"):
            if key not in f:
                raise DatasetError(path, f"not an AnnData file (no '{key}' group)")
        obs_cols = _columns(f["obs"], path)
        try:
            if organism is None:
                found = _file_organism(f, obs_cols, path, organism_hint, cfg.organism)
            else:
                found = resolve_organism(organism)
        except ValueError as e:
            raise DatasetError(path, str(e)) from None
        source, matrix, var = _choose_counts(f, path, cfg)
        reader = _RowReader(matrix, path, source)
        if reader.shape[0] == 0:
            raise DatasetError(path, f"no cells ({source} has 0 rows)")
        file_genes = _file_genes(var, gene_column, path, source, found)
        n_genes = len(file_genes.names)
        if n_genes != reader.shape[1]:
            raise DatasetError(path, f"{source} has {reader.shape[1]} columns, {n_genes} genes")
        plan = plan_genes(file_genes, (symbols or SymbolMap()).get(found),
                          cfg.drop_unmapped_genes)
        primary = None
        if not cfg.keep_non_primary and PRIMARY_COLUMN in obs_cols:
            primary = _primary_cells(_read_column(f["obs"], PRIMARY_COLUMN), path)
            if len(primary) != reader.shape[0]:
                raise DatasetError(path, f"obs has {len(primary)} rows, {source} "
                                         f"{reader.shape[0]}")
        yield CountsFile(path, f["obs"], obs_cols, found, source, file_genes, plan, primary, cfg,
                         reader)


def scan_genes(spec: DatasetSpec, cfg: IngestConfig) -> FileGenes:
    """What a dataset's columns are (organism, ids, symbols, features left out), read from its
    var without its counts: the pass that collects symbol-id pairs before any ingest."""
    with open_counts(spec.path, cfg, spec.gene_column, spec.organism) as found:
        return found.file_genes


# ---------------------------------------------------------------------------- counts


class _RowReader:
    """Row chunks of an AnnData matrix element (CSR, CSC or dense) as CSR, read on demand.

    CSR and dense matrices are sliced directly. A CSC matrix is not: a range of its rows has
    entries in every column, so a row slice through anndata reads all the matrix's entries and
    a file of n cells read in chunks costs O(n^2). Its rows are read inside ``by_rows``, which
    first sorts its entries into row-range files (``csc_rows.CscRows``, one pass over them).
    """

    def __init__(self, elem: h5py.Group | h5py.Dataset, path: Path, source: str):
        self.path, self.source = path, source
        self._indptr = self._csc_indptr = None
        self._csc: CscRows | None = None
        if isinstance(elem, h5py.Dataset):
            if elem.ndim != 2:
                raise DatasetError(path, f"{source} is not a 2-d matrix")
            self.shape = tuple(elem.shape)
        else:
            kind = elem.attrs.get("encoding-type", elem.attrs.get("h5sparse_format", ""))
            if kind in ("csr_matrix", "csr"):
                self._indptr = elem["indptr"][:].astype(np.int64)
            elif kind in ("csc_matrix", "csc"):
                self._csc_indptr = elem["indptr"][:].astype(np.int64)
            else:
                raise DatasetError(path, f"{source}: unsupported matrix encoding {kind!r}")
            self.shape = tuple(int(x) for x in elem.attrs["shape"])
        self._elem = elem

    @contextmanager
    def by_rows(self, scratch: Path, chunk_rows: int) -> Iterator[_RowReader]:
        """The context in which ``rows`` reads a CSC matrix in chunks of ``chunk_rows`` rows,
        from row-range files written into ``scratch`` (removed on exit; 12-16 bytes per stored
        count). CSR and dense matrices need none."""
        if self._csc_indptr is None:
            yield self
            return
        try:
            try:
                self._csc = CscRows.write(self._elem, self._csc_indptr, self.shape, scratch,
                                          chunk_rows)
            except ValueError as e:
                raise DatasetError(self.path, f"{self.source}: {e}") from None
            yield self
        finally:
            self._csc = None
            shutil.rmtree(scratch, ignore_errors=True)

    def first_values(self, n_rows: int) -> np.ndarray:
        """Stored values of the first ``n_rows`` rows (of a CSC matrix: as many stored values,
        in its order), for a look at what kind of numbers the matrix holds."""
        if self._csc_indptr is None:
            return self.rows(0, min(self.shape[0], n_rows)).data
        per_row = self._csc_indptr[-1] / max(self.shape[0], 1)
        return self._elem["data"][: int(np.ceil(per_row * n_rows))]

    def rows(self, start: int, stop: int) -> sp.csr_matrix:
        e = self._elem
        if self._indptr is not None:
            a, b = int(self._indptr[start]), int(self._indptr[stop])
            ptr = self._indptr[start : stop + 1] - a
            m = sp.csr_matrix((e["data"][a:b], e["indices"][a:b], ptr),
                              shape=(stop - start, self.shape[1]))
        elif self._csc_indptr is not None:
            if self._csc is None:
                raise RuntimeError("rows of a CSC matrix are read inside by_rows()")
            m = self._csc.rows(start, stop)
        else:
            block = e[start:stop]
            ncol = max(1, block.shape[1])
            _validate(block.ravel(), self.path, self.source, lambda i: start + i // ncol)
            m = sp.csr_matrix(block)
        return m


def _choose_counts(f: h5py.File, path: Path, cfg: IngestConfig):
    """(source name, matrix element, var group) of the raw counts; see the module docstring."""
    layers = f.get("layers")
    has_raw = "raw" in f and "X" in f["raw"]
    choice = cfg.counts_source
    if choice == "auto":
        if layers is not None and "counts" in layers:
            choice = "counts"
        elif "X" in f and (not has_raw or _looks_like_counts(f["X"], path, cfg)):
            choice = "X"
        elif has_raw:
            choice = "raw"
        else:
            raise DatasetError(path, "no count matrix (no X, layers['counts'] or raw.X)")
    if choice == "X":
        if "X" not in f:
            raise DatasetError(path, "no X matrix")
        return "X", f["X"], f["var"]
    if choice == "raw":
        if not has_raw:
            raise DatasetError(path, "no raw.X matrix")
        if "var" not in f["raw"]:
            raise DatasetError(path, "raw.X has no raw.var gene table")
        return "raw.X", f["raw"]["X"], f["raw"]["var"]
    if layers is None or choice not in layers:
        raise DatasetError(path, f"no layer {choice!r}")
    return f"layers['{choice}']", layers[choice], f["var"]


def _looks_like_counts(elem, path: Path, cfg: IngestConfig) -> bool:
    reader = _RowReader(elem, path, "X")
    try:
        d = reader.first_values(cfg.chunk_cells)
    except DatasetError:
        return False
    return bool(np.all(np.isfinite(d)) and np.all(d >= 0) and np.all(d == np.round(d)))


def _validate(values: np.ndarray, path: Path, source: str, row_of) -> None:
    """Raise DatasetError at the first NaN/inf, negative or non-integer count.

    ``row_of(i)`` maps a position in ``values`` to its obs row, for the message.
    """
    if values.dtype.kind == "f":
        checks = [
            (~np.isfinite(values), "NaN/inf"),
            (values < 0, "negative"),
            (values != np.round(values), "non-integer"),
        ]
    elif values.dtype.kind in "iub":
        checks = [(values < 0, "negative")]
    else:
        raise DatasetError(path, f"{source} has non-numeric dtype {values.dtype}")
    for bad, what in checks:
        if bad.any():
            i = int(np.argmax(bad))
            hint = (" (normalised data? provide raw counts in layers['counts'] or raw.X)"
                    if what == "non-integer" else "")
            raise DatasetError(
                path, f"{what} values in {source} (e.g. {values[i].item()!r} in cell {row_of(i)}); "
                f"expected raw integer counts{hint}"
            )


def _append_kept_cells(reader: _RowReader, out: dict[str, atomic.NpyAppender],
                       cfg: IngestConfig, plan: GenePlan, primary: np.ndarray | None,
                       progress: Callable[[int], None] | None) -> None:
    """Read the matrix chunk by chunk (validated, genes as the plan's, QC'd) and append the kept
    cells' CSR rows to ``out``, so memory stays one chunk whatever the file's size."""
    out["indptr"].append(np.zeros(1, np.int64))
    offset = 0
    n = reader.shape[0]
    for start in range(0, n, cfg.chunk_cells):
        stop = min(n, start + cfg.chunk_cells)
        m = reader.rows(start, stop)
        _validate(m.data, reader.path, reader.source,
                  lambda i, p=m.indptr, s=start: s + int(np.searchsorted(p, i, side="right")) - 1)
        if not plan.identity:
            m = _to_genes(m, plan)
        m.sum_duplicates()  # also sorts the column indices
        m.eliminate_zeros()
        nnz = np.diff(m.indptr)
        passed = nnz >= cfg.min_genes
        if primary is not None:
            passed &= primary[start:stop]
        keep = np.flatnonzero(passed)
        kept = m[keep]
        out["indptr"].append(offset + np.cumsum(nnz[keep], dtype=np.int64))
        offset += int(kept.nnz)
        out["indices"].append(kept.indices)
        out["data"].append(kept.data)
        out["cells"].append(start + keep)
        out["nnz"].append(nnz[keep])
        out["total"].append(np.asarray(kept.sum(axis=1, dtype=np.float64)).ravel())
        if progress is not None:
            progress(stop - start)


def _to_genes(m: sp.csr_matrix, plan: GenePlan) -> sp.csr_matrix:
    """Columns of a chunk as the plan's genes: left-out columns removed, merged ones summed
    (in float64, exact for integer counts, stored back as float32)."""
    cols = plan.column[m.indices]
    take = cols >= 0
    rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))[take]
    merged = sp.csr_matrix((m.data[take].astype(np.float64), (rows, cols[take])),
                           shape=(m.shape[0], len(plan.genes)))
    return merged.astype(np.float32)


# ---------------------------------------------------------------------------- genes, organism


def _columns(df: h5py.Group, path: Path) -> list[str]:
    if "encoding-type" not in df.attrs:
        raise DatasetError(path, "unsupported pre-0.7 AnnData layout; re-save it with anndata")
    return [str(c) for c in df.attrs.get("column-order", [])]


def _read_column(df: h5py.Group, name: str) -> pd.Series:
    return pd.Series(read_elem(df[name]))


def _file_genes(var: h5py.Group, column: str | None, path: Path, source: str,
                organism: Organism) -> FileGenes:
    """The var table's gene names with its other text columns (ids, symbols, feature types)."""
    names = _gene_ids(var, column, path, source)
    text = {}
    for col in _columns(var, path):
        if col != column and var[col].attrs.get("encoding-type") in ("categorical",
                                                                     "string-array"):
            text[col] = _read_column(var, col).tolist()
    return describe_var(organism, names, text, f"var[{column!r}]" if column else "var_names")


def _primary_cells(values: pd.Series, path: Path) -> np.ndarray:
    """True for cells to keep under the is_primary_data rule (missing values count as primary)."""
    if values.dtype == bool:
        return values.to_numpy()
    text = values.astype(str).str.strip().str.lower()
    bad = ~text.isin(["true", "false", "1", "0", "nan", "none", ""])
    if bad.any():
        raise DatasetError(path, f"obs['{PRIMARY_COLUMN}'] holds {values[bad].iloc[0]!r}; "
                                 "expected True/False")
    return ~text.isin(["false", "0"]).to_numpy()


def _gene_ids(var: h5py.Group, column: str | None, path: Path, source: str) -> list[str]:
    cols = _columns(var, path)
    if column is not None:
        if column not in cols:
            raise DatasetError(path, f"gene_column {column!r} not in var (columns: {cols})")
        key = column
    else:
        key = var.attrs.get("_index", "_index")
    genes = _read_column(var, key)
    missing = genes.isna()
    genes = genes.astype(str).str.strip()
    if missing.any() or (genes == "").any():
        raise DatasetError(path, f"empty gene ids in {'var.' + column if column else 'var_names'}")
    dup = genes[genes.duplicated()]
    if len(dup):
        raise DatasetError(
            path, f"duplicated gene ids for {source}: {len(dup)} duplicates, "
            f"e.g. {sorted(set(dup))[:5]} (deduplicate or choose another gene_column)"
        )
    return genes.tolist()


def _file_organism(f: h5py.File, obs_cols: list[str], path: Path, hint: str,
                   default: str | None) -> Organism:
    """The dataset organism from obs, then uns (schema keys), else ``default``; one organism per
    file. ``hint`` ends the error when there is none: how the caller's user can give it."""
    found = None
    for key in ("organism_ontology_term_id", "organism"):
        if key in obs_cols:
            values = sorted(set(_read_column(f["obs"], key).dropna().astype(str)))
            if len(values) > 1:
                raise DatasetError(path, f"several organisms in obs['{key}'] ({values[:5]}); "
                                         "split the file, one organism per dataset")
            if values:
                found = values[0]
                break
        if found is None and "uns" in f and key in f["uns"]:
            value = read_elem(f["uns"][key])
            found = str(value.item() if isinstance(value, np.ndarray) else value)
            break
    if found is None:
        found = default
    if found is None:
        raise DatasetError(path, f"unknown organism: none in obs or uns; {hint}")
    try:
        return resolve_organism(found)
    except ValueError as e:
        raise DatasetError(path, str(e)) from None


# ---------------------------------------------------------------------------- labels


def _label_sources(spec: DatasetSpec, obs_cols: list[str], path: Path) -> dict[str, str | None]:
    """class -> obs column used (None: no label). The organism class comes from the dataset."""
    out: dict[str, str | None] = {}
    for cls in CLASSES:
        if cls == "organism":
            continue
        given = spec.label_columns.get(cls)
        if given == NO_LABEL:
            out[cls] = None
        elif given:
            if given not in obs_cols:
                raise DatasetError(path, f"sheet names obs column {given!r} for {cls}; "
                                         f"the file has no such column (obs: {obs_cols})")
            out[cls] = given
        else:
            schema = ["tissue_type"] if cls == "cell_culture" else [cls, f"{cls}_ontology_term_id"]
            out[cls] = next((c for c in schema if c in obs_cols), None)
    return out


def _normalise(value, cls: str) -> str | None:
    """A label string, or None for unknown. cell_culture becomes CULTURE / NOT_CULTURE."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    text = str(value).strip()
    key = text.lower()
    if key in UNKNOWN_VALUES:
        return None
    if cls == "cell_culture":
        if key in _CULTURE_VALUES:
            return CULTURE
        return NOT_CULTURE if key in _NOT_CULTURE_VALUES or key else None
    return text


def _extract_labels(obs: h5py.Group, columns: dict[str, str | None], cells: np.ndarray,
                    organism: Organism) -> tuple[np.ndarray, dict[str, list[str]]]:
    codes = np.full((len(cells), len(CLASSES)), UNKNOWN, dtype=np.int32)
    values: dict[str, list[str]] = {}
    for j, cls in enumerate(CLASSES):
        if cls == "organism":
            values[cls] = [organism.curie]
            codes[:, j] = 0
            continue
        col = columns[cls]
        if col is None:
            values[cls] = []
            continue
        cat = _read_column(obs, col).astype("category")
        names = [_normalise(v, cls) for v in cat.cat.categories]
        uniq = sorted({v for v in names if v is not None})
        index = {v: i for i, v in enumerate(uniq)}
        table = np.array([index.get(v, UNKNOWN) for v in names] + [UNKNOWN], dtype=np.int32)
        cell_codes = table[np.asarray(cat.cat.codes)[cells]]  # code -1 (NaN) hits the last slot
        present = np.unique(cell_codes[cell_codes >= 0])
        remap = np.full(len(uniq) + 1, UNKNOWN, dtype=np.int32)
        remap[present] = np.arange(len(present), dtype=np.int32)
        codes[:, j] = remap[cell_codes]
        values[cls] = [uniq[i] for i in present]
    return codes, values


# ---------------------------------------------------------------------------- files


def _write_json(path: Path, obj) -> None:
    atomic.write_json(path, obj, indent=1, sort_keys=True, ensure_ascii=False)
