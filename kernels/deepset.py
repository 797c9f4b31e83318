"""DeepSet neighbour encoder: per gene, encode the cell's own value and its neighbours' values.

Math (identical in both classes; values are log2(1 + count)):
    s    = W2s relu(LN_s(w1s x + b1s)) + b2s                       (self branch)
    h_k  = relu(LN_n(W1n [x_k, dist_k] + b1n))                      (neighbour k)
    nbr  = sum_{k unmasked} (W2n h_k + b2n) = W2n sum_k h_k + n_k b2n
    out  = Wo [s; nbr] + bo
Masked neighbours contribute nothing, whatever their values (inf distances included); with no
neighbour the neighbour branch is exactly zero (its last bias is added once per neighbour).
"""

import torch
import triton
import triton.language as tl
from torch import nn

from kernels.dispatch import use_triton
from kernels.offsets import check_slice, wide


class DeepSetEncoderReference(nn.Module):
    """Plain PyTorch encoder: the definition of truth, and the CPU path.

    It materialises the per-neighbour activations [B, K, N, d], which is what the fused path avoids.
    Inputs are cast to the compute dtype: the autocast dtype when autocast is on, else the
    parameters' dtype. The output has the compute dtype.
    """

    def __init__(self, d_model: int, dropout: float = 0.0, eps: float = 1e-5):
        super().__init__()
        d = d_model
        self.d_model = d
        self.self_in = nn.Linear(1, d)
        self.self_norm = nn.LayerNorm(d, eps=eps)
        self.self_out = nn.Linear(d, d)
        self.nbr_in = nn.Linear(2, d)
        self.nbr_norm = nn.LayerNorm(d, eps=eps)
        self.nbr_out = nn.Linear(d, d)
        self.proj = nn.Linear(2 * d, d)
        self.dropout = nn.Dropout(dropout)

    def compute_dtype(self, device: torch.device) -> torch.dtype:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
        return self.self_in.weight.dtype

    def forward(
        self, x_self: torch.Tensor, x_nbr: torch.Tensor, dist: torch.Tensor, nbr_mask: torch.Tensor
    ) -> torch.Tensor:
        check_inputs(x_self, x_nbr, dist, nbr_mask)
        dtype = self.compute_dtype(x_self.device)
        s = self.self_in(x_self.to(dtype).unsqueeze(-1))
        s = self.self_out(self.dropout(torch.relu(self.self_norm(s))))
        m = nbr_mask.bool()
        xn = torch.where(m[:, :, None], x_nbr, 0).to(dtype)  # [B, K, N]
        dk = torch.where(m, dist, 0).to(dtype)  # [B, K]
        pair = torch.stack([xn, dk[:, :, None].expand_as(xn)], dim=-1)  # [B, K, N, 2]
        h = self.dropout(torch.relu(self.nbr_norm(self.nbr_in(pair))))  # [B, K, N, d]
        y = self.nbr_out(h) * m[:, :, None, None].to(h.dtype)
        return self.proj(torch.cat([s, y.sum(dim=1)], dim=-1))


def check_inputs(
    x_self: torch.Tensor, x_nbr: torch.Tensor, dist: torch.Tensor, nbr_mask: torch.Tensor
) -> None:
    if x_self.dim() != 2:
        raise ValueError(f"x_self must be [B, N], got shape {tuple(x_self.shape)}")
    b, n = x_self.shape
    if x_nbr.dim() != 3 or x_nbr.shape[0] != b or x_nbr.shape[2] != n:
        raise ValueError(f"x_nbr must be [B={b}, K, N={n}], got shape {tuple(x_nbr.shape)}")
    k = x_nbr.shape[1]
    if tuple(dist.shape) != (b, k) or tuple(nbr_mask.shape) != (b, k):
        raise ValueError(
            f"dist and nbr_mask must be [B={b}, K={k}], got {tuple(dist.shape)} and "
            f"{tuple(nbr_mask.shape)}"
        )
    if nbr_mask.dtype != torch.bool:
        raise ValueError(f"nbr_mask must be bool, got {nbr_mask.dtype}")


# ---------------------------------------------------------------------------------------------
# Fused path. One kernel computes H = [hs | sum_k m_k h_k] ([B, N, 2d], the post-ReLU activations
# of both branches) per block of genes, with every neighbour's LayerNorm done on chip; the three
# d x d Linears are folded (in fp32) into one [d, 2d] matrix A and applied as a single GEMM:
#     out = H A^T + (Wo_s b2s + bo) + n_k (Wo_n b2n),  A = [Wo_s W2s, Wo_n W2n].
# The backward kernel recomputes the per-neighbour activations from the inputs and returns the
# gradients of the inputs and of the first-layer and LayerNorm parameters; autograd does the rest
# (GEMM and fold). Nothing of size [B, N, K, d] is ever stored.
# ---------------------------------------------------------------------------------------------

_N_PARAM_VECTORS = 9  # w1s, b1s, g_s, beta_s, w1n[:, 0], w1n[:, 1], b1n, g_n, beta_n


@triton.jit
def _load_params(p_ptr, cols, DP: tl.constexpr):
    """The _N_PARAM_VECTORS packed per-feature vectors, each DP wide (see the forward)."""
    return (tl.load(p_ptr + 0 * DP + cols), tl.load(p_ptr + 1 * DP + cols),
            tl.load(p_ptr + 2 * DP + cols), tl.load(p_ptr + 3 * DP + cols),
            tl.load(p_ptr + 4 * DP + cols), tl.load(p_ptr + 5 * DP + cols),
            tl.load(p_ptr + 6 * DP + cols), tl.load(p_ptr + 7 * DP + cols),
            tl.load(p_ptr + 8 * DP + cols))


@triton.jit
def _ln_relu(z, g, beta, cmask, D: tl.constexpr, eps):
    """LayerNorm over the D real columns (padding columns of z must be 0), affine, ReLU."""
    mean = tl.sum(z, axis=1) / D
    zc = tl.where(cmask[None, :], z - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(zc * zc, axis=1) / D + eps)
    xhat = zc * rstd[:, None]
    y = xhat * g[None, :] + beta[None, :]
    return xhat, rstd, y


@triton.jit
def _ln_relu_bwd(go, xhat, rstd, y, g, cmask, D: tl.constexpr):
    """Gradient of relu(LN(z)) w.r.t. z, and the ReLU-gated upstream gradient (for g, beta)."""
    dy = tl.where(y > 0.0, go, 0.0)
    dxh = dy * g[None, :]
    c1 = tl.sum(dxh, axis=1) / D
    c2 = tl.sum(dxh * xhat, axis=1) / D
    dz = (dxh - c1[:, None] - xhat * c2[:, None]) * rstd[:, None]
    return tl.where(cmask[None, :], dz, 0.0), dy


@triton.jit
def _deepset_fwd_kernel(
    xs_ptr, xn_ptr, dist_ptr, mask_ptr, p_ptr, h_ptr,
    N, eps,
    s_xs_b, s_xs_n, s_xn_b, s_xn_k, s_xn_n, s_d_b, s_d_k, s_m_b, s_m_k, s_h_b, s_h_n,
    K: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    b = wide(tl.program_id(1))  # b * batch stride passes 2^31 on large batches
    rows = tl.program_id(0) * BN + tl.arange(0, BN)
    rmask = rows < N
    cols = tl.arange(0, DP)
    cmask = cols < D
    w1s, b1s, g_s, be_s, wx, wd, b1n, g_n, be_n = _load_params(p_ptr, cols, DP)
    out_mask = rmask[:, None] & cmask[None, :]
    h_rows = h_ptr + b * s_h_b + rows[:, None] * s_h_n + cols[None, :]

    x = tl.load(xs_ptr + b * s_xs_b + rows * s_xs_n, mask=rmask, other=0.0).to(tl.float32)
    _, _, y = _ln_relu(x[:, None] * w1s[None, :] + b1s[None, :], g_s, be_s, cmask, D, eps)
    tl.store(h_rows, tl.maximum(y, 0.0).to(h_ptr.dtype.element_ty), mask=out_mask)

    acc = tl.zeros((BN, DP), dtype=tl.float32)
    for k in tl.static_range(K):
        if tl.load(mask_ptr + b * s_m_b + k * s_m_k) != 0:
            dk = tl.load(dist_ptr + b * s_d_b + k * s_d_k).to(tl.float32)
            xk = tl.load(xn_ptr + b * s_xn_b + k * s_xn_k + rows * s_xn_n, mask=rmask, other=0.0)
            z = xk.to(tl.float32)[:, None] * wx[None, :] + (dk * wd + b1n)[None, :]
            _, _, y = _ln_relu(z, g_n, be_n, cmask, D, eps)
            acc += tl.maximum(y, 0.0)
    tl.store(h_rows + D, acc.to(h_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _deepset_bwd_kernel(
    xs_ptr, xn_ptr, dist_ptr, mask_ptr, p_ptr, gh_ptr,
    gxs_ptr, gxn_ptr, gdist_ptr, gp_ptr,
    N, eps, n_blocks, n_split,
    s_xs_b, s_xs_n, s_xn_b, s_xn_k, s_xn_n, s_d_b, s_d_k, s_m_b, s_m_k, s_h_b, s_h_n,
    K: tl.constexpr, D: tl.constexpr, DP: tl.constexpr, BN: tl.constexpr,
):  # fmt: skip
    """Each program walks row blocks pid, pid + n_split, ... of one sample, accumulating the
    parameter gradients in registers; it writes one partial per parameter vector (summed on the
    host: deterministic, no atomics). Input gradients are written directly; the distance gradient
    as one partial per (sample, row block, neighbour)."""
    pid = tl.program_id(0)
    b = wide(tl.program_id(1))  # b * batch stride passes 2^31 on large batches
    cols = tl.arange(0, DP)
    cmask = cols < D
    w1s, b1s, g_s, be_s, wx, wd, b1n, g_n, be_n = _load_params(p_ptr, cols, DP)
    a_w1s = tl.zeros((DP,), dtype=tl.float32)
    a_b1s = tl.zeros((DP,), dtype=tl.float32)
    a_gs = tl.zeros((DP,), dtype=tl.float32)
    a_bes = tl.zeros((DP,), dtype=tl.float32)
    a_wx = tl.zeros((DP,), dtype=tl.float32)
    a_wd = tl.zeros((DP,), dtype=tl.float32)
    a_b1n = tl.zeros((DP,), dtype=tl.float32)
    a_gn = tl.zeros((DP,), dtype=tl.float32)
    a_ben = tl.zeros((DP,), dtype=tl.float32)
    for blk in range(pid, n_blocks, n_split):
        rows = blk * BN + tl.arange(0, BN)
        rmask = rows < N
        gmask = rmask[:, None] & cmask[None, :]
        gh_rows = gh_ptr + b * s_h_b + rows[:, None] * s_h_n + cols[None, :]

        x = tl.load(xs_ptr + b * s_xs_b + rows * s_xs_n, mask=rmask, other=0.0).to(tl.float32)
        xhat, rstd, y = _ln_relu(x[:, None] * w1s[None, :] + b1s[None, :], g_s, be_s, cmask, D, eps)
        go = tl.load(gh_rows, mask=gmask, other=0.0).to(tl.float32)
        dz, dy = _ln_relu_bwd(go, xhat, rstd, y, g_s, cmask, D)
        a_gs += tl.sum(dy * xhat, axis=0)
        a_bes += tl.sum(dy, axis=0)
        a_w1s += tl.sum(dz * x[:, None], axis=0)
        a_b1s += tl.sum(dz, axis=0)
        gx = tl.sum(dz * w1s[None, :], axis=1)
        tl.store(gxs_ptr + b * N + rows, gx.to(gxs_ptr.dtype.element_ty), mask=rmask)

        go = tl.load(gh_rows + D, mask=gmask, other=0.0).to(tl.float32)
        for k in tl.static_range(K):
            gxk_ptrs = gxn_ptr + (b * K + k) * N + rows
            gd_ptr = gdist_ptr + (b * n_blocks + blk) * K + k
            if tl.load(mask_ptr + b * s_m_b + k * s_m_k) != 0:
                dk = tl.load(dist_ptr + b * s_d_b + k * s_d_k).to(tl.float32)
                xk_ptrs = xn_ptr + b * s_xn_b + k * s_xn_k + rows * s_xn_n
                xk = tl.load(xk_ptrs, mask=rmask, other=0.0).to(tl.float32)
                z = xk[:, None] * wx[None, :] + (dk * wd + b1n)[None, :]
                xhat, rstd, y = _ln_relu(z, g_n, be_n, cmask, D, eps)
                dz, dy = _ln_relu_bwd(go, xhat, rstd, y, g_n, cmask, D)
                a_gn += tl.sum(dy * xhat, axis=0)
                a_ben += tl.sum(dy, axis=0)
                dzs = tl.sum(dz, axis=0)
                a_wx += tl.sum(dz * xk[:, None], axis=0)
                a_wd += dzs * dk
                a_b1n += dzs
                gxk = tl.sum(dz * wx[None, :], axis=1)
                tl.store(gxk_ptrs, gxk.to(gxn_ptr.dtype.element_ty), mask=rmask)
                tl.store(gd_ptr, tl.sum(dzs * wd, axis=0))
            else:
                tl.store(gxk_ptrs, tl.zeros((BN,), dtype=gxn_ptr.dtype.element_ty), mask=rmask)
                tl.store(gd_ptr, 0.0)
    gp = gp_ptr + (b * n_split + pid) * (9 * DP) + cols
    tl.store(gp + 0 * DP, a_w1s)
    tl.store(gp + 1 * DP, a_b1s)
    tl.store(gp + 2 * DP, a_gs)
    tl.store(gp + 3 * DP, a_bes)
    tl.store(gp + 4 * DP, a_wx)
    tl.store(gp + 5 * DP, a_wd)
    tl.store(gp + 6 * DP, a_b1n)
    tl.store(gp + 7 * DP, a_gn)
    tl.store(gp + 8 * DP, a_ben)


def _launch_config(d: int, n: int, block_rows: int | None, backward: bool) -> tuple[int, int, int]:
    """(padded width, rows per block, warps). Blocks hold whole rows (each LayerNorm needs all d
    columns; d is padded to a power of 2 and masked). Forward: warps grow with d so that the
    per-column parameter vectors stay small per thread, and a register tile holds about 32 fp32
    elements per thread. Backward: more live tiles (both branches' activations and gradients) and
    nine per-column accumulators, so 8 warps and about 4 elements per thread per tile: built for
    sm_90 this spills no registers up to d = 512 and spills least at d = 1,280, where none of
    4-16 warps and 1-16 rows avoids spills (``benchmarks/bench_kernels.py --compile-check``)."""
    dp = triton.next_power_of_2(d)
    warps, per_thread = (8, 4) if backward else (max(4, min(8, dp // 64)), 32)
    bn = block_rows or max(1, min(triton.next_power_of_2(n), per_thread * 32 * warps // dp))
    return dp, bn, warps


class _DeepSetHidden(torch.autograd.Function):
    """H = [relu(LN_s(self_in x)) | sum_k m_k relu(LN_n(nbr_in [x_k, dist_k]))], [B, N, 2d]."""

    @staticmethod
    def forward(ctx, x_self, x_nbr, dist, nbr_mask, out_dtype, eps, block_rows, *params):
        w1s, b1s, g_s, be_s, w1n, b1n, g_n, be_n = params
        bsz, n = x_self.shape
        k, d = x_nbr.shape[1], g_s.shape[0]
        dp, bn, warps = _launch_config(d, n, block_rows, backward=False)
        packed = torch.zeros(_N_PARAM_VECTORS, dp, device=x_self.device, dtype=torch.float32)
        vectors = (w1s[:, 0], b1s, g_s, be_s, w1n[:, 0], w1n[:, 1], b1n, g_n, be_n)
        for row, vec in enumerate(vectors):
            packed[row, :d] = vec.detach()
        mask = nbr_mask.to(torch.uint8)
        h = torch.empty(bsz, n, 2 * d, device=x_self.device, dtype=out_dtype)
        for name, t in (("x_nbr", x_nbr), ("H", h)):
            check_slice(f"DeepSetEncoder {name}", t.shape, t.stride(), batch_dims=1)
        _deepset_fwd_kernel[(triton.cdiv(n, bn), bsz)](
            x_self, x_nbr, dist, mask, packed, h, n, eps,
            *x_self.stride(), *x_nbr.stride(), *dist.stride(), *mask.stride(), *h.stride()[:2],
            K=k, D=d, DP=dp, BN=bn, num_warps=warps,
        )  # fmt: skip
        ctx.save_for_backward(x_self, x_nbr, dist, mask, packed)
        ctx.config = (eps, block_rows, d)
        return h

    @staticmethod
    def backward(ctx, grad_h):
        x_self, x_nbr, dist, mask, packed = ctx.saved_tensors
        eps, block_rows, d = ctx.config
        bsz, n = x_self.shape
        k = x_nbr.shape[1]
        dp, bn, warps = _launch_config(d, n, block_rows, backward=True)
        n_blocks = triton.cdiv(n, bn)
        if x_self.is_cuda:
            sms = torch.cuda.get_device_properties(x_self.device).multi_processor_count
            n_split = min(n_blocks, max(1, triton.cdiv(4 * sms, bsz)))
        else:
            n_split = min(n_blocks, 2)
        grad_h = grad_h.contiguous()
        g_xs = torch.empty(bsz, n, device=x_self.device, dtype=x_self.dtype)
        g_xn = torch.empty(bsz, k, n, device=x_self.device, dtype=x_nbr.dtype)
        g_dist = torch.empty(bsz, n_blocks, k, device=x_self.device, dtype=torch.float32)
        g_p = torch.empty(bsz, n_split, _N_PARAM_VECTORS, dp, device=x_self.device)
        _deepset_bwd_kernel[(n_split, bsz)](
            x_self, x_nbr, dist, mask, packed, grad_h, g_xs, g_xn, g_dist, g_p,
            n, eps, n_blocks, n_split,
            *x_self.stride(), *x_nbr.stride(), *dist.stride(), *mask.stride(),
            *grad_h.stride()[:2],
            K=k, D=d, DP=dp, BN=bn, num_warps=warps,
        )  # fmt: skip
        g = g_p.sum(dim=(0, 1))[:, :d]
        w1n = torch.stack([g[4], g[5]], dim=1)
        params = (g[0, :, None], g[1], g[2], g[3], w1n, g[6], g[7], g[8])
        g_dist = g_dist.sum(dim=1).to(dist.dtype)
        return g_xs, g_xn, g_dist, None, None, None, None, *params


class DeepSetEncoder(DeepSetEncoderReference):
    """The encoder with the fused Triton path; same parameters and state_dict as the reference.

    The fused path runs where `use_triton` says so and the compute dtype is fp32, fp16 or bf16;
    it computes in fp32 internally and rounds only H (stored in the compute dtype) and the GEMM.
    With dropout active (training mode and p > 0) it runs the reference, since the fused path has
    no dropout masks to recompute. `block_rows` overrides the rows per kernel block (tuning, tests).
    """

    block_rows: int | None = None

    def forward(
        self, x_self: torch.Tensor, x_nbr: torch.Tensor, dist: torch.Tensor, nbr_mask: torch.Tensor
    ) -> torch.Tensor:
        dtype = self.compute_dtype(x_self.device)
        if (
            not use_triton(x_self, x_nbr, dist, nbr_mask, self.self_in.weight)
            or dtype not in (torch.float32, torch.float16, torch.bfloat16)
            or (self.training and self.dropout.p > 0)
        ):
            return super().forward(x_self, x_nbr, dist, nbr_mask)
        check_inputs(x_self, x_nbr, dist, nbr_mask)
        h = _DeepSetHidden.apply(
            x_self, x_nbr, dist, nbr_mask, dtype, self.self_norm.eps, self.block_rows,
            self.self_in.weight, self.self_in.bias, self.self_norm.weight, self.self_norm.bias,
            self.nbr_in.weight, self.nbr_in.bias, self.nbr_norm.weight, self.nbr_norm.bias,
        )  # fmt: skip
        a, bias_self, bias_nbr = self._folded()
        n_nbr = nbr_mask.sum(dim=1, dtype=torch.float32)
        bias = bias_self + n_nbr[:, None] * bias_nbr  # [B, d]
        return torch.matmul(h, a.to(dtype).t()) + bias.to(dtype)[:, None, :]

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A = [Wo_s W2s, Wo_n W2n] ([d, 2d]), Wo_s b2s + bo, Wo_n b2n; in fp32, differentiable."""
        d = self.d_model
        with torch.autocast(self.proj.weight.device.type, enabled=False):
            wo = self.proj.weight.float()
            wo_s, wo_n = wo[:, :d], wo[:, d:]
            a = torch.cat(
                [wo_s @ self.self_out.weight.float(), wo_n @ self.nbr_out.weight.float()], dim=1
            )
            bias_self = wo_s @ self.self_out.bias.float() + self.proj.bias.float()
            bias_nbr = wo_n @ self.nbr_out.bias.float()
        return a, bias_self, bias_nbr
