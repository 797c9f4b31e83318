"""pretrain.embed in bf16 against fp32: cells/s and how far the embeddings move.

    python benchmarks/bench_embed.py [--model out/demo/seed0/model.pt]
        [--data data/human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad]
        [--preset small --preset-cells 256 --preset-context 3200] [--repeats 2] [--workers N]
        [--samples-only]

Two models: the given model file at its training context on every cell of the file, and an
untrained model of ``--preset`` with the same vocabularies at ``--preset-context`` genes on the
file's first ``--preset-cells`` cells (the width and depth a pretraining run uses; its speed does
not depend on its weights). Each is embedded with ``precision="fp32"`` and ``"bf16"`` (autocast)
in turn, ``--repeats`` times (samples made as ``pretrain.embed`` makes them on the device: in
the same process on a CPU); the best time of each is kept. The samples alone (reading,
neighbour graph, batches; no model) are timed too, so the forward's share shows, made in one
process and by ``--workers`` DataLoader processes (what a GPU's forward waits on). Then
the bf16 embedding against the fp32 one: cosine per cell, the largest absolute difference, and
how many cells keep their predicted cell type and their 15 nearest neighbours.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import anndata
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_quality import PBMC, save_random_init  # noqa: E402  (benchmarks/)

from pretrain.device_peaks import native_bf16  # noqa: E402
from pretrain.embed import (  # noqa: E402
    EMBEDDING_KEY,
    default_workers,
    embed_cells,
    iter_batches,
)
from pretrain.export import load_model_file  # noqa: E402
from pretrain.label_transfer import nearest_reference  # noqa: E402
from pretrain.model import ModelConfig  # noqa: E402
from utils.cpus import cpu_model, usable_cpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def samples_alone(exported, data: Path, workers: int) -> tuple[int, float, float]:
    """(cells, seconds in one process, seconds with ``workers`` processes) of reading ``data``,
    its neighbour graph and every batch, no model (the second timing is the first's when
    ``workers`` is 0)."""
    seconds = []
    for w in dict.fromkeys((0, workers)):
        start = time.perf_counter()
        n = sum(len(rows) for rows, _ in iter_batches(exported, data, workers=w))
        seconds.append(time.perf_counter() - start)
    return n, seconds[0], seconds[-1]


def compare(model: Path, data: Path, repeats: int, device: str | torch.device = "cpu",
            workers: int | None = None) -> dict:
    """``model`` on ``data``, fp32 and bf16 in turn on ``device`` (best of ``repeats``, batches
    built by pretrain.embed's default workers for the device), the samples alone in one process
    and with ``workers`` processes (default: the device's default), and bf16's embedding
    against fp32's."""
    exported = load_model_file(model)
    best, results = {}, {}
    workers = default_workers(torch.device(device)) if workers is None else workers
    n, samples_s, samples_workers_s = samples_alone(exported, data, workers)
    for _ in range(repeats):
        for precision in ("fp32", "bf16"):
            start = time.perf_counter()
            results[precision] = embed_cells(exported, data, precision=precision, device=device)
            seconds = time.perf_counter() - start
            best[precision] = min(best.get(precision, seconds), seconds)
    a, b = (results[p].obsm[EMBEDDING_KEY] for p in ("fp32", "bf16"))
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    k = min(15, n - 1)
    nbr_a = nearest_reference(a, a, k + 1, "exact")
    nbr_b = nearest_reference(b, b, k + 1, "exact")
    kept = np.mean([len(set(x) & set(y)) / (k + 1) for x, y in zip(nbr_a, nbr_b)])
    same_type = np.mean(np.asarray(results["fp32"].obs["predicted_cell_type"]).astype(str)
                        == np.asarray(results["bf16"].obs["predicted_cell_type"]).astype(str))
    return {"name": f"{exported.config.d_model}-wide, {exported.config.n_layers} layers",
            "cells": n, "context": exported.train_context, "samples_s": samples_s,
            "workers": workers, "samples_workers_s": samples_workers_s, **best,
            "fp32_cells_per_s": n / best["fp32"], "bf16_cells_per_s": n / best["bf16"],
            "cos_min": float(cosine.min()), "cos_median": float(np.median(cosine)),
            "max_abs": float(np.abs(a - b).max()), "same_type": float(same_type),
            "kept_neighbours": float(kept)}


def model_and_data(ap: argparse.ArgumentParser) -> None:
    """--model and --data, as the embedding benchmarks take them: make demo's model and the
    real PBMC file by default."""
    ap.add_argument("--model", default=str(REPO / "out/demo/seed0/model.pt"),
                    help="an exported model (default: make demo's)")
    ap.add_argument("--data", default=str(PBMC))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_and_data(ap)
    ap.add_argument("--preset", default="small")
    ap.add_argument("--preset-cells", type=int, default=256)
    ap.add_argument("--preset-context", type=int, default=3200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--workers", type=int, default=usable_cpus(),
                    help="processes making the samples in the second samples-alone timing "
                         "(default: every usable CPU)")
    ap.add_argument("--samples-only", action="store_true",
                    help="only the samples-alone timings (no forward, no precision comparison)")
    args = ap.parse_args()
    print(f"machine: {cpu_model()}, {torch.get_num_threads()} "
          f"threads; bf16 native: {native_bf16('cpu')}")
    with tempfile.TemporaryDirectory() as tmp:
        subset = Path(tmp) / "subset.h5ad"
        anndata.read_h5ad(args.data)[:args.preset_cells].copy().write_h5ad(subset)
        preset = save_random_init(Path(args.model), Path(tmp) / "preset.pt", 0,
                                  ModelConfig.preset(args.preset), args.preset_context)
        if args.samples_only:
            print("| model | cells | context | samples alone | samples alone, "
                  f"{args.workers} workers |\n|---|---:|---:|---:|---:|")
            for model, data in ((Path(args.model), Path(args.data)), (preset, subset)):
                exported = load_model_file(model)
                for _ in range(args.repeats):
                    n, one, many = samples_alone(exported, data, args.workers)
                    print(f"| {exported.config.d_model}-wide | {n:,} | "
                          f"{exported.train_context:,} | {one:.2f} s ({n / one:,.0f}/s) | "
                          f"{many:.2f} s ({n / many:,.0f}/s, {one / many:.2f}x) |")
            return
        rows = [compare(Path(args.model), Path(args.data), args.repeats, workers=args.workers),
                compare(preset, subset, args.repeats, workers=args.workers)]
    print(f"\n| model | cells | context | samples alone | samples alone, {args.workers} workers | "
          "fp32 | bf16 | bf16 / fp32 speed | forward only: bf16 / fp32 | cosine min / median | "
          "max abs difference | same predicted type | same 15 neighbours |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fwd = (r["fp32"] - r["samples_s"]) / (r["bf16"] - r["samples_s"])
        print(f"| {r['name']} | {r['cells']:,} | {r['context']:,} | {r['samples_s']:.1f} s | "
              f"{r['samples_workers_s']:.1f} s ({r['samples_s'] / r['samples_workers_s']:.2f}x) | "
              f"{r['fp32']:.1f} s ({r['cells'] / r['fp32']:,.0f}/s) | {r['bf16']:.1f} s "
              f"({r['cells'] / r['bf16']:,.0f}/s) | {r['fp32'] / r['bf16']:.2f}x | {fwd:.2f}x | "
              f"{r['cos_min']:.5f} / {r['cos_median']:.6f} | {r['max_abs']:.2e} | "
              f"{r['same_type']:.4f} | {r['kept_neighbours']:.4f} |")


if __name__ == "__main__":
    main()
