"""Fused Triton kernels for the model's two hot spots, each beside its PyTorch reference.

On CUDA tensors the Triton kernels run; on CPU tensors the reference runs, except under
``TRITON_INTERPRET=1`` where the Triton kernels run through the interpreter (how tests use them).
"""

from kernels.criss_cross import criss_cross_attention, reference_criss_cross_attention
from kernels.deepset import DeepSetEncoder, DeepSetEncoderReference

__all__ = [
    "criss_cross_attention",
    "reference_criss_cross_attention",
    "DeepSetEncoder",
    "DeepSetEncoderReference",
]
