"""The objectives against hand-written float64 formulas, and the cross-rank gradient of InfoNCE."""

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from scipy.special import gammaln

from pretrain.distributed import all_gather_with_grad
from pretrain.losses import (
    classification_loss,
    hierarchy_children,
    info_nce,
    parent_logits,
    softmax_classification_loss,
    zinb_nll,
)


def zinb_nll_direct(x, mu, theta, pi_logit):
    """-log P(x) of the ZINB written the textbook way, float64."""
    pi = 1 / (1 + np.exp(-pi_logit))
    log_nb = (gammaln(x + theta) - gammaln(theta) - gammaln(x + 1)
              + theta * np.log(theta / (theta + mu)) + x * np.log(mu / (theta + mu)))
    p = np.where(x == 0, pi + (1 - pi) * np.exp(log_nb), (1 - pi) * np.exp(log_nb))
    return -np.log(p)


def test_zinb_nll_matches_direct_formula_for_zero_and_nonzero_counts():
    rng = np.random.default_rng(0)
    n = 400
    x = np.where(rng.random(n) < 0.4, 0.0, rng.integers(1, 60, n)).astype(np.float64)
    mu = rng.uniform(0.05, 40, n)
    theta = rng.uniform(0.1, 30, n)
    pi_logit = rng.uniform(-4, 4, n)
    want = zinb_nll_direct(x, mu, theta, pi_logit)
    got = zinb_nll(*(torch.tensor(a, dtype=torch.float64) for a in (x, mu, theta, pi_logit)),
                   eps=0.0)
    assert (x == 0).sum() > 100 and (x > 0).sum() > 100
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-10)
    got32 = zinb_nll(*(torch.tensor(a, dtype=torch.float32) for a in (x, mu, theta, pi_logit)))
    np.testing.assert_allclose(got32.numpy(), want, rtol=1e-4, atol=1e-4)


def test_zinb_nll_is_finite_with_finite_gradients_at_extremes():
    x = torch.tensor([0.0, 0.0, 1.0, 5000.0, 0.0, 3.0])
    mu = torch.tensor([1e-9, 1e4, 1e-9, 1.0, 1e-3, 2.0], requires_grad=True)
    theta = torch.tensor([math.exp(-15), math.exp(15), 1.0, 1e-3, 1.0, 1.0], requires_grad=True)
    pi_logit = torch.tensor([40.0, -40.0, 40.0, -40.0, 0.0, -80.0], requires_grad=True)
    nll = zinb_nll(x, mu, theta, pi_logit)
    nll.sum().backward()
    assert torch.isfinite(nll).all()
    for t in (mu, theta, pi_logit):
        assert torch.isfinite(t.grad).all()
    # pi -> 1 makes a zero certain (nll -> 0) and a nonzero count (nearly) impossible.
    assert nll[0] < 1e-6 and nll[2] > 30


def classification_direct(logits, labels, parents):
    """Per-cell mean of the supervised BCE terms, mean over labelled cells, float64 loops."""
    logits = logits.double().numpy()
    n = logits.shape[1]
    leaves = [j for j in range(n) if j not in parents]
    bce = lambda z, t: -(t * math.log(1 / (1 + math.exp(-z)))
                         + (1 - t) * math.log(1 - 1 / (1 + math.exp(-z))))
    per_cell = []
    for row, y in zip(logits, labels.tolist()):
        if y < 0:
            continue
        terms = []
        if y in parents:
            lse = math.log(sum(math.exp(row[j]) for j in parents[y]))
            terms.append(bce(lse, 1.0))
            terms += [bce(row[j], 0.0) for j in leaves if j not in parents[y]]
        else:
            terms += [bce(row[j], float(j == y)) for j in leaves]
        per_cell.append(sum(terms) / len(terms))
    return sum(per_cell) / len(per_cell)


def hierarchy_case():
    """7 labels, two parents (5 over 0-2, 6 over 3-4), 9 cells of leaf, parent and unknown
    labels: (parents, children matrix, float64 logits, labels)."""
    torch.manual_seed(0)
    parents = {5: [0, 1, 2], 6: [3, 4]}
    children = hierarchy_children({str(k): v for k, v in parents.items()}, 7)
    logits = torch.randn(9, 7, dtype=torch.float64) * 3
    return parents, children, logits, torch.tensor([0, 3, -1, 5, 6, 2, -1, 4, 5])


def test_classification_loss_matches_direct_formula_with_unknowns_and_parents():
    parents, children, logits, labels = hierarchy_case()
    got = classification_loss(logits, labels, children)
    assert got.item() == pytest.approx(classification_direct(logits, labels, parents), rel=1e-6)
    flat = classification_loss(logits, labels.clamp(max=4))
    assert flat.item() == pytest.approx(
        classification_direct(logits, labels.clamp(max=4), {}), rel=1e-6)


def test_unknown_labels_give_zero_gradient():
    logits = torch.randn(4, 5, requires_grad=True)
    labels = torch.tensor([-1, 2, -1, 0])
    children = hierarchy_children({4: [0, 1]}, 5)
    classification_loss(logits, labels, children).backward()
    assert torch.equal(logits.grad[[0, 2]], torch.zeros(2, 5))
    assert logits.grad[[1, 3]].abs().sum() > 0
    # A parent label's leaves get no leaf-wise push, only through their logsumexp.
    logits.grad = None
    classification_loss(logits, torch.tensor([4, -1, -1, -1]), children).backward()
    assert torch.isfinite(logits.grad).all() and logits.grad[0, 4] == 0
    all_unknown = torch.full((4,), -1)
    logits.grad = None
    loss = classification_loss(logits, all_unknown, children)
    loss.backward()
    assert loss.item() == 0 and torch.equal(logits.grad, torch.zeros(4, 5))


def softmax_direct(logits, labels, parents):
    """Mean over known cells of -log P(label): softmax over leaves, a parent's P = sum of its
    leaves' P, written with plain exponentials in float64."""
    n = logits.shape[1]
    leaves = [j for j in range(n) if j not in parents]
    terms = []
    for row, y in zip(logits.tolist(), labels.tolist()):
        if y < 0:
            continue
        z = sum(math.exp(row[j]) for j in leaves)
        covered = parents.get(y, [y])
        terms.append(-math.log(sum(math.exp(row[j]) for j in covered) / z))
    return sum(terms) / len(terms)


def test_softmax_classification_loss_matches_direct_formula_and_masks_unknowns():
    parents, children, logits, labels = hierarchy_case()
    logits.requires_grad_()
    n = logits.shape[1]
    got = softmax_classification_loss(logits, labels, children)
    assert got.item() == pytest.approx(softmax_direct(logits, labels, parents), rel=1e-6)
    flat = softmax_classification_loss(logits, labels.clamp(max=4))
    assert flat.item() == pytest.approx(softmax_direct(logits, labels.clamp(max=4), {}), rel=1e-6)
    got.backward()
    assert torch.equal(logits.grad[[2, 6]], torch.zeros(2, n, dtype=torch.float64))
    assert torch.isfinite(logits.grad).all()
    assert torch.equal(logits.grad[:, 5:], torch.zeros(9, 2, dtype=torch.float64))  # parents
    # The right label's gradient is the whole error, not 1/n of it as in the per-label BCE.
    one = torch.zeros(1, 13, requires_grad=True)
    softmax_classification_loss(one, torch.tensor([4])).backward()
    assert one.grad[0, 4].item() == pytest.approx(1 / 13 - 1)
    all_unknown = softmax_classification_loss(logits, torch.full((9,), -1), children)
    assert all_unknown.item() == 0


def test_hierarchy_validation_and_parent_logits():
    with pytest.raises(ValueError, match="out of range"):
        hierarchy_children({9: [0]}, 5)
    with pytest.raises(ValueError, match="both a parent and a leaf"):
        hierarchy_children({3: [0, 1], 4: [3]}, 5)
    children = hierarchy_children({3: [0, 1], 4: [2]}, 5)
    logits = torch.randn(3, 5) * 50
    out = parent_logits(logits, children)
    torch.testing.assert_close(out[:, 3], torch.logsumexp(logits[:, :2], 1))
    torch.testing.assert_close(out[:, 4], logits[:, 2])
    torch.testing.assert_close(out[:, :3], logits[:, :3])


def test_info_nce_single_process_matches_formula():
    torch.manual_seed(0)
    a, b = torch.randn(6, 8, dtype=torch.float64), torch.randn(6, 8, dtype=torch.float64)
    t = 0.2
    an, bn = a / a.norm(dim=1, keepdim=True), b / b.norm(dim=1, keepdim=True)
    sim = (an @ bn.T).numpy() / t
    lse_rows = np.log(np.exp(sim).sum(1))
    lse_cols = np.log(np.exp(sim).sum(0))
    want = ((lse_rows - np.diag(sim)).mean() + (lse_cols - np.diag(sim)).mean()) / 2
    assert info_nce(a, b, t).item() == pytest.approx(want, rel=1e-6)
    # Matching pairs score better than shuffled ones.
    assert info_nce(a, a + 0.01 * b, t) < info_nce(a, b, t)


def _gather_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        torch.manual_seed(0)
        a_all, b_all = torch.randn(world * 3, 4), torch.randn(world * 3, 4)
        a = a_all[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
        b = b_all[rank * 3 : (rank + 1) * 3].clone().requires_grad_()
        gathered = all_gather_with_grad(a)
        assert torch.equal(gathered.detach(), a_all)
        info_nce(a, b, 0.5).backward()
        torch.save({"a": a.grad, "b": b.grad}, Path(out_dir) / f"grad{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_all_gather_gives_gradient_to_other_ranks_embeddings():
    """Two gloo ranks: each rank's gradient equals that of the sum of both ranks' losses."""
    world = 2
    with tempfile.TemporaryDirectory() as tmp:
        mp.start_processes(_gather_worker, args=(world, str(Path(tmp) / "init"), tmp),
                           nprocs=world, start_method="spawn")
        grads = [torch.load(Path(tmp) / f"grad{r}.pt") for r in range(world)]
    torch.manual_seed(0)
    a_all = torch.randn(world * 3, 4).requires_grad_()
    b_all = torch.randn(world * 3, 4).requires_grad_()
    target = torch.arange(world * 3)
    an, bn = F.normalize(a_all, dim=1), F.normalize(b_all, dim=1)
    # Sum over ranks of each rank's mean loss = (sum over all rows) / rows per rank.
    total = (F.cross_entropy(an @ bn.T / 0.5, target, reduction="sum")
             + F.cross_entropy(bn @ an.T / 0.5, target, reduction="sum")) / 2 / 3
    total.backward()
    torch.testing.assert_close(torch.cat([g["a"] for g in grads]), a_all.grad)
    torch.testing.assert_close(torch.cat([g["b"] for g in grads]), b_all.grad)
    # Without the cross-rank sum (a detached gather) rank 0 would miss rank 1's loss terms.
    an0, bn0 = F.normalize(a_all[:3], dim=1), F.normalize(b_all[:3], dim=1)
    local = torch.autograd.grad(
        (F.cross_entropy(an0 @ bn.detach().T / 0.5, target[:3])
         + F.cross_entropy(bn0 @ an.detach().T / 0.5, target[:3])) / 2, a_all)[0]
    assert (local[:3] - a_all.grad[:3]).abs().max() > 1e-3
