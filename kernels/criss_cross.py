"""Criss-cross attention: genes read M latents and latents read N genes, without an N x N matrix.

``out_x = softmax(q_x k_z^T / sqrt(D)) v_z`` (genes read latents, [B, H, N, D]) and
``out_z = softmax(q_z k_x^T / sqrt(D) + mask) v_x`` (latents read real genes, [B, H, M, D]).

Both directions are one generic flash-attention pair of Triton kernels, launched with different
grids. The two directions share no large operand (out_x reads only q_x of the gene side, out_z only
k_x and v_x), so each gene-side tensor is read from memory exactly once per pass; fusing both
directions into one launch would save launches, not bytes.

- Forward, split over keys (flash-decoding): a program owns a query block and one split of the
  keys, keeps its softmax statistics on chip, and writes a normalised partial output and its
  log-sum-exp. Genes reading latents need one split (the M latents are a few key blocks); latents
  reading genes split N across programs and the small [splits, M, D] partials are combined.
- Backward, two kernels as in the flash-attention tutorial, each recomputing the probabilities
  from the saved log-sum-exp: dQ over query blocks looping over (a split of) the keys, then dK
  and dV over key blocks looping over (a split of) the queries. Each gradient element is written
  by one program, or as one split's small fp32 partial summed afterwards in a fixed order. No
  atomics anywhere: repeated backward passes give the same bits, so a resumed GPU run can repeat
  the uninterrupted one, and no key block waits on another's dQ additions (a fused one-kernel
  backward adding dQ with fp32 atomics ran 3.3x slower than two SDPA calls on an H200 at
  N = 3,200, M = 200: docs/benchmarks/kernels.md).

Offsets: the batch, head and split parts of every address are int64 (kernels/offsets.py); within
one (batch, head) slice they stay int32, which the wrapper checks.

A batch row with no real gene gives zeros for its latents (defined, never NaN). Latent inputs may
be expanded along the batch (stride 0): strides go to the kernels, nothing is copied, and the
gradients come back in the expanded shape so autograd's expand backward sums them over the batch.
"""

import functools
import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.dispatch import triton_interpreting, use_triton
from kernels.offsets import bh_offset, check_slice, wide

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
HEAD_DIMS = (16, 32, 64, 128)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INTERPRETER_TARGET_PROGRAMS = 264  # as on an H100 or H200 (132 SMs), so tests split like one


def _check(q_x, k_x, v_x, q_z, k_z, v_z, x_mask):
    if q_x.dim() != 4 or q_z.dim() != 4:
        raise ValueError(f"criss_cross_attention: expected [B,H,N,D] and [B,H,M,D], got "
                         f"{tuple(q_x.shape)} and {tuple(q_z.shape)}")
    if not (q_x.shape == k_x.shape == v_x.shape):
        raise ValueError("criss_cross_attention: q_x, k_x, v_x must have the same shape")
    if not (q_z.shape == k_z.shape == v_z.shape):
        raise ValueError("criss_cross_attention: q_z, k_z, v_z must have the same shape")
    if len({t.dtype for t in (q_x, k_x, v_x, q_z, k_z, v_z)}) != 1:
        raise ValueError("criss_cross_attention: all six inputs must share one dtype")
    B, H, N, D = q_x.shape
    if q_z.shape[0] != B or q_z.shape[1] != H or q_z.shape[3] != D:
        raise ValueError(f"criss_cross_attention: latent shape {tuple(q_z.shape)} does not match "
                         f"gene shape {tuple(q_x.shape)} in B, H or D")
    if x_mask is not None and (x_mask.shape != (B, N) or x_mask.dtype != torch.bool):
        raise ValueError(f"criss_cross_attention: x_mask must be bool [B, N] = [{B}, {N}], got "
                         f"{x_mask.dtype} {tuple(x_mask.shape)}")


def reference_criss_cross_attention(q_x, k_x, v_x, q_z, k_z, v_z, x_mask=None):
    """Two SDPA calls. A latent whose batch row has no real gene gets a zero output (no NaN)."""
    _check(q_x, k_x, v_x, q_z, k_z, v_z, x_mask)
    out_x = F.scaled_dot_product_attention(q_x, k_z, v_z)
    if x_mask is None:
        return out_x, F.scaled_dot_product_attention(q_z, k_x, v_x)
    any_real = x_mask.any(dim=1)  # [B]
    # Rows with no real gene attend everywhere (finite) and are then zeroed: no NaN in the grads.
    attend = (x_mask | ~any_real[:, None])[:, None, None, :]
    out_z = F.scaled_dot_product_attention(q_z, k_x, v_x, attn_mask=attend)
    return out_x, out_z * any_real[:, None, None, None].to(out_z.dtype)


@triton.jit
def _load_kv(K, V, KMASK, b, h, offs_k, offs_d, k_end, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n,
             sm_b, sm_n, HAS_MASK: tl.constexpr, UPCAST: tl.constexpr):
    """A block of keys and values (rows ``offs_k`` below ``k_end``) and which keys may be read."""
    k_in = offs_k < k_end
    valid = k_in
    if HAS_MASK:
        valid = valid & (tl.load(KMASK + wide(b) * sm_b + offs_k * sm_n, mask=k_in,
                                 other=0) != 0)
    k = tl.load(K + bh_offset(b, sk_b, h, sk_h) + offs_k[:, None] * sk_n + offs_d[None, :],
                mask=k_in[:, None], other=0.0)
    v = tl.load(V + bh_offset(b, sv_b, h, sv_h) + offs_k[:, None] * sv_n + offs_d[None, :],
                mask=k_in[:, None], other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    return valid, k, v


@triton.jit
def _attn_fwd(
    Q, K, V, KMASK, O, LSE,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n,
    so_s, so_b, so_h, so_n, sl_s, sl_b, sl_h,
    H, LQ, LK, keys_per_split, qk_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block against one split of the keys: normalised partial output + its lse."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D)
    q_in = offs_q < LQ
    q = tl.load(Q + bh_offset(b, sq_b, h, sq_h) + offs_q[:, None] * sq_n + offs_d[None, :],
                mask=q_in[:, None], other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_Q], tl.float32)
    acc = tl.zeros([BLOCK_Q, D], tl.float32)
    k_lo = pid_s * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, LK)
    for start in range(k_lo, k_hi, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        valid, k, v = _load_kv(K, V, KMASK, b, h, offs_k, offs_d, k_hi, sk_b, sk_h, sk_n, sv_b,
                               sv_h, sv_n, sm_b, sm_n, HAS_MASK, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l = l * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new
    empty = l == 0.0
    l_safe = tl.where(empty, 1.0, l)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m + tl.log2(l_safe)) * 0.6931471805599453)
    o_base = wide(pid_s) * so_s + bh_offset(b, so_b, h, so_h)
    tl.store(O + o_base + offs_q[:, None] * so_n + offs_d[None, :],
             out.to(O.dtype.element_ty), mask=q_in[:, None])
    lse_base = wide(pid_s) * sl_s + bh_offset(b, sl_b, h, sl_h)
    tl.store(LSE + lse_base + offs_q, lse, mask=q_in)


@triton.jit
def _load_rows(Q, DO, LSE, b, h, offs_q, offs_d, q_end, sq_b, sq_h, sq_n, sdo_b, sdo_h, sdo_n,
               sl_b, sl_h, UPCAST: tl.constexpr):
    """A block of queries (rows ``offs_q`` below ``q_end``), their output gradients and their
    log-sum-exps in log2 units (+inf for a row that saw no valid key: its probabilities are 0
    and it gets no gradient)."""
    q_in = offs_q < q_end
    q = tl.load(Q + bh_offset(b, sq_b, h, sq_h) + offs_q[:, None] * sq_n + offs_d[None, :],
                mask=q_in[:, None], other=0.0)
    do = tl.load(DO + bh_offset(b, sdo_b, h, sdo_h) + offs_q[:, None] * sdo_n
                 + offs_d[None, :], mask=q_in[:, None], other=0.0)
    lse = tl.load(LSE + bh_offset(b, sl_b, h, sl_h) + offs_q, mask=q_in, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    return q_in, q, do, lse


@triton.jit
def _attn_bwd_dq(
    Q, K, V, KMASK, O, DO, LSE, DELTA, DQ,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n,
    so_b, so_h, so_n, sdo_b, sdo_h, sdo_n, sl_b, sl_h, sdq_s, sdq_b, sdq_h, sdq_n,
    H, LQ, LK, keys_per_split, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One query block against one split of the keys: this split's dQ, stored (no atomics).
    The first split also stores ``delta = rowsum(dO * O)`` for the dK/dV kernel that follows."""
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    offs_d = tl.arange(0, D)
    q_in, q, do, lse = _load_rows(Q, DO, LSE, b, h, offs_q, offs_d, LQ, sq_b, sq_h, sq_n, sdo_b,
                                  sdo_h, sdo_n, sl_b, sl_h, UPCAST)
    o = tl.load(O + bh_offset(b, so_b, h, so_h) + offs_q[:, None] * so_n + offs_d[None, :],
                mask=q_in[:, None], other=0.0)
    delta = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    if pid_s == 0:
        tl.store(DELTA + bh_offset(b, sl_b, h, sl_h) + offs_q, delta, mask=q_in)
    dq = tl.zeros([BLOCK_Q, D], tl.float32)
    k_lo = pid_s * keys_per_split
    k_hi = tl.minimum(k_lo + keys_per_split, LK)
    for start in range(k_lo, k_hi, BLOCK_K):
        offs_k = start + tl.arange(0, BLOCK_K)
        valid, k, v = _load_kv(K, V, KMASK, b, h, offs_k, offs_d, k_hi, sk_b, sk_h, sk_n, sv_b,
                               sv_h, sv_n, sm_b, sm_n, HAS_MASK, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)
    dq_ptr = (DQ + wide(pid_s) * sdq_s + bh_offset(b, sdq_b, h, sdq_h) + offs_q[:, None] * sdq_n
              + offs_d[None, :])
    tl.store(dq_ptr, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_in[:, None])


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, KMASK, DO, LSE, DELTA, DK, DV,
    sq_b, sq_h, sq_n, sk_b, sk_h, sk_n, sv_b, sv_h, sv_n, sm_b, sm_n,
    sdo_b, sdo_h, sdo_n, sl_b, sl_h, sdk_s, sdk_b, sdk_h, sdk_n,
    H, LQ, LK, queries_per_split, qk_scale, sm_scale,
    D: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, HAS_MASK: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """One key block against one split of the queries: this split's dK and dV, stored."""
    pid_k = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_bh = tl.program_id(2)
    b = pid_bh // H
    h = pid_bh % H
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_d = tl.arange(0, D)
    k_in = offs_k < LK
    valid, k, v = _load_kv(K, V, KMASK, b, h, offs_k, offs_d, LK, sk_b, sk_h, sk_n, sv_b, sv_h,
                           sv_n, sm_b, sm_n, HAS_MASK, UPCAST)
    dk = tl.zeros([BLOCK_K, D], tl.float32)
    dv = tl.zeros([BLOCK_K, D], tl.float32)
    q_lo = pid_s * queries_per_split
    q_hi = tl.minimum(q_lo + queries_per_split, LQ)
    for start in range(q_lo, q_hi, BLOCK_Q):
        offs_q = start + tl.arange(0, BLOCK_Q)
        q_in, q, do, lse = _load_rows(Q, DO, LSE, b, h, offs_q, offs_d, q_hi, sq_b, sq_h, sq_n,
                                      sdo_b, sdo_h, sdo_n, sl_b, sl_h, UPCAST)
        delta = tl.load(DELTA + bh_offset(b, sl_b, h, sl_h) + offs_q, mask=q_in, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
        p = tl.where(valid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
        dp = tl.dot(do, tl.trans(v.to(do.dtype)), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk_ptr = (wide(pid_s) * sdk_s + bh_offset(b, sdk_b, h, sdk_h)
              + offs_k[:, None] * sdk_n + offs_d[None, :])
    tl.store(DK + dk_ptr, (dk * sm_scale).to(DK.dtype.element_ty), mask=k_in[:, None])
    tl.store(DV + dk_ptr, dv.to(DV.dtype.element_ty), mask=k_in[:, None])


def _block(n: int, cap: int) -> int:
    """Smallest power of two >= n (and >= 16, tl.dot's minimum), at most cap."""
    return max(16, min(cap, triton.next_power_of_2(n)))


def _launch_options(dtype: torch.dtype, d: int, kernel: str) -> dict:
    """Block sizes and compile options of one kernel: "forward", "dq" or "dkdv".

    Interpreter: large blocks (fewer programs run faster) and fp32 math (its bf16 tl.dot is wrong).
    GPU: fp16/bf16 use tensor cores with fp32 accumulation; a kernel whose resident block is the
    queries (forward, dq) takes 64 of them against 64-key steps, the dK/dV kernel 64 keys against
    32-query steps (its two fp32 accumulators are the larger resident state); at D = 128 the
    backward kernels halve the stepped block and take 8 warps. fp32 inputs use exact ("ieee")
    dots, which have no tensor-core path: 32 x 32 tiles, 8 warps. The tiles were chosen by
    compiling for sm_90 without a device (``python benchmarks/bench_kernels.py
    --compile-check``: no spills) and timing them on an H200 (``--sweep-tiles``: of the
    candidates these were fastest, and a third pipeline stage for the dK/dV kernel's query loads
    took the whole backward from 0.81 to 0.74 ms at N = 3,200; docs/benchmarks/kernels.md).
    """
    if kernel not in ("forward", "dq", "dkdv"):
        raise ValueError(f"unknown criss-cross kernel {kernel!r}")
    interpreting = triton_interpreting()
    fp32 = dtype == torch.float32
    wide_backward = d > 64 and kernel != "forward"
    if interpreting:
        block_q, block_k = (64, 128) if kernel == "forward" else (64, 64)
    elif fp32:
        block_q, block_k = 32, 32
    elif kernel == "dkdv":
        block_q, block_k = (16 if wide_backward else 32), 64
    else:
        block_q, block_k = 64, (32 if wide_backward else 64)
    return dict(
        BLOCK_Q=block_q,
        BLOCK_K=block_k,
        UPCAST=interpreting or fp32,
        PRECISION="ieee" if interpreting or fp32 else "tf32",
        num_warps=8 if (fp32 or wide_backward) and not interpreting else 4,
        num_stages=1 if interpreting else 3 if kernel == "dkdv" and not (
            fp32 or wide_backward) else 2,
    )


@functools.cache
def _target_programs(device: torch.device) -> int:
    """Programs that fill the device: two per multiprocessor (two waves of one program each)."""
    if device.type != "cuda":
        return _INTERPRETER_TARGET_PROGRAMS
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def _splits(n_items: int, block: int, other_programs: int,
            device: torch.device) -> tuple[int, int]:
    """Split n_items into chunks (multiples of block) so the grid has enough programs."""
    n_blocks = triton.cdiv(n_items, block)
    want = max(1, min(n_blocks, triton.cdiv(_target_programs(device), max(1, other_programs))))
    per_split = triton.cdiv(n_blocks, want) * block
    return triton.cdiv(n_items, per_split), per_split


def _plan(kernel: str, dtype: torch.dtype, d: int, lq: int, lk: int, bh: int,
          device: torch.device) -> tuple[dict, tuple[int, int, int], int]:
    """One kernel's launch: its options (blocks fitted to the lengths), its grid (resident
    blocks, splits of the looped side, B * H) and the length of each split. The forward and dQ
    kernels keep a query block resident and loop over keys; the dK/dV kernel the reverse."""
    opts = _launch_options(dtype, d, kernel)
    opts["BLOCK_Q"] = _block(lq, opts["BLOCK_Q"])
    opts["BLOCK_K"] = _block(lk, opts["BLOCK_K"])
    resident, looped = (lq, "BLOCK_Q"), (lk, "BLOCK_K")
    if kernel == "dkdv":
        resident, looped = looped, resident
    n_resident = triton.cdiv(resident[0], opts[resident[1]])
    n_splits, per_split = _splits(looped[0], opts[looped[1]], n_resident * bh, device)
    return opts, (n_resident, n_splits, bh), per_split


def _mask_args(mask, q):
    if mask is None:
        return q, 0, 0, False  # any pointer: never read
    mask = mask.view(torch.uint8)
    return mask, mask.stride(0), mask.stride(1), True


def _attend(q, k, v, mask):
    """softmax(q k^T / sqrt(D) + mask) v for [B, H, L, D] inputs; returns (out, lse [B, H, LQ])."""
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    for t in (q, k, v):
        check_slice("criss_cross_attention", t.shape, t.stride(), batch_dims=2)
    opts, grid, keys_per_split = _plan("forward", q.dtype, D, LQ, LK, B * H, q.device)
    n_splits = grid[1]
    f32 = torch.float32
    if n_splits == 1:
        out = torch.empty((1, B, H, LQ, D), device=q.device, dtype=q.dtype)
    else:
        out = torch.empty((n_splits, B, H, LQ, D), device=q.device, dtype=f32)
    lse = torch.empty((n_splits, B, H, LQ), device=q.device, dtype=f32)
    kmask, sm_b, sm_n, has_mask = _mask_args(mask, q)
    _attn_fwd[grid](
        q, k, v, kmask, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), sm_b, sm_n,
        out.stride(0), out.stride(1), out.stride(2), out.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2),
        H, LQ, LK, keys_per_split, LOG2E / math.sqrt(D),
        D=D, HAS_MASK=has_mask, **opts,
    )
    if n_splits == 1:
        return out[0], lse[0]
    total = torch.logsumexp(lse, dim=0)  # -inf where no split saw a valid key
    weight = torch.exp(lse - torch.where(torch.isinf(total), 0.0, total))
    return (weight.unsqueeze(-1) * out).sum(0).to(q.dtype), total


def _attend_backward(q, k, v, mask, out, d_out, lse):
    """Gradients of _attend in q, k, v (each in its input's shape, k/v dense even if expanded).

    Two kernels, as in the flash-attention tutorial: dQ over query blocks (looping over keys),
    then dK and dV over key blocks (looping over queries), each recomputing the probabilities
    from the saved log-sum-exp. Every gradient element is written by one program, or as one
    split's fp32 partial that is summed afterwards in a fixed order: no atomics, so repeated
    backward passes give the same bits.
    """
    B, H, LQ, D = q.shape
    LK = k.shape[2]
    f32 = torch.float32
    kmask, sm_b, sm_n, has_mask = _mask_args(mask, q)
    common = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
              v.stride(0), v.stride(1), v.stride(2), sm_b, sm_n)
    delta = torch.empty_like(lse)  # rowsum(dO * O), written by the dQ kernel
    assert delta.stride() == lse.stride()
    scales = (LOG2E / math.sqrt(D), 1.0 / math.sqrt(D))

    opts, grid, keys_per_split = _plan("dq", q.dtype, D, LQ, LK, B * H, q.device)
    n_splits = grid[1]
    dq = torch.empty((n_splits, B, H, LQ, D), device=q.device,
                     dtype=q.dtype if n_splits == 1 else f32)
    _attn_bwd_dq[grid](
        q, k, v, kmask, out, d_out, lse, delta, dq, *common,
        out.stride(0), out.stride(1), out.stride(2),
        d_out.stride(0), d_out.stride(1), d_out.stride(2), lse.stride(0), lse.stride(1),
        dq.stride(0), dq.stride(1), dq.stride(2), dq.stride(3),
        H, LQ, LK, keys_per_split, *scales, D=D, HAS_MASK=has_mask, **opts,
    )
    dq = dq[0] if n_splits == 1 else dq.sum(0).to(q.dtype)

    opts, grid, queries_per_split = _plan("dkdv", q.dtype, D, LQ, LK, B * H, q.device)
    n_splits = grid[1]
    dk = torch.empty((n_splits, B, H, LK, D), device=q.device,
                     dtype=k.dtype if n_splits == 1 else f32)
    dv = torch.empty_like(dk)
    _attn_bwd_dkdv[grid](
        q, k, v, kmask, d_out, lse, delta, dk, dv, *common,
        d_out.stride(0), d_out.stride(1), d_out.stride(2), lse.stride(0), lse.stride(1),
        dk.stride(0), dk.stride(1), dk.stride(2), dk.stride(3),
        H, LQ, LK, queries_per_split, *scales, D=D, HAS_MASK=has_mask, **opts,
    )
    if n_splits == 1:
        return dq, dk[0], dv[0]
    return dq, dk.sum(0).to(k.dtype), dv.sum(0).to(v.dtype)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """Kernels take any batch/head/sequence strides (stride 0 included) but a unit last stride."""
    return t if t.stride(-1) == 1 else t.contiguous()


class _CrissCross(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q_x, k_x, v_x, q_z, k_z, v_z, x_mask):
        q_x, k_x, v_x, q_z, k_z, v_z = map(_last_dim_contiguous, (q_x, k_x, v_x, q_z, k_z, v_z))
        out_x, lse_x = _attend(q_x, k_z, v_z, None)  # genes read latents
        out_z, lse_z = _attend(q_z, k_x, v_x, x_mask)  # latents read real genes
        ctx.save_for_backward(q_x, k_x, v_x, q_z, k_z, v_z, x_mask, out_x, lse_x, out_z, lse_z)
        return out_x, out_z

    @staticmethod
    def backward(ctx, d_out_x, d_out_z):
        q_x, k_x, v_x, q_z, k_z, v_z, x_mask, out_x, lse_x, out_z, lse_z = ctx.saved_tensors
        d_out_x = _last_dim_contiguous(d_out_x)
        d_out_z = _last_dim_contiguous(d_out_z)
        dq_x, dk_z, dv_z = _attend_backward(q_x, k_z, v_z, None, out_x, d_out_x, lse_x)
        dq_z, dk_x, dv_x = _attend_backward(q_z, k_x, v_x, x_mask, out_z, d_out_z, lse_z)
        return dq_x, dk_x, dv_x, dq_z, dk_z, dv_z, None


def criss_cross_attention(q_x, k_x, v_x, q_z, k_z, v_z, x_mask=None):
    """Fused Triton kernels on CUDA (or under TRITON_INTERPRET=1), the reference otherwise.

    Head dims outside {16, 32, 64, 128} (the kernels need a power-of-2 D >= 16) and dtypes other
    than fp32/fp16/bf16 (float64 has no tensor-core dot) also take the reference.
    """
    _check(q_x, k_x, v_x, q_z, k_z, v_z, x_mask)
    fits = q_x.shape[-1] in HEAD_DIMS and all(
        t.dtype in DTYPES for t in (q_x, k_x, v_x, q_z, k_z, v_z))
    if fits and use_triton(q_x, k_x, v_x, q_z, k_z, v_z):
        return _CrissCross.apply(q_x, k_x, v_x, q_z, k_z, v_z, x_mask)
    return reference_criss_cross_attention(q_x, k_x, v_x, q_z, k_z, v_z, x_mask)
