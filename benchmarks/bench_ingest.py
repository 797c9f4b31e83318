"""Ingest speed: the same matrix stored as CSR and as CSC, at growing cell counts.

    python benchmarks/bench_ingest.py [--cells 50000 100000 200000] [--depth 4]
                                      [--work out/bench_ingest] [--previous DIR]

For each size the script writes the first N cells of a DERIVED deep input (``data_prep.derive
--depth D`` from the real PBMC file) as a CSR and as a CSC .h5ad file (kept in ``--work`` for
reruns), then ingests each in a fresh process (``ingest_dataset``, default settings) with this
checkout and, with ``--previous DIR`` (a checkout of an earlier commit), with the earlier code,
the checkouts in turn, ``--repeats`` times. It prints the seconds of each run, the peak RSS and
whether all the artifacts are byte-identical. Ingest reads cells in chunks of rows, which a CSC
matrix cannot serve directly (a row range has entries in every column): the build sorts its
entries into row-range files in one pass (``data_prep/csc_rows.py``).
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from checkouts import run_in_checkout  # benchmarks/, beside this script
from derived import derived_file  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "data" / "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
ARRAYS = ("indptr", "indices", "data", "cells", "nnz", "total", "label_codes")

# Run in a child with a checkout first on sys.path: one ingest.
CHILD = r"""
import json, shutil, sys, time
repo, src, out = sys.argv[1:4]
sys.path.insert(0, repo)
from pathlib import Path
from data_prep.ingest import IngestConfig, ingest_dataset
from data_prep.sheet import DatasetSpec
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
ds = ingest_dataset(DatasetSpec(name=Path(src).stem, path=Path(src)), Path(out), IngestConfig())
print(json.dumps({"seconds": time.perf_counter() - t, "cells": ds.n_cells,
                  "nnz": int(ds.counts.nnz),
                  # VmHWM: this process's own peak (ru_maxrss starts from the parent's at the fork)
                  "peak_rss_mib": next(int(line.split()[1]) for line in open("/proc/self/status")
                                       if line.startswith("VmHWM")) / 1024}))
"""


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for name in ARRAYS:
        with open(folder / f"{name}.npy", "rb") as f:  # in pieces: this process stays small
            while piece := f.read(1 << 24):
                h.update(piece)
    return h.hexdigest()[:16]


# Run in a child, so that this process stays small: the first N cells of SRC as CSR and as CSC
# files.
WRITE = r"""
import sys
import anndata as ad
import scipy.sparse as sp
src, n, csr, csc = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
a = ad.read_h5ad(src, backed="r")[:n].to_memory()
for fmt, path in (("csr", csr), ("csc", csc)):
    a.X = sp.csr_matrix(a.X) if fmt == "csr" else sp.csc_matrix(a.X)
    a.write_h5ad(path)
"""


def inputs(work: Path, cells: list[int], depth: int, seed: int) -> dict[int, dict[str, Path]]:
    """CSR and CSC .h5ad files of the first N cells of the derived input, for each N."""
    src = derived_file(PBMC, work / f"pbmc_derived_{max(cells)}_depth{depth}.h5ad", max(cells),
                       depth, seed)
    files: dict[int, dict[str, Path]] = {}
    for n in cells:
        files[n] = {fmt: work / f"cells{n}_{fmt}.h5ad" for fmt in ("csr", "csc")}
        if not all(p.exists() for p in files[n].values()):
            subprocess.run([sys.executable, "-c", WRITE, str(src), str(n),
                            str(files[n]["csr"]), str(files[n]["csc"])], check=True)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, nargs="+", default=[50_000, 100_000, 200_000])
    ap.add_argument("--depth", type=int, default=4, help="data_prep.derive --depth")
    ap.add_argument("--work", default=str(REPO / "out" / "bench_ingest"))
    ap.add_argument("--previous", help="checkout of an earlier commit, measured too")
    ap.add_argument("--repeats", type=int, default=1, help="runs of each, the checkouts in turn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    files = inputs(work, sorted(args.cells), args.depth, args.seed)
    checkouts = {"this": REPO} | ({"previous": Path(args.previous)} if args.previous else {})
    runs = [(name, repo, fmt) for name, repo in checkouts.items() for fmt in ("csr", "csc")]
    print("| cells | stored counts | "
          + " | ".join(f"{name}, {fmt.upper()}: s each run / peak RSS MiB"
                       for name, _, fmt in runs)
          + " | CSC / CSR, this (medians) | artifacts |")
    print("|---:|---:|" + "---:|" * len(runs) + "---:|---|")
    for n, paths in files.items():
        for path in paths.values():  # into the page cache, so that no run reads it cold
            with open(path, "rb") as f:
                while f.read(1 << 24):
                    pass
        got, digests = {run[::2]: [] for run in runs}, set()
        for _ in range(args.repeats):
            for name, repo, fmt in runs:
                out = work / f"ingest-{name}-{fmt}-{n}"
                got[(name, fmt)].append(run_in_checkout(CHILD, repo, paths[fmt], out))
                digests.add(_digest(out))
                shutil.rmtree(out)
        seconds = {k: statistics.median(r["seconds"] for r in v) for k, v in got.items()}
        cell = [" / ".join(f"{r['seconds']:.1f}" for r in v)
                + f" / {max(r['peak_rss_mib'] for r in v):.0f}" for v in got.values()]
        ratio = seconds[("this", "csc")] / seconds[("this", "csr")]
        print(f"| {n:,} | {got[('this', 'csr')][0]['nnz']:,} | " + " | ".join(cell)
              + f" | {ratio:.2f} | " + ("byte-identical" if len(digests) == 1 else "DIFFER")
              + " |", flush=True)

if __name__ == "__main__":
    main()
