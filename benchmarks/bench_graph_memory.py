"""Memory of the graph stage on one large dataset: what it must hold, step by step.

    python benchmarks/bench_graph_memory.py [--cells 200000] [--depth 4] [--work out/bench_graph]
                                            [--previous DIR] [--repeats 1]

The graph stage (``data_prep.graph.build_graph``: HVGs, log-normalisation, PCA, kNN, Leiden) runs
on one ingested dataset in a fresh process. Its peak RSS (``ru_maxrss``) mixes two kinds of
memory: the pages of the memory-mapped ingest arrays it has read (8 bytes per stored count, page
cache the kernel drops and reads again when memory is short) and the anonymous memory of its own
arrays, which must fit. A thread samples both (``RssAnon``, ``RssFile`` of /proc/self/status)
every 10 ms, and the peak anonymous memory is reported per step. With ``--previous DIR`` (a
checkout of an earlier commit) the earlier code runs the same stage on the same ingest, in turn
with this checkout's, and the artifacts of the two are compared byte for byte.

Input: a DERIVED dataset made by ``data_prep.derive --depth D`` from the real 2,800-cell PBMC file
(each derived cell sums D convex mixes of a real cell with real neighbours, binomially thinned:
~1,300 expressed genes a cell at depth 4), ingested once with this checkout; both are kept in
``--work`` for reruns.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

from checkouts import run_in_checkout  # benchmarks/, beside this script
from derived import derived_file  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "data" / "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
STEPS = ("_row_scale", "highly_variable_genes", "log_normalise", "pca", "approximate_knn",
         "connectivities", "leiden")

# Run in a child with a checkout first on sys.path: the graph stage with a memory sampler.
CHILD = r"""
import json, resource, shutil, sys, threading, time
repo, ingest, out = sys.argv[1:4]
steps = sys.argv[4].split(",")
sys.path.insert(0, repo)
import numpy as np
from data_prep import graph as G
from data_prep.ingest import IngestedDataset

def status():
    got = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("RssAnon", "RssFile"):
                got[key] = int(value.split()[0]) / 1024
    return got

step = ["start"]
peaks = {}
def sample():
    while True:
        now, name = status(), step[0]
        p = peaks.setdefault(name, {"RssAnon": 0.0, "RssFile": 0.0})
        for key in p:
            p[key] = max(p[key], now[key])
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()

cfg = G.GraphConfig()
step[0] = "numba compile"  # once per worker process in a build, measured apart
G.approximate_knn(np.random.default_rng(0).standard_normal((3000, 50)).astype(np.float32),
                  cfg.k, 0, cfg)
seconds = {}
def timed(name, fn):
    def run(*args, **kwargs):
        time.sleep(0.03)  # let the sampler see the step begin
        step[0] = name
        t = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds[name] = time.perf_counter() - t
        time.sleep(0.03)
        step[0] = "between steps"
        return result
    return run
for name in steps:
    setattr(G, name, timed(name, getattr(G, name)))
step[0] = "load"
ds = IngestedDataset.load(ingest)
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
graph = G.build_graph(ds, out, cfg, 0)
total = time.perf_counter() - t
time.sleep(0.05)
stage = {k: v for k, v in peaks.items() if k != "numba compile"}
print(json.dumps({
    "cells": ds.n_cells, "nnz": int(ds.counts.nnz), "seconds": total, "step_seconds": seconds,
    "step_anon_mib": {k: v["RssAnon"] for k, v in peaks.items()},
    "peak_anon_mib": max(v["RssAnon"] for v in stage.values()),
    "peak_file_mib": max(v["RssFile"] for v in stage.values()),
    "compile_anon_mib": peaks["numba compile"]["RssAnon"],
    "ru_maxrss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "n_clusters": graph.meta["n_clusters"]}))
"""


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ("nbr_idx.npy", "nbr_dist.npy", "leiden.npy", "pseudo_label.json"):
        h.update((folder / name).read_bytes())
    return h.hexdigest()[:16]


def prepare(work: Path, cells: int, depth: int, seed: int) -> Path:
    """The derived input and its ingest (made once, reused by reruns)."""
    src = derived_file(PBMC, work / f"pbmc_derived_{cells}_depth{depth}.h5ad", cells, depth,
                       seed)
    ingest = work / "ingest"
    if not (ingest / "meta.json").exists():
        sys.path.insert(0, str(REPO))
        from data_prep.ingest import IngestConfig, ingest_dataset
        from data_prep.sheet import DatasetSpec

        ingest_dataset(DatasetSpec(name=src.stem, path=src.resolve()), ingest, IngestConfig())
    return ingest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=200_000)
    ap.add_argument("--depth", type=int, default=4, help="data_prep.derive --depth")
    ap.add_argument("--work", default=str(REPO / "out" / "bench_graph"))
    ap.add_argument("--previous", help="checkout of an earlier commit, measured too")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each checkout, alternating")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    ingest = prepare(work, args.cells, args.depth, args.seed)
    checkouts = {"this": REPO} | ({"previous": Path(args.previous)} if args.previous else {})
    env = {"OMP_NUM_THREADS": "1", "NUMBA_CACHE_DIR": str(REPO / ".numba_cache")}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.repeats):
        for name, repo in checkouts.items():
            r = run_in_checkout(CHILD, repo, ingest, work / f"graph-{name}", ",".join(STEPS),
                                env=env)
            r["artifacts"] = _digest(work / f"graph-{name}")
            runs[name].append(r)
            print(f"{name}: " + json.dumps(r), flush=True)
    first = runs["this"][0]
    print(f"\n{first['cells']:,} cells, {first['nnz']:,} stored counts "
          f"({first['nnz'] / first['cells']:,.0f} a cell), {first['n_clusters']} clusters")
    names = list(checkouts)
    print("| step | " + " | ".join(f"{n}: peak anonymous MiB" for n in names) + " |")
    print("|---|" + "---:|" * len(names))
    for s in ("load", *STEPS):  # _row_scale: the library sizes, one pass over the counts
        cells = [max(r["step_anon_mib"].get(s, 0.0) for r in runs[n]) for n in names]
        print(f"| {s} | " + " | ".join(f"{c:,.0f}" for c in cells) + " |")
    for label, key in (("whole stage: peak anonymous MiB", "peak_anon_mib"),
                       ("whole stage: peak mapped-file MiB", "peak_file_mib"),
                       ("whole stage: ru_maxrss MiB", "ru_maxrss_mib"),
                       ("numba compile beforehand: anonymous MiB", "compile_anon_mib"),
                       ("whole stage: seconds", "seconds")):
        cells = [[r[key] for r in runs[n]] for n in names]
        print(f"| {label} | " + " | ".join(" / ".join(f"{v:,.1f}" if key == "seconds"
                                                     else f"{v:,.0f}" for v in c)
                                         for c in cells) + " |")
    if "previous" in runs:
        a, b = runs["this"][0], runs["previous"][0]
        same = {r["artifacts"] for rs in runs.values() for r in rs}
        print(f"\npeak anonymous memory this / previous: {a['peak_anon_mib']:,.0f} / "
              f"{b['peak_anon_mib']:,.0f} MiB = {a['peak_anon_mib'] / b['peak_anon_mib']:.2f}; "
              f"artifacts {'byte-identical' if len(same) == 1 else 'DIFFER'}")


if __name__ == "__main__":
    main()
