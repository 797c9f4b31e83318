"""Unit tests of the packing primitives: sample alignment, shard cutting, row reads."""

import os

import numpy as np
import pytest

from data_prep import pack


def _genes(col2gid):
    return pack.GeneOrder(np.asarray(col2gid, dtype=np.int64))


def test_align_sample_orders_expressed_then_best_neighbour_genes():
    # local columns 0..5 map to global ids in reverse order, so sorting by id matters
    genes = _genes([60, 50, 40, 30, 20, 10])
    cell = (np.array([0, 2]), np.array([5.0, 1.0]))
    nbrs = [(np.array([1, 2, 3]), np.array([4.0, 2.0, 1.0])),
            (np.array([3, 4]), np.array([3.0, 9.0]))]
    gids, counts, nbr = pack.align_sample(
        cell[0], cell[1], [c for c, _ in nbrs], [v for _, v in nbrs], genes, context=4,
        metacell=False)
    # expressed: cols 2 (id 40) and 0 (id 60) ascending; then 2 of the extra genes by summed
    # neighbour count: col 4 (id 20, 9) then col 3 (id 30, 4); col 1 (id 50, 4) loses the tie
    np.testing.assert_array_equal(gids, [40, 60, 20, 30])
    np.testing.assert_array_equal(counts, [1.0, 5.0])
    np.testing.assert_array_equal(nbr, [[2.0, 0.0, 0.0, 1.0], [0.0, 0.0, 9.0, 3.0]])


def test_align_sample_pads_only_what_neighbours_have_and_context_allows():
    genes = _genes(np.arange(1, 11))
    cols = np.arange(5)
    nbr_cols = [np.array([5, 6])]
    gids, counts, nbr = pack.align_sample(cols, np.ones(5), nbr_cols, [np.ones(2)], genes,
                                          context=100, metacell=False)
    assert gids.shape == (7,) and counts.shape == (5,)  # all 2 available, not 95
    gids, _, _ = pack.align_sample(cols, np.ones(5), nbr_cols, [np.ones(2)], genes,
                                   context=3, metacell=False)
    assert gids.shape == (5,)  # the cell already fills the context: no padding


def test_metacell_is_the_integer_sum_over_the_union_without_neighbours():
    genes = _genes(np.arange(1, 5))
    gids, counts, nbr = pack.align_sample(
        np.array([0]), np.array([3.0]), [np.array([0, 1]), np.array([2])],
        [np.array([3.0, 6.0]), np.array([9.0])], genes, context=3200, metacell=True)
    np.testing.assert_array_equal(gids, [1, 2, 3])
    np.testing.assert_array_equal(counts, [6.0, 6.0, 9.0])  # summed counts stay counts
    assert nbr.shape == (0, 3)  # its neighbours are inside its counts, not handed in


@pytest.mark.parametrize("metacell", [False, True])
def test_align_sample_of_a_cell_and_neighbours_without_counts(metacell):
    genes = _genes(np.arange(1, 5))
    empty = np.zeros(0, dtype=np.int64)
    gids, counts, nbr = pack.align_sample(empty, np.zeros(0), [empty, empty],
                                          [np.zeros(0), np.zeros(0)], genes, context=8,
                                          metacell=metacell)
    assert gids.shape == (0,) and gids.dtype == np.uint32
    assert counts.shape == (0,) and counts.dtype == np.float32
    assert nbr.shape == (0 if metacell else 2, 0) and nbr.dtype == np.float32
    gids, counts, nbr = pack.align_sample(empty, np.zeros(0), [], [], genes, context=8,
                                          metacell=metacell)
    assert gids.shape == counts.shape == (0,) and nbr.shape == (0, 0)


def test_gene_order_from_the_plan_equals_ranking_the_map_again(tmp_path):
    """The plan saves each dataset's column ranks once; a shard's GeneOrder read from them is
    the one an argsort of the map gives (duplicate global ids rank by column), and a plan made
    before the ranks were saved still packs."""
    col2gid = np.array([7, 3, 9, 3, 0, 12, 7], dtype=np.int64)
    pack.save_dataset_maps(tmp_path, 4, col2gid, np.full((9, 1), -1))
    saved = pack.GeneOrder.load(tmp_path, 4)
    np.testing.assert_array_equal(saved.rank, [3, 1, 5, 2, 0, 6, 4])
    np.testing.assert_array_equal(saved.sorted_gid, [0, 3, 3, 7, 7, 9, 12])
    (tmp_path / "colrank-4.npy").unlink()
    again = pack.GeneOrder.load(tmp_path, 4)
    np.testing.assert_array_equal(again.rank, saved.rank)
    np.testing.assert_array_equal(again.sorted_gid, saved.sorted_gid)
    cols = (np.array([6, 0]), np.array([2.0, 1.0]))
    nbr = [(np.array([1, 3]), np.array([4.0, 5.0]))]
    for genes in (saved, again):
        gids, counts, _ = pack.align_sample(cols[0], cols[1], [nbr[0][0]], [nbr[0][1]], genes,
                                            context=8, metacell=False)
        np.testing.assert_array_equal(gids, [7, 7, 3, 3])
        np.testing.assert_array_equal(counts, [1.0, 2.0])


def test_shard_bounds_respect_samples_and_bytes():
    size = np.full(10, 100)
    np.testing.assert_array_equal(pack.shard_bounds(size, 4, 10_000), [0, 4, 8, 10])
    np.testing.assert_array_equal(pack.shard_bounds(size, 100, 250), [0, 2, 4, 6, 8, 10])
    # a sample larger than the byte limit still gets a shard of its own
    np.testing.assert_array_equal(pack.shard_bounds(np.array([500, 10]), 100, 100), [0, 1, 2])


def test_sample_bytes_bound_is_an_upper_bound():
    from data_prep.shard_format import CellSample, encode_sample, sample_bytes_bound

    genes = _genes(np.arange(1, 101))
    rng = np.random.default_rng(0)
    cell = np.sort(rng.choice(100, 30, replace=False))
    nbrs = [np.sort(rng.choice(100, 40, replace=False)) for _ in range(3)]
    for metacell in (False, True):
        gids, counts, nbr = pack.align_sample(cell, np.ones(30), nbrs, [np.ones(40)] * 3, genes,
                                              context=50, metacell=metacell)
        k = nbr.shape[0]
        s = CellSample(gids, counts, nbr, np.ones(k, np.float32), np.zeros(k, np.uint32),
                       np.zeros(9, np.int32), 0, 0, 9606, 0, 30, 0, 30.0, 1.0)
        bound = sample_bytes_bound(np.array([30]), np.array([120]), np.array([3]),
                                        np.array([metacell]), 50)
        assert len(encode_sample(s)) <= bound[0]


def test_holdout_is_stable_per_dataset_name():
    a = pack.holdout_mask(1000, 0.1, seed=3, name="pbmc")
    assert a.sum() == 100
    np.testing.assert_array_equal(a, pack.holdout_mask(1000, 0.1, seed=3, name="pbmc"))
    assert (a != pack.holdout_mask(1000, 0.1, seed=3, name="other")).any()
    assert not pack.holdout_mask(1000, 0.0, seed=3, name="pbmc").any()


def test_held_out_cells_whole_datasets_and_fractions():
    cfg = pack.PackConfig(eval_fraction=0.1, eval_datasets=["lung"])
    assert pack.held_out_cells("lung", 50, cfg, seed=3).all()
    np.testing.assert_array_equal(pack.held_out_cells("pbmc", 1000, cfg, seed=3),
                                  pack.holdout_mask(1000, 0.1, seed=3, name="pbmc"))
    pack.check_pack_config(cfg, ["pbmc", "lung"])
    with pytest.raises(ValueError, match="no dataset named lung"):
        pack.check_pack_config(cfg, ["pbmc", "lung_v2"])
    with pytest.raises(ValueError, match="--epochs"):
        pack.check_pack_config(pack.PackConfig(epochs=0), [])
    with pytest.raises(ValueError, match="--metacell-fraction"):
        pack.check_pack_config(pack.PackConfig(metacell_fraction=1.5), [])


def test_epoch_seeds_differ():
    seeds = [pack.epoch_seed(7, e) for e in range(5)]
    assert len(set(seeds)) == 5 and seeds == [pack.epoch_seed(7, e) for e in range(5)]
    assert pack.epoch_seed(8, 0) not in seeds


def test_npy_rows_reads_what_a_load_would(tmp_path):
    rng = np.random.default_rng(0)
    table = rng.standard_normal((5000, 3)).astype(np.float32)
    flat = rng.integers(0, 1000, 20_000).astype(np.int32)
    np.save(tmp_path / "table.npy", table)
    np.save(tmp_path / "flat.npy", flat)
    rows = np.array([4999, 3, 3, 0, 2500, 2501, 17])  # repeats, any order, near and far rows
    np.testing.assert_array_equal(pack.read_rows(tmp_path / "table.npy", rows), table[rows])
    np.testing.assert_array_equal(pack.read_rows(tmp_path / "table.npy", rows[:, None]),
                                  table[rows[:, None]])
    # disjoint sorted spans, one empty, some within READ_GAP of each other and some far apart
    starts, stops = np.array([0, 10, 10, 50, 19_000]), np.array([5, 10, 40, 60, 20_000])
    with pack.NpyRows(tmp_path / "flat.npy") as f:
        buf, at = f.spans(starts, stops)
    for a, b, p in zip(starts, stops, at):
        np.testing.assert_array_equal(buf[p:p + b - a], flat[a:b])
    np.testing.assert_array_equal(pack.read_range(tmp_path / "flat.npy", 7, 9000), flat[7:9000])
    for rows in ([20_000], [3, 20_000], [-1]):
        with pytest.raises(ValueError, match="out of range"):
            pack.read_rows(tmp_path / "flat.npy", np.array(rows))


@pytest.mark.parametrize("array", [
    np.arange(12, dtype=np.int64).reshape(3, 4), np.zeros(0, dtype=np.uint8),
    np.array([True, False]), np.float32(2.5), np.arange(6, dtype=">i2").reshape(2, 1, 3),
    np.array(["ab", "c"]),  # a header the fast pattern leaves to numpy's reader
    np.zeros(3, dtype=[("a", "<i4"), ("b", "<f8")]),
])
def test_npy_header_reader_agrees_with_numpy(tmp_path, array):
    path = tmp_path / "a.npy"
    np.save(path, array)
    big = tmp_path / "big.npy"  # format 2.0: a header too long for format 1.0
    with open(big, "wb") as f:
        np.lib.format.write_array(f, array, version=(2, 0))
    for p in (path, big):
        with open(p, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            want = read(f)
            offset = f.tell()
        fd = os.open(p, os.O_RDONLY)
        try:
            assert pack._npy_header(fd, p) == (*want, offset)
        finally:
            os.close(fd)
        # plain numeric arrays (what the pipeline writes) take the fast pattern
        fast = pack._PLAIN_HEADER.search(p.read_bytes()[:offset]) is not None
        assert fast == (array.dtype.kind in "biuf" and array.dtype.names is None)
        if array.ndim:
            np.testing.assert_array_equal(pack.read_array(p), array)


def test_npy_rows_refuses_fortran_order(tmp_path):
    np.save(tmp_path / "f.npy", np.asfortranarray(np.ones((3, 2))))
    with pytest.raises(ValueError, match="Fortran"):
        pack.NpyRows(tmp_path / "f.npy")
