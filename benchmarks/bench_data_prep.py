"""Data-preparation benchmark: cells/s and peak RSS per stage, and the scanpy reference pipeline.

    python benchmarks/bench_data_prep.py [--data DIR] [--cells 200000] [--work out/bench]

Inputs: the real 10k-cell mouse-brain file, and a DERIVED input of ``--cells`` cells made by
``data_prep.derive`` from the real 2,800-cell PBMC file (each derived cell = a convex mix of a real
cell and one of its real neighbours, binomially thinned; not tiling). The brain file holds only its
first 1,000 genes, so almost no cell reaches 200 expressed genes: it is ingested with
``--brain-min-genes`` (default 10) so that the graph stages see its ~10k cells.

Every stage runs in its own subprocess (this script with ``--stage``), which reports its wall time
and its own peak RSS (``ru_maxrss``), so stages do not pollute each other's memory figures.
Stages: ingest -> hvg -> normalise -> pca -> knn -> leiden, then the whole graph stage as the
build runs it (``build_graph``), then packing (``data_prep.build_shards`` reusing the ingest and
graph artifacts) and packing alone (``pack_all`` on the saved plan, in a fresh process), once
per ``--pack-samples`` stream size; earlier shards and plans are removed first, so packing really
runs. kNN recall@6 is measured against exact neighbours (brute force) in the same PCA space on
``--recall-queries`` random cells.

numba compiles pynndescent's NN-descent on first use in each process and cannot cache it; the kNN
stage first runs it on a small random matrix and reports that compile time separately ("cold" =
compile + run). The scanpy reference (normalize_total, log1p, highly_variable_genes, pca,
neighbors, leiden, all defaults but n_top_genes=4000, n_comps=50, n_neighbors=15,
resolution=1) runs in a separate virtual environment ``--scanpy-venv`` (created on first use with
``pip install scanpy==1.11.5 pynndescent==0.5.13``: scanpy's neighbors crashes with
pynndescent 0.7 + scipy 1.17 from 8,192 cells), with the same warm-up so both are compared warm.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BRAIN = "mouse_brain_10x_scanpy_10kcells_1000genes_raw.h5ad"
PBMC = "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
STAGES = ("ingest", "hvg", "normalise", "pca", "knn", "leiden", "graph", "pack", "shards")
SCANPY_PINS = ("scanpy==1.11.5", "pynndescent==0.5.13", "leidenalg==0.12.0", "igraph==1.0.0")
WARMUP_CELLS = 3000


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _emit(record: dict) -> None:
    record["peak_rss_mib"] = round(_peak_rss_mib(), 1)
    print("BENCH " + json.dumps(record), flush=True)


# --------------------------------------------------------------------------- our stages (child)


def _dataset_name(path: Path) -> str:
    from data_prep.sheet import safe_name

    return safe_name(path.stem)


def run_shards(out: Path) -> None:
    """Packing alone: every shard of the plan ``build_shards`` saved, in this fresh process."""
    import shutil
    from contextlib import nullcontext

    from data_prep import pack

    class _NoBar(nullcontext):
        def update(self, n: int) -> None:
            pass

        def close(self) -> None:
            pass

    shutil.rmtree(out / "shards", ignore_errors=True)
    plan = out / "work" / "pack"
    streams = sorted(d.name for d in plan.iterdir() if (d / "stream.json").is_file())
    t = time.perf_counter()
    shards = pack.pack_all(plan, out, streams, 1, None, lambda total, desc: _NoBar())
    samples = sum(s["n_samples"] for kind in shards.values() for s in kind)
    _emit({"stage": "shards", "samples": samples, "seconds": time.perf_counter() - t,
           "bytes": sum(s["bytes"] for kind in shards.values() for s in kind)})


def run_stage(stage: str, src: Path, out: Path, min_genes: int, seed: int, args) -> None:
    if stage == "shards":
        return run_shards(out)
    import shutil

    import numpy as np
    import scipy.sparse as sp

    from data_prep import graph as G
    from data_prep.ingest import IngestConfig, IngestedDataset, ingest_dataset
    from data_prep.sheet import DatasetSpec

    d = out / "work" / "datasets" / _dataset_name(src)
    st = out / "stages"
    st.mkdir(parents=True, exist_ok=True)
    cfg = G.GraphConfig()
    rec: dict = {"stage": stage}
    if stage == "ingest":
        shutil.rmtree(d / "ingest", ignore_errors=True)  # measure the work, not a resume
        t = time.perf_counter()
        spec = DatasetSpec(name=_dataset_name(src), path=src.resolve())
        ds = ingest_dataset(spec, d / "ingest", IngestConfig(min_genes=min_genes))
        rec.update(seconds=time.perf_counter() - t, cells=ds.n_cells, n_input=ds.meta["n_input"])
        return _emit(rec)
    ds = IngestedDataset.load(d / "ingest")
    n = ds.n_cells
    rec["cells"] = n
    t = time.perf_counter()
    if stage == "hvg":
        np.save(st / "genes.npy", G.highly_variable_genes(ds.counts, cfg))
    elif stage == "normalise":
        x = G.log_normalise(ds.counts, np.load(st / "genes.npy"), cfg)
        for part in ("data", "indices", "indptr"):
            np.save(st / f"x_{part}.npy", getattr(x, part))
        rec["nnz"] = int(x.nnz)
    elif stage in ("pca", "knn", "leiden", "recall"):
        if stage == "pca":
            parts = [np.load(st / f"x_{p}.npy", mmap_mode="r")
                     for p in ("data", "indices", "indptr")]
            genes = np.load(st / "genes.npy")
            x = sp.csr_matrix(tuple(parts), shape=(n, genes.size))
            np.save(st / "emb.npy", G.pca(x, min(cfg.n_pcs, n - 1, genes.size), seed, cfg))
        elif stage == "knn":
            emb = np.load(st / "emb.npy")
            k = min(cfg.k, n - 1)
            if n >= cfg.exact_knn_below:
                warm = np.random.default_rng(0).standard_normal((WARMUP_CELLS, emb.shape[1]))
                G.approximate_knn(warm.astype(np.float32), k, seed, cfg)
                rec["compile_seconds"] = time.perf_counter() - t
                t = time.perf_counter()
                idx, dist = G.approximate_knn(emb, k, seed, cfg)
                rec["method"] = "pynndescent"
            else:
                idx, dist = G.exact_knn(emb, k)
                rec["method"] = "exact"
            np.save(st / "idx.npy", idx)
            np.save(st / "dist.npy", dist)
        elif stage == "leiden":
            idx, dist = np.load(st / "idx.npy"), np.load(st / "dist.npy")
            conn = G.connectivities(idx, dist)
            rec["connectivities_seconds"] = time.perf_counter() - t
            clusters = G.leiden(conn, cfg.leiden_resolution, cfg.leiden_iterations, seed,
                                cfg.leiden_backend)
            rec["n_clusters"] = int(np.unique(clusters).size)
        else:  # recall@6 and @15 of the kNN stage against exact neighbours in the same PCA space
            emb, idx = np.load(st / "emb.npy"), np.load(st / "idx.npy")
            q = np.random.default_rng(seed).choice(n, min(args.recall_queries, n), replace=False)
            exact, exact_dist = G.exact_knn(emb, idx.shape[1], queries=q)
            found = np.linalg.norm(emb[q, None, :] - emb[idx[q]], axis=2)
            for kk in (6, idx.shape[1]):
                hits = [len(set(a[:kk]) & set(b[:kk])) for a, b in zip(idx[q], exact)]
                rec[f"recall_at_{kk}"] = float(np.sum(hits) / (len(q) * kk))
                # tie-aware (ann-benchmarks style): a found neighbour counts if it is no farther
                # than the exact k-th neighbour (equidistant cells are equally correct)
                bound = exact_dist[:, kk - 1 : kk].astype(np.float64) * (1 + 1e-6) + 1e-6
                rec[f"dist_recall_at_{kk}"] = float((found[:, :kk] <= bound).mean())
            rec["queries"] = int(len(q))
    elif stage == "graph":
        shutil.rmtree(d / "graph", ignore_errors=True)  # measure the work, not a resume
        g = G.build_graph(ds, d / "graph", cfg, seed)
        rec.update(n_clusters=g.meta["n_clusters"], n_pseudo_labels=g.meta["n_pseudo_labels"])
    elif stage == "pack":
        shutil.rmtree(out / "shards", ignore_errors=True)
        shutil.rmtree(out / "work" / "pack", ignore_errors=True)
        cmd = [sys.executable, "-m", "data_prep.build_shards", str(src), "--out", str(out),
               "--min-genes", str(min_genes), "--seed", str(seed), "--quiet",
               "--stream-size", str(args.pack_samples[0])]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"packing failed: {proc.stderr[-2000:]}")
        rec["samples"] = args.pack_samples[0]
        rec["child_peak_rss_mib"] = round(
            resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0, 1
        )
    rec["seconds"] = time.perf_counter() - t
    _emit(rec)


# --------------------------------------------------------------------------- scanpy (child)


def run_scanpy(src: Path, min_genes: int, seed: int) -> None:
    """The reference pipeline, timed step by step (runs inside the scanpy environment)."""
    import anndata as ad
    import numpy as np
    import scanpy as sc

    def pipeline(adata, times: dict | None):
        steps = [
            ("normalize_total", lambda: sc.pp.normalize_total(adata, target_sum=1e4)),
            ("log1p", lambda: sc.pp.log1p(adata)),
            ("highly_variable_genes",
             lambda: sc.pp.highly_variable_genes(adata, n_top_genes=min(4000, adata.n_vars))),
            ("pca", lambda: sc.pp.pca(adata, n_comps=50, random_state=seed)),
            ("neighbors", lambda: sc.pp.neighbors(adata, n_neighbors=15, random_state=seed)),
            ("leiden", lambda: sc.tl.leiden(adata, resolution=1.0, random_state=seed)),
        ]
        for name, fn in steps:
            t = time.perf_counter()
            fn()
            if times is not None:
                times[name] = time.perf_counter() - t

    adata = ad.read_h5ad(src)
    sc.pp.filter_cells(adata, min_genes=min_genes)
    t = time.perf_counter()
    # > 4,096 cells, or scanpy takes its exact kNN path and pynndescent stays uncompiled
    warm = adata[np.random.default_rng(0).choice(adata.n_obs, min(5000, adata.n_obs),
                                                 replace=False)].copy()
    pipeline(warm, None)
    warmup = time.perf_counter() - t
    times: dict = {}
    pipeline(adata, times)
    _emit({"stage": "scanpy", "cells": int(adata.n_obs), "warmup_seconds": warmup,
           "seconds": times, "n_clusters": int(adata.obs["leiden"].nunique()),
           "scanpy": sc.__version__})


# --------------------------------------------------------------------------- driver


def _child(argv: list[str], python: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.setdefault("NUMBA_CACHE_DIR", str(REPO / ".numba_cache"))
    cmd = [python or sys.executable, str(Path(__file__).resolve()), *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(argv)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][6:])


def ensure_scanpy_venv(venv: Path) -> str:
    python = venv / "bin" / "python"
    if not python.exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "-q", *SCANPY_PINS], check=True)
    return str(python)


def bench_input(label: str, src: Path, out: Path, min_genes: int, args) -> dict:
    res: dict = {"label": label, "file": src.name, "stages": {}}
    common = ["--input", str(src), "--out", str(out), "--min-genes", str(min_genes),
              "--seed", str(args.seed), "--recall-queries", str(args.recall_queries)]
    runs = [(stage, stage, []) for stage in (*STAGES[:-3], "recall", "graph")]
    if not args.no_pack:
        runs += [(f"{stage}_{n}", stage, ["--pack-samples", str(n)])
                 for n in args.pack_samples for stage in ("pack", "shards")]
    for key, stage, extra in runs:
        r = _child(["--stage", stage, *common, *extra])
        res["stages"][key] = r
        print(f"[{label}] {key}: " + json.dumps(r), flush=True)
    previous = {r["file"]: r for r in args.previous}
    if src.name in previous and "scanpy" in previous[src.name]:
        res["scanpy"] = previous[src.name]["scanpy"]
        print(f"[{label}] scanpy: reused from --scanpy-from", flush=True)
    elif not args.no_scanpy:
        python = ensure_scanpy_venv(Path(args.scanpy_venv))
        r = _child(["--scanpy-child", "--input", str(src), "--min-genes", str(min_genes),
                    "--seed", str(args.seed)], python=python)
        res["scanpy"] = r
        print(f"[{label}] scanpy: " + json.dumps(r), flush=True)
    return res


def _fmt_rate(cells: int, seconds: float) -> str:
    return f"{cells / seconds:,.0f}" if seconds > 0 else "-"


def report(results: list[dict]) -> str:
    lines = []
    for res in results:
        s = res["stages"]
        n = s["ingest"]["cells"]
        lines += [f"### {res['label']}: {res['file']} ({n:,} cells after QC)", "",
                  "| stage | seconds | cells/s | peak RSS (MiB) | notes |",
                  "|---|---:|---:|---:|---|"]
        for key, r in s.items():
            name = key.split("_")[0]
            note = ""
            if name == "knn":
                note = f"{r['method']}"
                if "compile_seconds" in r:
                    note += f"; +{r['compile_seconds']:.1f} s numba compile (cold)"
            elif name == "leiden":
                note = (f"{r['n_clusters']} clusters; connectivities "
                        f"{r['connectivities_seconds']:.1f} s")
            elif name == "graph":
                note = f"all graph stages in one process; {r['n_clusters']} clusters"
            elif name == "recall":
                note = (f"recall@6 = {r['recall_at_6']:.4f}, recall@15 = "
                        f"{r['recall_at_15']:.4f} ({r['queries']} queries, exact brute force)")
            elif name == "pack":
                note = (f"{r['samples']:,}-sample stream: whole build_shards reusing ingest+graph"
                        f" (peak RSS of that process; {r['peak_rss_mib']:.0f} MiB this driver)")
                r = {**r, "peak_rss_mib": r["child_peak_rss_mib"]}
            elif name == "shards":
                note = (f"packing alone (pack_all on the saved plan, fresh process), "
                        f"{r['samples']:,} samples, {r['bytes'] / r['samples'] / 1024:.0f} KiB"
                        " per sample")
            rate = _fmt_rate(r.get("samples", r.get("cells", 0)), r["seconds"])
            lines.append(
                f"| {key} | {r['seconds']:.2f} | {rate} | {r['peak_rss_mib']:.0f} | {note} |"
            )
        if "scanpy" in res:
            sc = res["scanpy"]
            t = sc["seconds"]
            ours = s["knn"]["seconds"] + s["leiden"]["seconds"]
            ours_cold = ours + s["knn"].get("compile_seconds", 0.0)
            theirs = t["neighbors"] + t["leiden"]
            lines += ["", f"scanpy {sc['scanpy']} reference (same cells, warm: after a "
                      f"5000-cell warm-up run of {sc['warmup_seconds']:.1f} s; peak RSS "
                      f"{sc['peak_rss_mib']:.0f} MiB; {sc['n_clusters']} clusters):", "",
                      "| step | seconds |", "|---|---:|"]
            lines += [f"| {k} | {v:.2f} |" for k, v in t.items()]
            lines += ["", f"**kNN + Leiden: ours {ours:.1f} s vs scanpy neighbors + leiden "
                      f"{theirs:.1f} s -> {theirs / ours:.2f}x faster** (ours incl. numba compile: "
                      f"{ours_cold:.1f} s, {theirs / ours_cold:.2f}x vs warm scanpy)"]
        lines.append("")
    return "\n".join(lines + packing_summary(results))


def packing_summary(results: list[dict]) -> list[str]:
    """Packing peak RSS by input size (columns) and stream size (rows): flat across a row."""
    sizes = sorted({int(k.split("_")[1]) for res in results for k in res["stages"]
                    if k.startswith("shards_")})
    if not sizes:
        return []
    head = " | ".join(f"{res['stages']['ingest']['cells']:,} cells: packing / build_shards"
                      for res in results)
    lines = ["Packing peak RSS (MiB) by input cells and stream size:", "",
             f"| stream samples | {head} |", "|---:|" + "---:|" * len(results)]
    for n in sizes:
        cells = [f"{res['stages'][f'shards_{n}']['peak_rss_mib']:.0f} / "
                 f"{res['stages'][f'pack_{n}']['child_peak_rss_mib']:.0f}"
                 if f"shards_{n}" in res["stages"] else "-" for res in results]
        lines.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return lines + [""]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(REPO / "data"))
    p.add_argument("--work", default=str(REPO / "out" / "bench"))
    p.add_argument("--cells", type=int, default=200_000, help="cells of the derived input")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--brain-min-genes", type=int, default=10)
    p.add_argument("--min-genes", type=int, default=200, help="QC of the derived input")
    p.add_argument("--recall-queries", type=int, default=2000)
    p.add_argument("--pack-samples", type=int, nargs="+", default=[5_000, 20_000],
                   help="stream sizes to pack (each packed twice: whole build, packing alone)")
    p.add_argument("--scanpy-venv", default=str(REPO / ".venv-scanpy"))
    p.add_argument("--no-scanpy", action="store_true")
    p.add_argument("--scanpy-from", default=None,
                   help="reuse the scanpy figures of a previous --json output (same inputs)")
    p.add_argument("--no-pack", action="store_true")
    p.add_argument("--only", choices=("real", "derived"), default=None)
    p.add_argument("--json", default=None, help="also write all figures to this JSON file")
    # child modes
    p.add_argument("--stage", choices=(*STAGES, "recall"), help=argparse.SUPPRESS)
    p.add_argument("--scanpy-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--input", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.scanpy_child:
        return run_scanpy(Path(args.input), args.min_genes, args.seed)
    if args.stage:
        return run_stage(args.stage, Path(args.input), Path(args.out), args.min_genes,
                         args.seed, args)

    args.previous = json.loads(Path(args.scanpy_from).read_text()) if args.scanpy_from else []
    data, work = Path(args.data), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results = []
    if args.only in (None, "real"):
        results.append(bench_input("real", data / BRAIN, work / "real", args.brain_min_genes, args))
    if args.only in (None, "derived"):
        derived = work / f"pbmc_derived_{args.cells}.h5ad"
        if not derived.exists():
            from data_prep.derive import derive_file

            derive_file(data / PBMC, derived, args.cells, seed=args.seed)
        results.append(bench_input(f"DERIVED ({args.cells:,} cells from {PBMC})", derived,
                                   work / "derived", args.min_genes, args))
    text = report(results)
    print(text)
    if args.json:
        from utils import atomic

        atomic.write_text(args.json, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
