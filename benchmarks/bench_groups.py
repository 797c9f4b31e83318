"""Sampling groups per dataset vs cell types pooled across datasets (``--pool-cell-types``):
what each does to the packed stream, measured on real cells.

    python benchmarks/bench_groups.py [--data DIR] [--work out/bench_groups] [--samples 20000]

Input: the real PBMC file split by its ``sample`` column into two datasets (CTRL and STIM: the
same 13 annotated cell types in both, as when two labs submit the same tissue), plus the real
mouse-brain file (unannotated: it keeps its per-dataset clusters either way). Each setting is
built with ``data_prep.build_shards`` (one epoch at gamma 1, ``--samples`` samples, no
meta-cells) and the stream is read back from the plan. Printed per setting: the number of groups;
the share of the stream that goes to PBMC cells (two datasets' worth of one tissue) and to the
brain file; the effective number of PBMC cell types in the stream (exp of the entropy of their
shares; 13 = perfectly even) and the largest / smallest cell-type share; how many of the PBMC
(dataset, Leiden cluster) pairs the stream covers with at least 1/1000 of its samples.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from utils import atomic

REPO = Path(__file__).resolve().parents[1]
PBMC = "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
BRAIN = "mouse_brain_10x_scanpy_10kcells_1000genes_raw.h5ad"


def split_pbmc(data: Path, work: Path) -> list[Path]:
    """The PBMC file's CTRL and STIM cells as two .h5ad files (real cells, unchanged)."""
    import anndata as ad

    adata = ad.read_h5ad(data / PBMC)
    out = []
    for sample in ("CTRL", "STIM"):
        path = work / f"pbmc_{sample.lower()}.h5ad"
        if not path.exists():
            adata[adata.obs["sample"] == sample].copy().write_h5ad(path)
        out.append(path)
    return out


def build(work: Path, inputs: list[Path], pooled: bool, samples: int) -> Path:
    out = work / ("pooled" if pooled else "per_dataset")
    sheet = work / "sheet.csv"
    atomic.write_text(sheet, "path,organism,cell_type\n" + "".join(
        f"{p},{'mouse' if p.name == BRAIN else 'human'},{'-' if p.name == BRAIN else ''}\n"
        for p in inputs))
    cmd = [sys.executable, "-m", "data_prep.build_shards", "--sheet", str(sheet), "--out",
           str(out), "--stream-size", str(samples), "--metacell-fraction", "0", "--gamma", "1",
           "--min-genes", "10", "--quiet", "--jobs", "1",
           "--pool-cell-types" if pooled else "--no-pool-cell-types"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return out


def measure(out: Path) -> dict:
    man = json.loads((out / "manifest.json").read_text())
    plan = out / "work" / "pack"
    cells = np.load(plan / "train-e0000" / "cells.npy")
    offsets = [d["offset"] for d in json.loads((plan / "plan.json").read_text())["datasets"]]
    ds_of = np.searchsorted(offsets, cells, side="right") - 1
    names = [d["name"] for d in man["datasets"]]
    pbmc = np.isin(ds_of, [i for i, n in enumerate(names) if n.startswith("pbmc")])
    # cell type and Leiden cluster of each drawn PBMC cell, from the ingest and graph artifacts
    types, clusters, clusters_total = [], [], 0
    for d in json.loads((plan / "plan.json").read_text())["datasets"]:
        if not d["name"].startswith("pbmc"):
            continue
        ing, gra = Path(d["ingest_dir"]), Path(d["graph_dir"])
        codes = np.load(ing / "label_codes.npy")[:, 0]
        values = json.loads((ing / "label_values.json").read_text())["cell_type"]
        leiden = np.load(gra / "leiden.npy")
        rows = cells[ds_of == d["id"]] - d["offset"]
        types += [values[c] for c in codes[rows]]
        clusters += [f"{d['name']}/{c}" for c in leiden[rows]]
        clusters_total += len(np.unique(leiden))
    _, type_counts = np.unique(types, return_counts=True)
    share = type_counts / type_counts.sum()
    _, cl_counts = np.unique(clusters, return_counts=True)
    return {
        "groups": man["labels"]["n_groups"],
        "pbmc_share": float(pbmc.mean()),
        "brain_share": float(1 - pbmc.mean()),
        "effective_cell_types": float(np.exp(-(share * np.log(share)).sum())),
        "max_min_type_share": (float(share.max()), float(share.min())),
        "clusters_covered": (int((cl_counts >= cells.size / 1000).sum()), clusters_total),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench_groups")
    p.add_argument("--samples", type=int, default=20_000)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    inputs = [*split_pbmc(args.data, args.work), args.data / BRAIN]
    print("| groups | n groups | PBMC share | brain share | effective PBMC cell types (of 13) "
          "| largest / smallest type share | PBMC clusters covered |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for pooled in (False, True):
        m = measure(build(args.work, inputs, pooled, args.samples))
        print(f"| {'pooled cell types' if pooled else 'per dataset'} | {m['groups']} | "
              f"{m['pbmc_share']:.3f} | {m['brain_share']:.3f} | "
              f"{m['effective_cell_types']:.2f} | {m['max_min_type_share'][0]:.3f} / "
              f"{m['max_min_type_share'][1]:.4f} | {m['clusters_covered'][0]} of "
              f"{m['clusters_covered'][1]} |", flush=True)


if __name__ == "__main__":
    main()
