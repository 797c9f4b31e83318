import numpy as np
import pytest

from data_prep.weights import (
    curriculum_gamma,
    depth_weight,
    group_ids,
    group_probabilities,
    group_weight,
    pair_probabilities,
)


def cell_probabilities(gid, nnz, multiplier=1.0, dataset=None, gamma=1.0):
    """Per-cell probabilities through the build's pair weights (one pair per group and
    dataset): P(pair) * w_i / sum of the pair's w."""
    gid = np.asarray(gid)
    dataset = np.zeros_like(gid) if dataset is None else np.asarray(dataset)
    mult = np.broadcast_to(np.asarray(multiplier, dtype=np.float64), gid.shape)
    pairs, pair_of = np.unique(np.column_stack([gid, dataset]), axis=0, return_inverse=True)
    pair_of = pair_of.reshape(-1)
    w = depth_weight(nnz)
    depth_sum = np.bincount(pair_of, w)
    first = np.unique(pair_of, return_index=True)[1]
    p = pair_probabilities(pairs[:, 0], np.bincount(pair_of), depth_sum, mult[first],
                           gamma=gamma)
    return p[pair_of] * w / depth_sum[pair_of]


def test_depth_weight_reference_values():
    w = depth_weight([500, 2000, 4000])
    assert w[0] == pytest.approx(1 + 999 / (1 + np.exp(4.5)))
    assert 11.5 < w[0] < 12.5
    assert w[1] == pytest.approx(500.5)
    assert 997 < w[2] < 999
    assert np.all(np.diff(depth_weight(np.arange(0, 10000, 100))) > 0)


def test_group_weight_saturates_near_S():
    assert group_weight(500) == pytest.approx(250.0)
    assert group_weight(1) == pytest.approx(500 / 501)
    assert group_weight(10**9) == pytest.approx(500.0, rel=1e-5)
    assert group_weight(500, S=100) == pytest.approx(100 * 500 / 600)
    assert group_weight(500, gamma=0.5) == pytest.approx(250.0**0.5)


def test_curriculum_gamma():
    assert curriculum_gamma(0) == pytest.approx(5 / 15)
    assert curriculum_gamma(4) == pytest.approx(9 / 15)
    assert curriculum_gamma(10) == 1.0
    assert curriculum_gamma(50) == 1.0


def test_cell_probabilities_hand_computed():
    gid = np.array([0, 0, 1])
    nnz = np.array([2000, 4000, 500])
    p = cell_probabilities(gid, nnz)
    w0, w1 = 500 * 2 / 502, 500 * 1 / 501
    d = depth_weight(nnz)
    expect = np.array(
        [w0 * d[0] / (d[0] + d[1]), w0 * d[1] / (d[0] + d[1]), w1 * 1.0]
    ) / (w0 + w1)
    np.testing.assert_allclose(p, expect, rtol=1e-12)
    assert p.sum() == pytest.approx(1.0)
    assert p.dtype == np.float64
    # gamma = 0 makes every group equally likely
    p0 = cell_probabilities(gid, nnz, gamma=0.0)
    assert group_probabilities(gid, p0) == pytest.approx([0.5, 0.5])


def test_big_group_does_not_dominate():
    rng = np.random.default_rng(0)
    gid = np.repeat([0, 1], [20000, 500])
    nnz = rng.integers(300, 6000, size=gid.size)
    p = cell_probabilities(gid, nnz)
    share = group_probabilities(gid, p)
    wa, wb = group_weight(20000), group_weight(500)
    assert share[0] == pytest.approx(wa / (wa + wb))  # ~0.66, although it has 97.6% of cells
    # a group's mass does not depend on its cells' depths (depth only acts within the group)
    p_deep = cell_probabilities(gid, np.where(gid == 0, 5000, nnz))
    assert group_probabilities(gid, p_deep) == pytest.approx(share)
    # the wrong formula W_c * w_i would hand the big group almost everything
    wrong = group_weight(np.bincount(gid))[gid] * depth_weight(nnz)
    assert wrong[gid == 0].sum() / wrong.sum() > 0.95


def test_multiplier_scales_dataset_mass():
    gid = np.array([0, 0, 1, 1, 2])
    nnz = np.full(5, 2500)
    base = cell_probabilities(gid, nnz)
    dataset = np.array([0, 0, 0, 0, 1])
    mult = np.array([1.0, 2.0])[dataset]
    p = cell_probabilities(gid, nnz, multiplier=mult, dataset=dataset)
    ratio = (p[dataset == 1].sum() / p[dataset == 0].sum()) / (
        base[dataset == 1].sum() / base[dataset == 0].sum()
    )
    assert ratio == pytest.approx(2.0)
    assert p.sum() == pytest.approx(1.0)
    p_off = cell_probabilities(gid, nnz, multiplier=np.array([1.0, 0.0])[dataset],
                               dataset=dataset)
    assert p_off[dataset == 1].sum() == 0.0
    with pytest.raises(ValueError):
        cell_probabilities(gid, nnz, multiplier=-1.0)
    with pytest.raises(ValueError, match="1-D of one length"):
        pair_probabilities([0, 1], [1, 1], [1.0])
    with pytest.raises(ValueError, match="every pair must have cells"):
        pair_probabilities([0, 1], [1, 0], [1.0, 0.0])


def test_a_group_across_datasets_weighs_as_one():
    """A pooled group split over two datasets gets the mass of one group of all its cells."""
    gid = np.array([0, 0, 0, 1])
    nnz = np.full(4, 2500)
    together = cell_probabilities(gid, nnz)
    split = cell_probabilities(gid, nnz, dataset=np.array([0, 1, 1, 1]))
    np.testing.assert_allclose(split, together, rtol=1e-12)


def test_group_ids_joint_code():
    keys = np.array(
        [["T_1", "blood", "9606"], ["B", "blood", "9606"], ["T_1", "blood", "9606"],
         ["T_1", "lung", "9606"], ["B", "blood", "10090"]],
        dtype=object,
    )
    ids, uniq = group_ids(keys)
    assert ids.tolist() == [2, 1, 2, 3, 0]  # sorted key order: deterministic numbering
    assert (uniq[ids] == keys).all()
    assert len(uniq) == 4
    ids_int, _ = group_ids(np.array([[3, 1], [3, 1], [0, 1]]))
    assert ids_int.tolist() == [1, 1, 0]


def test_sampled_stream_matches_group_targets():
    rng = np.random.default_rng(1)
    sizes = rng.integers(1, 3000, size=40)
    gid = np.repeat(np.arange(40), sizes)
    nnz = rng.integers(200, 7000, size=gid.size)
    p = cell_probabilities(gid, nnz, gamma=curriculum_gamma(2))
    target = group_probabilities(gid, p)
    draw = rng.choice(gid.size, size=20000, replace=True, p=p)
    freq = np.bincount(gid[draw], minlength=40) / draw.size
    assert 0.5 * np.abs(freq - target).sum() <= 0.05
    # deep cells are over-represented inside groups
    assert nnz[draw].mean() > nnz.mean() + 500


@pytest.mark.parametrize("epoch", [0, 5, 10])
def test_packed_stream_group_shares_within_tv_002_at_1m_draws(epoch, tmp_path, monkeypatch):
    """The build's sampler (``stream.draw_stream``: pair counts, draws within each dataset,
    meta-cells flagged, keyed external shuffle over 4 buckets) over 1,000 heavy-tailed groups
    (1 to ~100k cells, 400k cells in 20 datasets): at 1M draws each epoch's group shares are
    within total variation 0.02 of its target W_c^gamma / sum W^gamma, while uniform cell draws
    are far from it."""
    from data_prep import stream
    from data_prep.pack import METACELL_FRACTION, epoch_seed

    monkeypatch.setattr(stream, "BUCKET_SAMPLES", 250_000)
    rng = np.random.default_rng(epoch)
    sizes = np.maximum(1, rng.lognormal(4.5, 2.0, size=1000).astype(np.int64))
    sizes = np.minimum(sizes, 100_000)
    gid = np.repeat(np.arange(sizes.size), sizes)
    nnz = rng.integers(200, 7000, size=gid.size)
    bounds = np.linspace(0, gid.size, 21).astype(np.int64)  # 20 datasets, groups across them
    cells = [stream.DatasetCells(int(a), gid[a:b], depth_weight(nnz[a:b]), 1.0)
             for a, b in zip(bounds[:-1], bounds[1:])]
    table = stream.PairTable.concat([stream.PairTable.of(d, c) for d, c in enumerate(cells)])
    prob = table.probabilities(curriculum_gamma(epoch))
    target = table.group_target(prob, sizes.size)
    writer = stream.StreamWriter(tmp_path, 1000, 1 << 30)
    stream.draw_stream(tmp_path, writer, table, prob, cells, 1_000_000, METACELL_FRACTION,
                       epoch_seed(0, epoch), lambda d, rows, meta: np.ones(rows.shape[0]))
    writer.close("test")
    drawn, metacell = np.load(tmp_path / "cells.npy"), np.load(tmp_path / "metacell.npy")
    assert metacell.sum() == round(METACELL_FRACTION * 1_000_000)
    freq = np.bincount(gid[drawn], minlength=sizes.size) / drawn.size
    tv = 0.5 * np.abs(freq - target).sum()
    print(f"epoch {epoch}: gamma {curriculum_gamma(epoch):.3f}, {gid.size:,} cells, "
          f"total variation {tv:.4f} at 1M draws")
    assert tv <= 0.02
    assert 0.5 * np.abs(sizes / sizes.sum() - target).sum() > 0.3
    # meta-cell flags are independent of the group: their group shares match too
    meta_freq = np.bincount(gid[drawn[metacell]], minlength=sizes.size) / metacell.sum()
    assert 0.5 * np.abs(meta_freq - target).sum() <= 0.03
    # shuffled across datasets: every tenth of the stream draws from the 20 datasets alike
    # (within 5 Poisson standard deviations; the draw order before the shuffle is by dataset)
    dataset_of = np.searchsorted(bounds, drawn, side="right") - 1
    tenths = np.array([np.bincount(part, minlength=20) for part in np.split(dataset_of, 10)])
    mean = tenths.mean(axis=0)
    assert (np.abs(tenths - mean) < 5 * np.sqrt(mean)).all()
