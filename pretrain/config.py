"""Typed trainer configuration and its command line, generated from the dataclass fields.

A run is four sections (``RunConfig``): ``train`` (the run: shards, output, preset, steps,
checkpoints, evaluation), ``optim`` (AdamW and its schedule), ``model`` (``ModelConfig``:
architecture, loss weights) and ``data`` (``DataConfig``: context, batch, corruption,
neighbours). Every field is a flag (``utils.flags``): ``--model.w-zinb``,
``--data.mask-max``, ... (``_`` for ``-`` works too); the ``train`` and ``optim`` fields also go
without their section (``--max-steps``, ``--lr``, and ``--deepspeed_config``, the DeepSpeed
spelling), and the data and model fields a run is usually given keep their short names
(``SHORT_NAMES``: ``--context``, ``--batch-size``, ``--attention``, ...). The whole resolved
configuration is written to ``RUN/config.json``, so the command line, the defaults and the
record cannot drift apart.

What a flag left unset takes: the model preset's architecture (``pretrain/model.py``,
``PRESETS``), its optimisation recipe (``RECIPES``), the trainer's data defaults
(``TRAINER_DEFAULTS``), else the dataclass default. An explicit flag always wins.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

from pretrain.data import DataConfig
from pretrain.model import PRESETS, ModelConfig, saved_model_settings
from utils import flags

# Optimisation recipe of each model preset: what a flag left unset takes. small/medium/large are
# scPRINT-2's published settings (per-GPU batch, peak lr, warmup, clipping; medium's clipping is
# not published: it takes large's); tiny is sized for CPU ranks: at 32 cells a step its peak lr
# of 2e-3 beat 1e-3 (docs/benchmarks/learning.md), and docs/benchmarks/quality.md shows what
# 600 steps of it give on cells it never saw.
RECIPES = {
    "tiny": {"data.batch_size": 16, "optim.lr": 2e-3, "optim.warmup_steps": 50,
             "optim.grad_clip": 40.0},
    "small": {"data.batch_size": 30, "optim.lr": 1e-4, "optim.warmup_steps": 500,
              "optim.grad_clip": 40.0},
    "medium": {"data.batch_size": 16, "optim.lr": 1e-4, "optim.warmup_steps": 2000,
               "optim.grad_clip": 2.0},
    "large": {"data.batch_size": 16, "optim.lr": 5e-5, "optim.warmup_steps": 4000,
              "optim.grad_clip": 2.0},
}
# The trainer's data settings where DataConfig's defaults (made for reading shards in general)
# differ: two corrupted views per cell (the contrastive term), loader processes chosen by the
# device (-1: 2 on a GPU, 0 = in the training process on CPU ranks).
TRAINER_DEFAULTS = {"data.views": 2, "data.num_workers": -1}
# Set by the trainer: the shards are --shards, training reads the train split, pinned memory
# goes with CUDA.
SKIP = {"data.shards", "data.split", "data.pin_memory"}
SHORT_NAMES = {
    "data.context": "context", "data.batch_size": "batch-size", "data.views": "views",
    "data.num_workers": "workers", "model.attention": "attention",
    "model.checkpointing": "activation-checkpointing",
    "model.gene_embedding_file": "gene-embeddings",
}
# What the data settings mean to the trainer, where DataConfig says it in general terms.
HELPS = {
    "data.batch_size": "cells per rank per micro-step (unset: the preset's recipe)",
    "data.views": "corrupted views per cell: 2 trains the contrastive term between them, 1 skips "
                  "it",
    "data.num_workers": "loader worker processes per rank (-1: 2 on a GPU, 0 = in-process on "
                        "CPU ranks)",
    "data.seed": "seed of the data stream and its corruption (unset: --seed)",
    # DataConfig fields without a comment of their own
    "data.short_context_min": "shortest context of a short-context batch",
    "data.max_neighbours": "most neighbours given with a cell",
    "data.mask_max": "see --data.mask-scale",
}
SECTIONS = [
    flags.Section("train", "", "run settings"),
    flags.Section("optim", "", "optimiser settings (AdamW, warmup then cosine decay)"),
    flags.Section("model", None, "model settings (unset: the --model preset's, "
                  "pretrain/model.py PRESETS; the defaults shown are tiny's)"),
    flags.Section("data", None, "data settings (how cells become batches: context, "
                  "corruption, neighbours)"),
]


@dataclass
class TrainConfig:
    """The run: where its data and outputs are, how long it goes, what it logs and saves."""

    deepspeed_config: str = field(
        default="ds_configs/zero2.json", metadata={"help": "DeepSpeed JSON; 'auto' values are "
                                                   "filled from this config"})
    shards: str = field(default="", metadata={"help": "build_shards output dir (manifest.json)"})
    out: str = field(default="", metadata={"help": "run dir: TensorBoard, checkpoints, config"})
    model: str = field(default="tiny", metadata={
        "help": f"preset: {', '.join(PRESETS)} (architecture and optimisation recipe)"})
    max_steps: int = field(default=1000, metadata={"help": "stop after this optimizer step"})
    precision: str = field(default="auto", metadata={
        "help": "auto (the JSON decides; 'auto' there means bf16-mixed where the device has "
                "native bf16 matmuls: GPUs, AVX-512/AMX CPUs; else fp32), bf16-mixed (fp32 "
                "weights, bf16 matmuls under autocast), bf16 (DeepSpeed's: bf16 weights and "
                "activations) or fp32"})
    seed: int = field(default=0, metadata={
        "help": "seed of the initial weights and (unless --data.seed) the data stream"})
    deterministic: bool = field(default=False, metadata={
        "help": "bitwise-reproducible steps on GPUs (a resumed run then repeats the "
                "uninterrupted one exactly): torch's deterministic algorithms, a fixed "
                "cuBLAS workspace (the criss-cross kernels are deterministic either way)"})
    log_every: int = field(default=1, metadata={"help": "TensorBoard scalars every N steps"})
    ckpt_every: int = field(default=500, metadata={"help": "checkpoint every N steps (0 = end)"})
    keep_ckpts: int = field(default=3, metadata={"help": "checkpoints kept (latest K)"})
    eval_every: int = field(default=500, metadata={"help": "evaluate every N steps (0 = never)"})
    eval_batches: int = field(default=8, metadata={"help": "batches per evaluation and rank"})
    resume: bool = field(default=True, metadata={"help": "resume from RUN's latest checkpoint"})
    label_hierarchy: str = field(default="", metadata={
        "help": "JSON {class: {parent label: [leaf labels]}} in the label names of the shards' "
                "labels.json; a parent label then supervises the logsumexp of its leaves"})
    peak_tflops: float = field(default=0.0, metadata={
        "help": "peak TFLOP/s per rank for MFU (0 = known GPU table, else MFU not logged)"})
    local_rank: int = field(default=-1, metadata={"help": "set by the deepspeed launcher"})


@dataclass
class OptimConfig:
    """AdamW (weight decay on matrices only) with linear warmup and cosine decay."""

    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate (unset: the preset's recipe)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr (cosine)"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (unset: the preset's recipe)"})
    schedule_steps: int = field(default=0, metadata={
        "help": "length of the lr schedule (0 = max-steps); set it to train in chunks"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    grad_clip: float | None = field(default=None, metadata={
        "help": "max global grad norm, used where the JSON says gradient_clipping 'auto' "
                "(unset: the preset's recipe)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW weight decay"})
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1"})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2"})
    adam_eps: float = field(default=1e-7, metadata={"help": "AdamW epsilon"})


@dataclass
class RunConfig:
    """Everything one training run is given; ``RUN/config.json`` records it resolved."""

    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="pretrain/train.py", allow_abbrev=False,
        description="Pretrain a single-cell foundation model with DeepSpeed ZeRO.")
    flags.add_flags(p, RunConfig, SECTIONS, SHORT_NAMES, SKIP, HELPS, underscores=True,
                    defaults=resolve({}))
    return p


def resolve(given: dict) -> RunConfig:
    """The run's configuration from the settings given ({path: value}, e.g. the command line's):
    explicit values over the preset's architecture and recipe over the trainer's defaults.
    Raises ValueError for an unknown preset or a setting a section rejects."""
    preset = given.get("train.model", TrainConfig.model)
    if preset not in RECIPES:
        raise ValueError(f"unknown model preset {preset!r}; choose from {sorted(RECIPES)}")
    values = {**TRAINER_DEFAULTS, **RECIPES[preset], **given}
    values.setdefault("data.seed", values.get("train.seed", TrainConfig.seed))
    values.setdefault("data.shards", values.get("train.shards", TrainConfig.shards))
    context = values.get("data.context", DataConfig.context)
    values.setdefault("data.short_context_min", min(context, DataConfig.short_context_min))
    model = ModelConfig.preset(preset, **{k.split(".", 1)[1]: v for k, v in values.items()
                                          if k.startswith("model.")})
    return flags.build(RunConfig, values, RunConfig(model=model))


PRECISIONS = ("auto", "bf16", "bf16-mixed", "fp32")  # --precision (pretrain/train.py)
CKPT_DIR = "checkpoints"  # RUN/checkpoints/step<N>/ and RUN/checkpoints/latest
# Model settings a resumed run may change: how the same model is computed, not what it is.
RESUME_MAY_CHANGE = ("kernels", "checkpointing")


def resumed_settings(given: dict) -> dict:
    """``given`` with the model of the run it resumes. When ``--out`` holds a checkpoint that
    this run will resume (no ``--no-resume``), the preset and model settings the command line
    leaves unset are the saved run's (``RUN/config.json``), so a resumed run keeps its model even
    where a default has changed since; one set to another value than the saved one is an error
    naming it (a checkpoint holds one model), except ``RESUME_MAY_CHANGE``."""
    run = Path(given.get("train.out") or ".")
    saved_path = run / "config.json"
    if (not given.get("train.resume", TrainConfig.resume)
            or not (run / CKPT_DIR / "latest").is_file() or not saved_path.is_file()):
        return given
    saved = json.loads(saved_path.read_text())
    wanted = {"train.model": saved["train"]["model"]} | {
        f"model.{k}": v for k, v in saved_model_settings(saved["model"]).items()
        if k not in RESUME_MAY_CHANGE}
    conflicts = [f"{k} is {v!r} there, {given[k]!r} here" for k, v in wanted.items()
                 if k in given and given[k] != v]
    if conflicts:
        raise ValueError(f"{run} holds a checkpoint of another model ({saved_path}: "
                         f"{'; '.join(conflicts)}); resume with its settings, or train anew "
                         "with another --out or --no-resume")
    if saved.get("deepspeed"):  # unless given, the precision it trained in (auto's meaning
        wanted["train.precision"] = precision_of(saved["deepspeed"])  # may have changed since)
    return {**wanted, **given}


def precision_of(ds: dict) -> str:
    """The ``--precision`` a resolved DeepSpeed JSON trains in: bf16 (DeepSpeed's bf16 mode),
    bf16-mixed (bf16 autocast), fp32, or auto where it holds another mode (fp16), which only
    the JSON itself describes."""
    autocast = ds.get("torch_autocast", {})
    if ds.get("bf16", {}).get("enabled") is True:
        return "bf16"
    if ds.get("fp16", {}).get("enabled") is True or autocast.get("enabled") is True and (
            autocast.get("dtype") not in ("bfloat16", "bf16")):
        return "auto"
    return "bf16-mixed" if autocast.get("enabled") is True else "fp32"


def parse_train_config(argv: list[str] | None = None) -> RunConfig:
    p = parser()
    try:
        cfg = resolve(resumed_settings(flags.given(p.parse_args(argv))))
    except (TypeError, ValueError) as e:
        p.error(str(e))
    if not cfg.train.shards or not cfg.train.out:
        p.error("--shards and --out are required")
    if cfg.train.precision not in PRECISIONS:
        p.error(f"--precision {cfg.train.precision!r}: expected {', '.join(PRECISIONS)}")
    return cfg
