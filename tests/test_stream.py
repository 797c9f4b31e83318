"""The streams' draw and writer: distribution, exact meta-cell share, determinism, shard cuts
made in pieces."""

import numpy as np
import pytest

from data_prep import pack, stream
from utils.atomic import NpyAppender


def _corpus():
    """Two datasets; group 1 spans both, group 2 only the second; cell 2 is held out."""
    group = [np.array([0, 0, -1, 1, 1]), np.array([1, 2, 2, 2])]
    depth = [np.array([1.0, 3.0, 9.0, 2.0, 2.0]), np.array([4.0, 1.0, 1.0, 6.0])]
    cells = [stream.DatasetCells(0, group[0], depth[0], 1.0),
             stream.DatasetCells(5, group[1], depth[1], 2.0)]
    table = stream.PairTable.concat([stream.PairTable.of(d, c) for d, c in enumerate(cells)])
    return cells, table


def _draw(tmp_path, name, size, seed, metacell_fraction=0.25):
    cells, table = _corpus()
    prob = table.probabilities(gamma=0.5)
    seen = []
    writer = stream.StreamWriter(tmp_path / name, 7, 1 << 20)
    stream.draw_stream(tmp_path / name, writer, table, prob, cells, size, metacell_fraction,
                       seed, lambda d, rows, meta: (seen.append(d), np.ones(rows.shape[0]))[1])
    writer.close("fp")
    return table, prob, seen, {k: np.load(tmp_path / name / f"{k}.npy")
                               for k in ("cells", "metacell", "weight", "bounds")}


def test_draw_follows_the_cell_probabilities(tmp_path, monkeypatch):
    monkeypatch.setattr(stream, "BUCKET_SAMPLES", 7_000)  # 8 buckets
    table, prob, seen, s = _draw(tmp_path, "a", 50_000, seed=1)
    assert seen == [0, 1] and not (tmp_path / "a" / "buckets").exists()
    np.testing.assert_array_equal(table.group, [0, 1, 1, 2])
    np.testing.assert_array_equal(table.n_cells, [2, 2, 1, 3])
    # P(cell) = P(pair) * w_i / sum of the pair's w
    cells, _ = _corpus()
    p_cell = np.zeros(9)
    for d, c in enumerate(cells):
        sl = table.pairs_of(d)
        for g, pp, ws in zip(table.group[sl], prob[sl], table.depth_sum[sl]):
            mine = np.flatnonzero(c.group == g)
            p_cell[c.offset + mine] = pp * c.depth[mine] / ws
    assert p_cell.sum() == pytest.approx(1.0) and p_cell[2] == 0
    freq = np.bincount(s["cells"], minlength=9) / s["cells"].shape[0]
    assert 0.5 * np.abs(freq - p_cell).sum() < 0.01
    np.testing.assert_allclose(s["weight"], p_cell[s["cells"]] * table.n_pool)
    assert s["metacell"].sum() == 12_500  # an exact share
    for g in range(3):  # flags independent of the cell
        in_g = np.isin(s["cells"], np.flatnonzero(np.r_[cells[0].group, cells[1].group] == g))
        assert s["metacell"][in_g].mean() == pytest.approx(0.25, abs=0.02)
    np.testing.assert_array_equal(s["bounds"], np.r_[np.arange(0, 50_000, 7), 50_000])
    # the same bytes on a rerun, another stream with another seed
    again = _draw(tmp_path, "b", 50_000, seed=1)[3]
    for k in s:
        a, b = (tmp_path / name / f"{k}.npy" for name in ("a", "b"))
        assert a.read_bytes() == b.read_bytes()
    other = _draw(tmp_path, "c", 50_000, seed=2)[3]
    assert (other["cells"] != s["cells"]).mean() > 0.5
    assert (again["cells"] == s["cells"]).all()


def test_stream_writer_cuts_in_pieces_as_at_once(tmp_path):
    rng = np.random.default_rng(0)
    sizes = rng.integers(1, 300, 5000)
    sizes[[10, 2000]] = 5000  # larger than a shard: a shard of their own
    writer = stream.StreamWriter(tmp_path, 40, 2000)
    for part in np.split(np.arange(5000), [1, 2, 500, 501, 3333]):
        writer.add(part, part % 2 == 0, part * 0.5, sizes[part])
    writer.close("fp", extra=np.arange(3))
    np.testing.assert_array_equal(np.load(tmp_path / "bounds.npy"),
                                  pack.shard_bounds(sizes, 40, 2000))
    np.testing.assert_array_equal(np.load(tmp_path / "cells.npy"), np.arange(5000))
    np.testing.assert_array_equal(np.load(tmp_path / "metacell.npy"), np.arange(5000) % 2 == 0)
    np.testing.assert_array_equal(pack.read_range(tmp_path / "weight.npy", 3, 9),
                                  np.arange(3, 9) * 0.5)
    np.testing.assert_array_equal(np.load(tmp_path / "extra.npy"), np.arange(3))
    assert pack.plan_fingerprint(tmp_path.parent, tmp_path.name) == "fp"


def test_npy_appender_writes_nothing_until_closed(tmp_path):
    path = tmp_path / "x.npy"
    f = NpyAppender(path, np.int32)
    f.append(np.arange(5))
    assert not path.exists()
    f.abort()
    assert not list(tmp_path.iterdir())
    f = NpyAppender(path, np.float64)
    f.close()
    assert np.load(path).shape == (0,)


def test_npy_appender_writes_what_np_save_writes(tmp_path):
    """Byte for byte (the packer's fast header parser knows numpy's header, not others)."""
    import io

    for dtype in (np.int32, np.float32, np.int64):
        f = NpyAppender(tmp_path / "x.npy", dtype)
        f.append(np.arange(7))
        f.append(np.arange(123_456))
        f.close()
        expect = io.BytesIO()
        np.save(expect, np.concatenate([np.arange(7), np.arange(123_456)]).astype(dtype))
        assert (tmp_path / "x.npy").read_bytes() == expect.getvalue()
