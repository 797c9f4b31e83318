"""The GPU path end to end in one run: kernels (correctness, determinism, speed), the DeepSet
encoder, the trainer under DeepSpeed (NCCL, bf16, ZeRO-2) with evaluation, a checkpoint, a kill
and a resume, and the trained model embedding real cells. Started by ``bash
benchmarks/gpu_check.sh`` (which installs what the machine lacks from prepared wheels); writes
``OUT/gpu_check.json`` with top-level keys ``device``, ``kernels``, ``trainer`` and ``embed``
after every part (a run stopped by a time limit keeps what it did), and at the end prints its
figures as markdown tables, the device named, and writes them to ``OUT/gpu_check.md``
(``--report-from OUT/gpu_check.json`` writes them from the JSON alone).

On a GPU (about 7 minutes on one H200; ``--parts`` and ``--train-runs`` run a subset):
- kernel correctness: the criss-cross kernels in bf16 and fp32 against float64 math, forward and
  all six gradients, at the small and large presets' head shapes (N = 3,200, M = 200) in the
  model's layouts (q, k, v strided views of one fused projection; latents expanded along the
  batch with stride 0; padded rows, a row with one real gene, a row with none); each tensor
  within the tolerance or within twice the error of PyTorch's SDPA in the same dtype;
- determinism: two backward passes bitwise equal, with torch's deterministic algorithms on and
  off (the kernels use no atomics);
- the trainer: ``small`` at the 3,200 context, one GPU, 30 steps (checkpoint and evaluation
  every 15). Criss-cross with ``--deterministic``:
  an uninterrupted run, and a run killed (SIGTERM to its process group) after its mid-run
  checkpoint and then resumed, whose losses must equal the uninterrupted run's; full attention
  in its default mode; all in bf16-mixed (the default on a GPU), and criss-cross once more in
  DeepSpeed's bf16 mode (bf16 weights) for its speed and memory. Throughput (cells/s,
  tokens/s, TFLOP/s, MFU against pretrain/device_peaks.py) is the median over the steps after
  the first three, with the share of each step spent waiting for the loader
  (``perf/data_wait_frac``);
- kernel speed at N = 1,024 and 3,200 (benchmarks/bench_kernels.py: Triton criss-cross, SDPA
  reference, compiled FlexAttention, SDPA flash full attention, flash-attn if installed);
- the DeepSet encoder fused vs reference vs compiled reference, with peak memory;
- ``pretrain.embed`` with the uninterrupted criss-cross run's model, exported, on the real PBMC
  file (2,800 cells) on the GPU in fp32 and in bf16 (benchmarks/bench_embed.py): cells/s of each
  and of the samples alone (CPU work: reading, neighbour graph, batches; in one process and
  with the sample-making workers pretrain.embed gives a GPU), and how far bf16 moves the
  embeddings.
Parts run in that order of importance; one that would start past ``--budget-s`` is skipped and
says so in the JSON.

``--cpu``: the same steps that need no GPU, small and quick (the test suite runs it): the
kernels through the Triton interpreter, the DeepSet correctness rows, a one-process ``tiny``
trainer on CPU (gloo) with evaluation, checkpoint, kill and resume, and the embedding step on
300 cells.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CPU_MODE = "--cpu" in sys.argv[1:]
if CPU_MODE:  # must precede any import of the kernels
    os.environ["TRITON_INTERPRET"] = "1"
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
else:  # cuBLAS under deterministic algorithms (the repeated-backward check) needs it at init
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402

from utils import atomic  # noqa: E402

FP32_TOL = 1e-5  # max |error| / max |float64 value| (as tests/test_criss_cross.py)
HALF_TOL = 2e-2
DATASET = "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"  # real cells in data/


# ----------------------------------------------------------------------------------------------
# settings of the two modes
# ----------------------------------------------------------------------------------------------
def settings(cpu: bool) -> dict:
    if cpu:
        return dict(
            correctness=[("tiny-like", 3, 2, 100, 20, 32)],  # name, B, H, N, M, D
            dtypes=(torch.float32, torch.bfloat16),
            shards=["--context-genes", "256", "--stream-size", "600", "--shard-samples", "150"],
            train=dict(model="tiny", context=256, batch=4, steps=4, every=2, eval_batches=1,
                       precision="fp32", full_steps=2, other_precision=None,
                       launch_timeout_s=300),
            embed_cells=300,
        )
    return dict(
        correctness=[("small", 8, 4, 3200, 200, 64), ("large", 2, 20, 3200, 200, 64)],
        dtypes=(torch.float32, torch.bfloat16),
        shards=["--context-genes", "3200", "--stream-size", "1500", "--shard-samples", "300"],
        train=dict(model="small", context=3200, batch=30, steps=30, every=15, eval_batches=4,
                   precision="bf16-mixed", full_steps=30, other_precision="bf16",
                   launch_timeout_s=150),
        embed_cells=None,  # all 2,800
    )


# ----------------------------------------------------------------------------------------------
# kernels
# ----------------------------------------------------------------------------------------------
def strided_inputs(b, h, n, m, d, dtype, device, seed=0):
    """Leaves (fused qkv of genes [B, N, 3 H D], of latents [1, M, 3 H D]) and the gene mask."""
    gen = torch.Generator().manual_seed(seed)
    qkv_x = torch.randn(b, n, 3 * h * d, generator=gen)
    qkv_z = torch.randn(1, m, 3 * h * d, generator=gen)
    lengths = n - torch.randint(0, max(1, n // 5), (b,), generator=gen)
    mask = torch.arange(n)[None, :] < lengths[:, None]
    if b >= 3:  # a row with a single real gene, one with none
        mask[1] = False
        mask[1, n // 2] = True
        mask[2] = False
    leaves = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in (qkv_x, qkv_z)]
    return leaves, mask.to(device)


def attention_views(qkv_x, qkv_z, b, h):
    """The six inputs as the model builds them (pretrain.model._split_heads; latents expanded)."""
    from pretrain.model import _split_heads

    q_x, k_x, v_x = _split_heads(qkv_x, h)
    q_z, k_z, v_z = (t.expand(b, -1, -1, -1) for t in _split_heads(qkv_z, h))
    return q_x, k_x, v_x, q_z, k_z, v_z


def run_attention(fn, leaves, mask, b, h, d_out):
    """Outputs and the gradients of the six inputs for a fixed upstream gradient."""
    views = attention_views(*leaves, b, h)
    outs = fn(*views, mask)
    loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, d_out))
    return list(outs) + list(torch.autograd.grad(loss, views))


NAMES = ["out_x", "out_z", "dq_x", "dk_x", "dv_x", "dq_z", "dk_z", "dv_z"]


def kernel_correctness(cfg: dict, device) -> list[dict]:
    from bench_kernels import relative_error

    from kernels import criss_cross_attention, reference_criss_cross_attention

    rows = []
    for name, b, h, n, m, d in cfg["correctness"]:
        exact_leaves, mask = strided_inputs(b, h, n, m, d, torch.float64, device)
        gen = torch.Generator().manual_seed(1)
        d_out = [torch.randn(b, h, n, d, generator=gen).to(device),
                 torch.randn(b, h, m, d, generator=gen).to(device)]
        want = run_attention(reference_criss_cross_attention, exact_leaves, mask, b, h, d_out)
        for dtype in cfg["dtypes"]:
            leaves, _ = strided_inputs(b, h, n, m, d, dtype, device)
            got = run_attention(criss_cross_attention, leaves, mask, b, h, d_out)
            sdpa = run_attention(reference_criss_cross_attention, leaves, mask, b, h, d_out)
            errors = {k: relative_error(g, w) for k, g, w in zip(NAMES, got, want)}
            sdpa_errors = {k: relative_error(g, w) for k, g, w in zip(NAMES, sdpa, want)}
            tol = FP32_TOL if dtype == torch.float32 else HALF_TOL
            # A gradient that cancels to ~0 in exact math (a row with one real gene: its softmax
            # is 1, so dS = dP - delta) is ill-conditioned in any fp32 code: the bar is the
            # tolerance or twice what PyTorch's own SDPA reaches in the same dtype, per tensor.
            within = all(errors[k] <= max(tol, 2 * sdpa_errors[k]) for k in NAMES)
            finite = all(bool(torch.isfinite(g).all()) for g in got)
            rows.append({"shapes": name, "B": b, "H": h, "N": n, "M": m, "D": d,
                         "dtype": str(dtype).removeprefix("torch."), "tol": tol,
                         "max_rel_err": max(errors.values()),
                         "sdpa_max_rel_err": max(sdpa_errors.values()),
                         "ok": finite and within, **errors})
            del got, sdpa, leaves
        del want, exact_leaves
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def kernel_determinism(cfg: dict, device) -> dict:
    """Backward twice on the same inputs, with torch's deterministic algorithms on and off: the
    kernels use no atomics, so both must be bitwise equal."""
    from kernels import criss_cross_attention

    name, b, h, n, m, d = cfg["correctness"][0]
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    leaves, mask = strided_inputs(b, h, n, m, d, dtype, device, seed=2)
    gen = torch.Generator().manual_seed(3)
    d_out = [torch.randn(b, h, n, d, generator=gen).to(device),
             torch.randn(b, h, m, d, generator=gen).to(device)]
    result = {"shapes": name, "dtype": str(dtype).removeprefix("torch.")}
    before = torch.are_deterministic_algorithms_enabled()
    try:
        for mode, on in (("deterministic", True), ("default", False)):
            torch.use_deterministic_algorithms(on)
            first = run_attention(criss_cross_attention, leaves, mask, b, h, d_out)[2:]
            second = run_attention(criss_cross_attention, leaves, mask, b, h, d_out)[2:]
            result[f"{mode}_bitwise_equal"] = all(torch.equal(x, y)
                                                  for x, y in zip(first, second))
    finally:
        torch.use_deterministic_algorithms(before)
    result["ok"] = result["deterministic_bitwise_equal"] and result["default_bitwise_equal"]
    return result


def kernel_speed() -> list[dict]:
    from bench_kernels import CrissCrossConfig, bench_criss_cross_gpu

    configs = [CrissCrossConfig(16, 8, n, 200, 64, torch.bfloat16) for n in (1024, 3200)]
    return bench_criss_cross_gpu(configs)


def deepset_rows(cpu: bool) -> list[dict]:
    from deepset_bench import DeepSetBenchConfig, bench_deepset

    if cpu:
        return bench_deepset()
    return bench_deepset([DeepSetBenchConfig(16, n, 256) for n in (1024, 3200)])


# ----------------------------------------------------------------------------------------------
# trainer
# ----------------------------------------------------------------------------------------------
def start_shards(cfg: dict, out: Path, cpu: bool) -> subprocess.Popen | None:
    """Shards from the repository's real PBMC file, built in the background (a CPU job that
    overlaps the GPU kernel checks); None when they are already there."""
    if (out / "manifest.json").is_file():
        return None
    jobs = "1" if cpu else str(min(8, os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "data_prep.build_shards", str(REPO / "data" / DATASET),
           "--out", str(out), "--jobs", jobs, "--quiet", "--seed", "0", "--eval-fraction", "0.1",
           *cfg["shards"]]
    log = open(out.parent / "build_shards.log", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_env(cpu: bool) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)  # CPU ranks take the PyTorch path; GPUs the kernels
    if cpu:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    return env


def train_command(t: dict, shards: Path, run: Path, attention: str, deterministic: bool,
                  steps: int, precision: str) -> list[str]:
    """One `deepspeed` launch on one device (the launcher's module: its script may be absent
    where DeepSpeed was installed from a wheel into a target folder)."""
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1",
           "--master_port", str(_free_port()), "pretrain/train.py",
           "--deepspeed_config", "ds_configs/zero2.json", "--shards", str(shards),
           "--out", str(run), "--model", t["model"], "--attention", attention,
           "--context", str(t["context"]), "--batch-size", str(t["batch"]),
           "--max-steps", str(steps), "--schedule-steps", str(t["steps"]),
           "--eval-every", str(t["every"]), "--ckpt-every", str(t["every"]),
           "--eval-batches", str(t["eval_batches"]), "--precision", precision,
           "--keep-ckpts", "2"]
    return cmd + (["--deterministic"] if deterministic else [])


def launch(cmd: list[str], log: Path, cpu: bool, stop_after: str | None = None,
           timeout: float = 600) -> dict:
    """Run a launch in its own process group; with ``stop_after``, SIGTERM the whole group when
    a line starting with it appears (a job killed by its scheduler). A launch still running after
    ``timeout`` seconds, printing or not (a hung collective prints nothing), is killed and
    raises TimeoutError. Returns rc and seconds."""
    start = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_train_env(cpu), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            os.killpg(proc.pid, signal.SIGKILL)

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        stopped = False
        try:
            for line in proc.stdout:
                f.write(line)
                if stop_after and not stopped and line.startswith(stop_after):
                    os.killpg(proc.pid, signal.SIGTERM)
                    stopped = True
            proc.wait(timeout=60)
        finally:
            watchdog.cancel()
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    if expired.is_set():
        raise TimeoutError(f"{log.name}: killed after {timeout:.0f} s; end of {log}:\n"
                           f"{log.read_text()[-2000:]}")
    rc = proc.returncode
    if rc != 0 and not stopped:
        tail = log.read_text()[-3000:]
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed (rc {rc}); end of {log}:\n{tail}")
    return {"rc": rc, "stopped": stopped, "seconds": time.perf_counter() - start}


def scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def throughput(s: dict) -> dict:
    """Median of each perf scalar over the steps after the first three (compilation, warm-up;
    all steps of a shorter run)."""
    out = {}
    for tag in ("cells_per_s", "tokens_per_s", "tflops_per_s", "mfu", "data_wait_frac"):
        series = s.get(f"perf/{tag}", [])
        values = [v for step, v in series if step > 3] or [v for _, v in series]
        out[tag] = statistics.median(values) if values else None
    cuda = s.get("memory/cuda_max_gib/rank0")
    out["cuda_max_gib"] = cuda[-1][1] if cuda else None
    out["final_loss"] = s["loss/total"][-1][1]
    out["eval_loss"] = [v for _, v in s.get("eval/loss", [])]
    return out


PARTS = ("kernels", "trainer", "speed", "deepset", "embed")  # in the order they run
TRAIN_RUNS = ("criss_cross", "resume", "full", "other_precision")


def trainer(cfg: dict, shards: Path, work: Path, cpu: bool, deadline: float,
            runs: tuple[str, ...] = TRAIN_RUNS) -> dict:
    """The trainer's runs named in ``runs`` (TRAIN_RUNS; "resume" is the killed run and its
    resumption, compared with "criss_cross" when that ran too)."""
    t = cfg["train"]
    result: dict = {"model": t["model"], "context": t["context"], "batch_per_rank": t["batch"],
                    "precision": t["precision"], "zero_stage": 2, "steps": t["steps"],
                    "backend": "gloo" if cpu else "nccl", "runs": {}}
    half = t["every"]
    work.mkdir(parents=True, exist_ok=True)
    main = t["precision"]
    plans = []  # name, attention, deterministic, steps, precision, stop after the mid-run ckpt
    if "criss_cross" in runs:
        plans.append(("criss_cross", "criss_cross", True, t["steps"], main, None))
    if "resume" in runs:
        plans += [("criss_cross_killed", "criss_cross", True, t["steps"], main,
                   f"[train] checkpoint step {half}"),
                  ("criss_cross_resumed", "criss_cross", True, t["steps"], main, None)]
    if "full" in runs:
        plans.append(("full", "full", False, t["full_steps"], main, None))
    if "other_precision" in runs and t["other_precision"]:  # the other bf16 mode, same settings
        plans.append((f"criss_cross_{t['other_precision']}", "criss_cross", False,
                      t["full_steps"], t["other_precision"], None))
    for name, attention, deterministic, steps, precision, stop in plans:
        if time.time() > deadline:
            result["runs"][name] = {"skipped": "time budget spent"}
            continue
        resume = name in ("criss_cross_killed", "criss_cross_resumed")  # one run folder
        run = work / ("criss_cross_resume" if resume else name)
        cmd = train_command(t, shards, run, attention, deterministic, steps, precision)
        try:
            info = launch(cmd, work / f"{name}.log", cpu, stop_after=stop,
                      timeout=t["launch_timeout_s"])
        except (RuntimeError, TimeoutError) as e:  # the other runs still say what they can
            result["runs"][name] = {"error": f"{type(e).__name__}: {e}"}
            continue
        if name == "criss_cross_killed":
            last = sorted(p.name for p in (run / "checkpoints").glob("step*"))
            info["checkpoints_left"] = last
            result["runs"][name] = info
            continue
        if name == "criss_cross_resumed":
            info["resumed_from_step"] = half if f"resumed from step {half}" in (
                work / f"{name}.log").read_text() else None
        result["runs"][name] = info | {"attention": attention, "deterministic": deterministic,
                                       "precision": precision}
        result["runs"][name] |= throughput(scalars(run))
    reference, resumed = work / "criss_cross", work / "criss_cross_resume"
    if (resumed / "tb").is_dir() and (reference / "tb").is_dir():
        a, b = scalars(reference), scalars(resumed)
        la, lb = a["loss/total"], b["loss/total"]
        steps_match = [s for s, _ in la] == [s for s, _ in lb]
        diff = max((abs(x - y) for (_, x), (_, y) in zip(la, lb)), default=None)
        result["resume"] = {
            "resumed_from_step": result["runs"]["criss_cross_resumed"].get("resumed_from_step"),
            "steps_compared": len(lb), "steps_match": steps_match,
            "losses_match_bitwise": steps_match and la == lb,
            "max_abs_loss_diff": diff,
            "eval_losses_match": a.get("eval/loss") == b.get("eval/loss"),
        }
    return result


def embedding(run: Path, work: Path, device: torch.device, cells: int | None) -> dict:
    """``pretrain.embed`` with ``run``'s model on the real PBMC file (its first ``cells`` cells;
    all when None) on ``device``, fp32 against bf16 (bench_embed.compare)."""
    import anndata
    from bench_embed import compare

    from pretrain.export import export

    work.mkdir(parents=True, exist_ok=True)
    data = REPO / "data" / DATASET
    if cells is not None:
        anndata.read_h5ad(data)[:cells].copy().write_h5ad(work / "cells.h5ad")
        data = work / "cells.h5ad"
    # on a CPU, the model as pretrain.embed runs it there (the PyTorch reference), not through
    # the Triton interpreter that --cpu turned on for the kernel checks
    interpret = os.environ.pop("TRITON_INTERPRET", None) if device.type == "cpu" else None
    try:
        return compare(export(run, work / "model.pt"), data, repeats=1, device=device)
    finally:
        if interpret is not None:
            os.environ["TRITON_INTERPRET"] = interpret


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
def device_info(cpu: bool) -> dict:
    import triton

    from pretrain.device_peaks import device_peak

    info = {"mode": "cpu" if cpu else "gpu", "torch": torch.__version__,
            "triton": triton.__version__, "python": sys.version.split()[0]}
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except ImportError as e:
        info["deepspeed"] = f"missing ({e})"
    if cpu:
        return info | {"name": "cpu (Triton interpreter)"}
    props = torch.cuda.get_device_properties(0)
    return info | {
        "name": props.name, "capability": f"{props.major}.{props.minor}",
        "memory_gib": props.total_memory / 2**30, "multiprocessors": props.multi_processor_count,
        "cuda": torch.version.cuda, "nccl": ".".join(map(str, torch.cuda.nccl.version())),
        "peak": {p: device_peak("cuda", p).as_dict() for p in ("bf16", "fp32")},
    }


def attempt(fn, *args):
    """A part's rows, or the error that stopped it (the other parts still run)."""
    try:
        return fn(*args)
    except Exception as e:
        return f"error: {type(e).__name__}: {str(e)[:500]}"


def write(result: dict, out: Path) -> None:
    atomic.write_text(out / "gpu_check.json", json.dumps(result, indent=1, default=str) + "\n")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def table(rows: list[dict], keys: list[str]) -> str:
    """A markdown table (what docs/benchmarks takes as it is)."""
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def report(result: dict) -> str:
    """The figures of a (possibly partial) result as markdown, the device named."""
    dev = result["device"]
    out = [f"## gpu_check on {dev['name']}", "",
           f"torch {dev['torch']}, triton {dev['triton']}, deepspeed {dev.get('deepspeed')}, "
           f"Python {dev.get('python')}" + (f", CUDA {dev['cuda']}, NCCL {dev['nccl']}, "
                                            f"{dev['multiprocessors']} SMs, "
                                            f"{dev['memory_gib']:.0f} GiB" if "cuda" in dev
                                            else "")]
    k = result.get("kernels", {})
    if isinstance(k.get("correctness"), list):
        out += ["", "### Criss-cross kernels vs float64 (max |err| / max |exact|), model layouts",
                "", table(k["correctness"], ["shapes", "dtype", "N", "M", "H", "D", *NAMES,
                                             "tol", "sdpa_max_rel_err", "ok"])]
    elif "correctness" in k:
        out += ["", f"Kernel correctness: {k['correctness']}"]
    if "determinism" in k:
        out += ["", f"Repeated backward: {k['determinism']}"]
    if isinstance(k.get("speed"), list):
        out += ["", "### Kernel speed (B=16, H=8, M=200, D=64, bf16; ms, TFLOP/s, % of roofline)",
                "", table(k["speed"], ["N", "impl", "fwd_ms", "bwd_ms", "fwd_bwd_ms",
                                       "fwd_TFLOPs", "fwd_bwd_TFLOPs", "fwd_bwd_pct_roofline",
                                       "peak_fwd_bwd_MiB", "error"])]
    if isinstance(k.get("deepset"), list):
        out += ["", "### DeepSet encoder", "",
                table(k["deepset"], ["impl", "N", "d", "dtype", "rel_err_out", "rel_err_grad_x",
                                     "fwd_ms", "fwd_bwd_ms", "fwd_bwd_pct_roofline",
                                     "peak_fwd_bwd_mib"])]
    for part in ("speed", "deepset"):
        if isinstance(k.get(part), str):
            out += ["", f"kernels/{part}: {k[part]}"]
    t = result.get("trainer")
    if isinstance(t, dict) and "runs" in t:
        out += ["", f"### Trainer: {t['model']}, context {t['context']}, batch "
                    f"{t['batch_per_rank']}, {t['precision']}, ZeRO-{t['zero_stage']}, "
                    f"{t['backend']}, {t['steps']} steps", ""]
        rows = [{"run": n, **r} for n, r in t["runs"].items()]
        out += [table(rows, ["run", "precision", "seconds", "cells_per_s", "tokens_per_s",
                             "tflops_per_s", "mfu", "data_wait_frac", "cuda_max_gib",
                             "final_loss", "skipped"]), "",
                f"Resume: {t.get('resume')}"]
        out += [f"\nRun {n} failed: {r['error']}" for n, r in t["runs"].items() if "error" in r]
    elif t is not None:
        out += ["", f"Trainer: {t}"]
    e = result.get("embed")
    if isinstance(e, dict):
        out += ["", f"### pretrain.embed: {e['name']}, {e['cells']} cells, context {e['context']}"
                    " (cells/s; samples alone: reading, neighbour graph, batches, in one process"
                    " and with the workers pretrain.embed gives the device)", "",
                table([e | {"cos_min": f"{e['cos_min']:.6f}"}],  # 4 digits would read 1
                      ["samples_s", "workers", "samples_workers_s", "fp32_cells_per_s",
                       "bf16_cells_per_s", "cos_min", "max_abs", "same_type", "kept_neighbours"])]
    elif e is not None:
        out += ["", f"pretrain.embed: {e}"]
    if result.get("part_seconds"):
        out += ["", "Seconds per part: " + ", ".join(
            f"{part} {sec:.0f}" for part, sec in result["part_seconds"].items())]
    out += ["", f"Verdict: {result.get('verdict', 'unfinished')}  "
                f"({result.get('elapsed_s', 0):.0f} s)"]
    return "\n".join(out) + "\n"


def write_report(result: dict, out: Path) -> None:
    text = report(result)
    print("\n" + text)
    atomic.write_text(out / "gpu_check.md", text)


def verdict(result: dict) -> str:
    """PASS when every part asked for ran and passed; else what failed or was skipped."""
    parts = result.get("parts", PARTS)
    k, t = result.get("kernels", {}), result.get("trainer")
    problems = []
    if "kernels" in parts:
        correctness, determinism = k.get("correctness"), k.get("determinism")
        if isinstance(correctness, list):
            problems += [f"kernel {r['shapes']} {r['dtype']}" for r in correctness if not r["ok"]]
        else:
            problems.append(f"kernel correctness: {correctness}")
        if not isinstance(determinism, dict):
            problems.append(f"kernel determinism: {determinism}")
        elif not determinism["ok"]:
            problems.append("repeated backward not bitwise equal")
    if "trainer" in parts:
        if not isinstance(t, dict) or "runs" not in t:
            problems.append(f"trainer: {t.get('error') if isinstance(t, dict) else t}")
        else:
            for name, run in t["runs"].items():
                if "error" in run:
                    problems.append(f"trainer run {name} failed")
                elif "skipped" in run:
                    problems.append(f"trainer run {name} skipped ({run['skipped']})")
            ran = {n for n, r in t["runs"].items() if not {"error", "skipped"} & set(r)}
            resume = t.get("resume")
            if ({"criss_cross", "criss_cross_resumed"} <= ran
                    and not (resume and resume["losses_match_bitwise"])):
                problems.append("resumed losses differ from the uninterrupted run's")
    for name, part in (("speed", k.get("speed")), ("deepset", k.get("deepset")),
                       ("embed", result.get("embed"))):
        if name not in parts:
            continue
        if isinstance(part, list) and any("error" in r for r in part):
            problems.append(f"{name}: a row failed")
        elif isinstance(part, str) and not part.startswith("no GPU"):
            problems.append(f"{name}: {part}")
    return "PASS" if not problems else "FAIL: " + "; ".join(problems)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="out/gpu_check")
    parser.add_argument("--cpu", action="store_true", help="the steps that need no GPU")
    parser.add_argument("--shards", default=None, help="existing shards (default: build them)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no part after this many seconds")
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS),
                        help="run only these parts (e.g. 'kernels speed' after tuning a kernel; "
                             "embed uses the trainer's criss_cross run)")
    parser.add_argument("--train-runs", nargs="+", choices=TRAIN_RUNS, default=list(TRAIN_RUNS),
                        help="the trainer's runs ('resume': killed and resumed, compared with "
                             "criss_cross)")
    parser.add_argument("--report-from", default=None, metavar="JSON",
                        help="only write the markdown report of an earlier run's gpu_check.json "
                             "(e.g. one stopped by a time limit) beside it")
    args = parser.parse_args()
    if args.report_from:
        path = Path(args.report_from)
        write_report(json.loads(path.read_text()), path.parent)
        return 0
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --cpu for the steps that need no GPU")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    began = time.time()
    deadline = began + args.budget_s
    cfg = settings(args.cpu)
    device = torch.device("cpu" if args.cpu else "cuda")
    parts = set(args.parts)
    shards = Path(args.shards).resolve() if args.shards else out / "shards"
    shards.parent.mkdir(parents=True, exist_ok=True)
    builder = None if args.shards or "trainer" not in parts else start_shards(cfg, shards,
                                                                              args.cpu)

    result: dict = {"device": device_info(args.cpu), "parts": args.parts, "kernels": {},
                    "trainer": None, "part_seconds": {}}
    write(result, out)
    k = result["kernels"]
    mark = [time.time()]

    def done(part: str) -> None:
        """Save the result with the part's seconds (what a run on a lent GPU is sized from;
        the trainer's include waiting for the shards)."""
        now = time.time()
        result["part_seconds"][part] = now - mark[0]
        mark[0] = now
        write(result, out)

    def late() -> bool:  # on a GPU, parts after the budget are skipped
        return not args.cpu and time.time() > deadline

    if "kernels" in parts:
        k["correctness"] = attempt(kernel_correctness, cfg, device)
        k["determinism"] = attempt(kernel_determinism, cfg, device)
        done("kernels")
    if "trainer" in parts:
        if builder is not None and builder.wait() != 0:
            raise RuntimeError(f"building shards failed; see {out / 'build_shards.log'}")
        try:
            result["trainer"] = trainer(cfg, shards, out / "runs", args.cpu, deadline,
                                        tuple(args.train_runs))
        except Exception as e:  # keep the kernel figures; the verdict names the failure
            result["trainer"] = {"error": f"{type(e).__name__}: {e}"}
        done("trainer")
    if "speed" in parts:
        k["speed"] = ("no GPU: timings need one" if args.cpu else
                      "skipped: time budget spent" if late() else attempt(kernel_speed))
        done("speed")
    if "deepset" in parts:
        k["deepset"] = ("skipped: time budget spent" if late() else
                        attempt(deepset_rows, args.cpu))
        done("deepset")
    if "embed" in parts:
        result["embed"] = ("skipped: time budget spent" if late() else
                           attempt(embedding, out / "runs" / "criss_cross", out / "embed",
                                   device, cfg["embed_cells"]))
        done("embed")
    result["elapsed_s"] = time.time() - began
    result["verdict"] = verdict(result)
    write(result, out)
    write_report(result, out)
    print(f"wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    return 0 if result["verdict"] == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
