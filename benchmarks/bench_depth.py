"""Depth of the packed stream: the share of input profiles above the context (3,200 expressed
genes) before weighting, with depth weighting alone, and with meta-cells at several shares; and
the group total variation of the packed stream against its target (``--eval-stream``).

    python benchmarks/bench_depth.py [--data DIR] [--work out/bench_depth] [--samples 20000]

Inputs: the deepest real file of the shared data (fly gut, median ~1,000 expressed genes, 3% of
cells above 3,200), and a DERIVED deep input of ``--derived-cells`` cells made from it by
``data_prep.derive --depth 3`` (each derived cell sums 3 convex mixes of the same real cell with
a real neighbour, binomially thinned: ~16% of cells above 3,200, about the reference corpus's
11%; not a real measurement). Each input is built once per meta-cell share with
``data_prep.build_shards`` (one epoch of ``--samples`` samples; ingest and graph are reused between
shares) and the figures are read from its manifest (what its report's summary.txt shows).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from derived import derived_file  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
DEEPEST = "drosophila_gut_flycellatlas_scgoclust_180cells_recovered_counts.h5ad"


def build(inputs: list[Path], out: Path, samples: int, fraction: float, seed: int) -> dict:
    cmd = [sys.executable, "-m", "data_prep.build_shards", *map(str, inputs), "--out", str(out),
           "--stream-size", str(samples), "--metacell-fraction", str(fraction), "--seed",
           str(seed), "--quiet", "--jobs", "1"]
    subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
    return json.loads((out / "manifest.json").read_text())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--work", type=Path, default=REPO / "out" / "bench_depth")
    p.add_argument("--samples", type=int, default=20_000)
    p.add_argument("--derived-cells", type=int, default=20_000)
    p.add_argument("--derived-depth", type=int, default=3)
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.7, 0.75])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.work.mkdir(parents=True, exist_ok=True)
    derived = derived_file(args.data / DEEPEST,
                           args.work / f"DERIVED_fly_gut_depth{args.derived_depth}.h5ad",
                           args.derived_cells, args.derived_depth, args.seed)
    inputs = {"real: fly gut (180 cells)": args.data / DEEPEST,
              f"DERIVED deep, from it ({args.derived_cells:,} cells, depth "
              f"{args.derived_depth})": derived}
    print(f"| input | meta-cell share | input cells > 3,200 | packed profiles > 3,200 | "
          f"distinct cells | group TV ({args.samples:,} samples) |")
    print("|---|---:|---:|---:|---:|---:|")
    for i, (name, path) in enumerate(inputs.items()):
        for fraction in args.fractions:
            man = build([path], args.work / f"out{i}", args.samples, fraction, args.seed)
            (epoch,) = man["epochs"]
            print(f"| {name} | {fraction:.2f} | "
                  f"{100 * man['stream']['share_above_context_input']:.1f}% | "
                  f"{100 * epoch['share_above_context']:.1f}% | "
                  f"{epoch['n_distinct_cells']:,} | {epoch['group_tv']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
