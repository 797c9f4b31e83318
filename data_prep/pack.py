"""Packing: turn the weighted streams of cells (one per epoch, and the eval cells) into
deterministic, resumable tar shards.

Memory stays flat as the corpus grows: a shard reads only the rows it needs (its cells, their
neighbours and their CSR rows) with ``os.pread``, never through a memory map, and the corpus-wide
state the packer holds is the plan's O(stream) arrays, read per shard as well. A shard is done
when its final file exists; it is written to a temporary name and renamed, with its size and
sha256 in a sidecar, so a run killed at any point and rerun produces the same bytes.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import os
import re
import signal
import tarfile
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep.labels import map_labels
from data_prep.shard_format import (
    CONTEXT_GENES,
    FLAG_METACELL,
    MAX_NEIGHBOURS,
    SAMPLE_EXT,
    CellSample,
    compressor,
    encode_sample,
    member_bytes,
    sample_bytes_bound,
    sample_key,
)
from utils import atomic

# Test hook: kill this process with SIGKILL after writing this many samples (resumability tests).
FAULT_ENV = "SCPRETRAIN_FAULT_AFTER_SAMPLES"
SHARD_KEYS = ("path", "n_samples", "bytes", "sha256")  # a shard's manifest entry
# Bin edges of the expressed-genes histogram each shard records for the report.
N_EXPR_EDGES = np.unique(np.geomspace(1, 100_000, 121).round()).astype(np.int64)
# Byte ranges closer than this are read in one call (the bytes between are read and dropped).
READ_GAP = 4096
# Share of the drawn samples packed as meta-cells: the smallest (in steps of 0.05) that brings
# more than half of the packed profiles above 3,200 expressed genes, as in scPRINT-2, both on the
# deepest real file (3.3% of its cells, 6.5% packed without meta-cells, 56% with this share) and
# on a derived deep input (15.7%, 18.9%, 51%); benchmarks/bench_depth.py,
# docs/benchmarks/data_prep.md.
METACELL_FRACTION = 0.75
EVAL = "eval"  # name of the evaluation stream


@dataclass
class PackConfig:
    """What goes into the streams and how they are cut into shards."""

    stream_size: int | None = None  # train samples per epoch; None = number of train cells
    epochs: int = 1  # epochs packed: each its own draw, seed and curriculum gamma
    eval_fraction: float = 0.0  # share of each training dataset's cells held out into eval
    eval_datasets: list[str] = field(default_factory=list)  # whole datasets held out into eval
    metacell_fraction: float = METACELL_FRACTION  # share of drawn samples packed as meta-cells
    shard_samples: int = 1000  # at most this many samples per shard
    shard_mb: float = 256.0  # and at most this many MiB per shard (bound computed up front)
    context_genes: int = CONTEXT_GENES  # pad the gene list with neighbour genes up to this size
    neighbours: int = MAX_NEIGHBOURS


@dataclass
class PackDataset:
    """One accepted dataset as the packer sees it; its cells are rows offset..offset+n_cells of
    the corpus-wide arrays."""

    id: int
    name: str
    ingest_dir: str
    graph_dir: str
    taxon: int
    offset: int
    n_cells: int
    n_held: int = 0  # cells held out for evaluation


# ---------------------------------------------------------------------------------------------
# Hold-out, seeds and shard cuts


def holdout_mask(n_cells: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """Held-out cells of one dataset. Seeded by the dataset's name, not its position, so adding
    another dataset does not change which cells are held out here."""
    mask = np.zeros(n_cells, dtype=bool)
    n_hold = int(round(fraction * n_cells))
    if n_hold:
        rng = np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])
        mask[rng.permutation(n_cells)[:n_hold]] = True
    return mask


def held_out_cells(name: str, n_cells: int, cfg: PackConfig, seed: int) -> np.ndarray:
    """The cells of dataset ``name`` that go to the eval shards only: all of them for a dataset
    named in ``cfg.eval_datasets``, else a seeded ``cfg.eval_fraction`` of them. The graph stage
    uses the same mask to keep held-out cells out of training samples' neighbours."""
    if name in cfg.eval_datasets:
        return np.ones(n_cells, dtype=bool)
    return holdout_mask(n_cells, cfg.eval_fraction, seed, name)


def check_pack_config(cfg: PackConfig, names: list[str]) -> None:
    """Settings in range, and every ``--eval-datasets`` name a dataset of the build (``names``):
    a typo would silently train on the dataset meant for evaluation."""
    if cfg.epochs < 1:
        raise ValueError(f"--epochs must be at least 1, not {cfg.epochs}")
    for flag, value in (("--eval-fraction", cfg.eval_fraction),
                        ("--metacell-fraction", cfg.metacell_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{flag} must be in [0, 1], not {value}")
    unknown = sorted(set(cfg.eval_datasets) - set(names))
    if unknown:
        raise ValueError(f"--eval-datasets: no dataset named {', '.join(unknown)} in this build "
                         f"(datasets: {', '.join(names)})")


def epoch_seed(seed: int, epoch: int) -> int:
    """The seed of epoch ``epoch``'s draw: its own stream, reproducible from (seed, epoch)."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def shard_bounds(member_size: np.ndarray, max_samples: int, max_bytes: int) -> np.ndarray:
    """Cut a stream into shards of at most ``max_samples`` samples and ``max_bytes`` bytes (a
    single larger sample gets a shard of its own). Returns boundaries [0, ..., n]."""
    n = member_size.shape[0]
    cum = np.concatenate([[0], np.cumsum(member_size, dtype=np.int64)])
    bounds = [0]
    while bounds[-1] < n:
        start = bounds[-1]
        by_bytes = int(np.searchsorted(cum, cum[start] + max_bytes, side="right")) - 1
        bounds.append(min(n, start + max_samples, max(by_bytes, start + 1)))
    return np.asarray(bounds, dtype=np.int64)


# ---------------------------------------------------------------------------------------------
# Reading rows without memory maps


# The header numpy writes for a plain array ("{'descr': '<i8', 'fortran_order': False, 'shape':
# (60, 6), }" padded with spaces): parsed here without numpy's literal_eval, which took a fifth of
# the packing time when a shard reads a dozen small files from each of hundreds of datasets.
_PLAIN_HEADER = re.compile(rb"\{'descr': '([<>|=][a-z]\d+)', 'fortran_order': (False|True), "
                           rb"'shape': \(((?:\d+, ?)*\d*)\), \} *\n")


def _npy_header(fd: int, path: Path) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """(shape, fortran order, dtype, data offset) of the ``.npy`` file open at ``fd``; any header
    the fast pattern does not match goes to numpy's own reader."""
    head = os.pread(fd, 4096, 0)
    if head[:6] == b"\x93NUMPY" and head[6] in (1, 2, 3):
        size, start = ((int.from_bytes(head[8:10], "little"), 10) if head[6] == 1
                       else (int.from_bytes(head[8:12], "little"), 12))
        m = _PLAIN_HEADER.fullmatch(head, start, start + size)
        if m is not None:
            shape = tuple(int(x) for x in m[3].split(b",") if x.strip())
            return shape, m[2] == b"True", np.dtype(m[1].decode()), start + size
    with open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        return shape, fortran, dtype, f.tell()


class NpyRows:
    """Rows of a ``.npy`` file read with ``os.pread`` into private buffers.

    Not memory-mapped on purpose: a mapped page counts in the process RSS for as long as the map
    lives, and on a read fault the kernel maps the already cached pages around it too (fault-
    around, 64 KiB), so scattered reads of a few thousand rows from a 1 GB mapped CSR array leave
    most of it resident. Reading only the needed byte ranges keeps packing memory proportional to
    the shard being built, whatever the size of the dataset.
    """

    def __init__(self, path: Path):
        self.path = path
        fd = os.open(path, os.O_RDONLY)
        try:
            shape, fortran, dtype, self.offset = _npy_header(fd, path)
            if fortran and len(shape) > 1:
                raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        self.shape = shape
        self.row = np.dtype((dtype, shape[1:])) if len(shape) > 1 else dtype

    def __enter__(self) -> NpyRows:
        return self

    def __exit__(self, *exc) -> None:
        os.close(self.fd)

    def rows(self, rows: np.ndarray) -> np.ndarray:
        """``array[rows]`` for any int row array (repeats and any order allowed)."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size == 1:  # most reads of a shard drawn from many datasets
            row = int(rows.reshape(-1)[0])
            out = self.range(row, row + 1)
            return out.reshape(rows.shape + out.shape[1:])
        uniq, inv = np.unique(rows, return_inverse=True)
        buf, pos = self.spans(uniq, uniq + 1)
        out = buf[pos[inv.reshape(-1)]]
        return out.reshape(rows.shape + out.shape[1:])

    def range(self, start: int, stop: int) -> np.ndarray:
        """``array[start:stop]`` in one read."""
        if start < 0 or stop > self.shape[0] or start > stop:
            raise ValueError(f"{self.path}: rows out of range")
        buf = np.empty(stop - start, dtype=self.row)
        self._read(memoryview(buf.view(np.uint8).reshape(-1)), start)
        return buf

    def spans(self, starts: np.ndarray, stops: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Rows [starts[i], stops[i]) of sorted, disjoint spans, read with one pread per run of
        spans less than READ_GAP bytes apart. Returns (buffer of rows, start of span i in it)."""
        n = starts.shape[0]
        size = self.row.itemsize
        if n == 0:
            return np.zeros(0, self.row), np.zeros(0, dtype=np.int64)
        if n == 1:
            return self.range(int(starts[0]), int(stops[0])), np.zeros(1, dtype=np.int64)
        if int(stops[-1]) > self.shape[0] or int(starts[0]) < 0:
            raise ValueError(f"{self.path}: rows out of range")
        gap = (starts[1:] - stops[:-1]) * size
        first = np.concatenate([[0], np.flatnonzero(gap > READ_GAP) + 1])
        run_start = starts[first]
        run_stop = stops[np.concatenate([first[1:] - 1, [n - 1]])]
        run_at = np.concatenate([[0], np.cumsum(run_stop - run_start)])
        buf = np.empty(int(run_at[-1]), dtype=self.row)
        raw = memoryview(buf.view(np.uint8).reshape(-1))
        for a, b, at in zip(run_start.tolist(), run_stop.tolist(), run_at.tolist()):
            self._read(raw[at * size:(at + b - a) * size], a)
        run_of = np.repeat(np.arange(first.shape[0]), np.diff(np.concatenate([first, [n]])))
        return buf, run_at[run_of] + (starts - run_start[run_of])

    def _read(self, view: memoryview, row: int) -> None:
        """Fill ``view`` with the file's bytes from row ``row`` on."""
        offset = self.offset + row * self.row.itemsize
        while len(view):
            got = os.preadv(self.fd, [view], offset)
            if got == 0:
                raise ValueError(f"{self.path}: file is shorter than its header says")
            view, offset = view[got:], offset + got


def read_rows(path: Path, rows: np.ndarray) -> np.ndarray:
    """``np.load(path)[rows]`` reading only those rows."""
    with NpyRows(path) as f:
        return f.rows(rows)


def read_range(path: Path, start: int, stop: int) -> np.ndarray:
    """``np.load(path)[start:stop]`` reading only those rows."""
    with NpyRows(path) as f:
        return f.range(start, stop)


def read_array(path: Path) -> np.ndarray:
    """``np.load(path)`` of an array of one or more dimensions, through the same reader."""
    with NpyRows(path) as f:
        return f.range(0, f.shape[0])


# ---------------------------------------------------------------------------------------------
# Building one sample


def align_sample(
    cell_cols: np.ndarray,
    cell_vals: np.ndarray,
    nbr_cols: list[np.ndarray],
    nbr_vals: list[np.ndarray],
    genes: GeneOrder,
    context: int,
    metacell: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gene ids, own counts and neighbour counts of one sample (see CellSample).

    Own expressed genes come first in ascending global id; then up to ``context - n_expr`` genes
    only neighbours express, by summed neighbour count (ties: lower id first). A meta-cell's
    counts are the sum of the cell and its neighbours over the union of their genes (integer
    counts stay integers: a deeper profile, as in scPRINT-2's code), and it has no neighbours:
    they are inside its counts, so handing them in would give the target away.
    """
    k = len(nbr_cols)
    ranks = genes.rank[np.concatenate([cell_cols, *nbr_cols])]
    vals = np.concatenate([cell_vals, *nbr_vals]).astype(np.float32, copy=False)
    union = genes.union(ranks)  # ascending rank = ascending global id
    n_union = union.shape[0]
    rows = np.repeat(
        np.arange(k + 1) * n_union,  # not arange's step: the union is empty when no one has counts
        [cell_cols.shape[0], *(c.shape[0] for c in nbr_cols)],
    )
    dense = np.zeros((k + 1, n_union), dtype=np.float32)
    dense.ravel()[rows + genes.position[ranks]] = vals
    if metacell:
        own = dense.sum(axis=0)
        expressed = np.flatnonzero(own > 0)
        gids = genes.sorted_gid[union[expressed]].astype(np.uint32)
        return gids, own[expressed], dense[:0, expressed]
    own = dense[0]
    nbr_sum = dense[1:].sum(axis=0)
    expressed = np.flatnonzero(own > 0)
    extra = np.flatnonzero((own <= 0) & (nbr_sum > 0))
    n_pad = min(max(0, context - expressed.shape[0]), extra.shape[0])
    # stable sort on a gid-ascending array: ties keep the lower id first
    extra = extra[np.argsort(-nbr_sum[extra], kind="stable")[:n_pad]]
    take = np.concatenate([expressed, extra])
    gids = genes.sorted_gid[union[take]]
    return gids.astype(np.uint32), own[expressed], dense[1:, take]


class GeneOrder:
    """A dataset's gene columns ranked by global id, with reusable buffers to take the union of a
    few sparse rows in O(nnz) with the result already in ascending global id.

    The ranks come from the plan (``save_dataset_maps``), made once per dataset: a shard builds a
    GeneOrder for every dataset it draws from, and with hundreds of datasets per shard an argsort
    each time (about 2 ms at 30,000 genes, 4 ms at 60,000) was most of the packing time.
    """

    def __init__(self, col2gid: np.ndarray, rank: np.ndarray | None = None):
        # as intp: int32 index arrays are converted on every use, per sample
        self.rank = (gene_ranks(col2gid) if rank is None else rank).astype(np.intp)
        self.sorted_gid = np.empty_like(col2gid)
        self.sorted_gid[self.rank] = col2gid
        self.mark = np.zeros(col2gid.shape[0], dtype=bool)
        self.position = np.zeros(col2gid.shape[0], dtype=np.int64)

    @classmethod
    def load(cls, plan_dir: Path, ds_id: int) -> GeneOrder:
        """Dataset ``ds_id``'s order from the plan (ranked here if its plan predates the
        saved ranks)."""
        ranks = plan_dir / f"colrank-{ds_id}.npy"
        return cls(read_array(plan_dir / f"col2gid-{ds_id}.npy"),
                   read_array(ranks) if ranks.exists() else None)

    def union(self, ranks: np.ndarray) -> np.ndarray:
        self.mark[ranks] = True
        union = np.flatnonzero(self.mark)
        self.mark[union] = False
        self.position[union] = np.arange(union.shape[0])
        return union


class _ShardRows:
    """The rows of one dataset that one shard needs (its cells, their neighbours, the CSR rows
    of both), read in one pass and released once its samples are encoded."""

    def __init__(self, ds: PackDataset, plan_dir: Path, rows: np.ndarray, neighbours: int):
        ing, gra = Path(ds.ingest_dir), Path(ds.graph_dir)
        self.ds = ds
        self.genes = GeneOrder.load(plan_dir, ds.id)
        self.label_map = read_array(plan_dir / f"labelmap-{ds.id}.npy")
        self.nbr = read_rows(gra / "nbr_idx.npy", rows)[:, :neighbours]
        self.dist = read_rows(gra / "nbr_dist.npy", rows)[:, :neighbours]
        self.keep = (self.nbr >= 0) & (self.nbr != rows[:, None])
        self.codes = read_rows(ing / "label_codes.npy", rows)
        self.nnz = read_rows(ing / "nnz.npy", rows)
        self.total = read_rows(ing / "total.npy", rows)
        self.cell = read_rows(ing / "cells.npy", rows)
        self.nbr_cell = read_rows(ing / "cells.npy", np.where(self.keep, self.nbr, rows[:, None]))
        self.union = np.unique(np.concatenate([rows, self.nbr[self.keep]]))
        ptr = read_rows(ing / "indptr.npy", np.concatenate([self.union, self.union + 1]))
        lo, hi = ptr[: self.union.shape[0]], ptr[self.union.shape[0]:]
        self.length = hi - lo
        with NpyRows(ing / "indices.npy") as f:
            self.cols, self.at = f.spans(lo, hi)
        with NpyRows(ing / "data.npy") as f:
            self.vals, at = f.spans(lo, hi)
        assert np.array_equal(at, self.at)
        self.rows = rows

    def _row(self, r: int) -> tuple[np.ndarray, np.ndarray]:
        u = int(np.searchsorted(self.union, r))
        s = int(self.at[u])
        e = s + int(self.length[u])
        return self.cols[s:e], self.vals[s:e]

    def sample(
        self, i: int, metacell: bool, context: int, group: int, pseudo: int, weight: float
    ) -> CellSample:
        """Sample of the shard's ``i``-th row of this dataset."""
        keep = self.keep[i]
        nbr = self.nbr[i][keep]
        cols, vals = self._row(int(self.rows[i]))
        nbr_rows = [self._row(int(j)) for j in nbr]
        gene_ids, counts, nbr_counts = align_sample(
            cols, vals, [c for c, _ in nbr_rows], [v for _, v in nbr_rows], self.genes, context,
            metacell,
        )
        codes = self.codes[i].astype(np.int64)
        if metacell:
            nnz, total = counts.shape[0], float(counts.sum(dtype=np.float64))
            keep = np.zeros_like(keep)
        else:
            nnz, total = int(self.nnz[i]), float(self.total[i])
        return CellSample(
            gene_ids=gene_ids,
            counts=counts,
            nbr_counts=nbr_counts,
            nbr_dist=self.dist[i][keep].astype(np.float32),
            nbr_cells=self.nbr_cell[i][keep].astype(np.uint32),
            labels=map_labels(self.label_map, codes),
            dataset=self.ds.id,
            cell=int(self.cell[i]),
            organism=self.ds.taxon,
            group=group,
            nnz=nnz,
            pseudo_label=pseudo,
            total_count=total,
            weight=weight,
            flags=FLAG_METACELL if metacell else 0,
        )


# ---------------------------------------------------------------------------------------------
# The plan: everything the shard writers need, on disk, so shards can be built in any process


def save_plan(plan_dir: Path, cfg: PackConfig, datasets: list[PackDataset],
              fingerprint: str) -> None:
    """Write ``plan.json``, which marks the plan complete: the per-dataset maps
    (``save_dataset_maps``), the corpus-wide ``group.npy`` and ``pseudo.npy`` (global cell ->
    group, pseudo-label; read per shard, never whole) and the eval stream come before it, the
    epochs' streams after it, each in its own folder."""
    meta = {"config": asdict(cfg), "datasets": [asdict(d) for d in datasets],
            "fingerprint": fingerprint}
    atomic.write_text(plan_dir / "plan.json", json.dumps(meta, sort_keys=True, indent=1))


def gene_ranks(col2gid: np.ndarray) -> np.ndarray:
    """int32 rank of each local column in ascending global gene id (ties by column)."""
    rank = np.empty(col2gid.shape[0], dtype=np.int32)
    rank[np.argsort(col2gid, kind="stable")] = np.arange(col2gid.shape[0], dtype=np.int32)
    return rank


def save_dataset_maps(plan_dir: Path, ds_id: int, col2gid: np.ndarray,
                      label_map: np.ndarray) -> None:
    """A dataset's gene map (local column -> global gene id), the columns' ranks in global id
    order (``gene_ranks``, read by every shard that packs its cells) and its label map: int32
    [9, n_codes + 1], the global label id of local code c at column c + 1 (column 0 maps the
    unknown code -1 to -1)."""
    atomic.save_npy(plan_dir / f"col2gid-{ds_id}.npy", col2gid.astype(np.int64))
    atomic.save_npy(plan_dir / f"colrank-{ds_id}.npy", gene_ranks(col2gid))
    atomic.save_npy(plan_dir / f"labelmap-{ds_id}.npy", label_map.astype(np.int32))


def plan_fingerprint(plan_dir: Path, stream: str | None = None) -> str | None:
    """Fingerprint of the complete plan in ``plan_dir``, or of one of its streams (None if there
    is none)."""
    path = plan_dir / "plan.json" if stream is None else plan_dir / stream / "stream.json"
    try:
        return json.loads(path.read_text())["fingerprint"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def stream_name(epoch: int) -> str:
    """The folder of epoch ``epoch``'s stream in the plan and the prefix of its shards."""
    return f"train-e{epoch:04d}"


def _dataset_of(datasets: list[PackDataset], cells: np.ndarray) -> np.ndarray:
    offsets = np.array([d.offset for d in datasets], dtype=np.int64)
    return np.searchsorted(offsets, cells, side="right") - 1


def member_bytes_bound(ds: PackDataset, rows: np.ndarray, metacell: np.ndarray,
                       cfg: PackConfig) -> np.ndarray:
    """Upper bound of the tar bytes of the samples of dataset ``ds``'s ``rows``: what the shard
    cuts are made from before anything is packed."""
    nbr = read_rows(Path(ds.graph_dir) / "nbr_idx.npy", rows)[:, : cfg.neighbours]
    valid = (nbr >= 0) & (nbr != rows[:, None])
    ds_nnz = Path(ds.ingest_dir) / "nnz.npy"
    nnz = read_rows(ds_nnz, rows).astype(np.int64)
    nbr_sum = np.where(valid, read_rows(ds_nnz, np.maximum(nbr, 0)), 0).sum(axis=1)
    bound = sample_bytes_bound(nnz, nbr_sum.astype(np.int64), valid.sum(axis=1), metacell,
                               cfg.context_genes)
    return member_bytes(bound)


def shard_name(stream: str, index: int) -> str:
    return f"shards/{stream}-{index:06d}.tar"


class Packer:
    """Writes the shards of a saved plan's streams; one instance per process."""

    def __init__(self, plan_dir: str | Path, out_dir: str | Path):
        self.plan_dir = Path(plan_dir)
        self.out_dir = Path(out_dir)
        meta = json.loads((self.plan_dir / "plan.json").read_text())
        self.cfg = PackConfig(**meta["config"])
        self.datasets = [PackDataset(**d) for d in meta["datasets"]]
        self.fault_after = int(os.environ.get(FAULT_ENV, "0"))
        self.written = 0
        self.zstd = compressor()

    def n_shards(self, stream: str) -> int:
        return np.load(self.plan_dir / stream / "bounds.npy").shape[0] - 1

    def done_record(self, stream: str, index: int, check_hash: bool = True) -> dict | None:
        """The record of a finished shard, or None if it must be (re)built. ``check_hash``
        reads the shard to compare its sha256 too (the pack stage does; the manifest stage,
        after the packers checked it as they wrote, compares sizes only)."""
        path = self.out_dir / shard_name(stream, index)
        side = self.plan_dir / stream / "done" / f"{index:06d}.json"
        if not path.exists() or not side.exists():
            return None
        rec = json.loads(side.read_text())
        if path.stat().st_size != rec["bytes"] or (
                check_hash and file_sha256(path) != rec["sha256"]):
            return None
        return rec

    def pack(self, stream: str, index: int) -> dict:
        """Build shard ``index`` of ``stream`` unless it is already done; return its record."""
        rec = self.done_record(stream, index)
        if rec is not None:
            return rec
        sdir = self.plan_dir / stream
        bounds = np.load(sdir / "bounds.npy")
        start, end = int(bounds[index]), int(bounds[index + 1])
        cells = read_range(sdir / "cells.npy", start, end)
        metacell = read_range(sdir / "metacell.npy", start, end)
        weight = read_range(sdir / "weight.npy", start, end)
        group = read_rows(self.plan_dir / "group.npy", cells).astype(np.int64)
        pseudo = read_rows(self.plan_dir / "pseudo.npy", cells).astype(np.int64)
        ds_of = _dataset_of(self.datasets, cells)
        # dataset by dataset: a shard drawn from many datasets holds the rows of one at a time
        # and the encoded samples (at most the shard's size), written in stream order after
        encoded = [b""] * cells.shape[0]
        n_expr = np.zeros(cells.shape[0], dtype=np.int64)
        for d in np.unique(ds_of):
            ds = self.datasets[d]
            mine = np.flatnonzero(ds_of == d)
            rows = _ShardRows(ds, self.plan_dir, cells[mine] - ds.offset, self.cfg.neighbours)
            for i, j in enumerate(mine.tolist()):
                sample = rows.sample(i, bool(metacell[j]), self.cfg.context_genes,
                                     int(group[j]), int(pseudo[j]), float(weight[j]))
                n_expr[j] = sample.n_expr
                encoded[j] = encode_sample(sample, self.zstd)
            del rows
        path = self.out_dir / shard_name(stream, index)
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                out = _HashingWriter(f)
                with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                    tar.copybufsize = 1 << 24  # one write per member
                    for j, body in enumerate(encoded):
                        _add_member(tar, f"{sample_key(start + j)}.{SAMPLE_EXT}", body)
                        self._count_for_fault()
            rec = {"path": shard_name(stream, index), "n_samples": end - start,
                   "bytes": out.n, "sha256": out.hash.hexdigest(),
                   "stats": {"n_expr_hist": np.histogram(n_expr, N_EXPR_EDGES)[0].tolist(),
                             "n_above_context": int((n_expr > self.cfg.context_genes).sum()),
                             "n_metacells": int(metacell.sum())}}
            atomic.write_text(sdir / "done" / f"{index:06d}.json", json.dumps(rec, sort_keys=True))
        del encoded
        _release_heap()
        return rec

    def _count_for_fault(self) -> None:
        self.written += 1
        if self.fault_after and self.written >= self.fault_after:
            os.kill(os.getpid(), signal.SIGKILL)


def _release_heap() -> None:
    """Hand freed heap memory back to the OS after a shard. glibc raises its mmap threshold as
    large buffers are freed, so later shard-sized buffers come from the heap and, unreleased,
    the peak RSS would creep up with the number of shards packed by one process."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only


class _HashingWriter:
    """File wrapper that hashes and counts what tarfile writes through it."""

    def __init__(self, f: io.BufferedWriter):
        self.f = f
        self.hash = hashlib.sha256()
        self.n = 0

    def write(self, b: bytes) -> int:
        self.f.write(b)
        self.hash.update(b)
        self.n += len(b)
        return len(b)

    def tell(self) -> int:
        return self.n


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


_WORKER: Packer | None = None


def _init_worker(plan_dir: str, out_dir: str) -> None:
    global _WORKER
    _WORKER = Packer(plan_dir, out_dir)


def _pack_in_worker(stream: str, index: int) -> dict:
    assert _WORKER is not None
    return _WORKER.pack(stream, index)


def shard_tasks(packer: Packer, streams: list[str], num_machines: int = 1,
                machine_index: int = 0) -> list[tuple[str, int]]:
    """The (stream, shard) pairs machine ``machine_index`` of ``num_machines`` packs: a
    contiguous range of the plan's shards in stream order, the ranges of all machines disjoint
    and covering every shard."""
    tasks = [(stream, i) for stream in streams for i in range(packer.n_shards(stream))]
    lo = len(tasks) * machine_index // num_machines
    return tasks[lo:len(tasks) * (machine_index + 1) // num_machines]


def pack_all(plan_dir: Path, out_dir: Path, streams: list[str], jobs: int, mp_context,
             progress, num_machines: int = 1, machine_index: int = 0) -> dict[str, list]:
    """Build the shards of the plan's ``streams`` (in ``jobs`` processes when > 1); return
    their records by stream. Shards already done are checked and kept.

    With ``num_machines`` > 1 this machine packs only its range of shards (``shard_tasks``),
    while the others may be packing theirs into the same folder; otherwise it packs all of them
    and removes what a killed or earlier run left behind: temporaries and shards of other streams
    (an earlier configuration, epochs no longer asked for). ``progress(total, desc)`` returns a
    tqdm-like bar.
    """
    if num_machines == 1:
        atomic.remove_stale_tmp(out_dir / "shards")
    packer = Packer(plan_dir, out_dir)
    tasks = shard_tasks(packer, streams, num_machines, machine_index)
    records: dict[tuple[str, int], dict] = {}
    bar = progress(len(tasks), "pack shards")
    if jobs <= 1:
        for stream, i in tasks:
            records[stream, i] = packer.pack(stream, i)
            bar.update(1)
    else:
        with ProcessPoolExecutor(
            jobs, mp_context=mp_context, initializer=_init_worker,
            initargs=(str(plan_dir), str(out_dir)),
        ) as pool:
            futures = {pool.submit(_pack_in_worker, stream, i): (stream, i)
                       for stream, i in tasks}
            for fut, key in futures.items():
                records[key] = fut.result()
                bar.update(1)
    bar.close()
    if num_machines == 1:
        _remove_extra_shards(out_dir, {rec["path"] for rec in records.values()})
    return {stream: [records[k, i] for k, i in tasks if k == stream] for stream in streams}


def packed_shards(plan_dir: Path, out_dir: Path, streams: list[str],
                  num_machines: int = 1) -> dict[str, list]:
    """The records of every shard of ``streams``, once all machines have packed theirs (each
    shard's file there with the size its record says; the sha256 was checked as it was
    written). Raises ValueError naming the missing shards and the machines that pack them.
    Then removes the temporaries and shards of other streams left in the folder."""
    packer = Packer(plan_dir, out_dir)
    tasks = shard_tasks(packer, streams)
    records, missing = {}, []
    for stream, i in tasks:
        rec = packer.done_record(stream, i, check_hash=False)
        if rec is None:
            missing.append((stream, i))
        else:
            records[stream, i] = rec
    if missing:
        lost = set(missing)
        machines = [m for m in range(num_machines)
                    if lost & set(shard_tasks(packer, streams, num_machines, m))]
        names = ", ".join(shard_name(s, i) for s, i in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise ValueError(f"{len(missing)} of {len(tasks)} shards are not packed yet: {names}"
                         f"{more} (packed by machine{'s' if len(machines) > 1 else ''} "
                         f"{', '.join(map(str, machines))} of {num_machines}; run the pack "
                         "stage there first)")
    atomic.remove_stale_tmp(out_dir / "shards")
    _remove_extra_shards(out_dir, {rec["path"] for rec in records.values()})
    return {stream: [records[k, i] for k, i in tasks if k == stream] for stream in streams}


def _remove_extra_shards(out_dir: Path, keep: set[str]) -> None:
    """Shards of an earlier run with another configuration must not linger beside ours."""
    for p in sorted((out_dir / "shards").glob("*.tar")):
        if f"shards/{p.name}" not in keep:
            p.unlink()
