"""Sampling weights that realise the training distribution: diverse groups first, deep cells within.

A cell is drawn in two levels. First a group c (the joint code of pseudo-label, tissue, disease,
assay, ethnicity, sex, organism and culture) with probability proportional to
``W_c ** gamma`` where ``W_c = S * n_c / (n_c + S)``: rare groups count about as many cells as they
have, huge groups are capped near ``S``. Then a cell inside the group, proportional to its depth
weight ``w_i = 1 + scale * sigmoid(slope * (nnz_i - midpoint))``. Hence

    P(i) = W_c^gamma / sum_c' W_c'^gamma * w_i / sum_{j in c} w_j

The second factor is normalised within the group: multiplying ``W_c`` by ``w_i`` directly would
make a group's mass grow with its cell count again, so big groups would dominate.
"""

from __future__ import annotations

import numpy as np
from scipy.special import expit

GROUP_SCALE = 500.0  # S
DEPTH_SCALE = 999.0
DEPTH_SLOPE = 0.003
DEPTH_MIDPOINT = 2000.0
CURRICULUM_OFFSET = 5.0
CURRICULUM_SPAN = 15.0
# Whether an annotated cell type is one group across datasets (True) or one per dataset and
# Leiden cluster (False). Pooled, a cell type seen in D datasets no longer gets up to D times
# the group cap: on real PBMC cells split into two datasets it evened the cell types (effective
# number 8.3 -> 9.2 of 13) and gave the two-dataset tissue 47% instead of 53% of the stream next
# to a third dataset, with every cluster still drawn (benchmarks/bench_groups.py, docs/training.md).
POOL_CELL_TYPES = True


def group_weight(n_c, S: float = GROUP_SCALE, gamma: float = 1.0) -> np.ndarray:
    """``(S * n_c / (n_c + S)) ** gamma``: a group's mass, saturating at ``S`` cells."""
    n_c = np.asarray(n_c, dtype=np.float64)
    return (S * n_c / (n_c + S)) ** gamma


def depth_weight(
    nnz,
    scale: float = DEPTH_SCALE,
    slope: float = DEPTH_SLOPE,
    midpoint: float = DEPTH_MIDPOINT,
) -> np.ndarray:
    """``1 + scale * sigmoid(slope * (nnz - midpoint))``: favour cells with many expressed genes.

    With the defaults: nnz 500 -> ~12, 2000 -> ~500, 4000 -> ~998.
    """
    nnz = np.asarray(nnz, dtype=np.float64)
    return 1.0 + scale * expit(slope * (nnz - midpoint))


def curriculum_gamma(
    epoch: int, offset: float = CURRICULUM_OFFSET, span: float = CURRICULUM_SPAN
) -> float:
    """``min(1, (epoch + offset) / span)``: early epochs flatten group masses further."""
    return float(min(1.0, (epoch + offset) / span))


def group_ids(keys) -> tuple[np.ndarray, np.ndarray]:
    """Joint group code of per-cell key tuples.

    ``keys`` is ``[n_cells, n_fields]`` (strings or ints, e.g. pseudo-label, tissue, ... codes).
    Returns ``ids`` int64 ``[n_cells]`` and the unique key rows ``[n_groups, n_fields]`` such
    that ``unique[ids] == keys``; groups are numbered in sorted key order (deterministic).
    """
    keys = np.asarray(keys)
    if keys.ndim != 2:
        raise ValueError(f"group keys must be [n_cells, n_fields], got shape {keys.shape}")
    n, m = keys.shape
    if n == 0:
        return np.zeros(0, dtype=np.int64), keys[:0]
    codes = np.empty((n, m), dtype=np.int64)
    for f in range(m):
        _, codes[:, f] = np.unique(keys[:, f], return_inverse=True)
    _, first, ids = np.unique(codes, axis=0, return_index=True, return_inverse=True)
    return ids.reshape(-1).astype(np.int64), keys[first]


def pair_probabilities(
    pair_group,
    n_cells,
    depth_sum,
    multiplier=None,
    S: float = GROUP_SCALE,
    gamma: float = 1.0,
) -> np.ndarray:
    """Draw probability of each (group, dataset) pair (float64, sums to 1), see the module
    docstring: the corpus enters only through per-pair sums, so the plan never holds a per-cell
    array of the whole corpus. A cell ``i`` of pair ``p`` then has probability
    ``P(p) * w_i / depth_sum[p]``.

    ``pair_group`` is each pair's group, ``n_cells`` its training cells (> 0) and ``depth_sum``
    the sum of their depth weights ``w_i``. ``multiplier`` (per pair, >= 0; the dataset's)
    scales each cell's mass before the final renormalisation, so a dataset with multiplier 2
    gets twice the mass relative to the others (its share of the stream grows accordingly);
    0 removes it.
    """
    gid = np.asarray(pair_group, dtype=np.int64)
    n = np.asarray(n_cells, dtype=np.float64)
    w = np.asarray(depth_sum, dtype=np.float64)
    if not gid.shape == n.shape == w.shape or gid.ndim != 1:
        raise ValueError(f"pair_group {gid.shape}, n_cells {n.shape} and depth_sum {w.shape} "
                         "must be 1-D of one length")
    if gid.size == 0:
        return np.zeros(0, dtype=np.float64)
    if gid.min() < 0 or (n <= 0).any():
        raise ValueError("group ids must be >= 0 and every pair must have cells")
    n_groups = int(gid.max()) + 1
    n_c = np.bincount(gid, weights=n, minlength=n_groups)
    mass = np.where(n_c > 0, group_weight(n_c, S=S, gamma=gamma), 0.0)
    p = mass[gid] * w / np.bincount(gid, weights=w, minlength=n_groups)[gid]
    if multiplier is not None:
        mult = np.broadcast_to(np.asarray(multiplier, dtype=np.float64), p.shape)
        if (mult < 0).any() or not np.isfinite(mult).all():
            raise ValueError("multipliers must be finite and >= 0")
        p = p * mult
    total = p.sum()
    if total <= 0:
        raise ValueError("all cells have zero sampling mass")
    return p / total


def group_probabilities(group_ids, probabilities, n_groups: int = 0) -> np.ndarray:
    """Total probability of each group (the target frequency of a group in the drawn stream),
    from the probabilities of its cells or (group, dataset) pairs."""
    gid = np.asarray(group_ids, dtype=np.int64)
    return np.bincount(gid, weights=np.asarray(probabilities, dtype=np.float64),
                       minlength=n_groups)
