"""Rank helpers, device-placed collectives for metrics, and a differentiable all-gather for
losses that compare samples across ranks.

NCCL reduces only tensors on the rank's GPU ("No backend type associated with device type cpu"),
gloo those on the CPU: ``sum_across_ranks`` and ``gather_across_ranks`` take the device the
process group serves (the engine's device) and put their tensor there, so the same call works
under both.

``torch.distributed.all_gather`` returns tensors detached from the graph, so a contrastive loss
built on them gives no gradient to the other ranks' embeddings (the reference system's defect).
``all_gather_with_grad`` fixes that: in the backward pass every rank's gradient with respect to
the gathered tensor is summed across ranks (one all-reduce, which every backend including gloo
supports) and each rank keeps the slice that belongs to its own input.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def sum_across_ranks(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Elementwise sum over ranks of ``values`` (any shape), computed on ``device``.

    Returns a new tensor on ``device`` (the input is not modified); read it once with
    ``.tolist()``. Without a process group: a copy of ``values``.
    """
    total = values.detach().to(device=device, copy=True)
    if is_distributed():
        dist.all_reduce(total)
    return total


def gather_across_ranks(values: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """[world, *values.shape]: every rank's ``values`` in rank order, on ``device``."""
    mine = values.detach().to(device=device, copy=True)
    if not is_distributed():
        return mine.unsqueeze(0)
    parts = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, mine)
    return torch.stack(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """Concatenate every rank's ``x`` along dim 0; the backward sums gradients across ranks."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
        ctx.n = x.shape[0]
        ctx.rank = dist.get_rank()
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[n, ...] on each rank -> [world * n, ...] in rank order, differentiable for every rank.

    All ranks must pass the same shape. With one process (or no process group) returns ``x``.
    The summed backward matches data-parallel training, where the optimiser averages the ranks'
    gradients: the result is the gradient of the mean of the ranks' losses.
    """
    if world_size() == 1:
        return x
    return _AllGatherWithGrad.apply(x)
