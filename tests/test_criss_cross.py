"""Criss-cross attention: the Triton kernels (through the interpreter) against the SDPA reference
and float64 math, forward and all six gradients, with padding, empty rows and shared latents."""

import os
import subprocess
import sys

import pytest
import torch

import kernels.criss_cross as cc
from kernels import criss_cross_attention, reference_criss_cross_attention

FP32_TOL = 1e-5  # max |error| / max |float64 value|, per output and per gradient
HALF_TOL = 2e-2  # bf16/fp16 inputs and outputs (8/11-bit mantissas), fp32 accumulation


def _mask(kind: str, B: int, N: int, gen: torch.Generator) -> torch.Tensor | None:
    if kind == "none":
        return None
    mask = torch.rand(B, N, generator=gen) > 0.3
    if kind == "edge":  # one row with a single real gene, one row with none
        mask[1] = False
        mask[1, N - 1] = True
        mask[2] = False
    return mask


def _inputs(B, H, N, M, D, dtype, shared, gen, scale=1.0):
    def rand(*shape):
        return (scale * torch.randn(*shape, generator=gen)).to(dtype).requires_grad_(True)

    genes = [rand(B, H, N, D) for _ in range(3)]
    latents = [rand(1 if shared else B, H, M, D) for _ in range(3)]
    return genes, latents


def _run(fn, genes, latents, mask, d_out, cast=None):
    """Outputs and the six gradients (latent grads w.r.t. the possibly unexpanded leaves)."""
    if cast is not None:
        genes = [t.detach().to(cast).requires_grad_(True) for t in genes]
        latents = [t.detach().to(cast).requires_grad_(True) for t in latents]
    B, H, N, D = genes[0].shape
    expanded = [z.expand(B, H, z.shape[2], D) for z in latents]
    out_x, out_z = fn(*genes, *expanded, mask)
    loss = (out_x * d_out[0].to(out_x.dtype)).sum() + (out_z * d_out[1].to(out_z.dtype)).sum()
    grads = torch.autograd.grad(loss, genes + latents)
    return (out_x, out_z), grads


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    scale = want.double().abs().max().clamp_min(1e-6)
    return ((got.double() - want.double()).abs().max() / scale).item()


def _compare(dtype, B, H, N, M, D, mask_kind, shared, seed, tol, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    genes, latents = _inputs(B, H, N, M, D, dtype, shared, gen, scale)
    mask = _mask(mask_kind, B, N, gen)
    d_out = (torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, M, D, generator=gen))
    outs, grads = _run(criss_cross_attention, genes, latents, mask, d_out)
    exact_outs, exact_grads = _run(reference_criss_cross_attention, genes, latents, mask, d_out,
                                   cast=torch.float64)
    names = ["out_x", "out_z", "dq_x", "dk_x", "dv_x", "dq_z", "dk_z", "dv_z"]
    exact = list(exact_outs) + list(exact_grads)
    for name, got, want in zip(names, list(outs) + list(grads), exact):
        assert got.dtype == dtype and got.shape == want.shape, name
        assert torch.isfinite(got).all(), f"{name} has non-finite values"
        assert _rel_err(got, want) <= tol, f"{name}: rel err {_rel_err(got, want):.2e} > {tol}"
    return outs, grads, (genes, latents, mask, d_out)


# N, M not multiples of the blocks; N=150 splits the keys of the latent side across programs (the
# forward's partial outputs, the backward's dQ partials); M=70 needs two latent key blocks.
CASES = [
    (2, 2, 150, 70, 32, "random", False),
    (2, 1, 45, 13, 64, "none", True),
    (3, 1, 33, 9, 128, "edge", True),
    (3, 2, 21, 17, 16, "edge", False),
]


@pytest.mark.parametrize("B,H,N,M,D,mask_kind,shared", CASES)
def test_fp32_matches_float64_and_reference(B, H, N, M, D, mask_kind, shared):
    outs, grads, (genes, latents, mask, d_out) = _compare(
        torch.float32, B, H, N, M, D, mask_kind, shared, seed=N * M + D, tol=FP32_TOL)
    ref_outs, ref_grads = _run(reference_criss_cross_attention, genes, latents, mask, d_out)
    for got, want in zip(list(outs) + list(grads), list(ref_outs) + list(ref_grads)):
        assert _rel_err(got, want) <= 2 * FP32_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_documented_tolerance(dtype):
    _compare(dtype, 3, 2, 90, 40, 64, "edge", False, seed=7, tol=HALF_TOL)


def test_large_logits_stay_finite():
    """Logits of a few hundred: no overflow, and no worse than fp32 SDPA's own conditioning."""
    gen = torch.Generator().manual_seed(3)
    genes, latents = _inputs(2, 1, 40, 12, 32, torch.float32, False, gen, scale=6.0)
    mask = _mask("random", 2, 40, gen)
    d_out = (torch.randn(2, 1, 40, 32, generator=gen), torch.randn(2, 1, 12, 32, generator=gen))
    got = _run(criss_cross_attention, genes, latents, mask, d_out)
    ref = _run(reference_criss_cross_attention, genes, latents, mask, d_out)
    exact = _run(reference_criss_cross_attention, genes, latents, mask, d_out, cast=torch.float64)
    flat = lambda r: list(r[0]) + list(r[1])
    for ours, sdpa, want in zip(flat(got), flat(ref), flat(exact)):
        assert torch.isfinite(ours).all()
        assert _rel_err(ours, want) <= max(FP32_TOL, 2 * _rel_err(sdpa, want))


def test_padding_semantics():
    """Padded genes never reach the latents, get no gradient through them, and stay finite."""
    gen = torch.Generator().manual_seed(11)
    B, H, N, M, D = 3, 2, 30, 7, 32
    genes, latents = _inputs(B, H, N, M, D, torch.float32, False, gen)
    mask = _mask("edge", B, N, gen)
    d_out = (torch.randn(B, H, N, D, generator=gen), torch.randn(B, H, M, D, generator=gen))
    (out_x, out_z), grads = _run(criss_cross_attention, genes, latents, mask, d_out)
    assert torch.isfinite(out_x).all()
    assert torch.equal(out_z[2], torch.zeros_like(out_z[2]))  # no real gene: zeros by definition
    for g in grads:
        assert torch.isfinite(g).all()
    padded = ~mask[:, None, :, None].expand(B, H, N, D)
    for g in grads[1:3]:  # k_x, v_x feed only the latents, which never read padded genes
        assert (g[padded] == 0).all()
    assert torch.equal(grads[3][2], torch.zeros_like(grads[3][2]))  # dq_z of the empty row
    # A single real gene: every latent copies its value.
    real = int(mask[1].nonzero()[0, 0])
    expect = genes[2][1, :, real].detach()[:, None, :].expand(H, M, D)
    torch.testing.assert_close(out_z[1].detach(), expect, rtol=1e-6, atol=1e-6)
    # Values behind the padding do not matter.
    k_x, v_x = (t.detach().clone() for t in genes[1:])
    k_x[padded] = 1e4
    v_x[padded] = -1e4
    z = [t.detach() for t in latents]
    _, out_z2 = criss_cross_attention(genes[0].detach(), k_x, v_x, *z, mask)
    torch.testing.assert_close(out_z2[:2], out_z[:2].detach(), rtol=0, atol=1e-6)


def test_shared_latents_are_not_copied(monkeypatch):
    seen = []
    attend = cc._attend
    spy = lambda q, k, v, m: (seen.append((q, k)), attend(q, k, v, m))[1]
    monkeypatch.setattr(cc, "_attend", spy)
    gen = torch.Generator().manual_seed(5)
    genes, latents = _inputs(2, 2, 20, 6, 32, torch.float32, True, gen)
    z = [t.expand(2, 2, 6, 32) for t in latents]
    criss_cross_attention(*genes, *z)
    assert seen[0][1].stride(0) == 0 and seen[0][1].data_ptr() == latents[1].data_ptr()
    assert seen[1][0].stride(0) == 0


def test_dispatch(monkeypatch):
    """CPU tensors take the reference unless the interpreter is on; odd D / float64 always do."""
    calls = []
    reference = cc.reference_criss_cross_attention
    monkeypatch.setattr(cc, "reference_criss_cross_attention",
                        lambda *a: (calls.append("reference"), reference(*a))[1])
    monkeypatch.setattr(cc._CrissCross, "apply",
                        lambda *a: (calls.append("triton"), reference(*a))[1])
    x = torch.randn(1, 1, 5, 32)
    z = torch.randn(1, 1, 3, 32)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    criss_cross_attention(x, x, x, z, z, z)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    criss_cross_attention(x, x, x, z, z, z)
    criss_cross_attention(x.double(), x.double(), x.double(), z.double(), z.double(), z.double())
    x24, z24 = torch.randn(1, 1, 5, 24), torch.randn(1, 1, 3, 24)
    criss_cross_attention(x24, x24, x24, z24, z24, z24)
    assert calls == ["reference", "triton", "reference", "reference"]


def test_bad_inputs_raise_clear_errors():
    x = torch.randn(2, 1, 5, 32)
    z = torch.randn(2, 1, 3, 32)
    with pytest.raises(ValueError, match="x_mask must be bool"):
        criss_cross_attention(x, x, x, z, z, z, torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="does not match"):
        criss_cross_attention(x, x, x, z[:1], z[:1], z[:1])
    with pytest.raises(ValueError, match="one dtype"):
        criss_cross_attention(x, x, x, z.half(), z.half(), z.half())


def test_gpu_tiles_through_the_interpreter(monkeypatch):
    """The small fp32 tiles used on GPUs: many key and query blocks, splits on both sides."""
    monkeypatch.setattr(cc, "triton_interpreting", lambda: False)
    assert cc._launch_options(torch.float32, 64, "dkdv")["BLOCK_K"] == 32
    _compare(torch.float32, 2, 1, 70, 40, 32, "random", False, seed=9,
             tol=FP32_TOL)


def test_gpu_configurations_compile_for_h100(repo_root):
    """The interpreter accepts code the GPU compiler rejects: build every GPU launch configuration
    of the criss-cross and DeepSet kernels for sm_90 (no device needed) and require the
    half-precision criss-cross ones, and the DeepSet ones up to d = 512, not to spill registers."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, str(repo_root / "benchmarks" / "bench_kernels.py"), "--compile-check"],
        env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    lines = run.stdout.splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith(("forward", "dq", "dkdv"))]
    assert len(rows) == 12  # three kernels at bf16 D = 32, 64, 128 and fp32 D = 64
    for kernel, dtype, d, *_, spill, _shared in rows:
        assert dtype != "bf16" or spill == "0", f"{kernel} bf16 D={d} spills {spill} bytes"
    deepset = [line.split(" | ") for line in lines if line.startswith("deepset_")]
    assert len(deepset) == 8  # forward and backward at d = 64, 256, 512, 1280
    for kernel, d, _dp, _bn, _warps, _regs, spill, _shared in deepset:
        assert int(d) > 512 or spill == "0", f"{kernel} d={d} spills {spill} bytes"


def _record_splits(monkeypatch) -> dict[str, list[int]]:
    """Spy on the backward kernels' launches: the split count (grid axis 1) of each."""
    splits = {"dq": [], "dkdv": []}
    for name in splits:
        real = getattr(cc, f"_attn_bwd_{name}")

        class Spy:
            def __getitem__(self, grid, name=name, real=real):
                splits[name].append(grid[1])
                return real[grid]

        monkeypatch.setattr(cc, f"_attn_bwd_{name}", Spy())
    return splits


def test_backward_splits_sum_partials_and_repeat_bitwise(monkeypatch):
    """GPU tiles, several blocks and splits on both sides (dQ partials over key splits on the
    latent side, dK/dV partials over query splits on the gene side): gradients within the fp32
    tolerance of float64 math, and, with no atomics anywhere, two backward passes equal bit for
    bit without torch's deterministic mode."""
    monkeypatch.setattr(cc, "triton_interpreting", lambda: False)
    assert not torch.are_deterministic_algorithms_enabled()
    splits = _record_splits(monkeypatch)
    outs, grads, (genes, latents, mask, d_out) = _compare(
        torch.float32, 2, 2, 150, 70, 32, "random", False, seed=11, tol=FP32_TOL)
    # launches in order: genes read latents, then latents read genes
    assert splits["dq"][1] > 1 and splits["dkdv"][0] > 1, splits
    _, again = _run(criss_cross_attention, genes, latents, mask, d_out)
    for first, second in zip(grads, again):
        assert torch.equal(first, second)
