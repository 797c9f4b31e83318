"""The build report at the reference's scale: 20,000 datasets (synthetic metadata, no cells)
give fixed-size figures (at most 4,000 px a side) and a summary of distributions and extremes
instead of a row per dataset."""

from __future__ import annotations

import struct

import numpy as np

from data_prep import report
from data_prep.pack import N_EXPR_EDGES
from data_prep.shard_format import CLASSES

N_DATASETS = 20_000


def _png_size(path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def _stats_and_manifest(rng: np.random.Generator) -> tuple[dict, dict]:
    n_cells = rng.integers(20, 200_000, N_DATASETS)
    n_groups = 50_000
    before = rng.dirichlet(np.full(n_groups, 0.3))
    names = [f"collection_{i // 100}/dataset_{i:05d}" for i in range(N_DATASETS)]
    hist = rng.integers(0, 1000, N_EXPR_EDGES.shape[0] - 1)
    stats = {
        "context": 3200, "before_hist": hist, "after_hist": hist[::-1].copy(),
        "share_above_before": 0.01, "share_above_after": 0.2, "n_stream": 10**6,
        "n_metacells": 750_000, "group_before": before,
        "group_target": np.full(n_groups, 1 / n_groups), "group_after": before[::-1].copy(),
        "epochs": [{"epoch": 0, "gamma": 0.4, "seed": 1, "n_samples": 10**6,
                    "n_distinct_cells": 900_000, "n_metacells": 750_000,
                    "share_above_context": 0.2, "group_tv": 0.01}],
        "classes": {c: {"names": [f"{c} {i}" for i in range(300)] + ["(unknown)"],
                        "before": rng.dirichlet(np.ones(301)), "after": rng.dirichlet(np.ones(301))}
                    for c in CLASSES},
        "datasets": [{"name": n, "organism": "Homo sapiens", "n_cells": int(c),
                      "n_clusters": int(rng.integers(1, 80))} for n, c in zip(names, n_cells)],
    }
    genes = {"n_var": 30_000, "by_id": 30_000, "mapped": 0, "unmapped": 0, "merged": 0}
    manifest = {
        "accounting": {
            "total": {"input": int(n_cells.sum()), "packed": int(n_cells.sum()), "held_out": 0,
                      "dropped": {"min_genes": 0}},
            "datasets": {n: {"input": int(c), "packed": int(c), "held_out": 0,
                             "dropped": {"min_genes": 0}} for n, c in zip(names, n_cells)},
        },
        "datasets": [{"name": n, "n_genes": 30_000 - i % 7_000, "genes": genes}
                     for i, n in enumerate(names)],
        "rejected": [],
        "vocab": {"organisms": {"NCBITaxon:9606": {"name": "Homo sapiens", "n_genes": 60_000}}},
        "shards": [], "eval_shards": [], "n_samples": 10**6, "n_eval_samples": 0,
        "labels": {"n_groups": n_groups},
    }
    return stats, manifest


def test_report_at_20000_datasets_has_bounded_figures_and_summary(tmp_path):
    stats, manifest = _stats_and_manifest(np.random.default_rng(0))
    report.write(tmp_path, manifest, stats)
    pngs = sorted(tmp_path.glob("*.png"))
    assert len(pngs) == 4
    for png in pngs:
        width, height = _png_size(png)
        assert max(width, height) <= report.MAX_PX, (png.name, width, height)
        assert png.stat().st_size > 10_000
    summary = (tmp_path / "summary.txt").read_text().splitlines()
    assert len(summary) < 100
    # the largest dataset by cells is named, with its accounting; a middling one is not
    sizes = {d["name"]: d["n_cells"] for d in stats["datasets"]}
    largest = max(sizes, key=sizes.get)
    middle = sorted(sizes, key=sizes.get)[N_DATASETS // 2]
    text = "\n".join(summary)
    assert f"  {largest}: {sizes[largest]:,} = " in text and f"  {middle}: " not in text
    assert "20,000 datasets, input cells: min" in text
