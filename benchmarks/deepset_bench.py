"""DeepSet neighbour encoder: fused Triton path vs the PyTorch reference, eager and under
torch.compile (time, FLOP/s, % of roofline, memory).

Figures per configuration and implementation:
- FLOPs counted on the reference formulation, GEMMs only (the convention for TFLOP/s):
  forward = B N (2 d^2 (K + 1) + 4 d^2)  [self Linear(d,d), K neighbour Linear(d,d), Linear(2d,d)];
  forward + backward = 3 x forward. The fused path executes fewer (the three Linears fold into one
  d x 2d GEMM), so its figure is the reference work per second, not hardware utilisation.
- Bytes are the compulsory traffic: inputs B N (1 + K) + B K values, output B N d; forward reads
  the inputs and writes the output, forward + backward moves 3 x inputs + 2 x output.
- "% roofline" divides the least time those FLOPs and bytes need on the device
  (pretrain/device_peaks.py) by the measured time.
- Peak memory is torch.cuda.max_memory_allocated above what was allocated before the call.
On the CPU it runs one tiny configuration for correctness only (no timings, no compiled row).
Run alone: `python benchmarks/deepset_bench.py`.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

if not torch.cuda.is_available():
    # Without a GPU the kernel can only run through the Triton interpreter; set before importing.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_peak import peak_mib  # noqa: E402

from kernels.deepset import DeepSetEncoder, DeepSetEncoderReference  # noqa: E402
from pretrain.device_peaks import device_peak  # noqa: E402

PRECISION_OF = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class DeepSetBenchConfig:
    batch: int
    n_genes: int
    d_model: int
    n_nbr: int = 6
    dtype: torch.dtype = torch.bfloat16


GPU_CONFIGS = tuple(DeepSetBenchConfig(16, n, d) for d in (256, 512) for n in (1024, 3200, 8000))
CPU_CONFIG = DeepSetBenchConfig(2, 64, 32, dtype=torch.float32)


def deepset_flops(cfg: DeepSetBenchConfig) -> tuple[float, float]:
    """(forward, forward + backward) GEMM FLOPs of the reference formulation."""
    d = cfg.d_model
    fwd = cfg.batch * cfg.n_genes * (2 * d * d * (cfg.n_nbr + 1) + 4 * d * d)
    return float(fwd), 3.0 * fwd


def deepset_bytes(cfg: DeepSetBenchConfig) -> tuple[float, float]:
    """(forward, forward + backward) compulsory bytes."""
    elt = torch.tensor([], dtype=cfg.dtype).element_size()
    inputs = (cfg.batch * cfg.n_genes * (1 + cfg.n_nbr) + cfg.batch * cfg.n_nbr) * elt
    output = cfg.batch * cfg.n_genes * cfg.d_model * elt
    return float(inputs + output), float(3 * inputs + 2 * output)


def _inputs(cfg: DeepSetBenchConfig, device: torch.device, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, n, k = cfg.batch, cfg.n_genes, cfg.n_nbr
    x_self = torch.log2(1 + torch.poisson(torch.full((b, n), 3.0), generator=g))
    x_nbr = torch.log2(1 + torch.poisson(torch.full((b, k, n), 3.0), generator=g))
    dist = torch.rand(b, k, generator=g) * 4
    mask = torch.ones(b, k, dtype=torch.bool)
    tensors = [t.to(device=device, dtype=cfg.dtype) for t in (x_self, x_nbr, dist)]
    return [t.requires_grad_() for t in tensors], mask.to(device)


def _encoders(cfg: DeepSetBenchConfig, device: torch.device):
    torch.manual_seed(0)
    ref = DeepSetEncoderReference(cfg.d_model).to(device=device, dtype=cfg.dtype)
    fused = DeepSetEncoder(cfg.d_model).to(device=device, dtype=cfg.dtype)
    fused.load_state_dict(ref.state_dict())
    encoders = {"fused": fused, "reference": ref}
    if device.type == "cuda":  # the same reference module, compiled (shares its parameters)
        encoders["reference compiled"] = torch.compile(ref, dynamic=False)
    return encoders



def _timings(enc, inputs, mask, cfg: DeepSetBenchConfig) -> dict:
    import triton.testing

    go = torch.randn(*inputs[0].shape, cfg.d_model, device=mask.device, dtype=cfg.dtype)

    def fwd():
        return enc(*inputs, mask)

    def fwd_bwd():
        enc(*inputs, mask).backward(go)
        enc.zero_grad(set_to_none=True)
        for t in inputs:
            t.grad = None

    flops, nbytes = deepset_flops(cfg), deepset_bytes(cfg)
    peak = device_peak(mask.device, PRECISION_OF[cfg.dtype])
    t_f = triton.testing.do_bench(fwd)
    t_fb = triton.testing.do_bench(fwd_bwd)
    bound = peak.roofline_s(flops[1], nbytes[1])
    return {
        "fwd_ms": t_f, "fwd_bwd_ms": t_fb,
        "fwd_tflops": flops[0] / t_f / 1e9, "fwd_bwd_tflops": flops[1] / t_fb / 1e9,
        "fwd_gbs": nbytes[0] / t_f / 1e6, "fwd_bwd_gbs": nbytes[1] / t_fb / 1e6,
        "fwd_bwd_pct_roofline": 100 * bound * 1e3 / t_fb if bound else None,
        "peak_fwd_mib": peak_mib(fwd), "peak_fwd_bwd_mib": peak_mib(fwd_bwd),
    }  # fmt: skip


def bench_deepset(configs=None) -> list[dict]:
    """One row per (configuration, implementation). On CUDA: timings and memory; on the CPU:
    only the correctness columns (relative norm differences of the output, the x_self gradient
    and the proj.weight gradient against the eager reference; on the other rows)."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    configs = configs or (GPU_CONFIGS if cuda else (CPU_CONFIG,))
    rows = []
    for cfg in configs:
        (x_self, x_nbr, dist), mask = _inputs(cfg, device)
        encoders = _encoders(cfg, device)
        outs = {}
        go = torch.randn(cfg.batch, cfg.n_genes, cfg.d_model, device=device, dtype=cfg.dtype)
        for name, enc in encoders.items():
            out = enc(x_self, x_nbr, dist, mask)
            out.backward(go)
            outs[name] = (out.detach(), x_self.grad.clone(), enc.proj.weight.grad.clone())
            x_self.grad = x_nbr.grad = dist.grad = None
            enc.zero_grad(set_to_none=True)  # the compiled row shares the reference's weights
            del out
        for name, enc in encoders.items():
            row = {
                "impl": name, "B": cfg.batch, "N": cfg.n_genes, "K": cfg.n_nbr,
                "d": cfg.d_model, "dtype": str(cfg.dtype).removeprefix("torch."),
            }  # fmt: skip
            if name != "reference":
                err = [((a.float() - b.float()).norm() / b.float().norm()).item()
                       for a, b in zip(outs[name], outs["reference"])]
                row |= {
                    "rel_err_out": err[0],
                    "rel_err_grad_x": err[1],
                    "rel_err_grad_proj": err[2],
                }
            if cuda:
                row |= _timings(enc, (x_self, x_nbr, dist), mask, cfg)
            rows.append(row)
    return rows


def format_rows(rows: list[dict]) -> str:
    keys = list(rows[0])
    for row in rows:
        keys += [k for k in row if k not in keys]
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [" | ".join(keys)] + [" | ".join(fmt(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (correctness only)"
    print(f"DeepSet encoder on {name}")
    print(format_rows(bench_deepset()))
