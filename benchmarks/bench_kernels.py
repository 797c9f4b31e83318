"""Kernel benchmark: fused criss-cross attention and the DeepSet encoder against their references.

Criss-cross rows (B=16, H=8, M=200, D=64, bf16, N in {1024, 3200, 8000}, ~10% padded genes):
our Triton kernels, the two-SDPA-call reference, the same two attentions through compiled
FlexAttention (its padding block mask built once, outside the timing), and full attention over
the N genes (SDPA's flash kernel, and flash-attn when installed; no mask, its best case) as the
dense alternative. Each is timed forward, backward (of a retained graph) and forward + backward.

Counts (per call; e = bytes per element):
- criss-cross FLOPs: forward 8 B H N M D (two directions, each QK^T and PV at 2 N M D);
  backward 20 B H N M D (per direction: QK^T recompute, dV, dP, dK, dQ at 2 N M D each = 2.5 x
  forward), so forward + backward 28 B H N M D. Padded genes are counted (the kernels skip no
  work for them).
- criss-cross bytes (compulsory HBM traffic): forward reads q, k, v and writes out on both sides,
  4 e B H D (N + M); backward reads q, k, v, out, d_out and writes dq, dk, dv, 8 e B H D (N + M);
  forward + backward 12 e B H D (N + M). The mask, the fp32 log-sum-exp rows and the small split
  partials are left out (under 1%).
- full attention: forward 4 B H N^2 D FLOPs, backward 10 B H N^2 D, forward + backward
  14 B H N^2 D; bytes 4 e B H N D, 8 e B H N D and 12 e B H N D.
- roofline bound of the device (pretrain/device_peaks.py: its dense peak at the dtype and its
  memory bandwidth; SCPRETRAIN_PEAK_TFLOPS / SCPRETRAIN_PEAK_TBPS override):
  t_min = max(FLOPs / peak FLOP/s, bytes / peak bytes/s); "% roofline" = t_min / measured time.
Peak memory is torch.cuda.max_memory_allocated above what was allocated before the call.

Without CUDA it runs one small configuration through the Triton interpreter for correctness only
(errors against float64 math), prints the GPU rows' FLOP/byte counts and their roofline bounds on
an H100 SXM, and says so. Run: `python benchmarks/bench_kernels.py` (benchmarks/gpu_check.sh
runs these rows at N = 1,024 and 3,200 as part of its GPU check).

`--sweep-tiles` (GPU) times each criss-cross kernel's candidate tiles in place (TILE_CANDIDATES).

`--compile-check` compiles the criss-cross kernels' GPU launch configurations and the DeepSet
encoder's kernels at the presets' widths for an H100/H200 (sm_90) with the Triton compiler alone
(no device) and prints registers and spill bytes per thread.
"""

import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

CUDA = torch.cuda.is_available()
COMPILE_CHECK = "--compile-check" in sys.argv
SWEEP_TILES = "--sweep-tiles" in sys.argv
if not CUDA and not COMPILE_CHECK:
    # Without a GPU the kernels can only run through the Triton interpreter; set before importing.
    os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cuda_peak import peak_mib  # noqa: E402

from kernels import criss_cross as cc  # noqa: E402
from kernels import criss_cross_attention, reference_criss_cross_attention  # noqa: E402
from pretrain.device_peaks import DevicePeak, device_peak, lookup  # noqa: E402

PRECISION_OF = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class CrissCrossConfig:
    batch: int
    heads: int
    n_genes: int
    n_latents: int
    head_dim: int
    dtype: torch.dtype
    padded_fraction: float = 0.1

    @property
    def elt(self) -> int:
        return torch.tensor([], dtype=self.dtype).element_size()

    def criss_cross_counts(self) -> dict[str, tuple[float, float]]:
        """{pass: (FLOPs, bytes)} for "fwd", "bwd" and "fwd_bwd" (see the module docstring)."""
        bhd = self.batch * self.heads * self.head_dim
        nm = self.n_genes * self.n_latents
        moved = self.elt * bhd * (self.n_genes + self.n_latents)
        return {"fwd": (8.0 * bhd * nm, 4.0 * moved), "bwd": (20.0 * bhd * nm, 8.0 * moved),
                "fwd_bwd": (28.0 * bhd * nm, 12.0 * moved)}

    def full_counts(self) -> dict[str, tuple[float, float]]:
        bhd = self.batch * self.heads * self.head_dim
        nn_ = self.n_genes * self.n_genes
        moved = self.elt * bhd * self.n_genes
        return {"fwd": (4.0 * bhd * nn_, 4.0 * moved), "bwd": (10.0 * bhd * nn_, 8.0 * moved),
                "fwd_bwd": (14.0 * bhd * nn_, 12.0 * moved)}


GPU_CONFIGS = tuple(CrissCrossConfig(16, 8, n, 200, 64, torch.bfloat16) for n in (1024, 3200, 8000))
CPU_CONFIG = CrissCrossConfig(2, 2, 100, 20, 32, torch.float32)


def h100_peak(dtype: torch.dtype) -> DevicePeak:
    """The H100 SXM's table entry: the reference bound printed on machines without a GPU."""
    entry, flops, nbytes = lookup("H100 SXM", PRECISION_OF[dtype])
    return DevicePeak("NVIDIA H100 SXM", PRECISION_OF[dtype], flops, nbytes, f"table: {entry}")


def make_inputs(cfg: CrissCrossConfig, device, dtype=None, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dtype = dtype or cfg.dtype
    shape_x = (cfg.batch, cfg.heads, cfg.n_genes, cfg.head_dim)
    shape_z = (cfg.batch, cfg.heads, cfg.n_latents, cfg.head_dim)
    tensors = [torch.randn(*s, generator=gen) for s in (shape_x,) * 3 + (shape_z,) * 3]
    tensors = [t.to(device=device, dtype=dtype).requires_grad_(True) for t in tensors]
    n_real = cfg.n_genes - torch.randint(
        0, max(1, int(cfg.padded_fraction * cfg.n_genes) * 2), (cfg.batch,), generator=gen)
    mask = torch.arange(cfg.n_genes)[None, :] < n_real[:, None]
    return tensors, mask.to(device)


def flex_criss_cross(mask: torch.Tensor):
    """Both directions through compiled FlexAttention; the latents' key-padding block mask is
    built once here (outside any timing), as a training step would per batch."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention, dynamic=False)
    b, n = mask.shape

    def real_gene(b_, h_, q_, kv):
        return mask[b_, kv]

    cache = {}

    def run(t, m):
        q_x, k_x, v_x, q_z, k_z, v_z = t
        if "block" not in cache:
            cache["block"] = create_block_mask(real_gene, b, None, q_z.shape[2], n,
                                               device=mask.device)
        return flex(q_x, k_z, v_z), flex(q_z, k_x, v_x, block_mask=cache["block"])

    return run


def sdpa_flash(t, m):
    """Full attention over the genes through SDPA's flash kernel (forced: no silent fallback)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return (F.scaled_dot_product_attention(*t[:3]),)


def implementations(cfg: CrissCrossConfig, mask: torch.Tensor) -> dict:
    """name -> (function of (tensors, mask) returning outputs, counts)."""
    cc = cfg.criss_cross_counts()
    full = cfg.full_counts()
    impls = {
        "criss-cross triton": (lambda t, m: criss_cross_attention(*t, m), cc),
        "criss-cross sdpa reference": (lambda t, m: reference_criss_cross_attention(*t, m), cc),
        "criss-cross flex (compiled)": (flex_criss_cross(mask), cc),
        "full attention sdpa flash": (sdpa_flash, full),
    }
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return impls
    flash = lambda t, m: (flash_attn_func(*(x.transpose(1, 2) for x in t[:3])),)
    impls["full attention flash-attn"] = (flash, full)
    return impls



def time_row(name: str, fn, counts, tensors, mask, peak: DevicePeak) -> dict:
    """ms, TFLOP/s and % of the roofline of the forward, the backward and both, and peak MiB."""
    import triton.testing

    grads = [torch.randn_like(o) for o in fn(tensors, mask)]

    def fwd():
        with torch.no_grad():
            fn(tensors, mask)

    def fwd_bwd():
        torch.autograd.backward(fn(tensors, mask), grads)
        for t in tensors:
            t.grad = None

    outs = fn(tensors, mask)

    def bwd():
        torch.autograd.backward(outs, grads, retain_graph=True)
        for t in tensors:
            t.grad = None

    row = {"impl": name}
    for part, bench in (("fwd", fwd), ("bwd", bwd), ("fwd_bwd", fwd_bwd)):
        ms = triton.testing.do_bench(bench)
        flops, nbytes = counts[part]
        bound = peak.roofline_s(flops, nbytes)
        row |= {f"{part}_ms": ms, f"{part}_TFLOPs": flops / ms / 1e9,
                f"{part}_pct_roofline": 100 * bound * 1e3 / ms if bound else None}
    return row | {"peak_fwd_MiB": peak_mib(fwd), "peak_fwd_bwd_MiB": peak_mib(fwd_bwd)}


def bench_criss_cross_gpu(configs=GPU_CONFIGS) -> list[dict]:
    rows = []
    for cfg in configs:
        peak = device_peak("cuda", PRECISION_OF[cfg.dtype])
        tensors, mask = make_inputs(cfg, "cuda")
        for name, (fn, counts) in implementations(cfg, mask).items():
            try:
                row = time_row(name, fn, counts, tensors, mask, peak)
            except Exception as e:  # an optional baseline failing must not hide the others
                row = {"impl": name, "error": f"{type(e).__name__}: {str(e)[:200]}"}
            rows.append({"N": cfg.n_genes} | row)
        del tensors, mask
        torch.cuda.empty_cache()
    return rows


# (BLOCK_Q, BLOCK_K, num_warps, num_stages) tried per kernel by --sweep-tiles (rows: N, kernel,
# BLOCK_Q, BLOCK_K, warps, stages, pass_ms); the first of each is what kernels/criss_cross.py
# launches at D = 64 in bf16.
TILE_CANDIDATES = {
    "forward": [(64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2), (64, 64, 4, 3), (32, 64, 4, 2)],
    "dq": [(64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 4, 2), (64, 32, 4, 2), (64, 64, 4, 3)],
    "dkdv": [(32, 64, 4, 3), (32, 64, 4, 2), (32, 128, 4, 2), (32, 128, 8, 2), (64, 64, 4, 2),
             (16, 64, 4, 2)],
}


def sweep_tiles(cfg: CrissCrossConfig = CrissCrossConfig(16, 8, 3200, 200, 64, torch.bfloat16)):
    """Each kernel's candidate tiles (TILE_CANDIDATES) timed in place, one row at a time: the
    whole criss-cross forward (both directions) for the forward kernel's, the whole backward of a
    retained graph for the dq and dK/dV kernels' (the other kernels keep their tiles). A tile
    the device cannot run (shared memory, registers) is a row with its error."""
    import triton.testing

    chosen = cc._launch_options
    tensors, mask = make_inputs(cfg, "cuda")
    outs = criss_cross_attention(*tensors, mask)
    grads = [torch.randn_like(o) for o in outs]

    def forward():
        with torch.no_grad():
            criss_cross_attention(*tensors, mask)

    def backward():
        torch.autograd.backward(outs, grads, retain_graph=True)
        for t in tensors:
            t.grad = None

    for kernel, candidates in TILE_CANDIDATES.items():
        for tile in candidates:
            def options(dtype, d, name, kernel=kernel, tile=tile):
                opts = chosen(dtype, d, name)
                if name == kernel:
                    opts.update(zip(("BLOCK_Q", "BLOCK_K", "num_warps", "num_stages"), tile))
                return opts

            row = {"N": cfg.n_genes, "kernel": kernel,
                   **dict(zip(("BLOCK_Q", "BLOCK_K", "warps", "stages"), tile))}
            cc._launch_options = options
            try:
                row["pass_ms"] = triton.testing.do_bench(
                    forward if kernel == "forward" else backward)
            except Exception as e:  # a tile too large for the device
                row["error"] = f"{type(e).__name__}: {str(e)[:120]}"
            finally:
                cc._launch_options = chosen
            yield row


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want in float64)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-6)).item()


def correctness_cpu(cfg: CrissCrossConfig = CPU_CONFIG) -> list[dict]:
    """Max |error| / max |float64 value| of outputs and gradients, kernel and reference."""
    tensors, mask = make_inputs(cfg, "cpu")
    exact = [t.detach().double().requires_grad_(True) for t in tensors]
    gen = torch.Generator().manual_seed(1)
    shapes = (tensors[0].shape, tensors[3].shape)
    d_out = [torch.randn(*s, generator=gen) for s in shapes]

    def run(fn, ts):
        outs = fn(*ts, mask)
        loss = sum((o * g.to(o.dtype)).sum() for o, g in zip(outs, d_out))
        return list(outs) + list(torch.autograd.grad(loss, ts))

    want = run(reference_criss_cross_attention, exact)
    names = ["out_x", "out_z", "dq_x", "dk_x", "dv_x", "dq_z", "dk_z", "dv_z"]
    rows = []
    for impl, fn in (("criss-cross triton (interpreter)", criss_cross_attention),
                     ("criss-cross sdpa reference", reference_criss_cross_attention)):
        got = run(fn, tensors)
        row = {"impl": impl}
        for name, g, w in zip(names, got, want):
            row[name] = relative_error(g, w)
        rows.append(row)
    return rows


def counts_table(peak: DevicePeak) -> list[dict]:
    rows = []
    for cfg in GPU_CONFIGS:
        for name, counts in (("criss-cross", cfg.criss_cross_counts()),
                             ("full attention", cfg.full_counts())):
            row = {"N": cfg.n_genes, "op": name}
            for part in ("fwd", "fwd_bwd"):
                flops, nbytes = counts[part]
                row |= {f"{part}_GFLOP": flops / 1e9, f"{part}_MB": nbytes / 1e6,
                        f"bound_{part}_ms": peak.roofline_s(flops, nbytes) * 1e3}
            rows.append(row)
    return rows


def _compile_sm90(kernel, types: dict[str, str], const: dict, launch: dict) -> dict:
    """Build one kernel for sm_90 with the Triton compiler alone: its registers, spill (stack)
    bytes per thread and shared memory. ``types`` gives each pointer's element type; the other
    runtime arguments are i32 (fp32 where named ``eps`` or ``*scale``), as the JIT passes them."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = {}
    for n in kernel.arg_names:
        if n in const:
            sig[n] = "constexpr"
        elif n in types:
            sig[n] = f"*{types[n]}"
        else:
            sig[n] = "fp32" if n == "eps" or n.endswith("scale") else "i32"
    # As the JIT specialises contiguous inputs: pointers and strides divisible by 16.
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(kernel.arg_names)
             if sig[n].startswith("*") or (n.startswith("s") and sig[n] == "i32")}
    constexprs = {(kernel.arg_names.index(k),): v for k, v in const.items()}
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=launch)
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        usage = subprocess.run([str(cuobjdump), "-res-usage", str(cubin)],
                               capture_output=True, text=True, check=True).stdout
    regs, stack = re.search(r"REG:(\d+).*?STACK:(\d+)", usage).groups()
    return {"warps": launch["num_warps"], "registers": int(regs), "spill_bytes": int(stack),
            "shared_bytes": compiled.metadata.shared}


def compile_check() -> list[dict]:
    """Registers and spill bytes per thread of each criss-cross GPU launch configuration."""
    rows = []
    for dtype, d in [(torch.bfloat16, 32), (torch.bfloat16, 64), (torch.bfloat16, 128),
                     (torch.float32, 64)]:
        e = PRECISION_OF[dtype]
        for name, kernel in (("forward", cc._attn_fwd), ("dq", cc._attn_bwd_dq),
                             ("dkdv", cc._attn_bwd_dkdv)):
            opts = cc._launch_options(dtype, d, name)
            launch = {k: opts.pop(k) for k in ("num_warps", "num_stages")}
            const = opts | {"D": d, "HAS_MASK": True}
            # inputs in the dtype; saved statistics and split partials in fp32
            types = {n: e for n in ("Q", "K", "V", "O", "DO")}
            types |= {n: "fp32" for n in ("LSE", "DELTA", "DQ", "DK", "DV")}
            types |= {"KMASK": "u8"} | ({"O": "fp32"} if name == "forward" else {})
            rows.append({"kernel": name, "dtype": e, "D": d, "BLOCK_Q": const["BLOCK_Q"],
                         "BLOCK_K": const["BLOCK_K"],
                         **_compile_sm90(kernel, types, const, launch)})
    return rows


def compile_check_deepset() -> list[dict]:
    """The same for the DeepSet encoder's kernels at the presets' widths (tiny to large), as the
    bf16 trainer launches them: fp32 expression inputs, bf16 hidden output and its gradient."""
    from kernels import deepset as ds

    rows = []
    for d in (64, 256, 512, 1280):
        for kernel, backward in ((ds._deepset_fwd_kernel, False), (ds._deepset_bwd_kernel, True)):
            dp, bn, warps = ds._launch_config(d, 3200, None, backward)
            const = {"K": 6, "D": d, "DP": dp, "BN": bn}
            types = {n: "fp32" for n in kernel.arg_names if n.endswith("_ptr")}
            types |= {"mask_ptr": "u8", "h_ptr": "bf16", "gh_ptr": "bf16"}
            rows.append({"kernel": "deepset_" + ("backward" if backward else "forward"),
                         "d": d, "DP": dp, "BN": bn,
                         **_compile_sm90(kernel, types, const, {"num_warps": warps,
                                                                 "num_stages": 3})})
    return rows


def format_rows(rows: list[dict]) -> str:
    keys = list(dict.fromkeys(k for row in rows for k in row))
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = [" | ".join(fmt(r.get(k, "")) for k in keys) for r in rows]
    return "\n".join([" | ".join(keys), *lines])


def main() -> None:
    if COMPILE_CHECK:
        print("Criss-cross GPU launch configurations compiled for sm_90 (no device used):")
        print(format_rows(compile_check()))
        print("\nDeepSet encoder kernels compiled for sm_90 (N = 3,200, K = 6 neighbours):")
        print(format_rows(compile_check_deepset()))
        return
    if SWEEP_TILES:
        if not CUDA:
            sys.exit("--sweep-tiles times kernels: it needs a CUDA device")
        print(f"Criss-cross tiles on {torch.cuda.get_device_name()} (ms of the whole pass; "
              "B=16, H=8, N=3,200, M=200, D=64, bf16):", flush=True)
        for row in sweep_tiles():
            print(format_rows([row]).splitlines()[-1], flush=True)
        return
    if CUDA:
        peak = device_peak("cuda", "bf16")
        print(f"Criss-cross attention on {torch.cuda.get_device_name()} "
              "(B=16, H=8, M=200, D=64, bf16; times in ms; roofline: "
              f"{peak.source})")
        print(format_rows(bench_criss_cross_gpu()))
    else:
        cfg = CPU_CONFIG
        print("No CUDA device: correctness-only run through the Triton interpreter (no timings).")
        print(f"Criss-cross B={cfg.batch} H={cfg.heads} N={cfg.n_genes} M={cfg.n_latents} "
              f"D={cfg.head_dim} fp32, ~10% padded genes; max |err| / max |float64| per tensor:")
        print(format_rows(correctness_cpu()))
        peak = h100_peak(torch.bfloat16)
    print(f"\nCounts and roofline bounds of the GPU configurations on {peak.device} "
          f"({peak.flops / 1e12:.0f} TFLOP/s bf16 dense, {peak.bytes_per_s / 1e12:.2f} TB/s):")
    print(format_rows(counts_table(peak)))
    from deepset_bench import bench_deepset  # sets TRITON_INTERPRET without CUDA, as above

    device = torch.cuda.get_device_name() if CUDA else "CPU (correctness only)"
    print(f"\nDeepSet encoder on {device}")
    print(format_rows(bench_deepset()))


if __name__ == "__main__":
    main()
