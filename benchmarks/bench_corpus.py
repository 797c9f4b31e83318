"""Corpus-shaped build: thousands of small DERIVED datasets, time per dataset, and the peak RSS
of the plan and pack stages at two corpus sizes 5x apart.

    python benchmarks/bench_corpus.py [--datasets 2000] [--small 400] [--cells 60] [--genes 2000]
                                      [--work out/bench_corpus] [--json FILE] [--previous DIR]

Inputs: ``--datasets`` files of ``--cells`` cells each, DERIVED from the real 2,800-cell PBMC
file by ``data_prep.derive`` (each cell a convex mix of a real cell and a real neighbour,
binomially thinned; ``uns['derived_from']`` says so), cut to the ``--genes`` genes with the most
counts and split into files; each file gets one of 50 tissue labels, so sampling groups are
(cell type x tissue), pooled across datasets.

1. The per-dataset stages of all datasets as a cluster runs them (``build_shards
   --num-machines 2``, the two machines one after the other here, each with ``--jobs``), timed:
   seconds per dataset, and the peak RSS of a machine's driver process. Its parts are kept in
   ``--work`` and reused by a rerun.
2. The merge's plan (``--stage plan``) and one pack machine (``--stage pack --num-machines P
   --machine-index 0``, one process, P chosen so that each machine packs
   ``--shards-per-machine`` shards), each in its own process (``ru_maxrss`` of that process),
   on the first ``--small`` datasets and on all of them (the small corpus reuses the large
   one's per-dataset artifacts). The epoch's stream has one sample per training cell, so the
   stream grows with the corpus too.
3. The packing rate of one process on each corpus's plan: ``--pack-shards`` shards of its epoch
   after a warm-up shard, samples/s and how many datasets a shard draws from. With
   ``--previous DIR`` (a checkout of an earlier commit, e.g. ``git worktree add DIR <commit>``)
   the earlier code packs the same plan too, the two alternating ``--repeats`` times (medians,
   and their ratio).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from checkouts import run_in_checkout  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
PBMC = "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
N_TISSUES = 50
BUILD_FLAGS = ["--organism", "human", "--seed", "0", "--quiet"]


def measure(module: str, argv: list[str]) -> None:
    """Child mode: run ``module``'s main(argv) in this process and print its wall time and peak
    RSS."""
    import importlib

    t = time.perf_counter()
    rc = importlib.import_module(module).main(argv)
    record = {"rc": rc, "seconds": time.perf_counter() - t,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    print("BENCH " + json.dumps(record), flush=True)


def run(module: str, argv: list[str]) -> dict:
    """``module`` with ``argv`` in a fresh process; its BENCH record."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", module, *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines or json.loads(lines[-1][6:])["rc"] not in (0, None):
        raise RuntimeError(f"{module} {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


# Run in a child with a checkout first on sys.path: the packing rate of one process on a plan.
PACK_RATE = r"""
import json, shutil, sys, tempfile, time
from pathlib import Path
import numpy as np
repo, plan, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
sys.path.insert(0, repo)
from data_prep.pack import Packer
out = Path(tempfile.mkdtemp(prefix="pack_rate_"))
packer = Packer(plan, out)
stream = "train-e0000"
bounds = np.load(plan / stream / "bounds.npy")
n = min(n, bounds.shape[0] - 2)
packer.pack(stream, 0)  # warm-up: first allocations and reads
t = time.perf_counter()
for i in range(1, n + 1):
    packer.pack(stream, i)
seconds = time.perf_counter() - t
shutil.rmtree(out)
print(json.dumps({"samples_per_s": int(bounds[n + 1] - bounds[1]) / seconds,
                  "ms_per_shard": 1000 * seconds / n, "shards": n}))
"""


def pack_rate(repo: Path, plan: Path, n_shards: int) -> dict:
    """Samples/s of one process packing ``n_shards`` shards of ``plan`` with the code of
    checkout ``repo``."""
    return run_in_checkout(PACK_RATE, repo, plan, n_shards, env={"OMP_NUM_THREADS": "1"})


def datasets_per_shard(plan: Path, n_shards: int) -> float:
    """Mean number of datasets the measured shards (1..n_shards) draw from."""
    offsets = np.array([d["offset"] for d in json.loads((plan / "plan.json").read_text())
                        ["datasets"]])
    bounds = np.load(plan / "train-e0000" / "bounds.npy")
    cells = np.load(plan / "train-e0000" / "cells.npy")
    return float(np.mean([
        np.unique(np.searchsorted(offsets, cells[bounds[i]:bounds[i + 1]], "right")).size
        for i in range(1, min(n_shards, bounds.shape[0] - 2) + 1)]))


def pack_rates(plan: Path, n_shards: int, previous: Path | None, repeats: int) -> dict:
    """This checkout's packing rate on ``plan`` (and ``previous``'s, alternating): medians."""
    checkouts = {"this": REPO} | ({"previous": previous} if previous else {})
    runs: dict[str, list[float]] = {name: [] for name in checkouts}
    for _ in range(repeats if previous else 1):
        for name, repo in checkouts.items():
            runs[name].append(pack_rate(repo, plan, n_shards)["samples_per_s"])
    res = {name: float(np.median(v)) for name, v in runs.items()}
    res["datasets_per_shard"] = datasets_per_shard(plan, n_shards)
    return res


def make_corpus(data: Path, work: Path, n_datasets: int, n_cells: int, n_genes: int,
                seed: int) -> Path:
    """``n_datasets`` h5ad files of ``n_cells`` derived cells and the ``n_genes`` genes with
    the most counts each (made once, then reused)."""
    import anndata as ad
    import numpy as np

    from data_prep.derive import derive_file
    from utils import atomic

    corpus = work / f"corpus_{n_datasets}x{n_cells}x{n_genes}"
    if (corpus / "done").exists():
        return corpus
    big = work / f"pbmc_derived_{n_datasets * n_cells}.h5ad"
    if not big.exists():
        derive_file(data / PBMC, big, n_datasets * n_cells, seed=seed)
    adata = ad.read_h5ad(big)
    top = np.sort(np.argsort(-np.asarray(adata.X.sum(axis=0)).ravel(), kind="stable")[:n_genes])
    adata = adata[:, top].copy()
    corpus.mkdir(parents=True, exist_ok=True)
    for d in range(n_datasets):
        part = adata[d * n_cells:(d + 1) * n_cells].copy()
        part.obs["tissue"] = f"tissue_{d % N_TISSUES}"
        with atomic.atomic_path(corpus / f"derived_{d:05d}.h5ad") as tmp:
            part.write_h5ad(tmp)
    (corpus / "done").touch()
    return corpus


def subset(corpus: Path, work: Path, n: int) -> Path:
    """A folder with links to the first ``n`` files of ``corpus``."""
    out = work / f"inputs_{n}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in sorted(corpus.glob("*.h5ad"))[:n]:
        (out / f.name).symlink_to(f.resolve())
    return out


def per_dataset_stages(inputs: Path, parts: list[Path], jobs: int,
                       reuse: list[Path] | None = None) -> list[dict]:
    """``build_shards --num-machines len(parts)``, machine after machine; ``reuse``: parts of a
    larger build whose per-dataset artifacts are copied in first (same datasets, same flags)."""
    records = []
    for i, part in enumerate(parts):
        if reuse is not None:
            names = {f.stem for f in inputs.glob("*.h5ad")}
            for src in (reuse[i] / "work" / "datasets").iterdir():
                if src.name in names and not (part / "work" / "datasets" / src.name).exists():
                    shutil.copytree(src, part / "work" / "datasets" / src.name)
        records.append(run("data_prep.build_shards", [
            str(inputs), *BUILD_FLAGS, "--jobs", str(jobs), "--num-machines", str(len(parts)),
            "--machine-index", str(i), "--out", str(part)]))
    return records


def merge_stages(parts: list[Path], out: Path, shards_per_machine: int) -> dict:
    """The merge's plan, then one pack machine of a job array sized so that each packs
    ``shards_per_machine`` shards, each stage in its own process."""
    shutil.rmtree(out, ignore_errors=True)
    common = [*map(str, parts), "--out", str(out), "--quiet", "--jobs", "1"]
    res = {"plan": run("data_prep.merge", [*common, "--stage", "plan"])}
    plan = out / "work" / "pack"
    n_shards = sum(np.load(b).shape[0] - 1 for b in plan.glob("*/bounds.npy"))
    machines = max(1, n_shards // shards_per_machine)
    res["pack"] = run("data_prep.merge", [*common, "--stage", "pack", "--num-machines",
                                          str(machines), "--machine-index", "0"])
    meta = json.loads((plan / "plan.json").read_text())
    res["pack"]["shards"] = len(list(plan.glob("*/done/*.json")))
    res["n_datasets"] = len(meta["datasets"])
    res["n_cells"] = sum(d["n_cells"] for d in meta["datasets"])
    res["n_samples"] = int(np.load(plan / "train-e0000" / "bounds.npy")[-1])
    res["n_groups"] = json.loads((plan / "corpus.json").read_text())["n_groups"]
    res["n_shards"], res["pack_machines"] = int(n_shards), machines
    return res


def report(res: dict) -> str:
    small, large = res["corpora"]
    b = res["build"]
    lines = [
        f"corpus-shaped build: {b['n_datasets']:,} DERIVED datasets of {b['n_cells']} cells; "
        f"per-dataset stages (2 machines one after the other, --jobs {b['jobs']}): "
        f"{b['seconds']:.1f} s = {b['seconds'] / b['n_datasets']:.3f} s per dataset; "
        f"peak RSS of a machine's driver process {b.get('driver_peak_rss_mib', float('nan')):.0f}"
        " MiB (it reads every dataset's gene names)",
        "",
        "| stage | " + " | ".join(f"{c['n_datasets']:,} datasets ({c['n_cells']:,} cells, "
                                    f"{c['n_groups']:,} groups, {c['n_samples']:,} samples): "
                                    "s / peak RSS MiB" for c in (small, large)) + " | RSS ratio |",
        "|---|---:|---:|---:|",
    ]
    for stage, what in (("plan", "plan (vocabularies, groups, the epoch's draw and shuffle)"),
                        ("pack", "pack: machine 0 of a job array")):
        s, g = small[stage], large[stage]
        if stage == "pack":
            what += (f" ({s['shards']} of {small['n_shards']} / {g['shards']} of "
                     f"{large['n_shards']} shards)")
        lines.append(f"| {what} | {s['seconds']:.1f} / {s['peak_rss_mib']:.0f} | "
                     f"{g['seconds']:.1f} / {g['peak_rss_mib']:.0f} | "
                     f"{g['peak_rss_mib'] / s['peak_rss_mib']:.2f} |")
    rates = [c["pack_rate"] for c in (small, large)]
    lines.append("| pack rate, one process: samples/s (datasets per shard) | "
                 + " | ".join(f"{r['this']:,.0f} ({r['datasets_per_shard']:.0f})" for r in rates)
                 + " | |")
    if "previous" in rates[0]:
        lines.append("| the same, previous checkout (--previous) | "
                     + " | ".join(f"{r['previous']:,.0f}" for r in rates) + " | |")
        lines.append("| this / previous | " + " | ".join(
            f"**{r['this'] / r['previous']:.2f}**" for r in rates) + " | |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--work", default=str(REPO / "out" / "bench_corpus"))
    p.add_argument("--datasets", type=int, default=2000)
    p.add_argument("--small", type=int, default=400)
    p.add_argument("--cells", type=int, default=60, help="cells per derived dataset")
    p.add_argument("--genes", type=int, default=2000,
                   help="genes per dataset (those with the most counts)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shards-per-machine", type=int, default=2,
                   help="pack job array sized so that each machine packs this many shards")
    p.add_argument("--pack-shards", type=int, default=10,
                   help="shards timed for the packing rate")
    p.add_argument("--previous", default=None,
                   help="checkout of an earlier commit whose packing rate is measured too")
    p.add_argument("--repeats", type=int, default=3,
                   help="alternating runs of the two checkouts' packing (medians)")
    p.add_argument("--json", default=None)
    p.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--make-corpus", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return measure(args.measure[0], args.measure[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.make_corpus:
        return print(make_corpus(Path(args.data), work, args.datasets, args.cells, args.genes,
                                 args.seed))
    # in a child process: a child started by fork + exec inherits its parent's peak RSS, so the
    # driver must stay small for the stages' figures to be their own
    t = time.perf_counter()
    corpus = Path(subprocess.run([sys.executable, __file__, "--make-corpus", *sys.argv[1:]],
                                 check=True, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.split()[-1])
    print(f"corpus ready in {time.perf_counter() - t:.0f} s: {corpus}", flush=True)

    large_parts = [work / "parts_large" / str(i) for i in range(2)]
    small_parts = [work / "parts_small" / str(i) for i in range(2)]
    timing = work / "build.json"
    if not (timing.exists() and all((d / "part.json").exists() for d in large_parts)):
        for d in (*large_parts, *small_parts):
            shutil.rmtree(d, ignore_errors=True)
        t = time.perf_counter()
        records = per_dataset_stages(subset(corpus, work, args.datasets), large_parts, args.jobs)
        timing.write_text(json.dumps({
            "seconds": time.perf_counter() - t, "n_datasets": args.datasets,
            "n_cells": args.cells, "jobs": args.jobs,
            # the driver process of a machine (its workers are separate processes)
            "driver_peak_rss_mib": max(r["peak_rss_mib"] for r in records)}))
    res = {"build": json.loads(timing.read_text())}
    print("per-dataset stages: " + json.dumps(res["build"]), flush=True)
    if not all((d / "part.json").exists() for d in small_parts):
        per_dataset_stages(subset(corpus, work, args.small), small_parts, args.jobs,
                           large_parts)
    res["corpora"] = []
    for name, parts in (("small", small_parts), ("large", large_parts)):
        r = merge_stages(parts, work / f"merged_{name}", args.shards_per_machine)
        r["pack_rate"] = pack_rates(work / f"merged_{name}" / "work" / "pack", args.pack_shards,
                                    Path(args.previous).resolve() if args.previous else None,
                                    args.repeats)
        res["corpora"].append(r)
        print(f"{name}: " + json.dumps(r), flush=True)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
