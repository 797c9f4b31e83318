"""Peak CUDA memory of one call, shared by the kernel benchmarks."""

import torch


def peak_mib(fn) -> float:
    """MiB allocated at the peak of ``fn()`` above what was allocated before it."""
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20
