"""Resuming on another number of ranks at corpus scale: what dealing the stream again costs.

    python benchmarks/bench_redeal.py [--build OUT] [--shards-per-epoch 350000]
                                      [--old 64x4] [--new 48x4] [--batch-size 32] [--at 0.43]

A run of ``--old`` ranks x DataLoader workers, ``--at`` of the way through its first epoch of a
corpus-sized manifest (bench_manifest.py's: a real build's shard entry repeated under new names;
no shard is read), is resumed by ``--new`` ranks x workers. For rank 0 of the new run the script
times ``CellLoader.load_state_dict`` (the re-deal: every old slot's plan, the shards read whole,
the samples read again) and the first position of each of its workers' streams, and prints what
the re-deal leaves out, reads again, and keeps in the loader state; then the same for a resume
on the old layout (no re-deal), the alternative, in the same process.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_manifest import corpus_root  # noqa: E402  (benchmarks/)

from pretrain.data import CellLoader, DataConfig  # noqa: E402
from pretrain.shard_stream import ShardStream  # noqa: E402


def layout(text: str) -> tuple[int, int]:
    ranks, workers = text.lower().split("x")
    return int(ranks), int(workers)


def resume(cfg: DataConfig, world: int, state: dict) -> dict:
    """Rank 0 of ``world`` ranks loads ``state``; seconds for that and for its workers' streams
    to find their first sample's place."""
    loader = CellLoader(cfg, rank=0, world_size=world)
    start = time.perf_counter()
    loader.load_state_dict(state)
    loaded = time.perf_counter() - start
    n_workers = max(cfg.num_workers, 1)
    start = time.perf_counter()
    for worker in range(n_workers):
        stream = ShardStream(cfg, worker, world * n_workers, loader.table, loader.redeal)
        stream.position(loader.batches * cfg.batch_size // n_workers)
    placed = (time.perf_counter() - start) / n_workers
    return {"load_s": loaded, "stream_start_s": placed, "redeal": loader.redeal,
            "state_bytes": len(json.dumps(loader.state_dict()))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--build", help="a build_shards output (default: one from the PBMC file)")
    ap.add_argument("--shards-per-epoch", type=int, default=350_000)
    ap.add_argument("--old", type=layout, default=(64, 4), help="ranks x workers of the run")
    ap.add_argument("--new", type=layout, default=(48, 4), help="ranks x workers resuming it")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--at", type=float, default=0.43, help="share of epoch 0 read at the save")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_redeal_") as tmp:
        root, _ = corpus_root(Path(tmp), args.build, args.shards_per_epoch, 1)
        (world, workers), (world2, workers2) = args.old, args.new
        cfg = DataConfig(shards=str(root), batch_size=args.batch_size, num_workers=workers)
        saver = CellLoader(cfg, rank=0, world_size=world)
        per_slot = ShardStream(cfg, 0, world * workers, saver.table).epoch_size(0)
        saver.batches = int(args.at * per_slot * workers / args.batch_size)
        state = saver.state_dict()
        samples = int(saver.table.n_samples.sum())
        print(f"manifest: {len(saver.table):,} shards, {samples:,} samples in epoch 0; "
              f"{world} ranks x {workers} workers saved at batch {saver.batches:,} of "
              f"{args.batch_size} ({args.at:.0%} of epoch 0)")
        rows = [("same layout (no re-deal)", world, cfg),
                (f"{world2} ranks x {workers2} workers (re-deal)", world2,
                 replace(cfg, num_workers=workers2))]
        print("| resumed on | load_state_dict s | a worker's stream placed, s | shards left "
              "out | samples read again | per old slot | loader state, bytes |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, w, c in rows:
            r = resume(c, w, state)
            redeal = r["redeal"]
            done = sum(len(v) for v in redeal.done.values()) if redeal else 0
            again = redeal.reread if redeal else 0
            print(f"| {name} | {r['load_s']:.2f} | {r['stream_start_s']:.3f} | {done:,} | "
                  f"{again:,} | {again / (world * workers):,.0f} | {r['state_bytes']:,} |")


if __name__ == "__main__":
    main()
