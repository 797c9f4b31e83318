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
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_K = 15


def labelled(labels) -> np.ndarray:
    """Which of ``labels`` are labels: not NaN, None or ""."""
    values = pd.Series(pd.Categorical(labels)).astype(object)
    return values.notna().to_numpy() & (values.astype(str).str.len() > 0).to_numpy()


def transfer_labels(reference: np.ndarray, labels, query: np.ndarray,
                    k: int = DEFAULT_K) -> tuple[pd.Categorical, np.ndarray]:
    """Each query row's majority label among its ``k`` nearest reference rows, and its share
    of the votes. Reference rows whose label is missing (NaN, None, "") take no part."""
    from sklearn.neighbors import KNeighborsClassifier

    labels = pd.Series(pd.Categorical(labels)).astype(object)
    known = labelled(labels)
    if reference.shape[0] != labels.shape[0]:
        raise ValueError(f"{reference.shape[0]} reference embeddings for {labels.shape[0]} labels")
    if not 1 <= k <= int(known.sum()):
        raise ValueError(f"k = {k}: the reference has {int(known.sum())} labelled cells")
    classes = sorted(set(labels[known].astype(str)))
    codes = pd.Categorical(labels[known].astype(str), categories=classes).codes
    knn = KNeighborsClassifier(k).fit(reference[known], codes)
    votes = knn.predict_proba(query)  # [query, classes]: share of the k neighbours (every
    best = votes.argmax(axis=1)        # class occurs, so column j is label classes[j])
    return (pd.Categorical.from_codes(best, categories=classes),
            votes[np.arange(len(best)), best].astype(np.float32))
