"""Rank helpers and a differentiable all-gather for losses that compare samples across ranks.

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
