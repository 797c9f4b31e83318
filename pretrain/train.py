"""Pretrain a single-cell foundation model with DeepSpeed ZeRO, on one machine or many.

    deepspeed [--num_gpus G | --hostfile H] pretrain/train.py \
        --deepspeed_config ds_configs/zero2.json --shards OUT --out RUN --model tiny --max-steps N

(or the same under ``torchrun``). ``RUN/`` receives TensorBoard events (``RUN/tb``, rank 0 only),
checkpoints (``RUN/checkpoints/step<N>``, the last ``--keep-ckpts``) and the resolved configuration
(``RUN/config.json``). A run whose ``RUN/`` holds a checkpoint resumes from it: model, optimizer,
scheduler, every rank's RNG and data-stream position, so its steps continue the interrupted run's
loss sequence exactly (bitwise on CPU in fp32). Resumed on another number of ranks, it converts
the checkpoint to DeepSpeed's universal form once (every parameter's fp32 weights and optimizer
moments whole) and loads that, and the data stream is dealt again to the new ranks.
docs/training.md explains the options.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

if __package__ in (None, ""):  # started as a script by deepspeed/torchrun: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from data_prep.shard_format import CLASSES, load_manifest, read_labels  # noqa: E402
from pretrain.config import (  # noqa: E402
    CKPT_DIR,
    OptimConfig,
    RunConfig,
    TrainConfig,
    parse_train_config,
    precision_of,
)
from pretrain.device_peaks import DevicePeak, device_peak, native_bf16  # noqa: E402
from pretrain.distributed import gather_across_ranks, sum_across_ranks  # noqa: E402
from pretrain.evaluate import evaluate, to_device  # noqa: E402
from utils import atomic  # noqa: E402

# Loader worker processes per rank when --workers is left at -1: batches are assembled beside a
# GPU step; CPU ranks share the cores with the step, so they assemble in-process.
AUTO_WORKERS_CUDA = 2


# ----------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------
def resolve_ds_config(cfg: RunConfig, path: str | Path, native_bf16: bool) -> dict:
    """Read the DeepSpeed JSON and fill its ``"auto"`` values from the run's config.

    Precision ``"auto"`` is bf16-mixed where the device multiplies bf16 natively
    (``native_bf16``: Ampere or newer GPUs, CPUs with AVX-512 or AMX;
    ``device_peaks.native_bf16``) and fp32 elsewhere: an AVX2-only CPU emulates bf16 matmuls,
    and `tiny` trained 5x slower in bf16 than in fp32 on one (docs/benchmarks/train.md).
    ``"bf16-mixed"`` keeps the weights, gradients and residual stream in fp32 and runs the
    matmuls in bf16 under torch autocast (DeepSpeed's ``torch_autocast``); ``"bf16"`` is
    DeepSpeed's bf16 mode (bf16 weights, activations and gradients, fp32 master weights in the
    optimizer), which cost the demo's held-out accuracy 0.05 against both on one seed, less
    than the seed spread over three (docs/benchmarks/quality.md). A JSON that sets
    ``bf16.enabled`` or ``torch_autocast`` itself is followed under ``"auto"``.
    """
    path = Path(path)
    try:
        ds = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: DeepSpeed config not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    auto = {"train_micro_batch_size_per_gpu": cfg.data.batch_size,
            "gradient_accumulation_steps": cfg.optim.grad_accum,
            "gradient_clipping": cfg.optim.grad_clip}
    for key, value in auto.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    if ds.get("train_batch_size") == "auto":  # DeepSpeed derives it: micro x accum x world
        del ds["train_batch_size"]
    bf16 = ds.setdefault("bf16", {})
    precision = cfg.train.precision
    if precision == "auto" and bf16.get("enabled", "auto") == "auto":
        if "torch_autocast" in ds:  # the JSON's own autocast decides
            bf16["enabled"] = False
        else:
            precision = "bf16-mixed" if native_bf16 else "fp32"
    if precision != "auto":
        bf16["enabled"] = precision == "bf16"
        ds["torch_autocast"] = {"enabled": precision == "bf16-mixed", "dtype": "bfloat16"}
    if ds.get("fp16", {}).get("enabled") is True and bf16["enabled"]:
        raise ValueError(f"{path}: fp16 and bf16 are both enabled")
    if bf16["enabled"] and ds.get("torch_autocast", {}).get("enabled") is True:
        raise ValueError(f"{path}: bf16 and torch_autocast are both enabled (bf16-mixed is "
                         "torch_autocast alone)")
    ds.setdefault("steps_per_print", 10**9)  # the trainer logs; keep DeepSpeed quiet
    return ds


def offloads_optimizer(ds: dict) -> bool:
    device = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    return device in ("cpu", "nvme")


def lr_lambda(cfg: OptimConfig, max_steps: int):
    """Linear warmup to the peak, then cosine decay to ``min_lr_ratio`` at the schedule's end
    (``schedule_steps``, else ``max_steps``)."""
    total = cfg.schedule_steps or max_steps
    warmup = min(cfg.warmup_steps, max(total - 1, 0))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(total - warmup, 1))
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def build_optimizer(cfg: OptimConfig, model: torch.nn.Module, ds: dict) -> torch.optim.Optimizer:
    """AdamW; weight decay on matrices only (biases, norms and scalars are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
    if offloads_optimizer(ds):  # the CPU-side step needs DeepSpeed's fused CPU Adam (JIT-built)
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kw)
    return torch.optim.AdamW(groups, **kw)


# ----------------------------------------------------------------------------------------------
# per-rank state that DeepSpeed does not checkpoint
# ----------------------------------------------------------------------------------------------
# The legacy global numpy RNG is saved and seeded on purpose: libraries may draw from it.
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002
    torch.manual_seed(seed)


def memory_per_rank(engine) -> list[list[float]]:
    """[world][4] bytes per rank: resident set size, peak accelerator memory, and the parameter
    and optimizer-state bytes the rank holds (``state_bytes``); gathered on the engine's device."""
    cuda = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    held = state_bytes(engine)
    mine = torch.tensor([psutil.Process().memory_info().rss, cuda, held["param_bytes"],
                         held["optim_bytes"]], dtype=torch.float64)
    return gather_across_ranks(mine, engine.device).tolist()


def state_bytes(engine) -> dict[str, int]:
    """Bytes this rank holds for model parameters and for optimizer state (master weights and
    moments), counting each storage once: what ZeRO partitions."""
    seen: set[int] = set()

    def size(t: torch.Tensor) -> int:
        if t.data_ptr() in seen or t.numel() == 0:
            return 0
        seen.add(t.data_ptr())
        return t.numel() * t.element_size()

    params = sum(size(p.ds_tensor if hasattr(p, "ds_tensor") else p)
                 for p in engine.module.parameters())
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    # ZeRO keeps the fp32 master partitions itself (ZeRO-3 hands them to the inner optimizer
    # only during its step), so look in both places.
    masters = [*getattr(engine.optimizer, "single_partition_of_fp32_groups", []),
               *getattr(engine.optimizer, "fp32_partitioned_groups_flat", []),
               *(p for g in inner.param_groups for p in g["params"])]
    optim = sum(size(p) for p in masters)
    optim += sum(size(v) for s in inner.state.values() for v in s.values()
                 if torch.is_tensor(v) and v.ndim > 0)
    return {"param_bytes": params, "optim_bytes": optim}


# ----------------------------------------------------------------------------------------------
# checkpoints
# ----------------------------------------------------------------------------------------------
def checkpoint_tags(ckpt_dir: Path) -> list[str]:
    return sorted(p.name for p in ckpt_dir.glob("step*") if p.is_dir())


def save_checkpoint(engine, ckpt_dir: Path, step: int, loader, keep: int) -> None:
    """All ranks: DeepSpeed's sharded state plus, in client_state, every rank's loader position
    and RNG states (gathered, since DeepSpeed writes client_state from rank 0 only). A universal
    copy made to resume on another number of ranks is removed once this layout has its own."""
    mine = {"loader": loader.state_dict(), "rng": rng_state()}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    client = {"step": step, "world_size": dist.get_world_size(), "ranks": ranks}
    engine.save_checkpoint(str(ckpt_dir), tag=f"step{step:08d}", client_state=client)
    dist.barrier()
    if dist.get_rank() == 0:
        for old in checkpoint_tags(ckpt_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(ckpt_dir / old, ignore_errors=True)
        shutil.rmtree(ckpt_dir / UNIVERSAL_DIR, ignore_errors=True)
    dist.barrier()


UNIVERSAL_DIR = "universal"  # in RUN/checkpoints: converted checkpoints, one per tag
_PARTITION = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_\d+_optim_states\.pt$")


def latest_tag(ckpt_dir: Path) -> str | None:
    latest = ckpt_dir / "latest"
    return latest.read_text().strip() if latest.is_file() else None


def saved_layout(tag_dir: Path) -> tuple[int, bool] | None:
    """(data-parallel ranks, ZeRO-3 or not) of the run that wrote a DeepSpeed checkpoint: it
    wrote one ZeRO optimizer partition file per rank (the names DeepSpeed's own converter
    reads), and under ZeRO-3 one model-states file per rank too. None without partition files
    (no ZeRO optimizer)."""
    ranks = {int(m.group(1)) for f in tag_dir.iterdir() if (m := _PARTITION.match(f.name))}
    if not ranks:
        return None
    return len(ranks), not (tag_dir / "mp_rank_00_model_states.pt").is_file()


def universal_checkpoint(ckpt_dir: Path, tag: str) -> Path:
    """All ranks: the folder that holds checkpoint ``tag`` in DeepSpeed's universal form
    (``ds_to_universal``: each parameter's fp32 weights, Adam moments and step whole, which any
    number of ranks re-partition when they load). Rank 0 converts it once, into a temporary
    folder renamed when complete; a rerun finds it."""
    root = ckpt_dir / UNIVERSAL_DIR
    if dist.get_rank() == 0 and not (root / tag).is_dir():
        work = root / ".converting"
        shutil.rmtree(work, ignore_errors=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               str(ckpt_dir / tag), "--output_folder", str(work / tag), "--inject_missing_state"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{ckpt_dir / tag}: converting to a universal checkpoint failed "
                               f"({' '.join(cmd)}):\n{proc.stderr[-3000:]}")
        os.replace(work / tag, root / tag)
        shutil.rmtree(work)
    dist.barrier()
    return root


def load_checkpoint(engine, ckpt_dir: Path, loader, universal: Path | None = None,
                    seed: int = 0) -> int:
    """Restore the latest checkpoint in ``ckpt_dir``; returns its step (0 when there is none).

    ``universal``: the checkpoint was saved by another number of ranks and converted there
    (``universal_checkpoint``; the engine was configured with ``checkpoint.load_universal``).
    The loader then deals the data stream again from any old rank's state, and each rank's RNG
    is seeded afresh from (``seed``, step, rank), since the saved states were other ranks'.
    """
    tag = latest_tag(ckpt_dir)
    if tag is None:
        return 0
    path, client = engine.load_checkpoint(str(universal or ckpt_dir), tag=tag)
    if path is None:
        raise RuntimeError(f"{ckpt_dir}: could not load checkpoint {tag}")
    rank, world, saved = dist.get_rank(), dist.get_world_size(), client["world_size"]
    if (saved != world) != (universal is not None):
        raise RuntimeError(f"{path}: saved by {saved} ranks, loaded by {world} "
                           f"{'from' if universal else 'without'} a universal checkpoint")
    mine = client["ranks"][rank if rank < saved else 0]
    loader.load_state_dict(mine["loader"])
    step = int(client["step"])
    if saved == world:
        set_rng_state(mine["rng"])
    else:
        seed_all(seed + 1000 * (rank + 1) + 1_000_003 * step)
    return step


# ----------------------------------------------------------------------------------------------
# training
# ----------------------------------------------------------------------------------------------
def load_label_hierarchy(path: str | Path, shards: str | Path, manifest: dict) -> dict:
    """A hierarchy file in label names -> {class: {parent id: [leaf ids]}} for the model.

    The file maps each class to ``{parent label: [leaf labels]}``, in the names of the shards'
    labels.json (e.g. ontology term ids); parents absent from the shards are skipped, since no
    cell can carry them.
    """
    names = read_labels(Path(shards) / manifest["labels"]["file"])["classes"]
    try:
        given = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read the label hierarchy ({e})") from None
    hierarchy = {}
    for cls, parents in given.items():
        if cls not in CLASSES:
            raise ValueError(f"{path}: unknown class {cls!r}; classes are {sorted(CLASSES)}")
        ids = {name: i for i, name in enumerate(names[cls])}
        resolved = {}
        for parent, leaves in parents.items():
            if parent not in ids:
                continue
            unknown = [leaf for leaf in leaves if leaf not in ids]
            if unknown:
                raise ValueError(f"{path}: {cls} label {unknown[0]!r} is not in the label "
                                 f"vocabulary (a leaf of {parent!r})")
            resolved[ids[parent]] = [ids[leaf] for leaf in leaves]
        if resolved:
            hierarchy[cls] = resolved
    return hierarchy


def bf16_matmuls(ds: dict) -> bool:
    """Whether the run multiplies in bf16: DeepSpeed's bf16 mode or bf16 autocast."""
    return precision_of(ds) in ("bf16", "bf16-mixed")


def run_peak(cfg: TrainConfig, bf16: bool, device: torch.device) -> DevicePeak:
    """The device's peak at the run's matmul precision (bf16, else TF32 or plain fp32 as torch
    is set), or ``--peak-tflops``; MFU is logged only when it is known."""
    if bf16:
        precision = "bf16"
    else:
        precision = "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"
    return device_peak(device, precision, peak_tflops=cfg.peak_tflops or None)


def make_deterministic() -> None:
    """Same inputs, same bits: torch's deterministic algorithms (SDPA's memory-efficient
    backward takes its deterministic path; the criss-cross kernels use no atomics in any mode),
    cuBLAS with a fixed workspace, no cuDNN autotuning. Strict, not
    warn-only: an op without a deterministic version stops the run with torch's error naming it,
    rather than breaking the promise silently. Called before any CUDA work."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False


class Trainer:
    """One rank's view of a run: engine, data, logging, checkpoints."""

    def __init__(self, run_cfg: RunConfig):
        import deepspeed

        from pretrain.data import CellLoader
        from pretrain.model import ScPrintModel

        self.run_cfg, self.cfg = run_cfg, run_cfg.train
        cfg = run_cfg.train
        self.run = Path(cfg.out)
        self.ckpt_dir = self.run / CKPT_DIR
        if cfg.deterministic:
            make_deterministic()
        cuda = torch.cuda.is_available()
        if cuda:  # before the process group: NCCL and barrier() use the current device
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        else:
            # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU ranks when it starts
            # (minutes on a small machine); it serves inference_all_reduce only, never training.
            importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.manifest = load_manifest(cfg.shards)
        self.n_labels = dict(self.manifest["labels"]["n_labels"])

        seed_all(cfg.seed)  # identical initial weights on every rank
        self.model_cfg = run_cfg.model
        self.hierarchy = (load_label_hierarchy(cfg.label_hierarchy, cfg.shards, self.manifest)
                          if cfg.label_hierarchy else None)
        model = ScPrintModel(self.model_cfg, int(self.manifest["vocab"]["n_ids"]), self.n_labels,
                             self.hierarchy)
        seed_all(cfg.seed + 1000 * (self.rank + 1))  # then distinct dropout/noise per rank

        device = torch.device("cuda", torch.cuda.current_device()) if cuda else "cpu"
        self.ds_config = resolve_ds_config(run_cfg, cfg.deepspeed_config, native_bf16(device))
        tag = latest_tag(self.ckpt_dir) if cfg.resume else None
        layout = saved_layout(self.ckpt_dir / tag) if tag else None
        self.saved_world = layout[0] if layout else self.world
        stage = self.ds_config.get("zero_optimization", {}).get("stage", 0)
        if layout and layout[1] != (stage == 3):
            raise RuntimeError(f"{self.ckpt_dir / tag}: saved under ZeRO stage "
                               f"{'3' if layout[1] else '1 or 2'}, this run uses stage {stage}; "
                               "resume under the stage the run was saved with")
        universal = None
        if self.saved_world != self.world:  # ZeRO partitions for another number of ranks
            universal = universal_checkpoint(self.ckpt_dir, tag)
            self.ds_config["checkpoint"] = {**self.ds_config.get("checkpoint", {}),
                                            "load_universal": True}
        optimizer = build_optimizer(run_cfg.optim, model, self.ds_config)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer,
                                                      lr_lambda(run_cfg.optim, cfg.max_steps))
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=self.ds_config)
        self.device = self.engine.device

        data = run_cfg.data
        workers = data.num_workers if data.num_workers >= 0 else (AUTO_WORKERS_CUDA if cuda else 0)
        self.data_cfg = replace(data, shards=cfg.shards, split="train", num_workers=workers,
                                pin_memory=cuda)
        self.loader = CellLoader(self.data_cfg, self.rank, self.world)
        self.step = (load_checkpoint(self.engine, self.ckpt_dir, self.loader, universal, cfg.seed)
                     if cfg.resume else 0)
        self.batches = iter(self.loader)

        self.writer = None
        if self.rank == 0:
            self.run.mkdir(parents=True, exist_ok=True)
            self._write_config()
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint
            self.writer = SummaryWriter(str(self.run / "tb"), purge_step=self.step + 1)
        self.peak = run_peak(cfg, bf16_matmuls(self.ds_config), self.device)
        if self.rank == 0 and not self.peak.flops:
            print(f"[train] no peak FLOP/s known for {self.peak.device}: MFU not logged "
                  "(give --peak-tflops or SCPRETRAIN_PEAK_TFLOPS)", flush=True)

    def _write_config(self) -> None:
        resolved = {"train": asdict(self.cfg), "optim": asdict(self.run_cfg.optim),
                    "model": asdict(self.model_cfg),
                    "data": asdict(self.data_cfg), "deepspeed": self.ds_config,
                    "world_size": self.world, "n_genes": int(self.manifest["vocab"]["n_ids"]),
                    "n_labels": self.n_labels, "label_hierarchy": self.hierarchy}
        atomic.write_json(self.run / "config.json", resolved, indent=1, default=str)

    def train_step(self) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One optimizer step over ``grad_accum`` micro-batches; returns this rank's sums: the
        loss terms as float64 tensors on the device (nothing is read back to the host here) and
        the host-side counts (lr, cells, tokens, FLOPs, and the seconds spent waiting for the
        data stream's next batch: the loop can queue no device work meanwhile)."""
        losses: dict[str, torch.Tensor] = {}
        counts: dict[str, float] = {"lr": self.scheduler.get_last_lr()[0],  # this step's lr
                                    "data_wait": 0.0}
        for _ in range(self.run_cfg.optim.grad_accum):
            # torch's DataLoader draws from the global RNG when its iterator starts: keep that
            # out of the training stream, or a resumed run's dropout would shift by one draw.
            waited = time.perf_counter()
            with torch.random.fork_rng(devices=[]):
                host = next(self.batches)
            counts["data_wait"] += time.perf_counter() - waited
            cells, length = host["gene_ids"].shape
            views = 2 if "input_counts_2" in host else 1
            counts["cells"] = counts.get("cells", 0.0) + cells
            counts["tokens"] = counts.get("tokens", 0.0) + float(host["gene_mask"].sum())
            counts["flops"] = counts.get("flops", 0.0) + cells * views * float(
                self.engine.module.flops_per_cell(length, training=True))
            out = self.engine(to_device(host, self.device))
            self.engine.backward(out["loss"])
            self.engine.step()
            for name, value in [("total", out["loss"]), *out["losses"].items()]:
                key = f"loss/{name}"
                term = value.detach().double() / self.run_cfg.optim.grad_accum
                losses[key] = losses[key] + term if key in losses else term
        return losses, counts

    def log(self, losses: dict[str, torch.Tensor], counts: dict[str, float],
            seconds: float) -> float:
        """All ranks: sum the step's figures over ranks on the engine's device (one collective,
        one read back to the host); rank 0 writes the scalars. Returns the mean total loss."""
        counts = {**counts, "corrupt_shards": float(self.loader.stats["corrupt_shards"]),
                  "lr": counts["lr"] / self.world, "seconds": seconds / self.world,
                  "data_wait": counts["data_wait"] / self.world}  # means over ranks
        loss_names, count_names = sorted(losses), sorted(counts)
        host = torch.tensor([counts[k] for k in count_names], dtype=torch.float64)
        flat = torch.cat([torch.stack([losses[k] for k in loss_names]).to(self.device),
                          host.to(self.device)])
        total = dict(zip(loss_names + count_names,
                         sum_across_ranks(flat, self.device).tolist()))
        seconds = total["seconds"]
        memory = memory_per_rank(self.engine)
        grad_norm = self.engine.get_global_grad_norm()
        mean_loss = total["loss/total"] / self.world
        if self.writer is None:
            return mean_loss
        w, step = self.writer, self.step
        for name in loss_names:
            w.add_scalar(name, total[name] / self.world, step)
        w.add_scalar("opt/lr", total["lr"], step)
        if grad_norm is not None:
            w.add_scalar("opt/grad_norm", float(grad_norm), step)
        w.add_scalar("perf/cells_per_s", total["cells"] / seconds, step)
        w.add_scalar("perf/tokens_per_s", total["tokens"] / seconds, step)
        w.add_scalar("perf/tflops_per_s", total["flops"] / seconds / 1e12, step)
        if self.peak.flops:
            w.add_scalar("perf/mfu", total["flops"] / seconds / (self.peak.flops * self.world),
                         step)
        # near 1: the step waits on the loader (more workers, or a faster store); near 0: it
        # does not (the host still may: launches, Python)
        w.add_scalar("perf/data_wait_frac", min(1.0, total["data_wait"] / seconds), step)
        for r, (rss, cuda, param, optim) in enumerate(memory):
            w.add_scalar(f"memory/rss_gib/rank{r}", rss / 2**30, step)
            w.add_scalar(f"memory/param_mib/rank{r}", param / 2**20, step)
            w.add_scalar(f"memory/optim_mib/rank{r}", optim / 2**20, step)
            if cuda > 0:
                w.add_scalar(f"memory/cuda_max_gib/rank{r}", cuda / 2**30, step)
        w.add_scalar("data/corrupt_shards", total["corrupt_shards"], step)
        w.add_scalar("data/epoch", self.loader.stats["epoch"], step)  # packed epoch, rank 0
        w.add_scalar("data/passes", self.loader.stats["passes"], step)  # > 0: replaying draws
        return mean_loss

    def run_eval(self) -> None:
        from pretrain.data import CellLoader

        if not self.manifest.get("eval_shards"):
            return
        saved = rng_state()  # evaluation must not shift the training run's random streams
        loader = CellLoader(replace(self.data_cfg, split="eval"), self.rank, self.world)
        self.engine.eval()
        metrics = evaluate(self.engine, loader, self.n_labels, self.cfg.eval_batches,
                           self.device)
        self.engine.train()
        set_rng_state(saved)
        if self.writer is not None:
            for tag, value in metrics.items():
                self.writer.add_scalar(tag, value, self.step)
            print(f"[eval] step {self.step} " + " ".join(
                f"{k.split('/', 1)[1]}={v:.4f}" for k, v in sorted(metrics.items())), flush=True)

    def _clock(self) -> float:
        """Wall time once the device has finished the work queued so far (the steps run
        asynchronously: without the wait, a timed window would hold only their launch)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def fit(self) -> None:
        """Train to ``max_steps``. Throughput covers the steps of each logging window (the
        device synchronises once per window); evaluation and checkpoints are not timed."""
        cfg = self.cfg
        if self.rank == 0 and self.step:
            print(f"[train] resumed from step {self.step}", flush=True)
        redeal, grad_accum = self.loader.redeal, self.run_cfg.optim.grad_accum
        if self.rank == 0 and self.saved_world != self.world:
            print(f"[train] the checkpoint was saved by {self.saved_world} ranks, this run has "
                  f"{self.world}: optimizer state re-partitioned from its universal form; the "
                  f"global batch is now {self.world * self.data_cfg.batch_size * grad_accum} cells",
                  flush=True)
        if self.rank == 0 and redeal is not None and self.loader.batches == 0:
            done = sum(len(v) for v in redeal.done.values())
            print(f"[train] data stream dealt again to the new layout from loader epoch "
                  f"{redeal.epoch}: {done} shards read whole before are left out, "
                  f"{redeal.reread} samples of unfinished shards are read again", flush=True)
        self.engine.train()
        window: dict[str, float] = {}
        seconds, start = 0.0, self._clock()
        while self.step < cfg.max_steps:
            losses, counts = self.train_step()
            self.step += 1
            window = {k: v if k == "lr" else window.get(k, 0.0) + v for k, v in counts.items()}
            evaluates = bool(cfg.eval_every and self.step % cfg.eval_every == 0)
            saves = bool((cfg.ckpt_every and self.step % cfg.ckpt_every == 0)
                         or self.step == cfg.max_steps)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                now = self._clock()
                loss = self.log(losses, window, seconds + now - start)
                window, seconds, start = {}, 0.0, time.perf_counter()
                if self.rank == 0:
                    print(f"[train] step {self.step} loss {loss:.6f} (mean of ranks)", flush=True)
            if evaluates or saves:
                seconds += self._clock() - start
            if evaluates:
                self.run_eval()
            if saves:
                save_checkpoint(self.engine, self.ckpt_dir, self.step, self.loader,
                                cfg.keep_ckpts)
                if self.rank == 0:
                    print(f"[train] checkpoint step {self.step}", flush=True)
            if evaluates or saves:
                start = time.perf_counter()
        if self.writer is not None:
            self.writer.close()

    def close(self) -> None:
        """Release the run in a known order, every rank together: the engine (ZeRO-3's parameter
        hooks and gathered-parameter state), the data stream, then the process group. Left to
        interpreter teardown, they go in whatever order the garbage collector picks, while the
        other ranks are leaving."""
        self.engine.destroy()
        self.batches = None
        dist.barrier()
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    cfg = parse_train_config(argv)
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()


if __name__ == "__main__":
    main()
