"""``OUT/report/``: what the weighting did to the data, in plots and a short summary.

Figures: expressed genes per profile (input cells vs the packed stream, share above the context
size annotated), group frequencies and class frequencies before vs after weighting, and the
datasets' sizes and Leiden clusters. ``summary.txt`` has the cell accounting, headline shares and
how each dataset's columns became genes.

It reads at any number of datasets: every figure has a fixed size (at most MAX_PX pixels a side),
and past ``EXTREMES`` datasets the per-dataset parts show distributions and the largest and
smallest ``EXTREMES`` datasets instead of one row each (the manifest has them all).
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import numpy as np  # noqa: E402

from data_prep.pack import N_EXPR_EDGES  # noqa: E402
from data_prep.shard_format import CLASSES  # noqa: E402
from utils import atomic  # noqa: E402

BEFORE, AFTER, TARGET = "#7f7f7f", "#d62728", "#1f77b4"
PNG_META = {"Software": None}  # no version string: same bytes across matplotlib patch releases
DPI = 110
MAX_PX = 4000  # no figure is larger than this on a side, whatever the build's size
EXTREMES = 10  # datasets listed at each end when there are too many to list all


def collect(*, corpus: dict, group_before: np.ndarray, group_after: np.ndarray,
            target: np.ndarray, class_after: dict, train: list[dict], labels, context: int,
            epochs: list[dict], datasets: list[dict]) -> dict:
    """Numbers behind the figures, from the plan's corpus-wide counts (small tables, no per-cell
    arrays).

    ``corpus`` is the plan's corpus.json (expressed-genes histogram of the input cells, label
    counts of the training cells: unknown first, then by label id), ``group_before`` the
    training cells per group, ``group_after`` the samples per group over all epochs,
    ``class_after`` their label counts, ``target`` the group target of the whole packed stream
    (the mean of the epochs' targets, whose gammas differ), ``train`` the train shard records of
    all epochs, ``epochs`` the manifest's per-epoch entries, ``datasets`` name, organism, cells
    and clusters of each.
    """
    n_stream = max(1, sum(s["n_samples"] for s in train))
    after_hist = np.sum([s["stats"]["n_expr_hist"] for s in train], axis=0) if train else None
    n_groups = group_before.shape[0]
    classes = {}
    for cls in CLASSES:
        n_labels = len(labels.values(cls))
        shares = []
        for counts in (corpus["classes"][cls], class_after[cls]):
            c = np.zeros(n_labels + 1)  # by label id, then unknown
            c[:len(counts) - 1] = counts[1:]
            c[n_labels] = counts[0]
            shares.append(c / max(1, c.sum()))
        classes[cls] = {"names": [*labels.values(cls), "(unknown)"], "before": shares[0],
                        "after": shares[1]}
    return {
        "context": context,
        "before_hist": np.asarray(corpus["nnz_hist"]),
        "after_hist": after_hist,
        "share_above_before": round(corpus["n_above_context"] / max(1, corpus["n_cells"]), 6),
        "share_above_after": round(sum(s["stats"]["n_above_context"] for s in train) / n_stream,
                                   6),
        "n_stream": n_stream,
        "n_metacells": int(sum(s["stats"]["n_metacells"] for s in train)),
        "group_before": group_before / max(1, group_before.sum()),
        "group_target": np.pad(target, (0, n_groups - target.shape[0])),
        "group_after": np.pad(group_after, (0, n_groups - group_after.shape[0])) / n_stream,
        "epochs": epochs,
        "classes": classes,
        "datasets": datasets,
    }


def write(report_dir: Path, manifest: dict, stats: dict) -> None:
    report_dir.mkdir(parents=True, exist_ok=True)
    _expressed_genes(report_dir / "expressed_genes.png", stats)
    _groups(report_dir / "group_frequencies.png", stats)
    _classes(report_dir / "class_frequencies.png", stats)
    _clusters(report_dir / "clusters_per_dataset.png", stats)
    atomic.write_text(report_dir / "summary.txt", summary(manifest, stats))


def summary(manifest: dict, stats: dict) -> str:
    acc = manifest["accounting"]["total"]
    dropped = acc["dropped"]
    lines = [
        "Shard build summary",
        "",
        f"cells in        {acc['input']:>12,}",
        f"packed (train)  {acc['packed']:>12,}",
        f"held out (eval) {acc['held_out']:>12,}",
        f"dropped         {sum(dropped.values()):>12,}",
        *(f"  {reason}: {n:,}" for reason, n in sorted(dropped.items())),
        "",
        f"datasets        {len(manifest['datasets'])} accepted, {len(manifest['rejected'])} "
        "rejected",
        "organisms       " + ", ".join(
            f"{o['name'] or curie} ({o['n_genes']:,} genes)"
            for curie, o in manifest["vocab"]["organisms"].items()),
        f"shards          {len(manifest['shards'])} train ({manifest['n_samples']:,} samples), "
        f"{len(manifest['eval_shards'])} eval ({manifest['n_eval_samples']:,} samples)",
        f"groups          {manifest['labels']['n_groups']:,}",
        f"meta-cells      {stats['n_metacells']:,}",
        f"> {stats['context']:,} expressed genes: {100 * stats['share_above_before']:.1f}% of "
        f"input cells, {100 * stats['share_above_after']:.1f}% of packed samples",
        "",
        "epoch  gamma  seed        samples  distinct cells  meta-cells  > context  group TV",
        *(f"{e['epoch']:>5}  {e['gamma']:.3f}  {e['seed']:<10}  {e['n_samples']:>7,}  "
          f"{e['n_distinct_cells']:>14,}  {e['n_metacells']:>10,}  "
          f"{100 * e['share_above_context']:>8.1f}%  {e['group_tv']:>8.3f}"
          for e in stats["epochs"]),
        "",
        "per dataset (input = packed + held out + dropped)",
    ]
    accounting = manifest["accounting"]["datasets"]
    lines += _distribution("input cells", [a["input"] for a in accounting.values()])
    for name in _extremes(list(accounting), [a["input"] for a in accounting.values()]):
        if name == "":
            lines.append("  ...")
            continue
        a = accounting[name]
        drops = ", ".join(f"{k} {v:,}" for k, v in sorted(a["dropped"].items())) or "none"
        lines.append(f"  {name}: {a['input']:,} = {a['packed']:,} + {a['held_out']:,} + "
                     f"dropped ({drops})")
    lines += ["", "genes per dataset (columns -> genes: named by id, symbols mapped to ids, "
                  "symbols kept unmapped, merged into another column; columns left out)"]
    datasets = manifest["datasets"]
    lines += _distribution("genes", [d["n_genes"] for d in datasets])
    for i in _extremes(list(range(len(datasets))), [d["n_genes"] for d in datasets]):
        if i == "":
            lines.append("  ...")
            continue
        d = datasets[i]
        g = d["genes"]
        left = ", ".join(f"{k.removeprefix('left_out_')} {v:,}" for k, v in sorted(g.items())
                         if k.startswith("left_out_") and v) or "none"
        lines.append(f"  {d['name']}: {g['n_var']:,} -> {d['n_genes']:,}: {g['by_id']:,} by id, "
                     f"{g['mapped']:,} mapped, {g['unmapped']:,} unmapped, {g['merged']:,} "
                     f"merged; left out: {left}")
    return "\n".join(lines) + "\n"


def _extremes(keys: list, sizes: list) -> list:
    """All ``keys`` when there are at most 2 x EXTREMES, else the EXTREMES largest by ``sizes``,
    "" (a gap) and the EXTREMES smallest."""
    if len(keys) <= 2 * EXTREMES:
        return keys
    order = np.argsort(-np.asarray(sizes), kind="stable")
    return [keys[i] for i in order[:EXTREMES]] + [""] + [keys[i] for i in order[-EXTREMES:]]


def _distribution(what: str, values: list) -> list[str]:
    """One line of quantiles when there are too many datasets to list all."""
    if len(values) <= 2 * EXTREMES:
        return []
    q = np.quantile(np.asarray(values, dtype=float), [0, 0.1, 0.5, 0.9, 1])
    return [f"  {len(values):,} datasets, {what}: min {q[0]:,.0f}, 10% {q[1]:,.0f}, median "
            f"{q[2]:,.0f}, 90% {q[3]:,.0f}, max {q[4]:,.0f}; the {EXTREMES} largest and "
            "smallest:"]


def _save(fig, path: Path) -> None:
    width, height = fig.get_size_inches() * DPI
    if max(width, height) > MAX_PX:
        raise ValueError(f"{path.name}: a {width:.0f} x {height:.0f} px figure (at most {MAX_PX})")
    with atomic.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, bbox_inches="tight", metadata=PNG_META)
    plt.close(fig)


def _expressed_genes(path: Path, stats: dict) -> None:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    edges = N_EXPR_EDGES
    for hist, color, label, share in (
        (stats["before_hist"], BEFORE, "input cells (uniform)", stats["share_above_before"]),
        (stats["after_hist"], AFTER, "packed stream (weighted)", stats["share_above_after"]),
    ):
        if hist is None or hist.sum() == 0:
            continue
        ax.stairs(hist / hist.sum(), edges, color=color, lw=2, fill=color == BEFORE,
                  alpha=0.35 if color == BEFORE else 1.0,
                  label=f"{label}: {100 * share:.1f}% above {stats['context']:,}")
    used = np.flatnonzero(stats["before_hist"] + (0 if stats["after_hist"] is None
                                                 else stats["after_hist"]))
    if used.size:
        ax.set_xlim(min(edges[used[0]], stats["context"]) / 1.5,
                    max(edges[used[-1] + 1], stats["context"]) * 1.5)
    ax.axvline(stats["context"], color="black", ls="--", lw=1)
    ax.text(stats["context"] * 1.05, ax.get_ylim()[1] * 0.95, f"context\n{stats['context']:,}",
            va="top", fontsize=9)
    ax.set_xscale("log")
    ax.set_xlabel("expressed genes per profile (log scale)")
    ax.set_ylabel("share of profiles per bin")
    ax.set_title("Expressed genes: input cells vs the packed training stream")
    ax.legend(loc="upper left", frameon=False)
    _save(fig, path)


def _groups(path: Path, stats: dict) -> None:
    before, target, after = stats["group_before"], stats["group_target"], stats["group_after"]
    order = np.argsort(-before, kind="stable")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    rank = np.arange(1, order.shape[0] + 1)
    ax1.plot(rank, before[order], color=BEFORE, lw=2, label="input cells")
    ax1.plot(rank, target[order], color=TARGET, lw=2, label="target (weights)")
    ax1.scatter(rank, after[order], color=AFTER, s=8, label="packed stream", zorder=3)
    ax1.set_yscale("log")
    ax1.set_xlabel("sampling group, ranked by input frequency")
    ax1.set_ylabel("share of cells / samples")
    ax1.set_title(f"{before.shape[0]:,} groups: big ones capped, rare ones lifted")
    ax1.legend(frameon=False)
    both = np.concatenate([target, after])
    hi = max(float(both.max()), 1e-9) * 1.5
    lo = float(both[both > 0].min()) / 1.5 if (both > 0).any() else hi / 1e4
    ax2.plot([lo, hi], [lo, hi], color="black", lw=1, ls="--")
    ax2.scatter(np.maximum(target, lo), np.maximum(after, lo), s=10, color=AFTER)
    tv = 0.5 * np.abs(target - after).sum()
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlim(lo, hi)
    ax2.set_ylim(lo, hi)
    for axis in (ax2.xaxis, ax2.yaxis):  # less than a decade wide: minor labels would collide
        axis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax2.set_xlabel("target group probability")
    ax2.set_ylabel("share in the packed stream")
    ax2.set_title(f"stream vs target: total variation {tv:.3f} at {stats['n_stream']:,} samples")
    _save(fig, path)


def _classes(path: Path, stats: dict, top: int = 6) -> None:
    classes = [c for c in CLASSES if len(stats["classes"][c]["names"]) > 1]
    ncol = 3
    nrow = max(1, -(-len(classes) // ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(15, 3.2 * nrow), squeeze=False)
    for ax in axes.flat[len(classes):]:
        ax.axis("off")
    for ax, cls in zip(axes.flat, classes):
        c = stats["classes"][cls]
        order = np.argsort(-(c["before"] + c["after"]), kind="stable")[:top][::-1]
        y = np.arange(order.shape[0])
        ax.barh(y + 0.2, c["before"][order], height=0.4, color=BEFORE, label="input cells")
        ax.barh(y - 0.2, c["after"][order], height=0.4, color=AFTER, label="packed stream")
        ax.set_yticks(y, [_short(c["names"][i]) for i in order], fontsize=8)
        ax.set_title(f"{cls} ({len(c['names']) - 1} labels)", fontsize=10)
        ax.set_xlabel("share", fontsize=8)
    axes.flat[0].legend(frameon=False, fontsize=8, loc="lower right")
    fig.suptitle("Label frequencies before vs after weighting (top labels per class)")
    fig.tight_layout()
    _save(fig, path)


def _short(text: str, n: int = 28) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _clusters(path: Path, stats: dict) -> None:
    """Cells and Leiden clusters per dataset as distributions (a fixed-size figure at any number
    of datasets), and the largest and smallest datasets by cells named."""
    ds = stats["datasets"]
    cells = np.array([d["n_cells"] for d in ds], dtype=float)
    clusters = np.array([d["n_clusters"] for d in ds], dtype=float)
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(18, 5.5),
                                        gridspec_kw={"width_ratios": [1, 1, 1.3], "wspace": 0.9})
    for ax, values, what in ((ax1, cells, "cells"), (ax2, clusters, "Leiden clusters")):
        top = max(float(values.max(initial=1)), 1.0)
        bins = np.unique(np.geomspace(1, top * 1.01 + 1, 40).round())
        ax.hist(np.maximum(values, 1), bins=bins, color=TARGET)
        ax.set_xscale("log")
        ax.set_xlabel(f"{what} per dataset (log scale)")
        ax.set_ylabel("datasets")
        ax.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        if values.size:
            ax.set_title(f"{what}: median {np.median(values):,.0f}, max {values.max():,.0f}")
    picked = [i for i in _extremes(list(range(len(ds))), cells.tolist()) if i != ""]
    y = np.arange(len(picked))[::-1]
    ax3.barh(y, [cells[i] for i in picked], color=TARGET)
    for yi, i in zip(y, picked):
        ax3.text(cells[i], yi, f"  {ds[i]['n_clusters']} clusters", va="center", fontsize=7)
    ax3.set_yticks(y, [f"{_short(ds[i]['name'], 30)} ({_short(ds[i]['organism'], 14)})"
                       for i in picked], fontsize=7)
    ax3.set_xscale("log")
    ax3.set_xlabel("cells (log scale)")
    ax3.set_title(f"{len(ds):,} datasets" + (f": the {EXTREMES} largest and smallest"
                                              if len(picked) < len(ds) else ""))
    fig.suptitle("Datasets: sizes and Leiden clusters")
    _save(fig, path)
