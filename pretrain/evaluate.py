"""Held-out evaluation: how well the model denoises and classifies cells it never trained on.

Reconstruction quality is the Pearson correlation of predicted vs true log2(1 + count) in three
scopes of gene positions (RECON_SCOPES): every context gene (the profile the model gives back);
the genes whose corrupted input is 0 (dropped to 0 or truly 0: the zeros a denoiser must fill or
keep); and the positions the corruption changed (dropped counts, and every gene of a fully
zeroed cell). The first two are chosen by what the model sees; the last by the truth: every
count there was dropped, so it rewards ignoring the input (a 0 in the input is most often a
true 0, and this scope keeps only the zeros where that evidence misleads) and, read alone, it
prefers a model that leans on its neighbours over one that reads the cell
(docs/benchmarks/quality.md).
Classification reports accuracy and macro-F1 per metadata class over the cells whose label is
known. Every statistic is a sum, so ranks all-reduce them once and every rank gets the same
metrics; each rank runs the same number of forward passes (ZeRO-3 gathers parameters inside
``forward``, a collective).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch

from data_prep.shard_format import CLASSES
from pretrain.distributed import sum_across_ranks

# where reconstruction is scored: the eval/recon_pearson/<scope> tags (module docstring)
RECON_SCOPES = ("context", "input_zero", "dropped")


def to_device(batch: dict, device: torch.device | str) -> dict:
    """The batch's tensors on ``device`` (asynchronous from pinned memory); other values as is."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


class EvalAccumulator:
    """Sufficient statistics of the metrics, summed over batches and then over ranks.

    Every statistic lives on ``device`` (the model's) and ``add`` reads nothing back to the
    host: no boolean indexing, no ``float()``, no data-dependent branch. The host sees the sums
    once, in ``metrics``.
    """

    def __init__(self, n_labels: dict[str, int], device: torch.device | str = "cpu"):
        self.device = torch.device(device)
        self.n_labels = {c: n for c, n in n_labels.items() if n > 0}
        f64 = dict(dtype=torch.float64, device=self.device)
        # per scope: n, sum x, sum y, sum xx, sum yy, sum xy over its positions (x = pred,
        # y = true)
        self.recon = torch.zeros(len(RECON_SCOPES), 6, **f64)
        # per class: [true positives, predicted count, true count] per label id
        self.cls = {c: torch.zeros(3, n, **f64) for c, n in self.n_labels.items()}
        self.loss_sums: dict[str, torch.Tensor] = {}
        self.n_batches = 0

    def add(self, batch: dict[str, torch.Tensor], out: dict) -> None:
        """One batch; ``batch`` and ``out`` must be on the accumulator's device."""
        self.n_batches += 1
        for name, value in [("loss", out["loss"]), *sorted(out.get("losses", {}).items())]:
            total = self.loss_sums.get(name, torch.zeros((), dtype=torch.float64,
                                                          device=self.device))
            self.loss_sums[name] = total + value.detach().double()
        context = batch["gene_mask"]
        dropped = (batch["input_counts"] != batch["counts"]) | batch["zeroed"][:, None]
        w = torch.stack([context, context & (batch["input_counts"] == 0),
                         context & dropped]).flatten(1).double()  # [scope, position]
        # zero outside the context: a row without genes predicts NaN there, and 0 * NaN is NaN
        x = torch.where(context, torch.log2(1 + out["pred_mean"].detach().float()), 0)
        y = torch.where(context, torch.log2(1 + batch["counts"].float()), 0)
        x, y = x.flatten().double(), y.flatten().double()
        self.recon += torch.stack([w.sum(1), w @ x, w @ y, w @ (x * x), w @ (y * y),
                                   w @ (x * y)], dim=1)
        for c, stats in self.cls.items():
            logits = out.get("class_logits", {}).get(c)
            if logits is None:
                continue
            n = stats.shape[1]
            y_true = batch["labels"][:, CLASSES.index(c)]
            known = ((y_true >= 0) & (y_true < logits.shape[1])).double()
            y_pred = logits.detach().argmax(-1)
            y_true = y_true.clamp(0, n - 1)
            stats[0].scatter_add_(0, y_true, known * (y_pred == y_true))
            stats[1].scatter_add_(0, y_pred.clamp(max=n - 1), known)
            stats[2].scatter_add_(0, y_true, known)

    def all_reduce(self) -> None:
        """Sum every statistic over ranks, on the accumulator's device (NCCL or gloo alike)."""
        names = sorted(self.loss_sums)
        count = torch.tensor([float(self.n_batches)], dtype=torch.float64, device=self.device)
        flat = torch.cat([self.recon.flatten(), *[self.loss_sums[k].view(1) for k in names],
                          count, *[self.cls[c].flatten() for c in sorted(self.cls)]])
        flat = sum_across_ranks(flat, self.device)
        size = self.recon.numel()
        self.recon, flat = flat[:size].view(self.recon.shape), flat[size:]
        self.loss_sums = dict(zip(names, flat[: len(names)]))
        self.n_batches = round(float(flat[len(names)]))
        flat = flat[len(names) + 1:]
        for c in sorted(self.cls):
            size = self.cls[c].numel()
            self.cls[c], flat = flat[:size].view(3, -1), flat[size:]

    def metrics(self) -> dict[str, float]:
        """Scalar metrics keyed by TensorBoard tag (classes without known labels are left out)."""
        m = {f"eval/{k}": float(v) / max(self.n_batches, 1) for k, v in self.loss_sums.items()}
        for scope, (n, sx, sy, sxx, syy, sxy) in zip(RECON_SCOPES, self.recon.tolist()):
            if n > 1:
                cov = sxy / n - sx * sy / n**2
                var = (sxx / n - (sx / n) ** 2) * (syy / n - (sy / n) ** 2)
                m[f"eval/recon_pearson/{scope}"] = cov / var**0.5 if var > 0 else 0.0
        for c, stats in self.cls.items():
            tp, pred, true = stats.cpu()
            if true.sum() == 0:
                continue
            m[f"eval/{c}_accuracy"] = float(tp.sum() / true.sum())
            support = true > 0
            f1 = 2 * tp[support] / (pred[support] + true[support])
            m[f"eval/{c}_macro_f1"] = float(f1.mean())
        return m


def evaluate(forward: Callable[[dict], dict], batches: Iterable[dict[str, torch.Tensor]],
             n_labels: dict[str, int], n_batches: int,
             device: torch.device | str = "cpu") -> dict[str, float]:
    """Run ``n_batches`` forward passes without gradients (cycling ``batches`` when it is shorter:
    every rank must make the same number of passes) and return the all-reduced metrics.

    Each batch is moved to ``device`` once; the model and the accumulator both see that copy,
    so every tensor of the evaluation is on one device."""
    acc = EvalAccumulator(n_labels, device)
    it: Iterator = iter(batches)
    done = 0
    with torch.no_grad():
        while done < n_batches:
            try:
                batch = next(it)
            except StopIteration:
                if done == 0:
                    raise ValueError("the evaluation stream is empty (no eval_shards?)") from None
                it = iter(batches)
                continue
            batch = to_device(batch, device)
            acc.add(batch, forward(batch))
            done += 1
    acc.all_reduce()
    return acc.metrics()
