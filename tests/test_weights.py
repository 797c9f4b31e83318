import numpy as np
import pytest

from data_prep.weights import (
    cell_probabilities,
    curriculum_gamma,
    depth_weight,
    group_ids,
    group_probabilities,
    group_weight,
)


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
    p = cell_probabilities(gid, nnz, multiplier=mult)
    ratio = (p[dataset == 1].sum() / p[dataset == 0].sum()) / (
        base[dataset == 1].sum() / base[dataset == 0].sum()
    )
    assert ratio == pytest.approx(2.0)
    assert p.sum() == pytest.approx(1.0)
    p_off = cell_probabilities(gid, nnz, multiplier=np.array([1.0, 0.0])[dataset])
    assert p_off[dataset == 1].sum() == 0.0
    with pytest.raises(ValueError):
        cell_probabilities(gid, nnz, multiplier=-1.0)
    with pytest.raises(ValueError):
        cell_probabilities(gid, nnz[:3])


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
def test_packed_stream_group_shares_within_tv_002_at_1m_draws(epoch):
    """The build's sampler (``pack.draw_stream``, meta-cells flagged) over 1,000 heavy-tailed
    groups (1 to ~100k cells, 400k cells): at 1M draws each epoch's group shares are within
    total variation 0.02 of its target W_c^gamma / sum W^gamma, while uniform cell draws are
    far from it."""
    from data_prep.pack import METACELL_FRACTION, draw_stream, epoch_seed

    rng = np.random.default_rng(epoch)
    sizes = np.maximum(1, rng.lognormal(4.5, 2.0, size=1000).astype(np.int64))
    sizes = np.minimum(sizes, 100_000)
    gid = np.repeat(np.arange(sizes.size), sizes)
    nnz = rng.integers(200, 7000, size=gid.size)
    p = cell_probabilities(gid, nnz, gamma=curriculum_gamma(epoch))
    target = group_probabilities(gid, p)
    cells, metacell = draw_stream(p, 1_000_000, METACELL_FRACTION, epoch_seed(0, epoch))
    freq = np.bincount(gid[cells], minlength=sizes.size) / cells.size
    tv = 0.5 * np.abs(freq - target).sum()
    print(f"epoch {epoch}: gamma {curriculum_gamma(epoch):.3f}, {gid.size:,} cells, "
          f"total variation {tv:.4f} at 1M draws")
    assert tv <= 0.02
    assert 0.5 * np.abs(sizes / sizes.sum() - target).sum() > 0.3
    # meta-cell flags are independent of the group: their group shares match too
    meta_freq = np.bincount(gid[cells[metacell]], minlength=sizes.size) / metacell.sum()
    assert 0.5 * np.abs(meta_freq - target).sum() <= 0.03
