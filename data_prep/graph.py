"""Per-dataset cell graph: PCA neighbours for meta-cells and Leiden pseudo-labels for sampling.

Pipeline (one dataset, all steps deterministic for a seed):

1. log1p of counts normalised to ``target_sum`` per cell.
2. Up to ``n_hvg`` highly variable genes, Seurat-style: per-gene mean and variance of the
   normalised counts, accumulated in one streaming pass over the CSR (which may be memory-mapped);
   log dispersion z-scored within ``hvg_bins`` equal-width bins of log1p(mean); top genes kept.
   A dataset with at most ``n_hvg`` genes keeps all of them.
3. PCA to ``n_pcs`` components of the HVG matrix, implicitly centred (the sparse matrix is never
   densified): randomized SVD with power iterations from a seeded Gaussian start; small problems
   use an exact dense SVD. Signs are fixed so the largest loading of each component is positive.
4. ``k`` nearest neighbours (excluding the cell itself) in PCA space: exact blocked brute force
   below ``exact_knn_below`` cells, pynndescent above (seeded, ``nnd_jobs`` threads; one thread
   makes it reproducible run to run; an ``nnd_neighbours``-degree graph of which the k nearest
   are kept, for recall@6 ~0.99 where a (k+1)-degree graph gives ~0.9).
5. Leiden with leidenalg (RBConfigurationVertexPartition: modularity with a resolution, two
   passes by default; igraph's C implementation of the same objective is the alternative) on the
   symmetrised kNN graph weighted like UMAP/scanpy connectivities (fuzzy union of per-cell
   exponential kernels).
6. Pseudo-labels = cell type x cluster (see ``pseudo_labels``).

Steps 1-4 are ``neighbours``, which pretrain.embed also runs on a new file so that its cells get
neighbours found as in training; ``compute_graph`` adds steps 5-6.

Held-out cells (``held``, the eval split of ``--eval-fraction``) never reach a training sample:
the kept neighbours of every training cell are its nearest *training* cells (the first ones of
its k-NN list that are not held out; a cell with too few of those gets exact nearest training
cells by brute force). Held-out cells keep their own nearest cells. What stays transductive:
the HVGs, PCA, kNN graph and Leiden clusters of a dataset include its held-out cells.

Tiny datasets (rule recorded in meta.json): ``n_pcs = min(n_pcs, n_cells - 1, n_genes)``;
``k = min(k, n_cells - 1)``; neighbour slots that cannot be filled hold -1 / inf; a dataset of one
cell (or with no variable gene) is a single cluster and needs no PCA.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_prep.shard_format import MAX_NEIGHBOURS
from utils import atomic
from utils.spans import compressed_spans

GRAPH_VERSION = 1
FILES = ("nbr_idx.npy", "nbr_dist.npy", "leiden.npy", "pseudo_label.json", "meta.json")


@dataclass
class GraphConfig:
    target_sum: float = 1e4  # normalise each cell to this total before log1p
    n_hvg: int = 4000  # highly variable genes for the PCA
    hvg_bins: int = 20  # mean bins for the HVG dispersion z-score
    n_pcs: int = 50  # PCA components
    pca_oversample: int = 10  # randomized SVD oversampling
    pca_power_iters: int = 4  # randomized SVD power iterations
    dense_pca_max_entries: int = 4_000_000  # exact dense SVD when cells x HVGs is at most this
    k: int = 15  # nearest neighbours of the kNN graph (for Leiden)
    n_neighbours_kept: int = MAX_NEIGHBOURS  # nearest neighbours stored with each sample (<= 6)
    exact_knn_below: int = 5000  # exact kNN below this many cells, pynndescent above
    # NN-descent graph degree (the k nearest are kept): 16 gives recall@6 ~0.9 on real data,
    # 30 ~0.99 for ~1.5x the time
    nnd_neighbours: int = 30
    nnd_jobs: int = 1  # pynndescent threads (1 = reproducible)
    nnd_n_iters: int | None = None  # NN-descent iterations (default: pynndescent's own)
    leiden_resolution: float = 1.0  # Leiden resolution
    # Leiden iterations (-1: until the partition is stable); 2, scanpy's advice, gives the same
    # cluster count at 200k cells in 30 s where -1 takes minutes
    leiden_iterations: int = 2
    leiden_backend: str = "leidenalg"  # leidenalg, or igraph (its C Leiden on the same objective)
    # pseudo-label sub-clusters smaller than this fold into their cell type
    min_subcluster: int = 10
    # cells per chunk of the graph stage's streaming passes over the counts (at most)
    chunk_rows: int = 8192
    # stored counts per chunk of those passes (at most; a chunk's temporaries take ~40 bytes a
    # count, so this bound keeps them flat however deep the cells are)
    chunk_nnz: int = 1 << 22


def config_fingerprint(cfg: GraphConfig) -> dict:
    """The settings that change the artifact (the streaming chunk sizes do not)."""
    d = asdict(cfg)
    d.pop("chunk_rows")
    d.pop("chunk_nnz")
    return d


@dataclass
class DatasetGraph:
    """The graph artifact of one dataset (rows = kept cells of its ingest)."""

    nbr_idx: np.ndarray  # int32 [n, n_neighbours_kept], -1 = missing
    nbr_dist: np.ndarray  # float32 [n, n_neighbours_kept], inf = missing
    leiden: np.ndarray  # int32 [n]
    pseudo_label: np.ndarray  # str [n]
    meta: dict = field(default_factory=dict)

    @property
    def n_cells(self) -> int:
        return int(self.leiden.shape[0])

    @classmethod
    def load(cls, path) -> DatasetGraph:
        path = Path(path)
        meta_path = path / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{path}: no complete graph artifact (meta.json missing)")
        meta = json.loads(meta_path.read_text())
        pl = json.loads((path / "pseudo_label.json").read_text())
        values = np.array(pl["values"], dtype=str)
        codes = np.asarray(pl["codes"], dtype=np.int64)
        return cls(
            nbr_idx=np.load(path / "nbr_idx.npy"),
            nbr_dist=np.load(path / "nbr_dist.npy"),
            leiden=np.load(path / "leiden.npy"),
            pseudo_label=values[codes] if codes.size else np.zeros(0, dtype=str),
            meta=meta,
        )

    def save(self, path) -> None:
        """Write into ``path`` (a fresh directory); meta.json last marks it complete."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.save(path / "nbr_idx.npy", self.nbr_idx.astype(np.int32))
        np.save(path / "nbr_dist.npy", self.nbr_dist.astype(np.float32))
        np.save(path / "leiden.npy", self.leiden.astype(np.int32))
        values, codes = np.unique(self.pseudo_label.astype(str), return_inverse=True)
        pl = {"values": values.tolist(), "codes": codes.reshape(-1).tolist()}
        (path / "pseudo_label.json").write_text(json.dumps(pl))
        (path / "meta.json").write_text(json.dumps(self.meta, indent=1, sort_keys=True))


# --------------------------------------------------------------------------- stages


def _row_chunks(n: int, chunk: int):
    for start in range(0, n, max(1, chunk)):
        yield start, min(n, start + chunk)


def _csr_chunks(counts: sp.csr_matrix, cfg: GraphConfig):
    """Row ranges [start, stop) of at most ``cfg.chunk_rows`` rows and ``cfg.chunk_nnz`` stored
    counts (a single row may hold more)."""
    return compressed_spans(counts.indptr, cfg.chunk_rows, cfg.chunk_nnz)


def _chunk(counts: sp.csr_matrix, start: int, stop: int):
    """Rows [start, stop) as (row ids, columns, float64 values) without densifying."""
    lo, hi = int(counts.indptr[start]), int(counts.indptr[stop])
    rows = np.repeat(np.arange(start, stop), np.diff(counts.indptr[start : stop + 1]))
    return rows, np.asarray(counts.indices[lo:hi]), np.asarray(counts.data[lo:hi], np.float64)


def row_totals(counts: sp.csr_matrix, cfg: GraphConfig, columns: np.ndarray | None = None
               ) -> np.ndarray:
    """Per-cell sum of the counts (float64), streamed by chunk; with ``columns`` (a bool mask
    over the columns) only the counts of those columns."""
    totals = np.zeros(counts.shape[0])
    for start, stop in _csr_chunks(counts, cfg):
        rows, cols, vals = _chunk(counts, start, stop)
        weights = vals if columns is None else vals * columns[cols]
        totals[start:stop] = np.bincount(rows - start, weights=weights, minlength=stop - start)
    return totals


def _row_scale(counts: sp.csr_matrix, cfg: GraphConfig) -> np.ndarray:
    """Per-cell factor target_sum / library size (0 for an empty cell), streamed by chunk."""
    totals = row_totals(counts, cfg)
    return np.divide(cfg.target_sum, totals, out=np.zeros_like(totals), where=totals > 0)


def highly_variable_genes(counts: sp.csr_matrix, cfg: GraphConfig, scale=None) -> np.ndarray:
    """Column indices (ascending) of up to ``cfg.n_hvg`` Seurat-style highly variable genes."""
    n, g = counts.shape
    if g <= cfg.n_hvg:
        return np.arange(g)
    scale = _row_scale(counts, cfg) if scale is None else scale
    s1 = np.zeros(g)
    s2 = np.zeros(g)
    for start, stop in _csr_chunks(counts, cfg):
        rows, cols, vals = _chunk(counts, start, stop)
        vals = vals * scale[rows]
        s1 += np.bincount(cols, weights=vals, minlength=g)
        s2 += np.bincount(cols, weights=vals * vals, minlength=g)
    mean = s1 / n
    var = (s2 - n * mean * mean) / max(n - 1, 1)
    mean = np.where(mean == 0, 1e-12, mean)
    with np.errstate(divide="ignore", invalid="ignore"):
        disp = np.log(np.where(var > 0, var / mean, np.nan))
    logmean = np.log1p(mean)
    edges = np.linspace(logmean.min(), logmean.max(), cfg.hvg_bins + 1)
    bins = np.clip(np.searchsorted(edges, logmean, side="right") - 1, 0, cfg.hvg_bins - 1)
    norm = np.full(g, np.nan)
    for b in np.unique(bins):
        sel = (bins == b) & np.isfinite(disp)
        if sel.sum() == 1:  # as in Seurat: a lone gene's z-score is its dispersion over itself
            norm[sel] = 1.0
        elif sel.sum() > 1:
            d = disp[sel]
            sd = d.std(ddof=1)
            norm[sel] = (d - d.mean()) / sd if sd > 0 else 0.0
    order = np.lexsort((np.arange(g), -np.nan_to_num(norm, nan=-np.inf)))
    return np.sort(order[: cfg.n_hvg])


def log_normalise(counts: sp.csr_matrix, genes: np.ndarray, cfg: GraphConfig, scale=None):
    """float32 CSR of log1p(normalised counts) restricted to ``genes``, streamed by chunk.

    The matrix is the stage's largest array, so it is built in place: a first pass counts each
    row's entries in ``genes``, a second fills arrays of exactly that size (collecting chunks and
    concatenating them would hold it twice).
    """
    n, g = counts.shape
    scale = _row_scale(counts, cfg) if scale is None else scale
    col_map = np.full(g, -1, dtype=np.int64)
    col_map[genes] = np.arange(genes.size)
    selected = col_map >= 0
    indptr = np.zeros(n + 1, dtype=np.int64)
    for start, stop in _csr_chunks(counts, cfg):
        lo, hi = int(counts.indptr[start]), int(counts.indptr[stop])
        kept = np.concatenate(([0], np.cumsum(selected[counts.indices[lo:hi]])))
        ends = np.asarray(counts.indptr[start + 1 : stop + 1], dtype=np.int64) - lo
        indptr[start + 1 : stop + 1] = indptr[start] + kept[ends]
    indices = np.empty(int(indptr[-1]), dtype=np.int32)
    data = np.empty(int(indptr[-1]), dtype=np.float32)
    for start, stop in _csr_chunks(counts, cfg):
        rows, cols, vals = _chunk(counts, start, stop)
        keep = selected[cols]
        rows = rows[keep]
        out = slice(int(indptr[start]), int(indptr[stop]))
        indices[out] = col_map[cols[keep]]
        data[out] = np.log1p(vals[keep] * scale[rows])
    return sp.csr_matrix((data, indices, indptr), shape=(n, genes.size))


def _svd_flip(u: np.ndarray, vt: np.ndarray):
    """Make the largest-magnitude loading of each component positive (deterministic signs)."""
    signs = np.sign(vt[np.arange(vt.shape[0]), np.argmax(np.abs(vt), axis=1)])
    signs[signs == 0] = 1.0
    return u * signs, vt * signs[:, None]


def _column_means(x: sp.csr_matrix, cfg: GraphConfig) -> np.ndarray:
    """Per-column means of ``x`` computed as scipy's ``x.mean(axis=0)`` computes them (each
    entry scaled by 1/n in x's dtype, then summed in row order in that dtype), streamed by
    chunk: scipy's ``mean`` holds a scaled copy of x. Bit for bit the same means keep the
    Leiden clusters of a rebuilt dataset the same (they move with the smallest change in the
    PCA: ARI 0.66 between float32 and float64 means on a 200k-cell derived input)."""
    n = x.shape[0]
    sums = np.zeros(x.shape[1], dtype=x.dtype)
    scale = x.dtype.type(1.0 / n)
    for start, stop in _csr_chunks(x, cfg):
        lo, hi = int(x.indptr[start]), int(x.indptr[stop])
        np.add.at(sums, x.indices[lo:hi], x.data[lo:hi] * scale)
    return sums.astype(np.float64)


def pca(x: sp.csr_matrix, n_pcs: int, seed: int, cfg: GraphConfig) -> np.ndarray:
    """Cell coordinates (float32 [n, n_pcs]) on the top principal components of centred ``x``."""
    n, g = x.shape
    mu = _column_means(x, cfg)
    n_comp = n_pcs + cfg.pca_oversample
    if n_comp >= min(n, g) or n * g <= cfg.dense_pca_max_entries:
        dense = x.toarray().astype(np.float64) - mu
        u, s, vt = np.linalg.svd(dense, full_matrices=False)
        u, vt = _svd_flip(u[:, :n_pcs], vt[:n_pcs])
        return (u * s[:n_pcs]).astype(np.float32)
    x = x.astype(np.float32, copy=False)  # log_normalise's matrix is float32: no copy of it
    mu32 = mu.astype(np.float32)

    def times(m):  # (x - 1 mu^T) @ m
        return x @ m - mu32 @ m

    def rtimes(m):  # (x - 1 mu^T)^T @ m
        return x.T @ m - np.outer(mu32, m.sum(axis=0))

    rng = np.random.default_rng(seed)
    q = np.linalg.qr(times(rng.standard_normal((g, n_comp), dtype=np.float32)))[0]
    for _ in range(cfg.pca_power_iters):
        q = np.linalg.qr(rtimes(q))[0]
        q = np.linalg.qr(times(q))[0]
    b = rtimes(q).T.astype(np.float64)  # [n_comp, g]
    ub, s, vt = np.linalg.svd(b, full_matrices=False)
    u = q.astype(np.float64) @ ub[:, :n_pcs]
    u, vt = _svd_flip(u, vt[:n_pcs])
    return (u * s[:n_pcs]).astype(np.float32)


def exact_knn(emb: np.ndarray, k: int, queries=None):
    """Exact k nearest neighbours (excluding self, k < n) of ``queries`` (default: all cells)
    by blocked brute force in float64: (int32 [q, k], float32 [q, k]), ties broken by index.
    """
    n = emb.shape[0]
    queries = np.arange(n) if queries is None else np.asarray(queries)
    x = emb.astype(np.float64)
    sq = (x * x).sum(axis=1)
    idx = np.empty((queries.size, k), dtype=np.int32)
    dist = np.empty((queries.size, k), dtype=np.float32)
    block = max(1, min(2048, 2**25 // max(n, 1)))  # <= 256 MiB of distances per block
    for start, stop in _row_chunks(queries.size, block):
        q = queries[start:stop]
        d2 = sq[q, None] + sq[None, :] - 2.0 * (x[q] @ x.T)
        d2[np.arange(q.size), q] = np.inf
        part = np.argpartition(d2, k - 1, axis=1)[:, :k]
        pd = np.take_along_axis(d2, part, axis=1)
        order = np.lexsort((part, pd), axis=1)
        idx[start:stop] = np.take_along_axis(part, order, axis=1)
        dist[start:stop] = np.sqrt(np.maximum(np.take_along_axis(pd, order, axis=1), 0.0))
    return idx, dist


def _drop_self(idx: np.ndarray, dist: np.ndarray):
    """From k+1 candidates per row, drop the row's own index (or the farthest if absent)."""
    n, kp1 = idx.shape
    drop = idx == np.arange(n)[:, None]
    missing = ~drop.any(axis=1)
    drop[missing, kp1 - 1] = True
    first = np.argmax(drop, axis=1)  # exactly one slot per row
    keep = np.ones_like(drop)
    keep[np.arange(n), first] = False
    return idx[keep].reshape(n, kp1 - 1), dist[keep].reshape(n, kp1 - 1)


def approximate_knn(emb: np.ndarray, k: int, seed: int, cfg: GraphConfig):
    """k nearest neighbours (excluding self) with NN-descent: (int32, float32)."""
    from pynndescent import NNDescent

    index = NNDescent(
        emb,
        metric="euclidean",
        n_neighbors=min(max(k + 1, cfg.nnd_neighbours), emb.shape[0]),
        random_state=seed,
        n_jobs=cfg.nnd_jobs,
        n_iters=cfg.nnd_n_iters,
        low_memory=True,
        compressed=True,
        verbose=False,
    )
    idx, dist = index.neighbor_graph
    idx, dist = _drop_self(np.asarray(idx)[:, : k + 1], np.asarray(dist)[:, : k + 1])
    return idx.astype(np.int32), dist.astype(np.float32)


def connectivities(idx: np.ndarray, dist: np.ndarray) -> sp.csr_matrix:
    """UMAP-style fuzzy kNN graph: per-cell kernels exp(-(d - rho_i) / sigma_i), fuzzy union.

    rho_i is the distance to the nearest non-identical neighbour, sigma_i solves
    sum_j exp(-(d_ij - rho_i) / sigma_i) = log2(k + 1) by bisection (vectorised over cells).
    """
    n, k = idx.shape
    valid = idx >= 0
    d = np.where(valid, dist, np.inf).astype(np.float64)
    pos = np.where(valid & (d > 0), d, np.inf)
    rho = np.min(pos, axis=1)
    rho[~np.isfinite(rho)] = 0.0
    target = np.log2(k + 1)
    lo, hi, sigma = np.zeros(n), np.full(n, np.inf), np.ones(n)
    shifted = np.maximum(d - rho[:, None], 0.0)
    for _ in range(64):
        psum = np.where(valid, np.exp(-shifted / sigma[:, None]), 0.0).sum(axis=1)
        over = psum > target
        hi = np.where(over, sigma, hi)
        lo = np.where(over, lo, sigma)
        sigma = np.where(np.isfinite(hi), (lo + hi) / 2, sigma * 2)
    mean_d = np.where(valid, np.where(np.isfinite(d), d, 0.0), 0.0).sum(axis=1) / np.maximum(
        valid.sum(axis=1), 1
    )
    sigma = np.maximum(sigma, 1e-3 * np.where(rho > 0, mean_d, mean_d.mean() if n else 0.0))
    w = np.where(valid, np.exp(-shifted / np.maximum(sigma, 1e-300)[:, None]), 0.0)
    rows = np.repeat(np.arange(n), k)[valid.ravel()]
    a = sp.csr_matrix((w.ravel()[valid.ravel()], (rows, idx.ravel()[valid.ravel()])), (n, n))
    at = a.T.tocsr()
    return (a + at - a.multiply(at)).tocsr()


def leiden(
    conn: sp.csr_matrix, resolution: float, iterations: int, seed: int, backend: str = "leidenalg"
) -> np.ndarray:
    """Leiden clusters (int32, numbered by decreasing size) of a symmetric weighted graph.

    Both backends optimise modularity with a resolution (leidenalg's RBConfigurationVertexPartition
    = igraph's ``objective_function="modularity"``); "igraph" runs igraph's C implementation,
    seeded through a private ``random.Random(seed)``.
    """
    import igraph as ig

    n = conn.shape[0]
    upper = sp.triu(conn, k=1).tocoo()
    if upper.nnz == 0:
        return np.zeros(n, dtype=np.int32)
    graph = ig.Graph(n=n, edges=np.column_stack([upper.row, upper.col]))
    weights = upper.data.astype(np.float64)
    if backend == "leidenalg":
        import leidenalg

        part = leidenalg.find_partition(
            graph,
            leidenalg.RBConfigurationVertexPartition,
            weights=weights.tolist(),
            resolution_parameter=resolution,
            n_iterations=iterations,
            seed=seed,
        )
        return np.asarray(part.membership, dtype=np.int32)
    if backend != "igraph":
        raise ValueError(f"unknown Leiden backend {backend!r} (leidenalg or igraph)")
    import random

    ig.set_random_number_generator(random.Random(seed))
    try:
        part = graph.community_leiden(
            objective_function="modularity",
            weights=weights,
            resolution=resolution,
            n_iterations=iterations,
        )
    finally:
        ig.set_random_number_generator(random)
    membership = np.asarray(part.membership)
    sizes = np.bincount(membership)
    order = np.lexsort((np.arange(sizes.size), -sizes))  # largest cluster first, as leidenalg
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    return rank[membership].astype(np.int32)


def pseudo_labels(cell_type, clusters, min_size: int = 10) -> np.ndarray:
    """Pseudo-label per cell: ``<cell_type>_<cluster>``, folded to ``<cell_type>`` when that
    (type, cluster) sub-cluster has fewer than ``min_size`` cells; cells without a cell type
    (``cell_type`` None, or an entry that is None/empty) get ``unknown_<cluster>``.
    """
    clusters = np.asarray(clusters)
    n = clusters.shape[0]
    if cell_type is None:
        cell_type = np.full(n, None, dtype=object)
    cell_type = np.asarray(cell_type, dtype=object)
    if cell_type.shape != (n,):
        raise ValueError(f"cell_type has shape {cell_type.shape}, expected ({n},)")
    known = np.array([c is not None and str(c) != "" for c in cell_type], dtype=bool)
    ct = np.where(known, cell_type, "").astype(str)
    out = np.array([f"unknown_{c}" for c in clusters], dtype=object)
    if known.any():
        pairs = np.char.add(np.char.add(ct[known], "_"), clusters[known].astype(str))
        # count by (type, cluster) codes, not by the joined string, so "a_1"+"2" != "a"+"1_2"
        keys = np.column_stack([np.unique(ct[known], return_inverse=True)[1], clusters[known]])
        _, inv, cnt = np.unique(keys, axis=0, return_inverse=True, return_counts=True)
        big = cnt[inv.reshape(-1)] >= min_size
        out[known] = np.where(big, pairs, ct[known])
    return out.astype(str)


# --------------------------------------------------------------------------- driver


class _Stopwatch:
    """Seconds per stage (rounded to 0.1 ms), in the order the stages ran."""

    def __init__(self, timings: dict[str, float] | None = None):
        self.timings = {} if timings is None else timings
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._t, 4)
        self._t = now


@dataclass
class Neighbours:
    """Each cell's nearest other cells in PCA space (steps 1-4) and how they were found."""

    idx: np.ndarray  # int32 [n, k], ascending distance; [n, 0] when there was no PCA
    dist: np.ndarray  # float32, same shape
    n_hvg: int  # genes of the PCA (all genes when no neighbour was to be found)
    n_pcs: int
    k: int  # min(k asked, n_cells - 1)
    method: str  # "exact", "pynndescent" or "none"
    tiny_rule: list[str]  # the tiny-dataset rules that applied
    timings_s: dict[str, float]
    emb: np.ndarray | None = None  # float32 [n, n_pcs] PCA coordinates (None without a PCA)


def neighbours(counts: sp.csr_matrix, k: int, cfg: GraphConfig, seed: int) -> Neighbours:
    """Steps 1-4 with the tiny-dataset rules: HVGs, log-normalisation, PCA, then exact or
    NN-descent kNN of each cell's ``min(k, n_cells - 1)`` nearest other cells.

    With no neighbour to find (one cell, or ``k`` < 1) genes are neither selected nor
    normalised; with no PCA component (no genes) there are no neighbours either.
    """
    n, g = counts.shape
    if n == 0:
        raise ValueError("cannot build a cell graph for a dataset with no cells")
    watch = _Stopwatch()
    k_used = min(k, n - 1)
    if k_used >= 1:
        scale = _row_scale(counts, cfg)
        genes = highly_variable_genes(counts, cfg, scale)
        watch.lap("hvg")
    else:
        genes = np.arange(g)
    n_pcs = min(cfg.n_pcs, n - 1, genes.size)
    rule = []
    if n_pcs < cfg.n_pcs:
        rule.append(f"n_pcs=min({cfg.n_pcs}, n_cells-1, n_genes)={n_pcs}")
    if k_used < k:
        rule.append(f"k=min({k}, n_cells-1)={k_used}; missing neighbour slots are -1/inf")
    emb = None
    if n_pcs < 1 or k_used < 1:
        idx, dist = np.full((n, 0), -1, np.int32), np.full((n, 0), np.inf, np.float32)
        method = "none"
    else:
        x = log_normalise(counts, genes, cfg, scale)
        watch.lap("normalise")
        emb = pca(x, n_pcs, seed, cfg)
        del x  # the stage's largest array: gone before the kNN and Leiden allocate theirs
        watch.lap("pca")
        if n < cfg.exact_knn_below:
            idx, dist = exact_knn(emb, k_used)
            method = "exact"
        else:
            idx, dist = approximate_knn(emb, k_used, seed, cfg)
            method = "pynndescent"
        watch.lap("knn")
    return Neighbours(idx, dist, int(genes.size), int(max(n_pcs, 0)), int(max(k_used, 0)),
                      method, rule, watch.timings, emb)


def training_neighbours(nb: Neighbours, held: np.ndarray, kept: int):
    """The ``kept`` nearest neighbours of each cell with held-out cells removed from the lists of
    training cells: (int32 [n, kept] with -1 = missing, float32 distances with inf = missing,
    number of rows searched again).

    A training cell takes the first ``kept`` training cells of its k-NN list; when fewer are
    there (many held-out cells nearby) its nearest training cells are found again by exact
    search among the training cells. Held-out rows keep their first ``kept`` neighbours.
    """
    n = nb.idx.shape[0]
    idx = np.full((n, kept), -1, np.int32)
    dist = np.full((n, kept), np.inf, np.float32)
    train = np.flatnonzero(~held)
    ok = (nb.idx >= 0) & ~held[np.maximum(nb.idx, 0)]
    ok[held] = nb.idx[held] >= 0  # held-out rows: any neighbour
    rank = np.cumsum(ok, axis=1) - 1
    take = ok & (rank < kept)
    rows, cols = np.nonzero(take)
    idx[rows, rank[rows, cols]] = nb.idx[rows, cols]
    dist[rows, rank[rows, cols]] = nb.dist[rows, cols]
    want = min(kept, nb.idx.shape[1], train.size - 1)
    short = train[(idx[train] >= 0).sum(axis=1) < want] if held.any() else train[:0]
    if short.size and nb.emb is not None:
        pos = np.full(n, -1, dtype=np.int64)
        pos[train] = np.arange(train.size)
        found, d = exact_knn(nb.emb[train], want, queries=pos[short])
        idx[short, :want] = train[found]
        dist[short, :want] = d
    return idx, dist, int(short.size)


def compute_graph(counts: sp.csr_matrix, cell_type, cfg: GraphConfig, seed: int,
                  held: np.ndarray | None = None) -> DatasetGraph:
    """All stages in memory; ``cell_type`` is per-cell strings (None entries = unknown) or None;
    ``held`` marks held-out cells, which then never appear among training cells' neighbours."""
    n, g = counts.shape
    nb = neighbours(counts, cfg.k, cfg, seed)
    watch = _Stopwatch(nb.timings_s)
    rule = list(nb.tiny_rule)
    if nb.idx.shape[1]:
        clusters = leiden(
            connectivities(nb.idx, nb.dist),
            cfg.leiden_resolution,
            cfg.leiden_iterations,
            seed,
            cfg.leiden_backend,
        )
        watch.lap("leiden")
    else:
        rule.append("single cluster, no neighbours (fewer than 2 cells or no genes)")
        clusters = np.zeros(n, dtype=np.int32)
    held = _effective_held(held, n)
    nbr_idx, nbr_dist, n_searched = training_neighbours(
        nb, np.zeros(n, dtype=bool) if held is None else held, cfg.n_neighbours_kept)
    if n_searched:
        watch.lap("training_neighbours")
    labels = pseudo_labels(cell_type, clusters, cfg.min_subcluster)
    watch.lap("pseudo_labels")
    meta = {
        "version": GRAPH_VERSION,
        "n_cells": int(n),
        "n_genes": int(g),
        "n_hvg": nb.n_hvg,
        "n_pcs": nb.n_pcs,
        "k": nb.k,
        "knn_method": nb.method,
        "n_clusters": int(np.unique(clusters).size),
        "n_pseudo_labels": int(np.unique(labels).size),
        "tiny_rule": "; ".join(rule),
        "held_out": _held_fingerprint(held),
        "n_rows_searched_again": n_searched,
        "seed": int(seed),
        "config": config_fingerprint(cfg),
        "timings_s": watch.timings,
    }
    return DatasetGraph(nbr_idx, nbr_dist, clusters.astype(np.int32), labels, meta)


def _effective_held(held: np.ndarray | None, n: int) -> np.ndarray | None:
    """The hold-out mask when it changes neighbours: some but not all cells held out (a whole
    held-out dataset has no training cell to protect)."""
    if held is None:
        return None
    held = np.asarray(held, dtype=bool)
    if held.shape != (n,):
        raise ValueError(f"hold-out mask has shape {held.shape}, expected ({n},)")
    return held if 0 < held.sum() < n else None


def _held_fingerprint(held: np.ndarray | None) -> str:
    if held is None:
        return "none"
    return f"{int(held.sum())}:{hashlib.sha256(np.packbits(held).tobytes()).hexdigest()}"


def build_graph(ds, out_dir, cfg: GraphConfig | None = None, seed: int = 0,
                held: np.ndarray | None = None) -> DatasetGraph:
    """Build (or reuse, if complete for the same config, seed and hold-out) the graph artifact
    of ``ds``.

    ``ds`` is an ``IngestedDataset`` (``counts`` CSR over kept cells, its cell types); ``held``
    its held-out cells (see ``training_neighbours``). Written atomically (``atomic.atomic_dir``).
    """
    cfg = cfg or GraphConfig()
    out_dir = Path(out_dir)
    n = ds.counts.shape[0]
    if (out_dir / "meta.json").is_file():
        try:
            done = DatasetGraph.load(out_dir)
            m = done.meta
            same = m.get("config") == config_fingerprint(cfg) and m.get("seed") == seed
            same = same and m.get("held_out", "none") == _held_fingerprint(
                _effective_held(held, n))
            if same and m.get("n_cells") == n:
                return done
        except (OSError, ValueError, KeyError):
            pass
    graph = compute_graph(ds.counts, ds.labels("cell_type"), cfg, seed, held)
    with atomic.atomic_dir(out_dir) as tmp:
        graph.save(tmp)
    return graph
