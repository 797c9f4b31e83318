"""Shards -> model-ready training batches: a distinct, seeded, resumable stream per rank and worker.

Why it looks like this:

- Every (rank, worker) pair is one *slot* of ``world_size * num_workers``. Epoch ``e`` permutes the
  manifest's shards with ``seed + e`` (the same on every rank) and deals them round-robin to the
  slots, so within an epoch each shard is read by exactly one slot. With fewer shards than slots
  every slot reads every shard and keeps every ``n_slots``-th sample instead. Either way the
  ranks' sample ids are disjoint within an epoch and together cover it. Epochs never end for
  training (the scPRINT-2 sampler is not rank-aware; this is the fix).
- The shuffle is a block shuffle: each run of ``shuffle_buffer`` stream positions is permuted with
  a key of (seed, epoch, slot, block). All batch randomness (context length, neighbour count,
  context genes, corruption) is keyed by (seed, slot, batch index). So the stream position is one
  integer, the number of batches the trainer has taken, and resuming needs no replay: the slot
  skips whole epochs and shards from the manifest's sample counts without opening them.
- Local shards are memory-mapped and their tar headers parsed directly, so a sample is never
  copied before the batch kernel reads it: webdataset's streaming tar iterator (``reader=
  "webdataset"``, for file objects that cannot be mapped) costs ~140 us per member here, more
  than the whole budget of a 15k samples/s loader. One numba kernel per batch gathers the
  context of all 7 profiles (cell + 6 neighbours), samples genes without replacement and
  applies the denoising corruption.

Trainer API (exact names)::

    cfg = DataConfig(shards=OUT, context=3200, batch_size=32, seed=0, num_workers=2)
    loader = CellLoader(cfg, rank=rank, world_size=world_size)   # endless train stream
    for step, batch in zip(range(start, max_steps), loader): ...
    state = loader.state_dict()         # {"batches": n, ...}: save one per rank in the checkpoint
    loader.load_state_dict(state)       # before iterating: continues with batch n
    loader.stats["corrupt_shards"]      # also "corrupt_samples"; updated as batches arrive
    ev = CellLoader(dataclasses.replace(cfg, split="eval"), rank=rank, world_size=world_size)
    for batch in itertools.islice(ev, n): ...   # deterministic; restarts on every iter()

The eval stream reads ``manifest["eval_shards"]`` in order without shuffling and cycles, so every
rank can take the same number of batches; ``ev.n_batches`` is one pass for this rank.
"""

from __future__ import annotations

import mmap
import os
import struct
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tar_file_iterator

from data_prep.shard_format import (
    CLASSES,
    CONTEXT_GENES,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MAX_NEIGHBOURS,
    SAMPLE_EXT,
    load_manifest,
)

HEADER_WORDS = HEADER.itemsize // 4
_PREFIX = struct.Struct("<4sHHIII")  # magic, version, flags, n_expr, n_pad, n_nbr
_STATS = ("corrupt_shards", "corrupt_samples")
Item = tuple[int, np.ndarray, int]  # sample id, buffer as uint32 words, word offset of the sample


@dataclass
class DataConfig:
    """Where the shards are and how cells become training batches."""

    shards: str = ""  # build_shards output directory (holds manifest.json)
    split: str = "train"  # "train": endless shuffled epochs; "eval": eval_shards, in order, cycled
    context: int = CONTEXT_GENES  # genes per cell (L)
    short_context_prob: float = 0.2  # a batch uses L ~ U[short_context_min, context) instead
    short_context_min: int = 800
    max_neighbours: int = MAX_NEIGHBOURS
    n_neighbours: int | None = None  # None: uniform in 0..max_neighbours per batch
    mask_scale: float = 1.1  # per cell p = mask_scale * U(0, mask_max)
    mask_max: float = 0.8
    full_pass_prob: float = 0.1  # cells whose own input is zeroed and get all neighbours
    views: int = 1  # 2 adds input_counts_2, an independent corruption (contrastive views)
    batch_size: int = 32
    shuffle_buffer: int = 1000  # samples per shuffle block
    num_workers: int = 0  # DataLoader worker processes per rank (0 = in the training process)
    pin_memory: bool = False
    reader: str = "mmap"  # "mmap": local shards, zero-copy; "webdataset": its streaming tar reader
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"DataConfig.split must be 'train' or 'eval', not {self.split!r}")
        if self.reader not in ("mmap", "webdataset"):
            raise ValueError(f"DataConfig.reader must be 'mmap' or 'webdataset': {self.reader!r}")
        if self.views not in (1, 2):
            raise ValueError(f"DataConfig.views must be 1 or 2, not {self.views}")
        if not 0 < self.short_context_min <= self.context:
            raise ValueError("DataConfig needs 0 < short_context_min <= context")
        if not 0 <= self.max_neighbours <= MAX_NEIGHBOURS:
            raise ValueError(f"DataConfig.max_neighbours must be in 0..{MAX_NEIGHBOURS}")
        if self.n_neighbours is not None and not 0 <= self.n_neighbours <= self.max_neighbours:
            raise ValueError("DataConfig.n_neighbours must be in 0..max_neighbours")
        if self.batch_size < 1 or self.shuffle_buffer < 1:
            raise ValueError("DataConfig.batch_size and shuffle_buffer must be >= 1")


def _key(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


class ShardStream:
    """The deterministic sample stream of one slot: ``Item``s from position ``start``.

    ``sample_id = shard index * 2**32 + sample key``. Positions count the manifest's samples that
    belong to this slot, so a resumed stream finds its place from the manifest alone.
    """

    def __init__(self, cfg: DataConfig, slot: int, n_slots: int) -> None:
        self.root = Path(cfg.shards)
        manifest = load_manifest(self.root)
        self.shards = manifest["shards" if cfg.split == "train" else "eval_shards"]
        if not self.shards:
            raise ValueError(f"{self.root}: the manifest lists no {cfg.split} shards")
        self.train = cfg.split == "train"
        self.slot, self.n_slots = slot, n_slots
        self.seed, self.block = cfg.seed, cfg.shuffle_buffer if self.train else 1
        self.by_sample = len(self.shards) < n_slots
        self.reader = cfg.reader
        self.stats = dict.fromkeys(_STATS, 0)

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, samples of it that are this slot's) in this epoch's reading order."""
        order = np.arange(len(self.shards))
        if self.train:
            order = _key(self.seed, 0, epoch).permutation(order)
        if self.by_sample:
            return [(int(s), len(range(self.slot, self.shards[s]["n_samples"], self.n_slots)))
                    for s in order]
        return [(int(s), self.shards[s]["n_samples"]) for s in order[self.slot :: self.n_slots]]

    def epoch_size(self, epoch: int) -> int:
        return sum(n for _, n in self.plan(epoch))

    def samples(self, start: int = 0) -> Iterator[Item]:
        epoch = 0
        while start >= (size := self.epoch_size(epoch)) > 0:
            start, epoch = start - size, epoch + 1
        if self.epoch_size(epoch) == 0:
            raise ValueError(f"{self.root}: slot {self.slot}/{self.n_slots} has no samples")
        while True:
            block0 = start - start % self.block
            got = 0
            for b, block in enumerate(self._blocks(epoch, block0)):
                got += len(block)
                if self.block > 1:
                    perm = _key(self.seed, 1, epoch, self.slot, block0 // self.block + b)
                    block = [block[i] for i in perm.permutation(len(block))]
                yield from block[start - block0 :] if b == 0 else block
            if got == 0:
                raise RuntimeError(f"{self.root}: no readable sample in epoch {epoch}")
            start, epoch = 0, epoch + 1

    def _blocks(self, epoch: int, start: int) -> Iterator[list[Item]]:
        pos, block = 0, []
        for shard, n in self.plan(epoch):
            if pos + n <= start:
                pos += n
                continue
            for item in self._read(shard, max(0, start - pos)):
                block.append(item)
                if len(block) == self.block:
                    yield block
                    block = []
            pos += n
        if block:
            yield block

    def _read(self, shard: int, skip: int) -> Iterator[Item]:
        """This slot's valid samples of one shard, after its first ``skip`` ones."""
        path = self.root / self.shards[shard]["path"]
        members = _mmap_members(path) if self.reader == "mmap" else _wds_members(path)
        j, kept = -1, -1
        try:
            for name, words, off, size in members:
                if not name.endswith("." + SAMPLE_EXT):
                    continue
                j += 1
                if self.by_sample and j % self.n_slots != self.slot:
                    continue
                kept += 1
                if kept < skip:
                    continue
                problem = _check(words, off, size)
                if problem:
                    self.stats["corrupt_samples"] += 1
                    warnings.warn(f"{path}: member {name}: {problem}; skipped", stacklevel=2)
                    continue
                yield (shard << 32) + int(name[: -len(SAMPLE_EXT) - 1]), words, off // 4
        except (OSError, tarfile.TarError, ValueError) as e:
            self.stats["corrupt_shards"] += 1
            warnings.warn(f"{path}: unreadable shard ({e}); rest of it skipped", stacklevel=2)


Member = tuple[str, np.ndarray, int, int]  # name, buffer (uint32 words), byte offset, byte size


def _mmap_members(path: Path) -> Iterator[Member]:
    """Tar members as views into the memory-mapped shard: no read or copy per sample."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    words = np.frombuffer(mm, dtype="<u4", count=len(mm) // 4)
    off, end, long_name = 0, len(mm), None
    while off + 512 <= end:
        head = mm[off : off + 512]
        if head.count(0) == 512:
            return
        if int(head[148:156].strip(b"\0 ") or b"0", 8) != sum(head) - sum(head[148:156]) + 256:
            raise tarfile.TarError(f"bad tar header checksum at byte {off}")
        size = int(head[124:136].strip(b"\0 ") or b"0", 8)
        kind, data = head[156:157], off + 512
        if data + size > end:
            raise tarfile.TarError(f"truncated: member at byte {off} runs past the end")
        if kind in (b"x", b"L"):  # pax / GNU long-name header for the next member
            text = mm[data : data + size]
            long_name = (text.rstrip(b"\0").decode() if kind == b"L"
                         else dict(r.split(" ", 1)[1].split("=", 1)
                                   for r in text.decode().splitlines()).get("path", long_name))
        elif kind in (b"0", b"\0"):
            name = long_name or head[:100].split(b"\0", 1)[0].decode()
            yield name, words, data, size
            long_name = None
        off = data + (size + 511) // 512 * 512
    if off < end:
        raise tarfile.TarError("truncated tar header")


def _wds_members(path: Path) -> Iterator[Member]:
    """Tar members through webdataset's streaming tar iterator (any file object, no mmap)."""
    with open(path, "rb") as f:
        for rec in tar_file_iterator(f):
            data = rec["data"]
            yield rec["fname"], np.frombuffer(data, dtype="<u4", count=len(data) // 4), 0, len(
                data)


def _check(words: np.ndarray, off: int, size: int) -> str:
    """Why a sample's bytes are unusable ('' if they are fine): cheap header + length check."""
    if size < HEADER.itemsize:
        return f"{size} bytes, shorter than the header"
    magic, version, _, n_expr, n_pad, n_nbr = _PREFIX.unpack_from(words.data, off)
    if magic != MAGIC or version != FORMAT_VERSION:
        return f"bad magic/version {magic!r} v{version}"
    n_genes = n_expr + n_pad
    expected = HEADER.itemsize + 4 * (n_genes + n_expr + n_nbr * n_genes + 2 * n_nbr)
    if n_nbr > MAX_NEIGHBOURS or size != expected:
        return f"{size} bytes, header says {expected} ({n_nbr} neighbours)"
    return ""


@numba.njit(cache=True, nogil=True)
def _poisson(lam, u, rng):
    """Poisson(lam) by inversion of the uniform ``u``; the rare large means use ``rng``."""
    if lam >= 12.0:
        return rng.poisson(lam)
    k, p = 0, np.exp(-lam)
    cdf = p
    while u > cdf and k < 64:
        k += 1
        p *= lam / k
        cdf += p
    return k


@numba.njit(cache=True, nogil=True)
def _fill(words, fwords, rows, starts, n_expr, n_pad, n_give, zeroed, p, u, u_at, rng, gene_ids,
          gene_mask, expressed, counts, inputs, nbr_counts, scratch):
    """Per cell: context positions by partial Fisher-Yates over the expressed genes, then the
    top padding genes; gather the cell's and its neighbours' counts there; corrupt the input.
    Uniforms come pre-drawn in ``u`` (cell i's from ``u_at[i]``): numba's Generator calls are
    several times slower than one vectorised draw."""
    L = gene_ids.shape[1]
    for t in range(rows.shape[0]):
        i = rows[t]
        ne, ng = n_expr[i], n_expr[i] + n_pad[i]
        g0 = starts[i] + HEADER_WORDS
        c0 = g0 + ng
        n0 = c0 + ne
        m = min(L, ne)
        ui = u_at[i]
        for j in range(ne):
            scratch[j] = j
        for j in range(m):
            r = min(j + int(u[ui + j] * (ne - j)), ne - 1)
            s = scratch[r]
            scratch[r] = scratch[j]
            scratch[j] = s
        ui += m
        w = m + min(L - m, ng - ne)
        for j in range(m, w):
            scratch[j] = ne + j - m
        for j in range(w):
            gene_ids[i, j] = words[g0 + scratch[j]]
            gene_mask[i, j] = True
        for j in range(m):
            x = fwords[c0 + scratch[j]]
            counts[i, j] = x
            expressed[i, j] = x > 0
        for k in range(n_give[i]):
            base = n0 + k * ng
            for j in range(w):
                nbr_counts[i, k, j] = fwords[base + scratch[j]]
        if zeroed[i]:
            continue
        for v in range(inputs.shape[0]):
            half = 0.5 * p[v, i]
            for j in range(m):
                x = counts[i, j]
                y = x - _poisson(x * half, u[ui + 2 * j], rng)
                if y < 0 or u[ui + 2 * j + 1] < half:
                    y = 0.0
                inputs[v, i, j] = y
            ui += 2 * m


class BatchBuilder:
    """Turns ``batch_size`` raw samples into the fixed-shape training batch (torch tensors)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg
        self.scratch = np.empty(0, dtype=np.int32)

    def __call__(self, items: list[Item], rng: np.random.Generator) -> dict:
        cfg, B = self.cfg, len(items)
        L = cfg.context
        if cfg.short_context_min < L and rng.random() < cfg.short_context_prob:
            L = int(rng.integers(cfg.short_context_min, L))
        k = cfg.n_neighbours
        if k is None:
            k = int(rng.integers(0, cfg.max_neighbours + 1))
        zeroed = rng.random(B) < cfg.full_pass_prob
        p = cfg.mask_scale * rng.uniform(0.0, cfg.mask_max, size=(cfg.views, B))

        starts = np.fromiter((s for _, _, s in items), dtype=np.int64, count=B)
        head = np.empty(B, dtype=HEADER)
        groups: dict[int, tuple[np.ndarray, list[int]]] = {}
        for i, (_, words, s) in enumerate(items):
            head[i] = words[s : s + HEADER_WORDS].view(HEADER)[0]
            groups.setdefault(id(words), (words, []))[1].append(i)
        n_expr = head["n_expr"].astype(np.int64)
        n_pad = head["n_pad"].astype(np.int64)
        n_nbr = head["n_nbr"].astype(np.int64)
        n_give = np.where(zeroed, np.minimum(n_nbr, cfg.max_neighbours), np.minimum(n_nbr, k))
        m = np.minimum(n_expr, L)
        u_len = m * np.where(zeroed, 1, 1 + 2 * cfg.views)
        u_at = np.zeros(B, dtype=np.int64)
        np.cumsum(u_len[:-1], out=u_at[1:])
        u = rng.random(int(u_len.sum()))
        need = int(max(n_expr.max(), L))
        if self.scratch.shape[0] < need:
            self.scratch = np.empty(need, dtype=np.int32)

        gene_ids = np.zeros((B, L), dtype=np.int64)
        gene_mask = np.zeros((B, L), dtype=bool)
        expressed = np.zeros((B, L), dtype=bool)
        counts = np.zeros((B, L), dtype=np.float32)
        inputs = np.zeros((cfg.views, B, L), dtype=np.float32)
        nbr_counts = np.zeros((B, MAX_NEIGHBOURS, L), dtype=np.float32)
        nbr_mask = np.arange(MAX_NEIGHBOURS) < n_give[:, None]
        nbr_dist = np.zeros((B, MAX_NEIGHBOURS), dtype=np.float32)
        dist_at = starts + HEADER_WORDS + (n_expr + n_pad) * (1 + n_nbr) + n_expr
        for words, rows in groups.values():
            rows = np.array(rows, dtype=np.int64)
            _fill(words, words.view("<f4"), rows, starts, n_expr, n_pad, n_give, zeroed, p, u,
                  u_at, rng, gene_ids, gene_mask, expressed, counts, inputs, nbr_counts,
                  self.scratch)
            sel = nbr_mask[rows]
            at = np.where(sel, dist_at[rows, None] + np.arange(MAX_NEIGHBOURS), 0)
            nbr_dist[rows] = np.where(sel, words.view("<f4")[at], 0)
        batch = {
            "gene_ids": gene_ids,
            "gene_mask": gene_mask,
            "expressed": expressed,
            "counts": counts,
            "input_counts": inputs[0],
            "zeroed": zeroed,
            "nbr_counts": nbr_counts,
            "nbr_dist": nbr_dist,
            "nbr_mask": nbr_mask,
            "total_count": head["total_count"].astype(np.float32),
            "labels": head["labels"].astype(np.int64).reshape(B, len(CLASSES)),
            "organism": head["organism"].astype(np.int64),
            "dataset": head["dataset"].astype(np.int64),
            "group": head["group"].astype(np.int64),
            "weight": head["weight"].astype(np.float32),
            "sample_id": np.fromiter((s for s, _, _ in items), dtype=np.int64, count=B),
        }
        if cfg.views == 2:
            batch["input_counts_2"] = inputs[1]
        return {name: torch.from_numpy(a) for name, a in batch.items()}


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    dist = torch.distributed
    if rank is None:
        rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if world_size is None:
        world_size = (dist.get_world_size() if dist.is_initialized()
                      else int(os.environ.get("WORLD_SIZE", 1)))
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return rank, world_size


class CellBatches(IterableDataset):
    """Whole batches from one slot per (rank, worker); iterate it directly for one process."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.start_batch = start_batch
        self.stream: ShardStream | None = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = info.num_workers if info else 1
        # A DataLoader hands out batches round-robin from its worker 0: in a stream resumed at
        # batch n, worker i plays the role of the uninterrupted stream's worker (i + n) % W.
        worker = ((info.id if info else 0) + self.start_batch) % n_workers
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        b = max(0, -(-(self.start_batch - worker) // n_workers))
        self.stream = stream = ShardStream(self.cfg, slot, n_slots)
        build, B = BatchBuilder(self.cfg), self.cfg.batch_size
        items: list[Item] = []
        for item in stream.samples(b * B):
            items.append(item)
            if len(items) == B:
                batch = build(items, _key(self.cfg.seed, 2, slot, n_slots, b))
                if info:  # counters travel with the batch out of the worker process
                    batch["_stats"] = torch.tensor([stream.stats[s] for s in _STATS])
                yield batch
                items, b = [], b + 1


class CellLoader:
    """A rank's batch iterator over a torch DataLoader, with a resumable position and stats."""

    def __init__(self, cfg: DataConfig, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.batches = 0  # batches handed to the trainer: the stream position
        self.stats = dict.fromkeys(_STATS, 0)
        self._worker_stats: dict[int, list[int]] = {}
        if cfg.split == "eval":
            n_slots = self.world_size * max(cfg.num_workers, 1)
            sizes = [ShardStream(cfg, self.rank * max(cfg.num_workers, 1) + w, n_slots)
                     .epoch_size(0) for w in range(max(cfg.num_workers, 1))]
            self.n_batches = sum(-(-s // cfg.batch_size) for s in sizes)

    def state_dict(self) -> dict:
        return {"batches": self.batches, "seed": self.cfg.seed, "rank": self.rank,
                "world_size": self.world_size, "num_workers": self.cfg.num_workers,
                "batch_size": self.cfg.batch_size}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "num_workers", "batch_size"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state is for {key}={state[key]}, this loader has "
                                 f"{mine[key]}: the stream cannot resume exactly")
        self.batches = int(state["batches"])

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        start = self.batches if cfg.split == "train" else 0
        data = CellBatches(cfg, self.rank, self.world_size, start_batch=start)
        loader = DataLoader(data, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_memory,
                            persistent_workers=False)
        for i, batch in enumerate(loader):
            if cfg.num_workers:
                self._worker_stats[i % cfg.num_workers] = batch.pop("_stats").tolist()
            else:
                self._worker_stats[0] = [data.stream.stats[s] for s in _STATS]
            for j, name in enumerate(_STATS):
                self.stats[name] = sum(t[j] for t in self._worker_stats.values())
            if cfg.split == "train":
                self.batches += 1
            yield batch
