"""Typed trainer configuration and its command line, generated from the dataclass fields.

Every field of ``TrainConfig`` becomes ``--field-name`` (and ``--field_name``: the DeepSpeed
convention, e.g. ``--deepspeed_config``), so the command line, the defaults and the resolved
``RUN/config.json`` can never drift apart. Boolean fields become ``--name`` / ``--no-name``.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field

# Optimisation recipe of each model preset: what a flag left unset takes. small/medium/large are
# scPRINT-2's published settings (per-GPU batch, peak lr, warmup, clipping; medium's clipping is
# not published: it takes large's); tiny is sized for CPU ranks: at 32 cells a step its peak lr
# of 2e-3 beat 1e-3 (docs/benchmarks/learning.md), and docs/benchmarks/quality.md shows what
# 600 steps of it give on cells it never saw.
RECIPES = {
    "tiny": dict(batch_size=16, lr=2e-3, warmup_steps=50, grad_clip=40.0),
    "small": dict(batch_size=30, lr=1e-4, warmup_steps=500, grad_clip=40.0),
    "medium": dict(batch_size=16, lr=1e-4, warmup_steps=2000, grad_clip=2.0),
    "large": dict(batch_size=16, lr=5e-5, warmup_steps=4000, grad_clip=2.0),
}


@dataclass
class TrainConfig:
    """What one training run needs besides the model preset and the DeepSpeed JSON."""

    deepspeed_config: str = field(
        default="ds_configs/zero2.json", metadata={"help": "DeepSpeed JSON; 'auto' values are "
                                                   "filled from this config"})
    shards: str = field(default="", metadata={"help": "build_shards output dir (manifest.json)"})
    out: str = field(default="", metadata={"help": "run dir: TensorBoard, checkpoints, config"})
    model: str = field(default="tiny", metadata={"help": "preset: tiny, small, medium, large"})
    attention: str = field(default="", metadata={"help": "override the preset's attention "
                                                 "(criss_cross or full); empty keeps the preset"})
    max_steps: int = field(default=1000, metadata={"help": "stop after this optimizer step"})
    schedule_steps: int = field(default=0, metadata={
        "help": "length of the lr schedule (0 = max-steps); set it to train in chunks"})
    activation_checkpointing: bool = field(default=False, metadata={
        "help": "recompute the trunk blocks' activations in backward (less memory, ~30% slower)"})
    gene_embeddings: str = field(default="", metadata={
        "help": ".npy [n_ids, E] of precomputed gene embeddings (frozen, trainable adapter); "
                "empty: a learned embedding table"})
    views: int = field(default=2, metadata={
        "help": "corrupted views per cell: 2 trains the contrastive term between them, 1 skips it"})
    batch_size: int | None = field(default=None, metadata={
        "help": "cells per rank per micro-step (unset: the preset's recipe)"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimizer step"})
    context: int = field(default=3200, metadata={"help": "genes per cell (max context)"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate of AdamW (unset: the preset's recipe)"})
    min_lr_ratio: float = field(default=0.1, metadata={"help": "final lr / peak lr (cosine)"})
    warmup_steps: int | None = field(default=None, metadata={
        "help": "linear warmup steps (unset: the preset's recipe)"})
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-7
    grad_clip: float | None = field(default=None, metadata={
        "help": "max global grad norm, used where the JSON says gradient_clipping 'auto' "
                "(unset: the preset's recipe)"})
    precision: str = field(default="auto", metadata={
        "help": "auto (the JSON decides; 'auto' there means bf16), bf16 or fp32"})
    seed: int = 0
    workers: int = field(default=-1, metadata={
        "help": "loader worker processes per rank (-1: 2 on a GPU, 0 = in-process on CPU ranks)"})
    deterministic: bool = field(default=False, metadata={
        "help": "bitwise-reproducible steps on GPUs (a resumed run then repeats the "
                "uninterrupted one exactly): torch's deterministic algorithms and the "
                "criss-cross backward without atomics; a little slower"})
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

    def __post_init__(self) -> None:
        """Optimisation settings left unset take the preset's recipe (``RECIPES``)."""
        if self.model not in RECIPES:
            raise ValueError(f"unknown model preset {self.model!r}; choose from {sorted(RECIPES)}")
        for name, value in RECIPES[self.model].items():
            if getattr(self, name) is None:
                setattr(self, name, value)


def _parser_type(tp: object) -> type:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):  # X | None: parse as X
        tp = next(t for t in typing.get_args(tp) if t is not type(None))
    if tp in (int, "int"):
        return int
    if tp in (float, "float"):
        return float
    return str


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type) -> None:
    """One option per field of ``cls`` (dashes and underscores both accepted)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        names = [f"--{f.name.replace('_', '-')}"]
        if "_" in f.name:
            names.append(f"--{f.name}")
        help_ = f.metadata.get("help", "")
        if hints[f.name] is bool:
            parser.add_argument(*names, dest=f.name, action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_)
        else:
            if f.default is not None:
                help_ = f"{help_} (default: {f.default})"
            parser.add_argument(*names, dest=f.name, type=_parser_type(hints[f.name]),
                                default=f.default, help=help_)


def parse_train_config(argv: list[str] | None = None) -> TrainConfig:
    parser = argparse.ArgumentParser(
        prog="pretrain/train.py", allow_abbrev=False,
        description="Pretrain a single-cell foundation model with DeepSpeed ZeRO.")
    add_dataclass_args(parser, TrainConfig)
    try:
        cfg = TrainConfig(**vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))
    if not cfg.shards or not cfg.out:
        parser.error("--shards and --out are required")
    if cfg.precision not in ("auto", "bf16", "fp32"):
        parser.error(f"--precision {cfg.precision!r}: expected auto, bf16 or fp32")
    return cfg
