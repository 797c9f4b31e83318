"""Shard format: bytes per sample, packing rate and loader rate, previous format vs this one.

    python benchmarks/bench_shard_format.py --previous DIR [--data data] [--repeats 3]

``--previous`` is a checkout of the commit before the format change (e.g. ``git worktree add
/tmp/prev <commit>``). One build of ``--data`` (this checkout's build_shards) gives the plan; both
checkouts then pack that same plan (``pack.pack_all``, one process, a fresh output each) and read
what they packed with their own loader (``CellBatches``, one process, no DataLoader workers, the
fixed 6-neighbour 3,200-gene batch of benchmarks/bench_loader.py). Every figure comes from a child
process of its checkout; the two are measured alternately ``--repeats`` times and the medians and
their ratios printed, so both see the same machine load. Then the zstd level: this checkout's
sample bodies recompressed at each of ``--levels`` (tar bytes per sample, compression and
decompression time per sample), the measurement ``shard_format.ZSTD_LEVEL`` was chosen by.
``--contents-only`` prints what a sample of the build holds instead (no ``--previous`` needed):
genes stored, neighbours and bytes, meta-cells and single cells apart, the inputs of the
bytes-per-sample scaling in docs/scale.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from checkouts import run_in_checkout  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Run in a child with the checkout first on sys.path: pack the plan, then time the loader on it.
CHILD = r"""
import json, shutil, sys, time
from pathlib import Path
repo, plan, out, manifest_path = sys.argv[1:5]
sys.path.insert(0, repo)
from data_prep import pack, shard_format
from benchmarks.bench_loader import ours
from pretrain.data import DataConfig

class Bar:
    def update(self, n): pass
    def close(self): pass

manifest = json.loads(Path(manifest_path).read_text())
streams = sorted({Path(e["path"]).name.rsplit("-", 1)[0] for e in manifest["shards"]})
out = Path(out)
shutil.rmtree(out, ignore_errors=True)
t = time.perf_counter()
records = pack.pack_all(Path(plan), out, streams, 1, None, lambda total, desc: Bar())
seconds = time.perf_counter() - t
entries = [r for stream in streams for r in records[stream]]
for entry, rec in zip(manifest["shards"], entries):
    entry.update(bytes=rec["bytes"], sha256=rec["sha256"])
manifest["format_version"] = shard_format.FORMAT_VERSION
(out / "manifest.json").write_text(json.dumps(manifest))
n = sum(r["n_samples"] for r in entries)
cfg = DataConfig(shards=str(out), batch_size=64, short_context_prob=0.0, n_neighbours=6,
                 full_pass_prob=0.0)
print(json.dumps({"version": shard_format.FORMAT_VERSION, "samples": n,
                  "bytes_per_sample": sum(r["bytes"] for r in entries) / n,
                  "pack_samples_per_s": n / seconds, "loader_samples_per_s": ours(cfg, 150)}))
"""


def measure(repo: Path, plan: Path, out: Path, manifest: Path) -> dict:
    return run_in_checkout(CHILD, repo, plan, out, manifest,
                           env={"NUMBA_CACHE_DIR": str(repo / ".numba_cache")})


def levels(shards: Path, chosen: list[int]) -> None:
    """Bytes and (de)compression time per sample of this checkout's bodies at each zstd level."""
    import tarfile
    import time

    import zstandard

    from data_prep.shard_format import HEADER, member_bytes

    plain = zstandard.ZstdDecompressor()
    bodies = []
    for path in sorted(shards.glob("*.tar")):
        with tarfile.open(path) as tar:
            bodies += [plain.decompress(tar.extractfile(m).read()[HEADER.itemsize:]) for m in tar]
    mean = np.mean([len(b) for b in bodies])
    print(f"\nzstd level of the body ({len(bodies):,} bodies of {mean:,.0f} bytes on average; "
          "best of 3 timings)")
    print(f"{'level':>6s} {'tar bytes/sample':>17s} {'compress us':>12s} {'decompress us':>14s}")
    for level in chosen:
        z = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)
        timings = []
        for _ in range(3):
            t = time.perf_counter()
            frames = [z.compress(b) for b in bodies]
            t1 = time.perf_counter()
            for f in frames:
                plain.decompress(f)
            timings.append((t1 - t, time.perf_counter() - t1))
        sizes = member_bytes(np.array([HEADER.itemsize + len(f) for f in frames]))
        comp, dec = (min(x) / len(bodies) * 1e6 for x in zip(*timings))
        print(f"{level:6d} {sizes.mean():17,.0f} {comp:12.1f} {dec:14.1f}")


def contents(build: Path) -> None:
    """What a sample of the build holds, meta-cells and single cells apart: genes stored (the
    profile's own, then neighbour-only padding), neighbours, tar bytes per sample and per stored
    gene, and the expressed genes of the drawn cell itself (from its dataset's ingest folder)."""
    import tarfile

    from data_prep.ingest import IngestedDataset
    from data_prep.shard_format import FLAG_METACELL, decode_header, member_bytes

    manifest = json.loads((build / "manifest.json").read_text())
    own_nnz = {}  # dataset id -> expressed genes by obs row of its input file
    for d in manifest["datasets"]:
        ds = IngestedDataset.load(build / "work" / "datasets" / d["name"] / "ingest")
        by_row = np.full(int(ds.cells.max(initial=-1)) + 1, -1, dtype=np.int64)
        by_row[ds.cells] = ds.nnz
        own_nnz[d["id"]] = by_row
    rows = []
    for entry in manifest["shards"]:
        with tarfile.open(build / entry["path"]) as tar:
            for member in tar:
                buf = tar.extractfile(member).read()
                head = decode_header(buf)
                rows.append((bool(head["flags"] & FLAG_METACELL),
                             int(head["n_expr"]) + int(head["n_pad"]), int(head["n_expr"]),
                             int(head["n_nbr"]), int(member_bytes(np.array([len(buf)]))[0]),
                             int(own_nnz[int(head["dataset"])][int(head["cell"])])))
    a = np.array(rows, dtype=np.int64)
    print(f"\nwhat a sample holds ({len(a):,} train samples of {build})")
    print(f"{'samples':>14s} {'n':>6s} {'genes stored':>13s} {'own genes':>10s} "
          f"{'neighbours':>11s} {'tar bytes':>10s} {'bytes/gene':>11s} {'drawn cell genes':>17s}")
    for name, sel in (("meta-cells", a[:, 0] == 1), ("single cells", a[:, 0] == 0),
                      ("all", np.ones(len(a), dtype=bool))):
        s = a[sel]
        per_gene = s[:, 4].sum() / s[:, 1].sum()
        print(f"{name:>14s} {len(s):6,d} {s[:, 1].mean():13,.0f} {s[:, 2].mean():10,.0f} "
              f"{s[:, 3].mean():11.2f} {s[:, 4].mean():10,.0f} {per_gene:11.3f} "
              f"{s[:, 5].mean():17,.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--previous", help="checkout of the previous format (required unless "
                    "--levels-only or --contents-only)")
    ap.add_argument("--data", default=str(REPO / "data"))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--levels-only", action="store_true", help="only the zstd levels, on the "
                    "shards of an earlier run's --work")
    ap.add_argument("--work", help="build folder (default: a temporary one)")
    ap.add_argument("--levels", type=int, nargs="*", default=[-7, -3, -1, 1, 3, 9])
    ap.add_argument("--contents-only", action="store_true", help="only what a sample holds, on "
                    "the build of --work (built first if absent)")
    args = ap.parse_args()
    if args.previous is None and not (args.levels_only or args.contents_only):
        ap.error("--previous is required to compare formats")
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_shard_format_"))
    build = work / "build"
    if not (build / "manifest.json").exists():
        subprocess.run([sys.executable, "-m", "data_prep.build_shards", args.data, "--out",
                        str(build), "--quiet"], check=True, cwd=REPO)
    if args.levels_only:
        levels(work / "out-this" / "shards", args.levels)
        return
    if args.contents_only:
        contents(build)
        return
    checkouts = {"previous": Path(args.previous).resolve(), "this": REPO}
    runs: dict[str, list[dict]] = {name: [] for name in checkouts}
    for _ in range(args.repeats):
        for name, repo in checkouts.items():
            plan = work / f"plan-{name}"
            shutil.rmtree(plan, ignore_errors=True)
            shutil.copytree(build / "work" / "pack", plan)
            runs[name].append(measure(repo, plan, work / f"out-{name}", build / "manifest.json"))
    print(f"input: {args.data}, {runs['this'][0]['samples']:,} samples; {os.cpu_count()} cpus; "
          f"medians of {args.repeats} alternating runs")
    keys = ("bytes_per_sample", "pack_samples_per_s", "loader_samples_per_s")
    med = {name: {k: float(np.median([r[k] for r in rs])) for k in keys}
           for name, rs in runs.items()}
    v = {name: rs[0]["version"] for name, rs in runs.items()}
    print(f"{'':24s} {'format ' + str(v['previous']):>14s} {'format ' + str(v['this']):>14s} "
          f"{'ratio':>8s}")
    for k in keys:
        a, b = med["previous"][k], med["this"][k]
        print(f"{k:24s} {a:14,.0f} {b:14,.0f} {b / a:8.3f}")
    levels(work / "out-this" / "shards", args.levels)


if __name__ == "__main__":
    main()
