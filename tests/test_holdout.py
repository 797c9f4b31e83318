"""Held-out cells never reach training samples: training cells' kept neighbours are their
nearest training cells, found from the k-NN lists or, when those run short, by exact search."""

import numpy as np
import pytest

from data_prep.graph import Neighbours, exact_knn, training_neighbours


def _neighbours(emb: np.ndarray, k: int) -> Neighbours:
    idx, dist = exact_knn(emb, k)
    return Neighbours(idx, dist, emb.shape[1], emb.shape[1], k, "exact", [], {}, emb)


@pytest.mark.parametrize("fraction", [0.05, 0.6])
def test_training_cells_get_their_nearest_training_cells(fraction):
    """At 5% held out the k-NN lists suffice; at 60% many rows run short and are searched
    again. Either way the result is the exact 6 nearest training cells."""
    rng = np.random.default_rng(0)
    emb = rng.standard_normal((600, 8)).astype(np.float32)
    held = rng.random(600) < fraction
    nb = _neighbours(emb, 15)
    idx, dist, n_searched = training_neighbours(nb, held, 6)
    train = np.flatnonzero(~held)
    assert not held[idx[train]].any() and (idx[train] >= 0).all()
    exact, exact_d = exact_knn(emb[train], 6)
    np.testing.assert_array_equal(idx[train], train[exact])
    np.testing.assert_allclose(dist[train], exact_d, rtol=1e-5)
    assert (n_searched > 0) == (fraction > 0.5)
    # held-out cells keep their own nearest cells, held out or not
    np.testing.assert_array_equal(idx[held], nb.idx[held, :6])


def test_without_held_out_cells_the_neighbours_are_the_knn_lists():
    rng = np.random.default_rng(1)
    emb = rng.standard_normal((50, 4)).astype(np.float32)
    nb = _neighbours(emb, 15)
    idx, dist, n_searched = training_neighbours(nb, np.zeros(50, bool), 6)
    np.testing.assert_array_equal(idx, nb.idx[:, :6])
    np.testing.assert_array_equal(dist, nb.dist[:, :6])
    assert n_searched == 0
    # tiny dataset: 3 cells, 2 neighbours each, missing slots -1 / inf
    nb = _neighbours(emb[:3], 2)
    idx, dist, _ = training_neighbours(nb, np.array([False, False, True]), 6)
    assert (idx[:2, 0] == [1, 0]).all() and (idx[:2, 1:] == -1).all()
    assert np.isinf(dist[:2, 1:]).all()
