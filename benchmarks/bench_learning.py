"""Why the model learns cell identity now: the design switches of ModelConfig, one at a time.

    python benchmarks/bench_learning.py [--steps 150] [--context 512] [--batch-size 32]
        [--lr 2e-3] [--jobs 2] [--variants NAME ...]

Shards from the PBMC file of data/ with 20% of its cells held out; ``tiny`` trained in one
process (AdamW, the trainer's optimiser settings, linear warmup 30 steps, ZINB + classification,
one view) for each variant; then the trainer's own evaluation (pretrain.evaluate) on the held-out
cells: cell-type accuracy and macro-F1, reconstruction Pearson in its three scopes. Variants:

- ``reference``: every switch off: raw token sum, cell tokens read genes by cross-attention only,
  the reference's per-label BCE;
- ``all``: the defaults (normalised token parts with the neighbour part starting at 0, pooled
  readout with attention weights, softmax classification);
- ``no_<switch>``: the defaults with one switch back to the reference's form;
- ``uniform_pooled_weights``: the defaults with the pooled readout's plain mean (its form
  before the attention weights).

Variants run as separate processes (``--jobs`` at a time, one thread each); the majority class of
the held-out cells is printed for scale. A falling loss is not the measure: held-out accuracy is.
Every 25 steps it also records the size of the raw gene-token parts: in the reference form the
DeepSet output is several times the gene embedding from the first step, mostly one vector
repeated at every gene of a cell, and it grows: the nuisance that kept the heads at the class
frequencies.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PBMC = REPO / "data" / "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
OFF = {"token_norm": False, "neighbour_scale_init": 1.0, "pooled_readout": False,
       "classification": "bce"}
VARIANTS = {
    "reference": OFF,
    "all": {},
    "no_token_norm": {"token_norm": False},
    "no_neighbour_scale_0": {"neighbour_scale_init": 1.0},
    "no_pooled_readout": {"pooled_readout": False},
    "uniform_pooled_weights": {"pooled_weights": "uniform"},
    "no_softmax (bce)": {"classification": "bce"},
}


def run_variant(args, shards: str, overrides: dict) -> dict:
    """One training run in this process; returns the held-out metrics."""
    import torch

    from data_prep.shard_format import load_manifest
    from pretrain.config import resolve
    from pretrain.data import CellLoader, DataConfig
    from pretrain.evaluate import evaluate
    from pretrain.model import ModelConfig, ScPrintModel
    from pretrain.train import build_optimizer

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    manifest = load_manifest(shards)
    n_labels = dict(manifest["labels"]["n_labels"])
    model = ScPrintModel(ModelConfig.preset("tiny", **overrides), int(manifest["vocab"]["n_ids"]),
                         n_labels)
    optim = resolve({"train.shards": shards, "optim.lr": args.lr}).optim
    opt = build_optimizer(optim, model, {})
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 30))
    data = DataConfig(shards=shards, context=args.context, short_context_min=args.context,
                      batch_size=args.batch_size, seed=args.seed)
    batches = iter(CellLoader(data, 0, 1))
    parts: dict[str, torch.Tensor] = {}
    for name in ("gene_embedding", "neighbours"):  # the raw token parts, before any norm
        getattr(model, name).register_forward_hook(
            lambda _m, _i, y, name=name: parts.__setitem__(name, y.detach()))
    growth = []
    for step in range(args.steps):
        batch = next(batches)
        out = model(batch)
        if step % 25 == 0:
            real = batch["gene_mask"].repeat(2 if "input_counts_2" in batch else 1, 1)
            nbr = parts["neighbours"]
            # how much of the neighbour part is the same vector at every gene of a cell
            spread = (nbr - nbr.mean(1, keepdim=True))[real].norm(dim=-1).mean()
            growth.append([step, float(parts["gene_embedding"][real].norm(dim=-1).mean()),
                           float(nbr[real].norm(dim=-1).mean()), float(spread)])
        opt.zero_grad()
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), optim.grad_clip)
        opt.step()
        sched.step()
    model.eval()
    held_out = CellLoader(DataConfig(shards=shards, split="eval", context=args.context,
                                     short_context_min=args.context, batch_size=64,
                                     seed=args.seed), 0, 1)
    return {**evaluate(model, held_out, n_labels, held_out.n_batches), "growth": growth}


def majority_share(shards: str) -> float:
    import torch

    from pretrain.data import CellLoader, DataConfig

    cfg = DataConfig(shards=shards, split="eval", batch_size=256, context=16,
                     short_context_min=16)
    loader = CellLoader(cfg, 0, 1)
    y = torch.cat([b["labels"][:, 0] for _, b in zip(range(loader.n_batches), loader)])
    y = y[y >= 0]
    return float(torch.bincount(y).max() / len(y))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--variants", nargs="*", default=list(VARIANTS))
    p.add_argument("--shards", default="", help="(internal) run one variant on these shards")
    p.add_argument("--overrides", default="", help="(internal) JSON ModelConfig overrides")
    args = p.parse_args(argv)
    if args.shards:  # a child process: one variant
        print(json.dumps(run_variant(args, args.shards, json.loads(args.overrides))))
        return
    with tempfile.TemporaryDirectory() as tmp:
        shards = str(Path(tmp) / "shards")
        subprocess.run([sys.executable, "-m", "data_prep.build_shards", str(PBMC), "--out",
                        shards, "--jobs", "2", "--quiet", "--eval-fraction", "0.2"],
                       cwd=REPO, check=True)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        env.pop("TRITON_INTERPRET", None)

        def child(name: str) -> tuple[str, dict]:
            cmd = [sys.executable, __file__, "--shards", shards, "--overrides",
                   json.dumps(VARIANTS[name]), "--steps", str(args.steps), "--context",
                   str(args.context), "--batch-size", str(args.batch_size), "--lr", str(args.lr),
                   "--seed", str(args.seed)]
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                                  check=True)
            return name, json.loads(proc.stdout.strip().splitlines()[-1])

        with ThreadPoolExecutor(args.jobs) as pool:
            results = dict(pool.map(child, args.variants))
        majority = majority_share(shards)
    print(f"tiny, {args.steps} steps x {args.batch_size} cells, context {args.context}, "
          f"lr {args.lr}; held-out PBMC cells (majority class {majority:.3f})")
    from pretrain.evaluate import RECON_SCOPES

    print("| variant | cell-type accuracy | macro-F1 | reconstruction Pearson: "
          + " | ".join(s.replace("_", " ") for s in RECON_SCOPES) + " |")
    print("|---|---:|---:|" + "---:|" * len(RECON_SCOPES))
    for name, m in results.items():
        print(f"| {name} | {m['eval/cell_type_accuracy']:.3f} | {m['eval/cell_type_macro_f1']:.3f}"
              " | " + " | ".join(f"{m[f'eval/recon_pearson/{s}']:.3f}" for s in RECON_SCOPES)
              + " |")
    print("\nMean norm per gene token of the raw parts during training (gene embedding; DeepSet "
          "neighbour encoding; the part of it that differs between the genes of a cell):")
    print("| variant | step | gene embedding | neighbour encoding | its spread across genes |")
    print("|---|---:|---:|---:|---:|")
    for name, m in results.items():
        for step, identity, nbr, spread in m["growth"]:
            print(f"| {name} | {step} | {identity:.3f} | {nbr:.3f} | {spread:.3f} |")


if __name__ == "__main__":
    main()
