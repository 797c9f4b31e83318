"""Derive a large benchmark input from a small real dataset, without making kNN trivially easy.

Plain tiling makes every cell's nearest neighbours its own copies, so neighbour search and
clustering become trivial and benchmark figures meaningless. Instead each derived cell mixes a
real cell ``a`` (taken in turn) with one of its real nearest neighbours ``b`` (PCA space of the
source, random among the ``k`` nearest) by a random convex weight ``lam ~ U(0, 1)``, and thins
the result binomially with a random depth factor ``t ~ U(thin_low, 1)``:

    y = Binomial(x_a, lam * t) + Binomial(x_b, (1 - lam) * t)

so counts stay raw integers, ``E[y] = t * (lam x_a + (1 - lam) x_b)`` lies on the segment between
two real neighbouring profiles, and no two derived cells are identical. Obs labels are those of
``a``. The output says it is derived in ``uns['derived_from']``.

``--depth D`` makes a deeper input (for what depth does downstream, e.g. meta-cells and the share
of profiles above the context): each derived cell sums D such draws around the same cell ``a``,
each with its own partner, weight and thinning, so it holds about D times the counts and the
genes of D + 1 real neighbouring cells, like a deeper assay of the same tissue.

    python -m data_prep.derive SRC.h5ad --cells 200000 --out X.h5ad --seed 0 [--depth 1]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from data_prep.graph import GraphConfig, exact_knn, highly_variable_genes, log_normalise, pca
from utils import atomic


def _raw_counts(adata, path) -> sp.csr_matrix:
    x = adata.layers["counts"] if "counts" in adata.layers else adata.X
    x = sp.csr_matrix(x, dtype=np.float32)
    if x.nnz and (np.any(x.data < 0) or np.any(x.data != np.round(x.data))):
        raise ValueError(f"{path}: X is not raw non-negative integer counts")
    return x


def source_neighbours(counts: sp.csr_matrix, k: int, seed: int) -> np.ndarray:
    """Exact ``k`` nearest neighbours (int [n, k]) of each source cell in its own PCA space."""
    cfg = GraphConfig()
    n = counts.shape[0]
    genes = highly_variable_genes(counts, cfg)
    emb = pca(log_normalise(counts, genes, cfg), min(cfg.n_pcs, n - 1, genes.size), seed, cfg)
    return exact_knn(emb, min(k, n - 1))[0]


def derive_counts(
    counts: sp.csr_matrix,
    n_cells: int,
    seed: int,
    k: int = 10,
    thin_low: float = 0.7,
    chunk: int = 20000,
    depth: int = 1,
) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
    """Derived counts (float32 CSR [n_cells, genes]) plus the source rows ``a`` and ``b`` (the
    first draw's partner); ``depth`` draws summed per cell (see the module docstring)."""
    n = counts.shape[0]
    if n < 2:
        raise ValueError("deriving needs at least 2 source cells")
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    rng = np.random.default_rng(seed)
    nbrs = source_neighbours(counts, k, seed)
    a = np.arange(n_cells) % n
    draws = []  # (partner b, weight lam, thinning t) per draw
    for _ in range(depth):
        b = nbrs[a, rng.integers(0, nbrs.shape[1], size=n_cells)]
        draws.append((b, rng.random(n_cells), rng.uniform(thin_low, 1.0, size=n_cells)))
    parts = []
    for start in range(0, n_cells, chunk):
        sl = slice(start, min(n_cells, start + chunk))
        blocks = []
        for b, lam, t in draws:
            for rows, p in ((a[sl], lam[sl] * t[sl]), (b[sl], (1 - lam[sl]) * t[sl])):
                m = counts[rows]
                per_entry = np.repeat(p, np.diff(m.indptr))
                m.data = rng.binomial(m.data.astype(np.int64), per_entry).astype(np.float32)
                blocks.append(m)
        y = sum(blocks[1:], blocks[0]).tocsr()
        y.eliminate_zeros()
        y.sort_indices()
        parts.append(y)
    return sp.vstack(parts, format="csr").astype(np.float32), a, draws[0][0]


def derive_file(src, out, n_cells: int, seed: int = 0, k: int = 10, thin_low: float = 0.7,
                depth: int = 1):
    """Write a derived .h5ad of ``n_cells`` cells from ``src`` (atomically)."""
    import anndata as ad
    import pandas as pd

    src, out = Path(src), Path(out)
    adata = ad.read_h5ad(src)
    x, a, b = derive_counts(_raw_counts(adata, src), n_cells, seed, k=k, thin_low=thin_low,
                            depth=depth)
    obs = adata.obs.iloc[a].copy()
    obs.index = pd.Index([f"derived_{i}" for i in range(n_cells)])
    obs["derived_source_a"] = np.asarray(adata.obs_names)[a]
    obs["derived_source_b"] = np.asarray(adata.obs_names)[b]
    uns = {
        "derived_from": {
            "source": src.name,
            "source_origin": str(adata.uns.get("source", "")),
            "method": "convex mix of a real cell and a real kNN neighbour, binomially thinned "
            "(not tiling); DERIVED, NOT A REAL MEASUREMENT",
            "n_source_cells": int(adata.n_obs),
            "k": int(k),
            "thin_low": float(thin_low),
            "depth": int(depth),
            "seed": int(seed),
        }
    }
    derived = ad.AnnData(X=x, obs=obs, var=adata.var.copy(), uns=uns)
    with atomic.atomic_path(out) as tmp:
        derived.write_h5ad(tmp)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="real .h5ad with raw integer counts")
    p.add_argument("--cells", type=int, default=200_000, help="derived cells to write")
    p.add_argument("--out", required=True, help="output .h5ad")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=10, help="mix partners: among the k nearest")
    p.add_argument("--thin-low", type=float, default=0.7, help="thinning factor ~ U(this, 1)")
    p.add_argument("--depth", type=int, default=1,
                   help="draws summed per derived cell (> 1: a deeper input)")
    args = p.parse_args(argv)
    out = derive_file(args.src, args.out, args.cells, args.seed, args.k, args.thin_low,
                      args.depth)
    print(f"wrote {out} ({args.cells} derived cells from {args.src})")


if __name__ == "__main__":
    main()
