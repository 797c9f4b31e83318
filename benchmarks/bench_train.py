"""Trainer throughput and per-rank memory for ZeRO 1/2/3 on 2 CPU ranks (or the GPUs present).

    python benchmarks/bench_train.py [--model small] [--context 256] [--steps 8] [--shards OUT]

Each configuration is a real ``torchrun`` launch of pretrain/train.py; the figures are read back
from the run's TensorBoard events: cells/s (median over the steps after the first two), and per
rank the parameter bytes and optimizer-state bytes (fp32 master weights + Adam moments) it holds,
and its resident set size. Without ``--shards`` it first builds shards from the real demo
datasets in the repository's data/ directory.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from pretrain.config import PRECISIONS  # noqa: E402
from utils.cpus import cpu_model  # noqa: E402


def build_demo_shards(out: Path, context: int) -> Path:
    cmd = [sys.executable, "-m", "data_prep.build_shards", str(REPO / "data"), "--out", str(out),
           "--jobs", "1", "--quiet", "--context-genes", str(context), "--stream-size", "2000",
           "--shard-samples", "500"]
    subprocess.run(cmd, cwd=REPO, check=True)
    return out


def scalars(run: Path) -> dict[str, list[float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [e.value for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def run_config(args, shards: Path, config: str, out: Path) -> dict:
    nproc = args.nproc
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc_per_node",
           str(nproc), "pretrain/train.py", "--deepspeed_config", f"ds_configs/{config}.json",
           "--shards", str(shards), "--out", str(out), "--model", args.model,
           "--context", str(args.context), "--batch-size", str(args.batch_size),
           "--max-steps", str(args.steps), "--eval-every", "0", "--ckpt-every", "0",
           "--keep-ckpts", "1", "--warmup-steps", "2", "--precision", args.precision]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    env.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    env.pop("TRITON_INTERPRET", None)
    subprocess.run(cmd, cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    s = scalars(out)
    ranks = range(nproc)
    return {
        "config": config,
        "cells_per_s": statistics.median(s["perf/cells_per_s"][2:] or s["perf/cells_per_s"]),
        "param_mib": [s[f"memory/param_mib/rank{r}"][-1] for r in ranks],
        "optim_mib": [s[f"memory/optim_mib/rank{r}"][-1] for r in ranks],
        "rss_gib": [s[f"memory/rss_gib/rank{r}"][-1] for r in ranks],
        "mfu": statistics.median(s["perf/mfu"]) if "perf/mfu" in s else None,
    }


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--precision", default="auto", choices=PRECISIONS,
                        help="the trainer's --precision")
    parser.add_argument("--configs", default="zero1,zero2,zero3")
    parser.add_argument("--shards", default=None, help="build_shards output (default: demo)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shards = Path(args.shards) if args.shards else build_demo_shards(tmp / "shards",
                                                                          args.context)
        rows = [run_config(args, shards, c, tmp / c) for c in args.configs.split(",")]

    mem = psutil.virtual_memory().total / 2**30
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, "
          f"{mem:.0f} GiB RAM, {'CUDA' if _has_cuda() else 'no GPU'}; {args.nproc} ranks, "
          f"model {args.model}, context {args.context}, batch {args.batch_size}/rank, "
          f"{args.precision}, {args.steps} steps")
    print("| config | cells/s | param MiB/rank | optim MiB/rank | param+optim MiB/rank "
          "| RSS GiB/rank |")
    print("|---|---|---|---|---|---|")
    base = None
    for r in rows:
        held = [p + o for p, o in zip(r["param_mib"], r["optim_mib"])]
        base = base or max(held)
        print(f"| {r['config']} | {r['cells_per_s']:.1f} "
              f"| {' / '.join(f'{v:.1f}' for v in r['param_mib'])} "
              f"| {' / '.join(f'{v:.1f}' for v in r['optim_mib'])} "
              f"| {' / '.join(f'{v:.1f}' for v in held)} ({max(held) / base:.2f}x) "
              f"| {' / '.join(f'{v:.2f}' for v in r['rss_gib'])} |")


if __name__ == "__main__":
    main()
