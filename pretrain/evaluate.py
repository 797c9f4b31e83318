"""Held-out evaluation: how well the model denoises and classifies cells it never trained on.

Reconstruction quality is the Pearson correlation of predicted vs true log2(1 + count) over the
gene positions the corruption changed (dropped counts, and every gene of a fully zeroed cell):
unchanged positions are trivially copied from the input and would inflate the score.
Classification reports accuracy and macro-F1 per metadata class over the cells whose label is
known. Every statistic is a sum, so ranks all-reduce them once and every rank gets the same
metrics; each rank runs the same number of forward passes (ZeRO-3 gathers parameters inside
``forward``, a collective).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from data_prep.shard_format import CLASSES


class EvalAccumulator:
    """Sufficient statistics of the metrics, summed over batches and then over ranks."""

    def __init__(self, n_labels: dict[str, int]):
        self.n_labels = {c: n for c, n in n_labels.items() if n > 0}
        # n, sum x, sum y, sum xx, sum yy, sum xy of the corrupted positions (x = pred, y = true)
        self.recon = torch.zeros(6, dtype=torch.float64)
        # per class: [true positives, predicted count, true count] per label id
        self.cls = {c: torch.zeros(3, n, dtype=torch.float64) for c, n in self.n_labels.items()}
        self.loss_sums: dict[str, float] = {}
        self.n_batches = 0

    def add(self, batch: dict[str, torch.Tensor], out: dict) -> None:
        self.n_batches += 1
        for name, value in [("loss", out["loss"]), *sorted(out.get("losses", {}).items())]:
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + float(value)
        corrupted = batch["gene_mask"] & (
            (batch["input_counts"] != batch["counts"]) | batch["zeroed"][:, None])
        x = torch.log2(1 + out["pred_mean"].detach().float()[corrupted]).double()
        y = torch.log2(1 + batch["counts"][corrupted].float()).double()
        self.recon += torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(),
                                   y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()])
        for c, stats in self.cls.items():
            logits = out.get("class_logits", {}).get(c)
            if logits is None:
                continue
            y_true = batch["labels"][:, CLASSES.index(c)]
            known = (y_true >= 0) & (y_true < logits.shape[1])
            if not known.any():
                continue
            y_true = y_true[known]
            y_pred = logits.detach()[known].argmax(-1)
            n = stats.shape[1]
            stats[0] += torch.bincount(y_true[y_pred == y_true], minlength=n)[:n].double()
            stats[1] += torch.bincount(y_pred.clamp(max=n - 1), minlength=n)[:n].double()
            stats[2] += torch.bincount(y_true, minlength=n)[:n].double()

    def all_reduce(self) -> None:
        if not (dist.is_available() and dist.is_initialized()):
            return
        names = sorted(self.loss_sums)
        flat = torch.cat([self.recon,
                          torch.tensor([self.loss_sums[k] for k in names] + [self.n_batches],
                                       dtype=torch.float64),
                          *[self.cls[c].flatten() for c in sorted(self.cls)]])
        dist.all_reduce(flat)
        self.recon, flat = flat[:6], flat[6:]
        self.loss_sums = {k: float(v) for k, v in zip(names, flat[: len(names)])}
        self.n_batches = int(flat[len(names)])
        flat = flat[len(names) + 1:]
        for c in sorted(self.cls):
            size = self.cls[c].numel()
            self.cls[c], flat = flat[:size].view(3, -1), flat[size:]

    def metrics(self) -> dict[str, float]:
        """Scalar metrics keyed by TensorBoard tag (classes without known labels are left out)."""
        m = {f"eval/{k}": v / max(self.n_batches, 1) for k, v in self.loss_sums.items()}
        n, sx, sy, sxx, syy, sxy = self.recon.tolist()
        if n > 1:
            cov = sxy / n - sx * sy / n**2
            var = (sxx / n - (sx / n) ** 2) * (syy / n - (sy / n) ** 2)
            m["eval/recon_pearson"] = cov / var**0.5 if var > 0 else 0.0
        for c, (tp, pred, true) in self.cls.items():
            if true.sum() == 0:
                continue
            m[f"eval/{c}_accuracy"] = float(tp.sum() / true.sum())
            support = true > 0
            f1 = 2 * tp[support] / (pred[support] + true[support])
            m[f"eval/{c}_macro_f1"] = float(f1.mean())
        return m


def evaluate(forward: Callable[[dict], dict], batches: Iterable[dict[str, torch.Tensor]],
             n_labels: dict[str, int], n_batches: int) -> dict[str, float]:
    """Run ``n_batches`` forward passes without gradients (cycling ``batches`` when it is shorter:
    every rank must make the same number of passes) and return the all-reduced metrics."""
    acc = EvalAccumulator(n_labels)
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
            acc.add(batch, forward(batch))
            done += 1
    acc.all_reduce()
    return acc.metrics()
