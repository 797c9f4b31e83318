"""Labels of a user's own reference carried to query cells through the model's embedding.

The pretrained heads predict only the labels of the training vocabulary; a lab's own annotation
(its cell-type names, states, clusters) reaches new cells by a k-nearest-neighbour vote in the
embedding space: both files are embedded by the same model (``pretrain.embed``), and each query
cell takes the label most of its ``k`` nearest reference cells carry (Euclidean, as the kNN probe
of benchmarks/bench_quality.py, which calls this function; ties go to the label that comes first
in the reference's sorted labels). Its score is that label's share of the ``k`` votes.

    python -m pretrain.embed MODEL QUERY.h5ad --out OUT.h5ad \
        --reference REF.h5ad --reference-label cell_type [--transfer-k 15]

writes ``obs['transferred_<label>']`` and ``obs['transferred_<label>_score']`` into the copy.

The neighbours are found exactly (scikit-learn's brute force on every thread the process may
use; its time grows with query x reference cells) or, for an atlas-sized search, approximately
with an NN-descent index of the reference (pynndescent, as in the build's graph stage): one
thread and seeded, so a rerun gives the same labels. ``method="auto"`` searches exactly while
query x reference x dimensions stays below ``EXACT_WORK_BELOW`` per thread (42 s of brute force
on one core of the 2-core Xeon VM the benchmark ran on) and approximately above, where the index
pays for its one-off compilation (~20 s per process). benchmarks/bench_label_transfer.py
measures both and how often their labels agree.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from utils.cpus import usable_cpus

DEFAULT_K = 15
METHODS = ("auto", "exact", "approximate")
EXACT_WORK_BELOW = 2e12  # query x reference x dimensions per thread searched exactly by "auto"
INDEX_NEIGHBOURS = 30  # degree of the reference's NN-descent graph (the build's graph stage's)
VOTE_ROWS = 65536  # query cells counted at a time: [rows, labels] int32 votes


def labelled(labels) -> np.ndarray:
    """Which of ``labels`` are labels: not NaN, None or ""."""
    values = pd.Series(pd.Categorical(labels)).astype(object)
    return values.notna().to_numpy() & (values.astype(str).str.len() > 0).to_numpy()


def search_method(n_query: int, n_reference: int, dims: int, method: str = "auto",
                  threads: int | None = None) -> str:
    """``"exact"`` or ``"approximate"``: what ``method`` means for a search of this size on
    ``threads`` threads (default: ``search_threads()``)."""
    if method not in METHODS:
        raise ValueError(f"method {method!r}: one of {', '.join(METHODS)}")
    if method != "auto":
        return method
    threads = search_threads() if threads is None else threads
    work = float(n_query) * n_reference * dims
    return "exact" if work < EXACT_WORK_BELOW * threads else "approximate"


def search_threads() -> int:
    """Threads the exact search runs on (OpenMP's rule): ``OMP_NUM_THREADS`` when set, else
    the CPUs this process may use."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return usable_cpus()


def nearest_reference(reference: np.ndarray, query: np.ndarray, k: int, method: str = "auto",
                      seed: int = 0) -> np.ndarray:
    """Row indices (int64 [query, k]) of each query row's ``k`` nearest reference rows."""
    reference = np.ascontiguousarray(reference, dtype=np.float32)
    query = np.ascontiguousarray(query, dtype=np.float32)
    if search_method(len(query), len(reference), reference.shape[1], method) == "exact":
        from sklearn.neighbors import NearestNeighbors

        return NearestNeighbors(n_neighbors=k).fit(reference).kneighbors(
            query, return_distance=False).astype(np.int64)
    from pynndescent import NNDescent

    index = NNDescent(reference, metric="euclidean",
                      n_neighbors=min(len(reference), max(k, INDEX_NEIGHBOURS)),
                      random_state=seed, n_jobs=1, low_memory=True, verbose=False)
    return np.asarray(index.query(query, k=k)[0], dtype=np.int64)


def transfer_labels(reference: np.ndarray, labels, query: np.ndarray, k: int = DEFAULT_K,
                    method: str = "auto", seed: int = 0) -> tuple[pd.Categorical, np.ndarray]:
    """Each query row's majority label among its ``k`` nearest reference rows, and its share
    of the votes. Reference rows whose label is missing (NaN, None, "") take no part.
    ``method``: "exact", "approximate" (an NN-descent index seeded by ``seed``) or "auto"."""
    labels = pd.Series(pd.Categorical(labels)).astype(object)
    known = labelled(labels)
    if reference.shape[0] != labels.shape[0]:
        raise ValueError(f"{reference.shape[0]} reference embeddings for {labels.shape[0]} labels")
    if not 1 <= k <= int(known.sum()):
        raise ValueError(f"k = {k}: the reference has {int(known.sum())} labelled cells")
    classes = sorted(set(labels[known].astype(str)))
    codes = pd.Categorical(labels[known].astype(str), categories=classes).codes
    best, share = vote(codes[nearest_reference(reference[known], query, k, method, seed)],
                       len(classes))
    return pd.Categorical.from_codes(best, categories=classes), share


def vote(voters: np.ndarray, n_labels: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``voters`` (label codes of a query cell's neighbours, [query, k]): the label
    most of them carry (the lowest code of a tie) and its share of the votes."""
    best = np.empty(len(voters), dtype=np.int64)
    share = np.empty(len(voters), dtype=np.float32)
    for start in range(0, len(voters), VOTE_ROWS):
        rows = voters[start:start + VOTE_ROWS]
        votes = np.zeros((len(rows), n_labels), dtype=np.int32)
        for column in rows.T:
            votes[np.arange(len(rows)), column] += 1
        best[start:start + len(rows)] = votes.argmax(axis=1)  # the first label of a tie
        share[start:start + len(rows)] = votes.max(axis=1) / voters.shape[1]
    return best, share
