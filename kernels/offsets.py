"""int64 addressing for the Triton kernels.

Triton computes ``index * stride`` in the index's type, int32 for program ids and ``tl.arange``:
past 2^31 elements the product wraps and the kernel reads or writes the wrong memory. The fused
qkv buffer of the large preset at N = 3,200 genes holds 3 x 1,280 x 3,200 = 12.3M elements per
cell, so a batch of 175 cells already passes 2^31. The kernels therefore widen the batch, head
and split indices before multiplying; offsets inside one (batch, head) slice stay int32 and the
wrappers check that each slice spans fewer than 2^31 elements.
"""

import triton
import triton.language as tl

INT32_LIMIT = 2**31


@triton.jit
def wide(i):
    """An index as int64, so that index * stride cannot wrap at 2^31."""
    return i.to(tl.int64)


@triton.jit
def bh_offset(b, s_b, h, s_h):
    """``b * s_b + h * s_h`` in int64: the start of one (batch, head) slice."""
    return wide(b) * s_b + wide(h) * s_h


def check_slice(name: str, shape, strides, batch_dims: int) -> None:
    """Raise if one slice below the first ``batch_dims`` dims spans 2^31 elements or more."""
    extent = 1 + sum((n - 1) * s for n, s in zip(shape[batch_dims:], strides[batch_dims:]))
    if extent >= INT32_LIMIT:
        raise ValueError(f"{name}: one slice of a {tuple(shape)} tensor spans {extent} elements "
                         f"(>= 2^31); the kernels index within a slice in int32")
