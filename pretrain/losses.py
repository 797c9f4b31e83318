"""The pretraining objectives: ZINB denoising likelihood, masked hierarchical classification,
and InfoNCE between two views with negatives gathered (differentiably) from every rank."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pretrain.distributed import all_gather_with_grad, rank


def zinb_nll(
    x: torch.Tensor,
    mean: torch.Tensor,
    theta: torch.Tensor,
    pi_logit: torch.Tensor,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Elementwise negative log-likelihood of counts ``x`` under a zero-inflated negative binomial.

    ``mean`` > 0 and ``theta`` > 0 (inverse dispersion) parametrise the NB; the zero-inflation
    probability is ``sigmoid(pi_logit)``. Written with softplus / log-sum forms so that neither
    tiny means nor large logits overflow; computed in float32 at least.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, mean, theta, pi_logit = (t.to(dtype) for t in (x, mean, theta, pi_logit))
    log_theta_mean = torch.log(theta + mean + eps)
    # log NB(0) = theta * (log theta - log(theta + mean)); the zero case mixes it with pi.
    log_nb_zero = theta * (torch.log(theta + eps) - log_theta_mean)
    log_not_pi = -F.softplus(pi_logit)  # log(1 - sigmoid(pi_logit)) = -softplus(pi_logit)
    log_zero = F.softplus(-pi_logit + log_nb_zero) - F.softplus(-pi_logit)
    log_nonzero = (
        log_not_pi
        + log_nb_zero
        + x * (torch.log(mean + eps) - log_theta_mean)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1.0)
    )
    return -torch.where(x > 0, log_nonzero, log_zero)


def hierarchy_children(hierarchy: dict, n_labels: int) -> torch.Tensor:
    """Bool [n_labels, n_labels]: row p marks the leaves under parent label p (empty for leaves).

    ``hierarchy`` maps a parent label id (int or its string form, as JSON gives it) to its leaf ids.
    """
    children = torch.zeros(n_labels, n_labels, dtype=torch.bool, device="cpu")
    for parent, leaves in hierarchy.items():
        p = int(parent)
        if not 0 <= p < n_labels or not leaves:
            raise ValueError(f"label hierarchy: parent {parent!r} out of range or without leaves")
        idx = torch.as_tensor([int(v) for v in leaves], dtype=torch.long)
        if idx.min() < 0 or idx.max() >= n_labels:
            raise ValueError(f"label hierarchy: a leaf of parent {p} is outside [0, {n_labels})")
        children[p, idx] = True
    if (children.any(1) & children.any(0)).any():
        raise ValueError("label hierarchy: a label is both a parent and a leaf (give leaves only)")
    return children


def parent_logits(logits: torch.Tensor, children: torch.Tensor) -> torch.Tensor:
    """Logits with each parent label's column replaced by logsumexp over its leaves' logits.

    Computed as a matmul of shifted exponentials in float64 (no [B, parents, labels] tensor),
    over every column and then selected, so no parent index list (a ``nonzero()``, a host sync)
    is needed; leaf columns keep their logits.
    """
    is_parent = children.any(1)
    top = logits.detach().max(1, keepdim=True).values
    summed = torch.exp((logits - top).double()) @ children.T.double()
    lse = (torch.log(torch.where(is_parent, summed, 1.0)) + top).to(logits.dtype)
    return torch.where(is_parent, lse, logits)


def _one_hot(y: torch.Tensor, n: int) -> torch.Tensor:
    """Bool [B, n]; unlike F.one_hot it does not check the range of ``y`` (a host sync)."""
    return y.unsqueeze(1) == torch.arange(n, device=y.device)


def classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, children: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over labelled cells of the mean BCE over the supervised label terms of each cell.

    labels: int64 [B], -1 = unknown (the cell contributes nothing, not even a gradient). A leaf
    label supervises every leaf logit (one-hot). A parent label (row of ``children``) supervises
    ``logsumexp`` of its leaves' logits as positive and every other leaf as negative; its own
    leaves get weight 0, since which of them is right is unknown. Parent columns are never
    targets themselves.
    """
    n = logits.shape[-1]
    logits = logits.float()
    known = labels >= 0
    y = labels.clamp(min=0)
    if children is None:
        leaf_col = torch.ones(n, dtype=torch.bool, device=logits.device)
        below = torch.zeros_like(logits, dtype=torch.bool)
    else:
        leaf_col = ~children.any(1)
        below = children[y]  # [B, n] leaves under the cell's label (none for a leaf label)
    is_parent_row = below.any(1) & known
    target = _one_hot(y, n).to(logits.dtype) * (~is_parent_row).unsqueeze(1)
    weight = (leaf_col.unsqueeze(0) & ~below & known.unsqueeze(1)).to(logits.dtype)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    # Rows without a parent label take the lse over all columns (finite, then discarded) so that
    # no all -inf row puts NaN into the backward pass.
    pool = below | ~is_parent_row.unsqueeze(1)
    lse = torch.logsumexp(logits.masked_fill(~pool, float("-inf")), dim=-1)
    parent_term = torch.where(is_parent_row, F.softplus(-lse), torch.zeros_like(lse))
    per_cell = ((bce * weight).sum(1) + parent_term) / (weight.sum(1) + is_parent_row).clamp(min=1)
    return (per_cell * known).sum() / known.sum().clamp(min=1)


def softmax_classification_loss(
    logits: torch.Tensor, labels: torch.Tensor, children: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over labelled cells of the cross-entropy of the cell's label among the leaf labels.

    labels: int64 [B], -1 = unknown (no loss, no gradient). A leaf label's term is
    ``-log softmax(leaf logits)[label]``; a parent label (row of ``children``) supervises the
    probability of its leaves together, ``-log sum_{leaf under it} softmax(leaf logits)``.
    Parent columns never enter the softmax. Why not the reference's per-label BCE: averaged over
    n labels, the positive label's gradient is 1/n of the loss (a 13-type class gave the heads
    almost nothing to learn from; docs/benchmarks/learning.md), while the softmax puts the whole
    gradient on telling the right label from the others.
    """
    logits = logits.float()
    known = labels >= 0
    y = labels.clamp(min=0)
    if children is None:
        nll = -torch.log_softmax(logits, -1).gather(1, y[:, None]).squeeze(1)
    else:
        leaves = logits.masked_fill(children.any(1), float("-inf"))
        # the leaves a cell's label covers: those under a parent label, or the leaf label itself
        target = children[y] | (_one_hot(y, logits.shape[-1])
                                & ~children[y].any(1, keepdim=True))
        nll = torch.logsumexp(leaves, -1) - torch.logsumexp(
            leaves.masked_fill(~target, float("-inf")), -1)
    return torch.where(known, nll, 0).sum() / known.sum().clamp(min=1)


def info_nce(a: torch.Tensor, b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric InfoNCE: row i of ``a`` and of ``b`` are two views of the same cell.

    Negatives are every other cell of every rank: both sides are gathered with a differentiable
    all-gather, so other ranks' embeddings receive gradient too. Each rank passes the same n.
    """
    a = F.normalize(a.float(), dim=-1)
    b = F.normalize(b.float(), dim=-1)
    a_all, b_all = all_gather_with_grad(a), all_gather_with_grad(b)
    target = torch.arange(a.shape[0], device=a.device) + rank() * a.shape[0]
    loss_ab = _cross_entropy(a @ b_all.T / temperature, target)
    loss_ba = _cross_entropy(b @ a_all.T / temperature, target)
    return (loss_ab + loss_ba) / 2


def _cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy as log-softmax and a gather: F.cross_entropy's CUDA NLL kernel has no
    deterministic mode (torch refuses it under the trainer's --deterministic)."""
    return -torch.log_softmax(logits, -1).gather(1, target[:, None]).mean()
