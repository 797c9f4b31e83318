"""Corpus-shaped build: thousands of small DERIVED datasets, time per dataset, and the peak RSS
of the plan and pack stages at two corpus sizes 5x apart.

    python benchmarks/bench_corpus.py [--datasets 2000] [--small 400] [--cells 100]
                                      [--work out/bench_corpus] [--previous PREV] [--json FILE]

Inputs: ``--datasets`` files of ``--cells`` cells each, DERIVED from the real 2,800-cell PBMC
file by ``data_prep.derive`` (each cell a convex mix of a real cell and a real neighbour,
binomially thinned; ``uns['derived_from']`` says so), split into files; each file gets one of 50
tissue labels, so sampling groups are (cell type x tissue), pooled across datasets.

1. The per-dataset stages of all datasets as a cluster runs them (``build_shards
   --num-machines 2``, the two machines one after the other here, each with ``--jobs``), timed:
   seconds per dataset.
2. The merge's stages, each in its own process (``ru_maxrss`` of that process): ``--stage
   plan``, ``--stage pack`` (one machine, one process) and ``--stage manifest``, on the first
   ``--small`` datasets and on all of them (the small corpus reuses the large one's per-dataset
   artifacts). Every epoch's stream has one sample per training cell, so the stream grows with
   the corpus too.
3. With ``--previous PREV`` (a checkout of an earlier commit, e.g. ``git worktree add PREV
   <commit>``), the same two merges with that checkout's code, whole merge in one process: the
   alternative measured in the same run.
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


def run(module: str, argv: list[str], repo: Path = REPO) -> dict:
    """``module`` with ``argv`` in a fresh process of ``repo``'s code; its BENCH record."""
    env = dict(os.environ, PYTHONPATH=str(repo), OMP_NUM_THREADS="1")
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", module, *argv]
    proc = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines or json.loads(lines[-1][6:])["rc"] not in (0, None):
        raise RuntimeError(f"{module} {' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def make_corpus(data: Path, work: Path, n_datasets: int, n_cells: int, seed: int) -> Path:
    """``n_datasets`` h5ad files of ``n_cells`` derived cells each (made once, then reused)."""
    import anndata as ad

    from data_prep import atomic
    from data_prep.derive import derive_file

    corpus = work / f"corpus_{n_datasets}x{n_cells}"
    if (corpus / "done").exists():
        return corpus
    big = work / f"pbmc_derived_{n_datasets * n_cells}.h5ad"
    if not big.exists():
        derive_file(data / PBMC, big, n_datasets * n_cells, seed=seed)
    adata = ad.read_h5ad(big)
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


def merge_stages(parts: list[Path], out: Path, repo: Path = REPO,
                 stages=("plan", "pack", "manifest")) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    res = {}
    for stage in stages:
        args = [*map(str, parts), "--out", str(out), "--quiet", "--jobs", "1"]
        res[stage] = run("data_prep.merge", args + (["--stage", stage] if stage != "all" else []),
                         repo)
    man = json.loads((out / "manifest.json").read_text())
    res["n_samples"] = man["n_samples"]
    res["n_cells"] = man["accounting"]["total"]["packed"]
    res["n_datasets"] = len(man["datasets"])
    res["n_groups"] = man["labels"]["n_groups"]
    res["n_shards"] = len(man["shards"])
    return res


def report(res: dict) -> str:
    small, large = res["corpora"]
    b = res["build"]
    lines = [
        f"corpus-shaped build: {b['n_datasets']:,} DERIVED datasets of {b['n_cells']} cells; "
        f"per-dataset stages (2 machines one after the other, --jobs {b['jobs']}): "
        f"{b['seconds']:.1f} s = {b['seconds'] / b['n_datasets']:.3f} s per dataset "
        f"({b['n_datasets'] / b['seconds']:.1f} datasets/s)",
        "",
        "| stage | " + " | ".join(f"{c['n_datasets']:,} datasets ({c['n_cells']:,} cells, "
                                    f"{c['n_samples']:,} samples): s / peak RSS MiB"
                                    for c in (small, large)) + " | RSS ratio |",
        "|---|---:|---:|---:|",
    ]
    for stage in ("plan", "pack", "manifest"):
        s, g = small[stage], large[stage]
        lines.append(f"| {stage} | {s['seconds']:.1f} / {s['peak_rss_mib']:.0f} | "
                     f"{g['seconds']:.1f} / {g['peak_rss_mib']:.0f} | "
                     f"{g['peak_rss_mib'] / s['peak_rss_mib']:.2f} |")
    if "previous" in res:
        s, g = (c["all"] for c in res["previous"])
        lines.append(f"| previous code, whole merge in one process | {s['seconds']:.1f} / "
                     f"{s['peak_rss_mib']:.0f} | {g['seconds']:.1f} / {g['peak_rss_mib']:.0f} | "
                     f"{g['peak_rss_mib'] / s['peak_rss_mib']:.2f} |")
    lines.append("")
    lines.append(f"groups: {small['n_groups']:,} / {large['n_groups']:,}; shards: "
                 f"{small['n_shards']:,} / {large['n_shards']:,}")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--work", default=str(REPO / "out" / "bench_corpus"))
    p.add_argument("--datasets", type=int, default=2000)
    p.add_argument("--small", type=int, default=400)
    p.add_argument("--cells", type=int, default=100, help="cells per derived dataset")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--previous", default=None, help="checkout of an earlier commit to compare")
    p.add_argument("--json", default=None)
    p.add_argument("--measure", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    p.add_argument("--make-corpus", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.measure:
        return measure(args.measure[0], args.measure[1:])
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.make_corpus:
        return print(make_corpus(Path(args.data), work, args.datasets, args.cells, args.seed))
    # in a child process: a child started by fork + exec inherits its parent's peak RSS, so the
    # driver must stay small for the stages' figures to be their own
    t = time.perf_counter()
    corpus = Path(subprocess.run([sys.executable, __file__, "--make-corpus", *sys.argv[1:]],
                                 check=True, capture_output=True, text=True,
                                 env=dict(os.environ, PYTHONPATH=str(REPO))).stdout.split()[-1])
    print(f"corpus ready in {time.perf_counter() - t:.0f} s: {corpus}", flush=True)

    large_parts = [work / "parts_large" / str(i) for i in range(2)]
    small_parts = [work / "parts_small" / str(i) for i in range(2)]
    for d in (*large_parts, *small_parts):
        shutil.rmtree(d, ignore_errors=True)
    t = time.perf_counter()
    per_dataset_stages(subset(corpus, work, args.datasets), large_parts, args.jobs)
    res = {"build": {"seconds": time.perf_counter() - t, "n_datasets": args.datasets,
                     "n_cells": args.cells, "jobs": args.jobs}}
    print("per-dataset stages: " + json.dumps(res["build"]), flush=True)
    per_dataset_stages(subset(corpus, work, args.small), small_parts, args.jobs, large_parts)
    res["corpora"] = []
    for name, parts in (("small", small_parts), ("large", large_parts)):
        r = merge_stages(parts, work / f"merged_{name}")
        res["corpora"].append(r)
        print(f"{name}: " + json.dumps(r), flush=True)
    if args.previous:
        res["previous"] = [merge_stages(parts, work / f"previous_{name}", Path(args.previous),
                                        ("all",))
                           for name, parts in (("small", small_parts), ("large", large_parts))]
        print("previous: " + json.dumps(res["previous"]), flush=True)
    print(report(res))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
