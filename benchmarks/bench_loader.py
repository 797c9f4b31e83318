"""Data-loader throughput: our shard loader vs a plain random-access AnnData loader, same cells.

    python benchmarks/bench_loader.py [--shards OUT] [--data DIR] [--batches 200] [--only ours]

Both build the same model-ready sample: a 3,200-gene context (expressed genes sampled without
replacement, then neighbour-ranked padding genes), the cell's and its 6 neighbours' counts
aligned to it (7 profiles) and a denoising-corrupted input. Ours reads build_shards output in
ONE process (no DataLoader workers); the baseline reads each cell and its neighbours' rows from
the .h5ad files, backed (on disk) and with the whole matrix in RAM. Without --shards the script
builds shards from --data with ``python -m data_prep.build_shards`` into a temporary directory.
``--only ours`` skips the AnnData baselines (for iterating; published figures come from a full run).
"""

from __future__ import annotations

import argparse
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anndata as ad
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data_prep.shard_format import (  # noqa: E402
    CONTEXT_GENES,
    HEADER,
    decode_header,
    decode_record,
    load_manifest,
)
from pretrain.data import CellBatches, DataConfig  # noqa: E402
from pretrain.shard_stream import ShardStream  # noqa: E402


def ours(cfg: DataConfig, batches: int, repeats: int = 3) -> float:
    """Median rate of ``repeats`` consecutive runs of ``batches`` (the machine is shared)."""
    it = iter(CellBatches(cfg))
    for _ in range(5):  # warm-up: numba load, first pages
        next(it)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(batches):
            next(it)
        rates.append(batches * cfg.batch_size / (time.perf_counter() - t))
    return float(np.median(rates))


def anndata_sample(x, cell: int, nbrs: np.ndarray, rng: np.random.Generator) -> dict:
    """The per-sample recipe of a plain loader: rows -> union genes -> context -> 7 profiles."""
    rows = x[np.concatenate([[cell], nbrs])]
    dense = rows.toarray() if hasattr(rows, "toarray") else np.asarray(rows)
    expr = np.flatnonzero(dense[0])
    nsum = dense[1:].sum(0)
    pad = np.setdiff1d(np.flatnonzero(nsum), expr)
    pad = pad[np.argsort(-nsum[pad], kind="stable")]
    chosen = rng.permutation(expr)[:CONTEXT_GENES]
    cols = np.concatenate([chosen, pad[: CONTEXT_GENES - len(chosen)]])
    prof = np.zeros((7, CONTEXT_GENES), dtype=np.float32)
    prof[:, : len(cols)] = dense[:, cols]
    p = 1.1 * rng.uniform(0, 0.8)
    inp = np.maximum(prof[0] - rng.poisson(prof[0] * p / 2), 0)
    inp[rng.random(CONTEXT_GENES) < p / 2] = 0
    return {"gene_ids": cols, "profiles": prof, "input": inp}


def baseline(cells: list[tuple[Path, int, np.ndarray]], backed: bool) -> float:
    files = {path: ad.read_h5ad(path, backed="r" if backed else None) for path, _, _ in cells}
    xs = {path: (a.X if backed else a.X.tocsr()) for path, a in files.items()}
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for path, cell, nbrs in cells:
        anndata_sample(xs[path], cell, np.sort(nbrs), rng)
    return len(cells) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", help="build_shards output (default: build one from --data)")
    ap.add_argument("--data", default=str(REPO / "data"))
    ap.add_argument("--batches", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--backed-cells", type=int, default=300)
    ap.add_argument("--only", choices=["ours"], help="skip the AnnData baselines")
    args = ap.parse_args()
    if args.shards is None:
        args.shards = tempfile.mkdtemp(prefix="bench_loader_")
        subprocess.run([sys.executable, "-m", "data_prep.build_shards", args.data, "--out",
                        args.shards, "--quiet"], check=True, cwd=REPO)
    manifest = load_manifest(args.shards)
    print(f"shards: {args.shards}: {manifest['n_samples']} samples in "
          f"{len(manifest['shards'])} shards; {os.cpu_count()} cpus, "
          f"load {os.getloadavg()[0]:.1f}")

    fixed = DataConfig(shards=args.shards, batch_size=args.batch_size, short_context_prob=0.0,
                       n_neighbours=6, full_pass_prob=0.0)
    figures = {
        "ours, 6 neighbours, L=3200": ours(fixed, args.batches),
        "ours, training defaults (0..6 neighbours, short contexts)": ours(
            DataConfig(shards=args.shards, batch_size=args.batch_size), args.batches),
        "ours, webdataset tar reader, 6 neighbours": ours(
            DataConfig(**{**fixed.__dict__, "reader": "webdataset"}), args.batches),
    }
    if args.only is None:
        figures.update(baselines(args, fixed, manifest))
    ref = figures["ours, 6 neighbours, L=3200"]
    for name, rate in figures.items():
        print(f"{name:60s} {rate:10.0f} samples/s   ours/this = {ref / rate:6.1f}x")


def baselines(args: argparse.Namespace, fixed: DataConfig, manifest: dict) -> dict[str, float]:
    """The AnnData loaders on the first cells of our stream (same cells and neighbours)."""
    n = args.batches * args.batch_size
    cells = []
    for _, rec in itertools.islice(ShardStream(fixed, 0, 1).samples(), n):
        head = decode_header(rec)
        s = decode_record(head, rec[HEADER.itemsize:HEADER.itemsize + int(head["body_bytes"])])
        path = Path(manifest["datasets"][s.dataset]["path"])
        path = path if path.is_file() else Path(args.data) / path.name
        cells.append((path, s.cell, s.nbr_cells.astype(np.int64)))
    return {
        "anndata in RAM, 6 neighbours": baseline(cells, backed=False),
        "anndata backed, 6 neighbours": baseline(cells[: args.backed_cells], backed=True),
    }


if __name__ == "__main__":
    main()
