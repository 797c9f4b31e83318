"""The denoising corruption of the training input: a modelling choice, kept in one place.

scPRINT-2's recipe: each cell of a batch gets a corruption strength ``p = mask_scale *
U(0, mask_max)`` per view; each of its counts x loses Poisson(x p/2) counts (clipped at x), then
is zeroed with probability p/2. A ``full_pass_prob`` share of the cells get their whole input
zeroed (and all their neighbours), so the model learns to reconstruct a cell from its neighbours
alone; a meta-cell has no neighbours to reconstruct it from and is never zeroed. The targets are
the uncorrupted counts. ``DataConfig`` holds the settings; the batch kernel (pretrain.batches)
calls ``corrupt`` for every cell and view.
"""

from __future__ import annotations

import math

import numba
import numpy as np

from pretrain.random_streams import GOLDEN, TO_UNIT, mix, poisson_ptrs

CDF_MAX = 16  # integer counts up to this draw their drop from a per-cell CDF table (x4)


def draw_strengths(rng: np.random.Generator, metacell: np.ndarray, full_pass_prob: float,
                   mask_scale: float, mask_max: float, views: int) -> tuple[np.ndarray, np.ndarray]:
    """Per batch: which cells are zeroed (bool [B]) and each view's strength p ([views, B])."""
    zeroed = rng.random(metacell.shape[0]) < full_pass_prob
    zeroed &= ~metacell  # a meta-cell has no neighbours to reconstruct it from
    p = mask_scale * rng.uniform(0.0, mask_max, size=(views, metacell.shape[0]))
    return zeroed, p


@numba.njit(cache=True, nogil=True)
def cdf_table():
    """Scratch for ``corrupt``: the CDF rows of the integer counts 0..CDF_MAX and their flags."""
    return np.empty((CDF_MAX + 1) * CDF_MAX, np.float64), np.zeros(CDF_MAX + 1, np.bool_)


@numba.njit(cache=True, nogil=True)
def _cdf_row(cdf, row, x, lam):
    """cdf[row + k] = P(Poisson(lam) <= k) for k < x (the integer count x), then 2.0 (never
    below a uniform) up to a multiple of 4 entries (at least 4)."""
    pk = math.exp(-lam)
    acc = pk
    for k in range(x):
        cdf[row + k] = acc
        pk *= lam / (k + 1)
        acc += pk
    for k in range(x, max(4, (x + 3) // 4 * 4)):
        cdf[row + k] = 2.0


@numba.njit(cache=True, nogil=True)
def _drop(x, lam, u, s):
    """Poisson(lam) counts to drop from the count x, clipped at x: inversion of the uniform ``u``
    for lam < 12, else PTRS on the stream at ``s``; returns (count, new stream position)."""
    if lam >= 12.0:
        return poisson_ptrs(lam, s)
    pk = math.exp(-lam)
    cdf, k = pk, 0
    while u > cdf and k < x:  # counts past x are clipped anyway
        k += 1
        pk *= lam / k
        cdf += pk
    return k, s


@numba.njit(cache=True, nogil=True, boundscheck=False)
def corrupt(counts, out, m, p, s, cdf, ready):
    """``out[:m]`` = the first ``m`` counts corrupted at strength ``p``, drawn from the
    SplitMix64 stream at ``s``; returns the new stream position.

    The drop is sampled by inversion against a per-cell CDF row for each integer count value
    (built on first use: counts repeat a lot), by inversion for other counts and PTRS for large
    means; the zeroing is a select, not a branch."""
    h = 0.5 * p
    ready[:] = False
    for j in range(m):
        x = counts[j]
        s += GOLDEN
        z = mix(s)
        u = (z & np.uint64(0xFFFFFFFF)) * TO_UNIT
        xi = np.int64(x)
        if xi == x and xi <= CDF_MAX:
            row = xi * CDF_MAX
            if not ready[xi]:
                _cdf_row(cdf, row, xi, xi * h)
                ready[xi] = True
            # count the CDF entries below u, 4 at a time without branches (rows are padded
            # with 2.0): counts of 1..4 are most entries
            c = 0
            for q in range(row, row + max(xi, 1), 4):
                c += (np.int64(u > cdf[q]) + np.int64(u > cdf[q + 1])
                      + np.int64(u > cdf[q + 2]) + np.int64(u > cdf[q + 3]))
            y = np.float32(xi - c)
        else:
            kk, s = _drop(x, x * h, u, s)
            y = np.float32(max(x - kk, 0.0))
        out[j] = y if (z >> np.uint64(32)) * TO_UNIT >= h else np.float32(0)
    return s
