"""The loader's randomness: seeded numpy generators for plans and per-batch draws, and cheap
per-cell SplitMix64 streams for compiled code.

Every random choice of the loader is keyed by integers (seed, slot, epoch, block or batch index),
never by state carried from earlier batches, so a stream resumes at any batch without replay.
Inside the batch kernel each cell gets its own SplitMix64 stream keyed by one 64-bit draw of the
batch's generator: pre-drawing numpy uniforms cost ~12 us per sample (numba calls into a
``Generator`` cost more), a fifth of the 15k samples/s budget.
"""

from __future__ import annotations

import math

import numba
import numpy as np

GOLDEN = np.uint64(0x9E3779B97F4A7C15)
TO_UNIT = 2.0**-32


def keyed(*parts: int) -> np.random.Generator:
    """A numpy generator keyed by ``parts`` (independent for different keys)."""
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


@numba.njit(cache=True, nogil=True, inline="always")
def mix(z):
    """SplitMix64's output function: the i-th draw of a stream is ``mix(base + i * GOLDEN)``
    (passes BigCrush; no state but one integer, so each cell gets its own stream cheaply)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def poisson_ptrs(lam, s):
    """Poisson(lam >= 10) by Hoermann's transformed rejection (PTRS; numpy's algorithm) from the
    SplitMix64 stream at ``s``; returns (k, new stream position)."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        s += GOLDEN
        z = mix(s)
        u = (z >> np.uint64(32)) * TO_UNIT - 0.5
        v = ((z & np.uint64(0xFFFFFFFF)) + 0.5) * TO_UNIT
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k, s
        if k < 0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)
                <= -lam + k * loglam - math.lgamma(k + 1)):
            return k, s
