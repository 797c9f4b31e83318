"""int64 addressing of the Triton kernels at sizes past 2^31 elements, without allocating them.

The kernels form the start of each (batch, head) slice with kernels.offsets; a probe kernel runs
those helpers in the interpreter (numpy int32 arithmetic wraps exactly as a GPU's does) on the
largest real address of the large preset's fused qkv buffer, beside the int32 product they
replace, which must wrap: that control shows the check would catch an int32 offset.
"""

import pytest
import torch
import triton
import triton.language as tl

from kernels.offsets import INT32_LIMIT, bh_offset, check_slice, wide
from pretrain.model import ModelConfig


@triton.jit
def _probe(OUT, b, s_b, h, s_h, pid_s, s_s):
    tl.store(OUT + 0, bh_offset(b, s_b, h, s_h))
    tl.store(OUT + 1, wide(pid_s) * s_s + bh_offset(b, s_b, h, s_h))
    tl.store(OUT + 2, b * s_b + h * s_h)  # the int32 arithmetic the kernels used before


def _qkv_strides(cfg: ModelConfig, n: int) -> tuple[int, int]:
    """Batch and head strides of q as the model views its fused [B, N, 3 d] qkv projection."""
    qkv = torch.empty(1, n, 3 * cfg.d_model, device="meta")
    q = qkv.view(1, n, 3, cfg.n_heads, -1).permute(2, 0, 3, 1, 4)[0]
    return q.stride(0), q.stride(1)


def test_slice_starts_are_int64_past_2_31():
    cfg = ModelConfig.preset("large")
    s_b, s_h = _qkv_strides(cfg, 3200)
    first_wrapping = -(-INT32_LIMIT // s_b)  # the first batch row whose start passes 2^31
    assert 170 < first_wrapping < 180  # "from about 175 cells per batch"
    b, h = 2 * first_wrapping, cfg.n_heads - 1
    exact = b * s_b + h * s_h
    assert exact >= INT32_LIMIT
    out = torch.zeros(3, dtype=torch.int64)
    _probe[(1,)](out, b, s_b, h, s_h, 7, s_b * 4096)
    assert out[0].item() == exact
    assert out[1].item() == 7 * s_b * 4096 + exact  # the split stride is an int64 argument
    wrapped = (exact + 2**31) % 2**32 - 2**31
    assert out[2].item() == wrapped != exact  # int32 products do wrap here


def test_slices_past_int32_are_refused():
    check_slice("x", (4, 8, 1000, 64), (8 * 1000 * 64, 1000 * 64, 64, 1), batch_dims=2)
    with pytest.raises(ValueError, match="spans .* elements"):
        check_slice("criss_cross_attention", (1, 1, 2**25, 64), (2**31, 2**31, 64, 1),
                    batch_dims=2)
