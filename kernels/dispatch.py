"""Where a kernel call runs: Triton on CUDA tensors (and on CPU under TRITON_INTERPRET=1)."""

import os

import torch


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def use_triton(*tensors: torch.Tensor) -> bool:
    """True when the fused kernels should run for these tensors, False for the PyTorch reference."""
    if all(t.is_cuda for t in tensors):
        return True
    return triton_interpreting() and not any(t.is_cuda for t in tensors)
