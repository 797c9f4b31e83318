"""Label transfer against atlas-sized references: the exact search against the NN-descent index.

    OMP_NUM_THREADS=1 python benchmarks/bench_label_transfer.py [--model out/demo/seed0/model.pt]
        [--data data/human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad] [--label cell_type]
        [--references 200000 1000000] [--query 100000] [--dims 256] [--exact-query 5000]

The real file is embedded by the model (``pretrain.embed``); from its labelled embeddings the
script DERIVES a reference and a query set of the given sizes: each derived cell lies on the
segment between two real cells of the same label, at a uniform random point, plus Gaussian
noise of 5% of the embedding's per-dimension spread, and keeps their label. ``--dims`` lifts the
embeddings by a random orthonormal map into that many dimensions (distances unchanged), so the
search costs what a model of that width costs (``small`` is 256 wide, ``large`` 1,280).

For each reference size, in one process: the exact search (``pretrain.label_transfer``'s
scikit-learn brute force) on the first ``--exact-query`` query cells, its time extrapolated to
the whole query (it is linear in query cells); the approximate search (index build + query of
every query cell), and again for one query cell (the index's part); how many of the exact k
neighbours the index finds (recall) and how often the two votes agree, on the cells both
searched; each vote's accuracy against the derived labels. The one-off compilation of the
index's code is timed first, on 2,000 cells.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_embed import model_and_data  # noqa: E402  (benchmarks/)

from pretrain.embed import EMBEDDING_KEY, embed_cells  # noqa: E402
from pretrain.label_transfer import DEFAULT_K, nearest_reference, vote  # noqa: E402


def derive(emb: np.ndarray, codes: np.ndarray, n: int, rng: np.random.Generator):
    """``n`` DERIVED cells on segments between same-label real cells, with their label codes."""
    first = rng.integers(0, len(emb), n)
    second = np.empty(n, dtype=np.int64)
    for code in np.unique(codes):
        pick = codes[first] == code
        second[pick] = rng.choice(np.flatnonzero(codes == code), int(pick.sum()))
    t = rng.random((n, 1), dtype=np.float32)
    out = t * emb[first] + (1 - t) * emb[second]
    out += rng.normal(0, 0.05 * float(emb.std(axis=0).mean()), out.shape).astype(np.float32)
    return out, codes[first]


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_and_data(ap)
    ap.add_argument("--label", default="cell_type")
    ap.add_argument("--references", type=int, nargs="+", default=[200_000, 1_000_000])
    ap.add_argument("--query", type=int, default=100_000)
    ap.add_argument("--dims", type=int, default=256)
    ap.add_argument("--exact-query", type=int, default=5_000)
    ap.add_argument("--k", type=int, default=DEFAULT_K)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import anndata

    (ann, embed_s) = timed(embed_cells, args.model, args.data)
    real = ann.obsm[EMBEDDING_KEY]
    labels = anndata.read_h5ad(args.data, backed="r").obs[args.label].astype(str).to_numpy()
    codes = pd.Categorical(labels).codes
    n_labels = int(codes.max()) + 1
    rng = np.random.default_rng(args.seed)
    if args.dims > real.shape[1]:
        lift = np.linalg.qr(rng.standard_normal((args.dims, real.shape[1])))[0]
        real = (real @ lift.T).astype(np.float32)
    print(f"{args.data}: {len(real)} real cells embedded in {embed_s:.1f} s by {args.model}, "
          f"{n_labels} labels; lifted to {real.shape[1]} dimensions")
    query, query_codes = derive(real, codes, args.query, rng)
    sub = slice(0, min(args.exact_query, args.query))
    _, compile_s = timed(nearest_reference, query[:2000], query[:10], args.k, "approximate")
    print(f"first approximate search in this process (2,000 cells, compiles the index's code): "
          f"{compile_s:.1f} s")
    rows = []
    for n_ref in args.references:
        reference, ref_codes = derive(real, codes, n_ref, rng)
        exact_idx, exact_s = timed(nearest_reference, reference, query[sub], args.k, "exact")
        approx_idx, approx_s = timed(nearest_reference, reference, query, args.k, "approximate")
        _, index_s = timed(nearest_reference, reference, query[:1], args.k, "approximate")
        exact_vote = vote(ref_codes[exact_idx], n_labels)[0]
        approx_vote = vote(ref_codes[approx_idx], n_labels)[0]
        recall = np.mean([len(set(a) & set(b)) for a, b in zip(approx_idx[sub], exact_idx)])
        exact_full_s = exact_s * args.query / len(exact_idx)
        rows.append((n_ref, exact_full_s, approx_s, index_s,
                     recall / args.k, (approx_vote[sub] == exact_vote).mean(),
                     (exact_vote == query_codes[sub]).mean(),
                     (approx_vote == query_codes).mean()))
        print(f"reference {n_ref:,}: exact {exact_s:.1f} s for {len(exact_idx):,} query cells "
              f"({exact_full_s:.0f} s for {args.query:,}), approximate {approx_s:.1f} s for "
              f"{args.query:,} ({index_s:.1f} s for one)", flush=True)
    print(f"\n{args.query:,} query cells, k = {args.k}, {real.shape[1]} dimensions; exact time "
          f"for the whole query extrapolated from {args.exact_query:,} cells\n")
    print("| reference cells | exact search | approximate search (index + query) | speed-up | "
          "of which the index | recall of the exact neighbours | same label as exact | "
          "accuracy: exact | accuracy: approximate |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for n_ref, full_s, approx_s, index_s, recall, agree, acc_e, acc_a in rows:
        print(f"| {n_ref:,} | {full_s:,.0f} s | {approx_s:,.1f} s | {full_s / approx_s:.1f}x | "
              f"{index_s:,.1f} s | {recall:.4f} | {agree:.4f} | {acc_e:.4f} | {acc_a:.4f} |")


if __name__ == "__main__":
    main()
