"""Shard format 3: the compact encoding decodes to exactly what was encoded (integer counts of
any width, float counts, gene ids in any order, sparse neighbours), a damaged body or a shard of
another version is caught, and stock tarfile + zstandard read a member without this package."""

from __future__ import annotations

import ast
import io
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import zstandard

from data_prep import shard_format as F


def _sample(rng: np.random.Generator, n_expr: int, n_pad: int, n_nbr: int, top: float,
            floats: bool = False) -> F.CellSample:
    ids = np.sort(rng.choice(2**32 - 1, n_expr, replace=False)).astype(np.uint32)
    pad = rng.choice(2**20, n_pad, replace=False).astype(np.uint32)  # ranked, not sorted
    counts = rng.integers(1, top, n_expr).astype(np.float32)
    nbr = rng.integers(0, top, (n_nbr, n_expr + n_pad)).astype(np.float32)
    nbr[rng.random(nbr.shape) < 0.7] = 0
    if floats:
        counts = counts * np.float32(0.37)
    return F.CellSample(
        gene_ids=np.concatenate([ids, pad]), counts=counts, nbr_counts=nbr,
        nbr_dist=rng.random(n_nbr).astype(np.float32),
        nbr_cells=rng.integers(0, 2**32, n_nbr, dtype=np.uint32),
        labels=rng.integers(-1, 50, 9).astype(np.int32), dataset=3, cell=123_456, organism=9606,
        group=7, nnz=n_expr, pseudo_label=-1, total_count=float(counts.sum()), weight=0.5,
        flags=F.FLAG_METACELL if n_nbr == 0 else 0)


def _equal(a: F.CellSample, b: F.CellSample) -> None:
    for name, x in a.__dict__.items():
        y = getattr(b, name)
        if isinstance(x, np.ndarray):
            assert x.dtype == y.dtype and np.array_equal(x, y), name
        else:
            assert x == y, name


@pytest.mark.parametrize("n_expr,n_pad,n_nbr,top,floats", [
    (0, 0, 0, 2, False), (300, 40, 6, 100, False), (50, 3, 2, 70_000, False),
    (20, 0, 0, 2**31, False), (200, 10, 3, 50, True), (1, 0, 1, 2, False)])
def test_samples_round_trip_exactly(n_expr, n_pad, n_nbr, top, floats):
    s = _sample(np.random.default_rng(n_expr), n_expr, n_pad, n_nbr, top, floats)
    buf = F.encode_sample(s)
    _equal(s, F.decode_sample(buf))
    head = np.frombuffer(buf, F.HEADER, 1)[0]
    assert bool(head["flags"] & F.FLAG_FLOAT_COUNTS) == floats
    bound = F.sample_bytes_bound(np.array([n_expr]), np.array([n_pad]), np.array([n_nbr]),
                                 np.array([False]), n_expr + n_pad)
    assert len(buf) <= bound[0]


def test_small_counts_take_a_byte_each():
    s = _sample(np.random.default_rng(1), 2000, 0, 0, 100)
    body, _ = F.encode_body(s)
    zigzag = 2 * np.diff(s.gene_ids.astype(np.int64), prepend=0)  # ascending ids
    gene_bytes = int(sum((zigzag >= 2 ** (7 * q)).sum() for q in range(5)))
    assert len(body) == 2000 + gene_bytes


def test_damage_and_other_versions_are_reported():
    s = _sample(np.random.default_rng(2), 100, 10, 2, 30)
    buf = bytearray(F.encode_sample(s))
    buf[len(buf) // 2] ^= 0xFF  # inside the zstd frame: its checksum no longer matches
    with pytest.raises(ValueError, match="does not decompress|body"):
        F.decode_sample(bytes(buf))
    old = bytearray(F.encode_sample(s))
    old[4:6] = (2).to_bytes(2, "little")
    with pytest.raises(F.FormatVersionError, match="version 2"):
        F.decode_sample(bytes(old))
    with pytest.raises(F.FormatVersionError, match="version 2"):
        F.check_manifest({"format": F.FORMAT_NAME, "format_version": 2}, "OUT/manifest.json")


def test_stock_tools_read_a_member():
    """What docs/shard-format.md tells a third-party reader to do, with tarfile and zstandard."""
    s = _sample(np.random.default_rng(3), 64, 8, 3, 500)
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as tar:
        data = F.encode_sample(s)
        info = tarfile.TarInfo(f"{F.sample_key(0)}.{F.SAMPLE_EXT}")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    raw.seek(0)
    with tarfile.open(fileobj=raw) as tar:
        buf = tar.extractfile(tar.getmembers()[0]).read()
    head = np.frombuffer(buf, F.HEADER, count=1)[0]
    body = zstandard.ZstdDecompressor().decompress(buf[F.HEADER.itemsize:])
    assert len(body) == head["body_bytes"]
    _equal(s, F.decode_record(head, body))


def test_training_and_export_import_only_the_format_module_of_data_prep(repo_root):
    """Of data_prep, the trainer (everything ``pretrain/train.py`` imports) and the exporter load
    ``shard_format`` alone, which loads nothing else of the project; the helpers they share with
    the build are ``utils``, which loads nothing of data_prep either. Build code may then change
    without touching training."""
    code = ("import sys; import {}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('data_prep', 'pretrain',"
            " 'kernels', 'utils')))")

    def loaded(*modules):
        out = subprocess.run([sys.executable, "-c", code.format(", ".join(modules))],
                             cwd=repo_root, capture_output=True, text=True, check=True).stdout
        return ast.literal_eval(out.strip().splitlines()[-1])

    assert loaded("data_prep.shard_format") == ["data_prep", "data_prep.shard_format"]
    assert loaded("utils.atomic", "utils.flags") == ["utils", "utils.atomic", "utils.flags"]
    training = loaded("pretrain.train", "pretrain.export")
    assert "pretrain.export" in training and "pretrain.model" in training
    of_data_prep = [m for m in training if m.startswith("data_prep.")]
    assert of_data_prep == ["data_prep.shard_format"], f"training imports {of_data_prep}"


def test_is_remote_agrees_with_locate():
    """The manifest's shards are classified without joining paths; the rule is locate's."""
    roots = ["/data/build", "rel/build", "s3://bucket/build", "pipe:curl -s http://h/build"]
    paths = ["shards/a.tar", "/abs/a.tar", "file:///abs/a.tar", "file://rel/a.tar",
             "https://h/a.tar", "pipe:cat a.tar"]
    for root in roots:
        for path in paths:
            assert F.is_remote(root, path) == F.is_url(F.locate(root, path)), (root, path)
    assert F.is_remote("s3://bucket/build", "shards/a.tar")
    assert not F.is_remote("/data/build", "shards/a.tar")
