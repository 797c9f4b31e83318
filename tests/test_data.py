"""The training data loader: disjoint seeded rank/worker streams, exact resume, corrupt shards,
context sampling, padding, corruption and the batch contract, on shards built from real cells."""

from __future__ import annotations

import io
import itertools
import json
import tarfile
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import torch

from data_prep.shard_format import (
    CLASSES,
    FLAG_METACELL,
    FORMAT_VERSION,
    HEADER,
    CellSample,
    FormatVersionError,
    encode_sample,
    is_url,
    locate,
    sample_key,
)
from pretrain.data import CellBatches, CellLoader, DataConfig
from pretrain.shard_stream import ShardStream, ShardTable

# Real files, cells taken from each, and their taxon.
SOURCES = (
    ("human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad", 150, 9606),
    ("mouse_stomach_intestine_MCA_scgoclust_219cells_raw.h5ad", 90, 10090),
)
N_SHARDS = 6


def _neighbours(x: np.ndarray, k: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Exact kNN in a 20-component PCA of log1p(CP10k)."""
    logn = np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4)
    logn -= logn.mean(0)
    u, s, _ = np.linalg.svd(logn, full_matrices=False)
    pcs = u[:, :20] * s[:20]
    d = np.sqrt(((pcs[:, None] - pcs[None]) ** 2).sum(-1))
    np.fill_diagonal(d, np.inf)
    idx = np.argsort(d, axis=1)[:, :k]
    return idx, np.take_along_axis(d, idx, axis=1).astype(np.float32)


def _cell_samples(data: Path) -> list[CellSample]:
    samples, start = [], 1
    for ds, (fname, n, taxon) in enumerate(SOURCES):
        x = np.asarray(ad.read_h5ad(data / fname).X[:n].todense(), dtype=np.float32)
        idx, dist = _neighbours(x)
        for i in range(n):
            expr = np.flatnonzero(x[i])
            nb = x[idx[i]]
            pad = np.setdiff1d(np.flatnonzero(nb.sum(0)), expr)
            pad = pad[np.argsort(-nb[:, pad].sum(0), kind="stable")]
            cols = np.concatenate([expr, pad])
            n_nbr = 6 - i % 3  # some cells carry fewer than 6 neighbours
            labels = np.full(len(CLASSES), -1, dtype=np.int32)
            labels[-1] = ds
            samples.append(CellSample(
                gene_ids=(cols + start).astype(np.uint32), counts=x[i, expr],
                nbr_counts=np.ascontiguousarray(nb[:n_nbr, cols]), nbr_dist=dist[i, :n_nbr],
                nbr_cells=idx[i, :n_nbr].astype(np.uint32), labels=labels, dataset=ds, cell=i,
                organism=taxon, group=ds, nnz=len(expr), pseudo_label=-1,
                total_count=float(x[i].sum()), weight=1.0))
        start += x.shape[1]
    return samples


def write_shards(samples: list[CellSample], out: Path, n_shards: int, epochs: int = 1) -> Path:
    """A build_shards-shaped output (manifest + tar shards); eval gets every 8th sample; the
    train shards are split into ``epochs`` consecutive packed epochs."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "shards").mkdir(exist_ok=True)
    order = np.random.default_rng(0).permutation(len(samples))
    splits = {"eval_shards": order[::8], "shards": np.setdiff1d(order, order[::8])}
    entries: dict[str, list] = {}
    for split, idx in splits.items():
        parts = np.array_split(idx, n_shards if split == "shards" else 2)
        entries[split] = []
        for s, part in enumerate(parts):
            rel = f"shards/{split}-{s:06d}.tar"
            with tarfile.open(out / rel, "w") as tar:
                for pos in part:
                    data = encode_sample(samples[pos])
                    info = tarfile.TarInfo(f"{sample_key(int(pos))}.cell")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
            entries[split].append({"path": rel, "n_samples": len(part),
                                   "bytes": (out / rel).stat().st_size, "sha256": ""})
            if split == "shards":
                entries[split][-1]["epoch"] = s * epochs // len(parts)
    manifest = {"format": "scpretrain-cells", "format_version": FORMAT_VERSION, **entries,
                "n_samples": int(len(splits["shards"])),
                "n_eval_samples": int(len(splits["eval_shards"]))}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def samples(real_data: Path) -> list[CellSample]:
    return _cell_samples(real_data)


@pytest.fixture(scope="module")
def shards(samples: list[CellSample], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_shards(samples, tmp_path_factory.mktemp("shards"), N_SHARDS)


@pytest.fixture(scope="module")
def by_id(shards: Path, samples: list[CellSample]) -> dict[int, CellSample]:
    """sample_id -> the sample, read back from the shards."""
    manifest = json.loads((shards / "manifest.json").read_text())
    out = {}
    for s, entry in enumerate(manifest["shards"]):
        with tarfile.open(shards / entry["path"]) as tar:
            for m in tar.getmembers():
                out[(s << 32) + int(m.name.split(".")[0])] = samples[int(m.name.split(".")[0])]
    return out


def _cfg(shards: Path, **kw) -> DataConfig:
    base = dict(shards=str(shards), context=256, short_context_min=64, batch_size=8,
                shuffle_buffer=16, seed=3)
    return DataConfig(**{**base, **kw})


def _ids(stream: ShardStream, n: int) -> list[int]:
    return [item[0] for item in itertools.islice(stream.samples(), n)]


@pytest.mark.parametrize("world,workers", [(2, 2), (4, 2)])
def test_slots_are_disjoint_and_cover_each_epoch(shards, by_id, world, workers):
    # (2, 2): 4 slots share 6 shards by shard; (4, 2): 8 slots > 6 shards, split by sample.
    cfg = _cfg(shards)
    n_slots = world * workers
    for epoch in (0, 1):
        seen: list[int] = []
        for slot in range(n_slots):
            stream = ShardStream(cfg, slot, n_slots)
            ids = _ids(stream, sum(stream.epoch_size(e) for e in range(epoch + 1)))
            seen += ids[sum(stream.epoch_size(e) for e in range(epoch)):]
        assert len(seen) == len(set(seen)) == len(by_id)
        assert set(seen) == set(by_id)
    # Epochs reshuffle: a slot's shards and order change from one epoch to the next.
    s = ShardStream(cfg, 0, 2)
    assert [x for x, _ in s.plan(0)] != [x for x, _ in s.plan(1)] or _ids(s, 20) != _ids(
        ShardStream(_cfg(shards, seed=4), 0, 2), 20)


def test_ranks_get_disjoint_batches_through_the_loader(shards, by_id):
    cfg = _cfg(shards, num_workers=0, batch_size=10)
    epoch_batches = len(by_id) // (2 * 10)
    ids = [torch.cat([b["sample_id"] for b in itertools.islice(
        CellLoader(cfg, rank=r, world_size=2), epoch_batches)]).tolist() for r in range(2)]
    assert not set(ids[0]) & set(ids[1])
    assert len(set(ids[0])) == len(ids[0]) and set(ids[0]) <= set(by_id)


def test_webdataset_reader_gives_the_same_batches(shards, tmp_path):
    # Shards given as pipe: specs stream through webdataset under reader="auto".
    manifest = json.loads((shards / "manifest.json").read_text())
    for e in manifest["shards"]:
        e["path"] = f"pipe:cat {shards / e['path']}"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for root, reader in ((tmp_path, "webdataset"), (shards, "mmap")):
        stream = ShardStream(_cfg(root), 0, 1)
        assert [stream.reader_of(s) for s in range(N_SHARDS)] == [reader] * N_SHARDS
    a = itertools.islice(iter(CellBatches(_cfg(shards))), 4)
    b = itertools.islice(iter(CellBatches(_cfg(shards, reader="webdataset"))), 4)
    c = itertools.islice(iter(CellBatches(_cfg(tmp_path))), 4)
    for x, y, z in zip(a, b, c, strict=True):
        assert all(torch.equal(x[k], y[k]) and torch.equal(x[k], z[k]) for k in x)
    with pytest.raises(ValueError, match="mmap reader needs a local"):
        ShardStream(_cfg(tmp_path, reader="mmap"), 0, 1)


def test_shard_table_is_the_manifest_in_arrays(shards, tmp_path):
    """What a stream keeps of the manifest: each shard's source and whether it is remote as the
    manifest's paths give them (relative, absolute, file://, URL, pipe:; under a plain and a
    file:// root), its samples and epoch; a rank's loader reads it once for its workers."""
    manifest = json.loads((shards / "manifest.json").read_text())
    forms = [lambda p: p, lambda p: str(shards / p), lambda p: f"file://{shards / p}",
             lambda p: f"https://example.org/{p}", lambda p: f"pipe:cat {shards / p}",
             lambda p: f"file://{p}"]
    for e, form in zip(manifest["shards"], forms, strict=True):
        e["path"] = form(e["path"])
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    for root in (str(tmp_path), f"file://{tmp_path}"):
        table = ShardTable.read(root, "train")
        assert len(table) == N_SHARDS and table.epochs() == [0]
        for s, e in enumerate(manifest["shards"]):
            assert table.source(s) == locate(root, e["path"])
            assert table.url[s] == is_url(locate(root, e["path"]))
            assert table.n_samples[s] == e["n_samples"] and table.epoch[s] == 0
    loader = CellLoader(_cfg(shards, num_workers=2), rank=0, world_size=1)
    assert next(iter(loader))["gene_ids"].shape[0] == 8  # workers stream from the rank's table


def test_seed_reproduces_and_changes_the_stream(shards):
    def first(seed: int) -> list[dict]:
        return list(itertools.islice(iter(CellBatches(_cfg(shards, seed=seed))), 3))

    a, b, c = first(3), first(3), first(4)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert not all(torch.equal(x["sample_id"], z["sample_id"]) for x, z in zip(a, c))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_gives_the_same_batches(shards, workers):
    cfg = _cfg(shards, num_workers=workers, shuffle_buffer=8)
    n_epoch = sum(e["n_samples"] for e in json.loads((shards / "manifest.json").read_text())
                  ["shards"]) // cfg.batch_size
    stop, total = n_epoch + 3, n_epoch + 7  # the resume point lies in the second epoch
    full = list(itertools.islice(CellLoader(cfg, rank=1, world_size=2), total))
    first = CellLoader(cfg, rank=1, world_size=2)
    _ = list(itertools.islice(first, stop))
    state = first.state_dict()
    assert state["batches"] == stop
    resumed = CellLoader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed, total - stop))
    for x, y in zip(full[stop:], rest):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="rank 1, this loader is rank 0"):
        CellLoader(cfg, rank=0, world_size=2).load_state_dict(state)
    with pytest.raises(ValueError, match="another seed"):
        CellLoader(_cfg(shards, num_workers=workers, seed=4), rank=1,
                   world_size=2).load_state_dict(state)


@pytest.fixture(scope="module")
def epoch_shards(samples: list[CellSample], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same samples in 6 shards packed as 2 epochs (shards 0-2: epoch 0, 3-5: epoch 1)."""
    return write_shards(samples, tmp_path_factory.mktemp("epochs"), N_SHARDS, epochs=2)


def _epoch_of(shards: Path) -> dict[int, int]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return {s: e["epoch"] for s, e in enumerate(manifest["shards"])}


@pytest.mark.parametrize("world", [1, 4])
def test_epochs_are_read_in_order_and_the_stream_wraps(epoch_shards, world, caplog):
    """Epoch e's shards come after e-1's for every slot; past the last packed epoch the stream
    says so and starts again from the first (world 4: more slots than an epoch's shards)."""
    of = _epoch_of(epoch_shards)
    for slot in range(world):
        stream = ShardStream(_cfg(epoch_shards), slot, world)
        sizes = [stream.epoch_size(t) for t in range(4)]
        with caplog.at_level("WARNING", logger="pretrain.shard_stream"):
            caplog.clear()
            items = stream.samples()
            first = [of[i >> 32] for i, _ in itertools.islice(items, sizes[0] + sizes[1])]
            assert first == [0] * sizes[0] + [1] * sizes[1]
            assert stream.stats["passes"] == 0 and not caplog.records
            again = [of[i >> 32] for i, _ in itertools.islice(items, sizes[2])]
        assert again == [0] * sizes[2] and stream.stats["passes"] == 1
        assert stream.stats["epoch"] == 0
        assert any("ran past the last packed epoch" in r.message for r in caplog.records)
    # each pass through an epoch reshuffles it
    stream = ShardStream(_cfg(epoch_shards), 0, 1)
    assert _ids(stream, sizes[0]) != list(
        itertools.islice((i for i, _ in stream.samples(sizes[0] + sizes[1])), sizes[0]))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_across_an_epoch_boundary(epoch_shards, workers):
    """The loader state names the packed epoch; a run resumed just before the boundary
    continues into the next epoch batch for batch as if it had never stopped."""
    cfg = _cfg(epoch_shards, num_workers=workers, shuffle_buffer=8)
    loader, full, epochs = CellLoader(cfg, rank=1, world_size=2), [], []
    for batch in itertools.islice(loader, 40):
        full.append(batch)
        epochs.append(loader.stats["epoch"])
    boundary = epochs.index(1)
    stop, total = boundary - 1, boundary + 2
    assert stop > 0 and total <= len(full)
    first = CellLoader(cfg, rank=1, world_size=2)
    _ = list(itertools.islice(first, stop))
    state = first.state_dict()
    assert state["epoch"] == 0 and state["passes"] == 0 and state["epochs"] == [0, 1]
    resumed = CellLoader(cfg, rank=1, world_size=2)
    resumed.load_state_dict(state)
    rest = list(itertools.islice(resumed, total - stop))
    for x, y in zip(full[stop:total], rest, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    assert resumed.stats["epoch"] == epochs[total - 1] == 1
    of = _epoch_of(epoch_shards)
    assert {of[int(i) >> 32] for b in rest for i in b["sample_id"]} == {0, 1}


def _same(a, b) -> bool:
    """Two re-deals leave out the same shards from the same epoch on."""
    return (a.epoch, a.generation, a.reread) == (b.epoch, b.generation, b.reread) and (
        a.done.keys() == b.done.keys()
        and all(np.array_equal(a.done[t], b.done[t]) for t in a.done))


def _ids_of(batches) -> list[int]:
    return [int(i) for b in batches for i in b["sample_id"]]


@pytest.mark.parametrize("old,new,stop", [
    ((2, 0, 8, 8), (3, 0, 8, 8), 5),     # more ranks; epoch 0 was dealt by shard
    ((1, 2, 8, 8), (2, 0, 4, 16), 10),   # workers, batch size and shuffle block change
    ((4, 0, 4, 8), (1, 2, 8, 8), 4),     # fewer ranks; epoch 0 was dealt by sample (3 shards)
])
def test_resume_with_another_layout_reads_each_sample_once(epoch_shards, old, new, stop):
    """A state saved with other ranks, workers, batch size or shuffle block is dealt again: the
    new slots read disjoint samples that, with those the old ranks had read, make up the epochs
    exactly once each, except ``redeal.reread`` samples of shards the old ranks had not finished
    (a shard and a shuffle block per old slot at most); the re-dealt loader then resumes exactly
    under its own layout."""
    (world, workers, batch, block), (world2, workers2, batch2, block2) = old, new
    of = _epoch_of(epoch_shards)
    table = ShardTable.read(str(epoch_shards), "train")
    cfg = _cfg(epoch_shards, num_workers=workers, batch_size=batch, shuffle_buffer=block)
    old_ids, states = [], []
    for rank in range(world):
        loader = CellLoader(cfg, rank=rank, world_size=world)
        old_ids += _ids_of(itertools.islice(loader, stop))
        states.append(loader.state_dict())
    assert len(old_ids) == len(set(old_ids)) and {of[i >> 32] for i in old_ids} <= {0, 1}

    cfg2 = _cfg(epoch_shards, num_workers=workers2, batch_size=batch2, shuffle_buffer=block2)
    redeals = []
    for rank in range(world2):
        loader = CellLoader(cfg2, rank=rank, world_size=world2)
        loader.load_state_dict(states[rank % world])
        redeals.append(loader.redeal)
        assert loader.batches == 0 and loader.stats["epoch"] == 0
    redeal = redeals[0]
    assert all(_same(r, redeal) for r in redeals)  # any rank's state places all
    assert redeal.epoch == 0 and redeal.generation == 1 and len(redeal.done[0]) > 0
    new_ids = []  # loader epochs 0 and 1 as the new slots read them
    n_slots = world2 * max(workers2, 1)
    for slot in range(n_slots):
        stream = ShardStream(cfg2, slot, n_slots, table, redeal)
        n = stream.epoch_size(0) + stream.epoch_size(1)
        new_ids += [i for i, _ in itertools.islice(stream.samples(), n)]
    assert len(new_ids) == len(set(new_ids))  # the new slots read disjoint samples
    assert set(old_ids) | set(new_ids) == set(_stream_ids(epoch_shards))  # nothing skipped
    assert len(set(old_ids) & set(new_ids)) == redeal.reread > 0
    largest = int(table.n_samples.max())
    assert redeal.reread <= world * max(workers, 1) * (largest + block)

    # Resumed again under the new layout, the re-dealt stream continues batch for batch.
    loader = CellLoader(cfg2, rank=world2 - 1, world_size=world2)
    loader.load_state_dict(states[0])
    full = list(itertools.islice(loader, 6))
    first = CellLoader(cfg2, rank=world2 - 1, world_size=world2)
    first.load_state_dict(states[0])
    _ = list(itertools.islice(first, 2))
    state = first.state_dict()
    assert state["batches"] == 2 and state["redeal"] == redeal.source
    assert state["redeal"] == {"world_size": world, "num_workers": workers, "batch_size": batch,
                               "shuffle_buffer": block, "batches": stop}
    again = CellLoader(cfg2, rank=world2 - 1, world_size=world2)
    again.load_state_dict(state)
    assert _same(again.redeal, redeal)  # made again from the few numbers of its source
    for x, y in zip(full[2:], itertools.islice(again, 4), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)


def test_second_redeal_keeps_what_the_first_left_out(epoch_shards):
    """2 ranks -> 3 -> 1: the second re-deal places the old slots on the first re-deal's
    plans and keeps its done shards, so the three phases read loader epochs 0 and 1 whole, each
    sample once but for what the two re-deals say they read again."""
    table = ShardTable.read(str(epoch_shards), "train")
    cfg = _cfg(epoch_shards, batch_size=8, shuffle_buffer=8)
    read: list[int] = []
    state: dict = {}
    redeals = []
    for world, taken in ((2, 5), (3, 3)):
        for rank in range(world):
            loader = CellLoader(cfg, rank=rank, world_size=world)
            if state:
                loader.load_state_dict(state)
            read += _ids_of(itertools.islice(loader, taken))
            if rank == 0:
                saved = loader.state_dict()
        state = saved
        redeals.append(loader.redeal)
    last = CellLoader(cfg, rank=0, world_size=1)
    last.load_state_dict(state)
    second = last.redeal
    assert second.generation == 2 and redeals[1].generation == 1
    for t, shards in redeals[1].done.items():
        if t >= second.epoch:
            assert set(shards) <= set(second.done[t])
    stream = ShardStream(cfg, 0, 1, table, second)
    read += [i for i, _ in itertools.islice(stream.samples(), sum(
        stream.epoch_size(t) for t in range(second.epoch, 2)))]
    assert set(read) == set(_stream_ids(epoch_shards))
    assert len(read) - len(set(read)) == redeals[1].reread + second.reread


def test_redeal_after_the_stream_wrapped(epoch_shards, caplog):
    """A state saved in a later pass (past the last packed epoch) re-deals in that pass: the new
    slots start at its loader epoch, count the pass, and do not warn of it again."""
    cfg = _cfg(epoch_shards, batch_size=8, shuffle_buffer=8)
    old = CellLoader(cfg, rank=0, world_size=1)
    with caplog.at_level("WARNING", logger="pretrain.shard_stream"):
        _ = list(itertools.islice(old, 30))  # 240 samples: past both packed epochs (210)
        assert any("ran past the last packed epoch" in r.message for r in caplog.records)
        caplog.clear()
        new = CellLoader(cfg, rank=1, world_size=2)
        new.load_state_dict(old.state_dict())
        assert new.redeal.epoch == 2 and new.stats["passes"] == 1 and new.stats["epoch"] == 0
        batch = next(iter(new))
        assert not caplog.records
    of = _epoch_of(epoch_shards)
    assert {of[int(i) >> 32] for i in batch["sample_id"]} == {0}


def _stream_ids(shards: Path) -> list[int]:
    """Every train sample id of the manifest."""
    table = ShardTable.read(str(shards), "train")
    return [(s << 32) + k for s in range(len(table))
            for k in _keys(table.source(s))]


def _keys(path: str) -> list[int]:
    with tarfile.open(path) as tar:
        return [int(m.name.split(".")[0]) for m in tar.getmembers()]


def test_resume_after_epochs_were_added(epoch_shards, shards):
    """A checkpoint saved over epoch 0 resumes exactly once epoch 1 has been packed too; a state
    whose epochs the manifest no longer starts with is refused."""
    manifest = json.loads((epoch_shards / "manifest.json").read_text())
    only_first = epoch_shards.parent / "only_first"
    only_first.mkdir()
    (only_first / "shards").symlink_to(epoch_shards / "shards")
    manifest["shards"] = [e for e in manifest["shards"] if e["epoch"] == 0]
    (only_first / "manifest.json").write_text(json.dumps(manifest))
    early = CellLoader(_cfg(only_first), rank=0, world_size=1)
    _ = list(itertools.islice(early, 3))
    state = early.state_dict()
    assert state["epochs"] == [0]
    full = list(itertools.islice(CellLoader(_cfg(epoch_shards), rank=0, world_size=1), 6))
    later = CellLoader(_cfg(epoch_shards), rank=0, world_size=1)
    later.load_state_dict(state)
    for x, y in zip(full[3:], itertools.islice(later, 3), strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    with pytest.raises(ValueError, match="packed epochs"):
        CellLoader(_cfg(shards), rank=0, world_size=1).load_state_dict({**state,
                                                                       "epochs": [3]})


def test_metacells_are_never_zeroed(samples, tmp_path):
    """A meta-cell (flagged, no neighbours) keeps its own input even in the full pass."""
    meta = [CellSample(**{**s.__dict__, "nbr_counts": s.nbr_counts[:0], "nbr_dist":
                          s.nbr_dist[:0], "nbr_cells": s.nbr_cells[:0], "flags": FLAG_METACELL})
            for s in samples[:64]]
    out = write_shards(meta + samples[64:128], tmp_path / "meta", 2)
    batch = next(iter(CellBatches(_cfg(out, full_pass_prob=1.0, batch_size=56))))
    is_meta = batch["sample_id"].remainder(2**32) < 64
    assert is_meta.any() and (~is_meta).any()
    assert not batch["zeroed"][is_meta].any() and batch["zeroed"][~is_meta].all()
    assert (batch["input_counts"][is_meta].sum(1) > 0).all()
    assert not batch["nbr_mask"][is_meta].any()


def test_corrupt_and_truncated_shards_are_skipped_and_counted(shards, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "shards").mkdir()
    manifest = json.loads((shards / "manifest.json").read_text())
    for e in manifest["shards"] + manifest["eval_shards"]:
        (bad / e["path"]).write_bytes((shards / e["path"]).read_bytes())
    truncated = bad / manifest["shards"][1]["path"]
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 3])
    (bad / manifest["shards"][2]["path"]).write_bytes(b"this is not a tar file" * 100)
    (bad / "manifest.json").write_text(json.dumps(manifest))
    cfg = _cfg(bad, batch_size=4)
    loader = CellLoader(cfg, rank=0, world_size=1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        n = sum(e["n_samples"] for e in manifest["shards"]) // 4
        batches = list(itertools.islice(loader, n))
    assert len(batches) == n
    assert loader.stats["corrupt_shards"] >= 2
    assert any("unreadable shard" in str(w.message) for w in caught)
    ids = torch.cat([b["sample_id"] for b in batches])
    assert not ((ids >> 32) == 2).any()  # nothing from the garbage shard


def test_bad_sample_is_skipped(shards, samples, tmp_path):
    out = tmp_path / "one"
    out.mkdir()
    write_shards(samples[:40], out, 1)
    path = out / "shards" / "shards-000000.tar"
    raw = bytearray(path.read_bytes())
    raw[512 : 512 + 4] = b"XXXX"  # the first member's magic
    path.write_bytes(bytes(raw))
    stream = ShardStream(_cfg(out), 0, 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ids = _ids(stream, stream.epoch_size(0) - 1)
    assert stream.stats["corrupt_samples"] == 1 and len(set(ids)) == len(ids)


def test_batch_contract_and_context_sampling(shards, by_id):
    cfg = _cfg(shards, views=2, short_context_prob=0.0, n_neighbours=4, full_pass_prob=0.25)
    batches = list(itertools.islice(iter(CellBatches(cfg)), 6))
    b = batches[0]
    B, L = cfg.batch_size, cfg.context
    shapes = {"gene_ids": (B, L), "gene_mask": (B, L), "expressed": (B, L), "counts": (B, L),
              "input_counts": (B, L), "input_counts_2": (B, L), "zeroed": (B,),
              "nbr_counts": (B, 6, L), "nbr_dist": (B, 6), "nbr_mask": (B, 6),
              "total_count": (B,), "labels": (B, 9), "organism": (B,), "dataset": (B,),
              "group": (B,), "weight": (B,), "sample_id": (B,)}
    dtypes = {"gene_ids": torch.int64, "labels": torch.int64, "organism": torch.int64,
              "dataset": torch.int64, "group": torch.int64, "sample_id": torch.int64,
              "gene_mask": torch.bool, "expressed": torch.bool, "zeroed": torch.bool,
              "nbr_mask": torch.bool}
    assert set(b) == set(shapes)
    for k, shape in shapes.items():
        assert tuple(b[k].shape) == shape, k
        assert b[k].dtype == dtypes.get(k, torch.float32), k
    n_zeroed = 0
    for b in batches:
        for i, sid in enumerate(b["sample_id"].tolist()):
            s = by_id[sid]
            n_expr, n_genes = s.n_expr, s.gene_ids.shape[0]
            w = min(L, n_genes)
            ids = b["gene_ids"][i].numpy()
            mask = b["gene_mask"][i].numpy()
            assert mask[:w].all() and not mask[w:].any() and (ids[w:] == 0).all()
            m = min(L, n_expr)
            # Expressed genes first, each at most once; then the top-ranked padding genes.
            col = {int(g): j for j, g in enumerate(s.gene_ids)}
            pos = np.array([col[int(g)] for g in ids[:w]])
            assert len(set(pos.tolist())) == w
            assert (pos[:m] < n_expr).all() and (pos[m:] == n_expr + np.arange(w - m)).all()
            assert np.array_equal(b["counts"][i, :m].numpy(), s.counts[pos[:m]])
            assert not b["counts"][i, m:].any() and b["expressed"][i, :m].all()
            assert not b["expressed"][i, m:].any()
            # Neighbours: 4 asked, capped by what the sample has; all of them on the full pass.
            zeroed = bool(b["zeroed"][i])
            k = min(s.nbr_dist.shape[0], 6 if zeroed else 4)
            assert b["nbr_mask"][i].tolist() == [j < k for j in range(6)]
            assert np.array_equal(b["nbr_counts"][i, :k, :w].numpy(), s.nbr_counts[:k, pos])
            assert not b["nbr_counts"][i, k:].any() and not b["nbr_dist"][i, k:].any()
            assert np.array_equal(b["nbr_dist"][i, :k].numpy(), s.nbr_dist[:k])
            assert b["total_count"][i] == np.float32(s.total_count)
            assert b["organism"][i] == s.organism and b["dataset"][i] == s.dataset
            for view in ("input_counts", "input_counts_2"):
                x, y = b["counts"][i], b[view][i]
                assert (y <= x).all() and (y >= 0).all()
                assert not zeroed or not y.any()
            n_zeroed += zeroed
    assert 0 < n_zeroed < len(batches) * B


@pytest.mark.parametrize("pad_alone", [True, False])
def test_padding_of_a_cell_given_no_neighbours(shards, by_id, pad_alone):
    # Padding genes are those the neighbours express: without pad_alone a cell given none of its
    # neighbours gets none of their genes either (its context ends with its own expressed genes);
    # a full-pass cell (own input zeroed, all neighbours given) keeps them.
    cfg = _cfg(shards, context=2048, short_context_prob=0.0, n_neighbours=0, full_pass_prob=0.3,
               pad_alone=pad_alone)
    seen = {True: 0, False: 0}
    for b in itertools.islice(iter(CellBatches(cfg)), 12):
        for i, sid in enumerate(b["sample_id"].tolist()):
            s = by_id[sid]
            zeroed = bool(b["zeroed"][i])
            if s.gene_ids.shape[0] <= s.n_expr or s.n_expr >= cfg.context:
                continue  # no padding genes to give
            padded = pad_alone or (zeroed and s.nbr_dist.shape[0] > 0)
            w = min(cfg.context, s.gene_ids.shape[0] if padded else s.n_expr)
            assert int(b["gene_mask"][i].sum()) == w and not b["gene_ids"][i, w:].any()
            assert int(b["nbr_mask"][i].sum()) == (min(6, s.nbr_dist.shape[0]) if zeroed else 0)
            seen[zeroed] += 1
    assert seen[True] > 0 and seen[False] > 0


def test_context_subsamples_without_replacement_uniformly(shards, by_id):
    # Cells with more expressed genes than the context: L distinct expressed genes, random order.
    cfg = _cfg(shards, context=64, short_context_min=64, n_neighbours=0, batch_size=16)
    hits: dict[int, np.ndarray] = {}
    orders = set()
    for b in itertools.islice(iter(CellBatches(cfg)), 30):
        for i, sid in enumerate(b["sample_id"].tolist()):
            s = by_id[sid]
            col = {int(g): j for j, g in enumerate(s.gene_ids)}
            pos = np.array([col[int(g)] for g in b["gene_ids"][i].tolist()])
            assert len(set(pos.tolist())) == 64 and (pos < s.n_expr).all()
            hits.setdefault(sid, np.zeros(s.n_expr))[pos] += 1
            orders.add(bool((np.diff(pos) > 0).all()))
    assert orders == {False}  # never sorted: random order
    # Pooled over cells, the chance of a gene being picked is flat in its position (uniform).
    rel = np.concatenate([np.linspace(0, 1, len(h), endpoint=False)[h > 0] for h in hits.values()])
    frac = np.histogram(rel, bins=4, range=(0, 1))[0] / len(rel)
    assert np.all(np.abs(frac - 0.25) < 0.05), frac


def test_short_context_and_neighbour_count_rates(shards):
    cfg = _cfg(shards, batch_size=2, shuffle_buffer=4, context=128, short_context_min=32)
    Ls, ks = [], []
    for b in itertools.islice(iter(CellBatches(cfg)), 300):
        Ls.append(b["gene_ids"].shape[1])
        ks.append(int(b["nbr_mask"][~b["zeroed"]].sum(1).max()) if (~b["zeroed"]).any() else -1)
    Ls = np.array(Ls)
    assert 0.13 < (Ls < 128).mean() < 0.27 and Ls.min() >= 32
    ks = np.array(ks)[np.array(ks) >= 0]
    assert ks.min() == 0 and ks.max() == 6 and set(ks.tolist()) == set(range(7))


def test_corruption_statistics(shards):
    cfg = _cfg(shards, full_pass_prob=0.0, n_neighbours=0, batch_size=16)
    kept = []
    for b in itertools.islice(iter(CellBatches(cfg)), 8):
        x, y = b["counts"], b["input_counts"]
        e = b["expressed"]
        assert (y <= x).all() and not y[~e].any() and not b["zeroed"].any()
        assert torch.equal(y, y.round())  # integer counts stay integer
        kept.append((y[e].sum() / x[e].sum()).item())
    # E[kept mass] = E[(1 - p/2)^2] with p = 1.1 U(0, 0.8): about 0.60.
    p = 1.1 * np.random.default_rng(0).uniform(0, 0.8, 100_000)
    assert abs(np.mean(kept) - np.mean((1 - p / 2) ** 2)) < 0.08
    assert len(set(np.round(kept, 3))) > 1


def test_eval_is_deterministic_and_cycles(shards):
    cfg = _cfg(shards, split="eval", batch_size=5)
    loader = CellLoader(cfg, rank=0, world_size=2)
    assert loader.n_batches >= 1
    a = list(itertools.islice(loader, loader.n_batches + 2))
    b = list(itertools.islice(loader, loader.n_batches + 2))
    for x, y in zip(a, b):
        assert all(torch.equal(x[k], y[k]) for k in x)
    other = list(itertools.islice(CellLoader(cfg, rank=1, world_size=2), 1))
    assert not set(a[0]["sample_id"].tolist()) & set(other[0]["sample_id"].tolist())


def test_bad_config_and_manifest_errors(tmp_path, shards):
    with pytest.raises(ValueError, match="views"):
        DataConfig(views=3)
    with pytest.raises(FileNotFoundError, match="manifest"):
        ShardStream(DataConfig(shards=str(tmp_path)), 0, 1)
    with pytest.raises(ValueError, match="rank 2"):
        CellLoader(_cfg(shards), rank=2, world_size=2)


def test_damaged_body_is_skipped_and_an_old_version_stops_the_loader(samples, tmp_path):
    out = write_shards(samples[:40], tmp_path / "one", 1)
    path = out / "shards" / "shards-000000.tar"
    raw = bytearray(path.read_bytes())
    raw[512 + HEADER.itemsize + 20] ^= 0xFF  # inside the first member's zstd frame
    path.write_bytes(bytes(raw))
    stream = ShardStream(_cfg(out), 0, 1)
    with pytest.warns(UserWarning, match="does not decompress"):
        ids = _ids(stream, stream.epoch_size(0) - 1)
    assert stream.stats["corrupt_samples"] == 1 and len(set(ids)) == len(ids)
    raw[512 + 4:512 + 6] = (2).to_bytes(2, "little")  # the first member is of version 2
    path.write_bytes(bytes(raw))
    with pytest.raises(FormatVersionError, match=r"shards-000000.tar: .*format version 2"):
        _ids(ShardStream(_cfg(out), 0, 1), 1)
