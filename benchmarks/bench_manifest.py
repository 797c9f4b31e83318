"""What a sample stream holds of a corpus-sized manifest, and how long it takes to open one.

    python benchmarks/bench_manifest.py [--build OUT] [--shards-per-epoch 350000] [--epochs 1]
                                        [--previous DIR]

A manifest lists every shard of every packed epoch: the reference corpus (350M cells) at 1,000
samples a shard has 350,000 shards an epoch. The script writes such a manifest into a temporary
folder (the entries of a real build's manifest, ``--build`` or one built from the PBMC file of
data/, repeated under new names; no shard is read) and, in a fresh process, opens one
``ShardStream`` on it: the memory the stream keeps (tracemalloc, after a collection) and the
seconds it took. With ``--previous DIR`` (a checkout of an earlier commit) the earlier code does
the same in its own process. Before the shard table, every DataLoader worker of every rank
opened its own stream from the manifest; now a rank reads it once and its workers share the
table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from checkouts import run_in_checkout  # benchmarks/, beside this script

REPO = Path(__file__).resolve().parents[1]
PBMC = REPO / "data" / "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"

# Run in a child with a checkout first on sys.path.
CHILD = r"""
import gc, json, sys, time, tracemalloc
repo, root = sys.argv[1:3]
sys.path.insert(0, repo)
from pretrain.data import DataConfig
from pretrain.shard_stream import ShardStream
cfg = DataConfig(shards=root)
tracemalloc.start()
t = time.perf_counter()
stream = ShardStream(cfg, 0, 8)
seconds = time.perf_counter() - t
gc.collect()
held, peak = tracemalloc.get_traced_memory()
print(json.dumps({"held_mb": held / 1e6, "peak_mb": peak / 1e6, "seconds": seconds,
                  "slot_samples": stream.epoch_size(0)}))
"""


def corpus_manifest(build: Path, out: Path, per_epoch: int, epochs: int) -> int:
    """``build``'s manifest with ``per_epoch`` train shards in each of ``epochs`` epochs."""
    manifest = json.loads((build / "manifest.json").read_text())
    entry = manifest["shards"][0]
    manifest["shards"] = [dict(entry, epoch=e, path=f"shards/train-e{e:04d}-{i:06d}.tar")
                          for e in range(epochs) for i in range(per_epoch)]
    if epochs > 1:
        manifest["epochs"] = [dict(manifest["epochs"][0], epoch=e) for e in range(epochs)]
    (out / "manifest.json").write_text(json.dumps(manifest))
    return (out / "manifest.json").stat().st_size


def corpus_root(tmp: Path, build: str | None, per_epoch: int, epochs: int) -> tuple[Path, int]:
    """A folder in ``tmp`` holding only a corpus-sized manifest made from ``build``'s (built
    from the PBMC file when None), and its size in bytes."""
    built = Path(build) if build else tmp / "build"
    if not build:
        subprocess.run([sys.executable, "-m", "data_prep.build_shards", str(PBMC), "--out",
                        str(built), "--quiet", "--stream-size", "1000"], check=True, cwd=REPO)
    root = tmp / "corpus"
    root.mkdir()
    return root, corpus_manifest(built, root, per_epoch, epochs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", help="a build_shards output (default: one from the PBMC file)")
    ap.add_argument("--shards-per-epoch", type=int, default=350_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--previous", help="checkout of an earlier commit, measured too")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_manifest_") as tmp:
        root, size = corpus_root(Path(tmp), args.build, args.shards_per_epoch, args.epochs)
        n = args.shards_per_epoch * args.epochs
        print(f"manifest of {n:,} train shards ({args.epochs} epoch(s)): {size / 1e6:.1f} MB")
        checkouts = {"this": REPO} | ({"previous": Path(args.previous)} if args.previous else {})
        for name, repo in checkouts.items():
            r = run_in_checkout(CHILD, repo, root)
            print(f"{name:9s} one stream keeps {r['held_mb']:7.1f} MB ({r['held_mb'] * 1e6 / n:.0f}"
                  f" B a shard; peak {r['peak_mb']:.0f} MB while opening), opened in "
                  f"{r['seconds']:.1f} s")


if __name__ == "__main__":
    main()
