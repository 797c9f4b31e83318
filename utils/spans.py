"""Bounded spans of a compressed sparse axis: the streaming passes over CSR rows or CSC columns."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np


def compressed_spans(indptr: np.ndarray, max_items: int, max_entries: int
                     ) -> Iterator[tuple[int, int]]:
    """Consecutive ranges [start, stop) of the major axis described by ``indptr`` (rows of a CSR
    matrix, columns of a CSC one) that cover it in order, each at most ``max_items`` long and
    holding at most ``max_entries`` stored entries (a single item may hold more)."""
    n = indptr.shape[0] - 1
    start = 0
    while start < n:
        stop = min(n, start + max(1, max_items))
        ends = np.asarray(indptr[start + 1 : stop + 1], dtype=np.int64)
        fits = np.searchsorted(ends, int(indptr[start]) + max_entries, side="right")
        stop = start + max(1, int(fits))
        yield start, stop
        start = stop
