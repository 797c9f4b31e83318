"""The stream plan: which samples each (rank, worker) slot reads, in which order, from where.

Every (rank, worker) pair is one *slot* of ``world_size * num_workers``. The build packs one
fresh weighted draw per epoch (``manifest["epochs"]``; each train shard names its ``epoch``).
Loader epoch ``t`` reads packed epoch ``t mod E``: its shards, permuted with ``seed + t`` (the
same on every rank), dealt round-robin to the slots, so within an epoch each shard is read by
exactly one slot; epoch e's shards come after e-1's. With fewer shards than slots every slot
reads every shard and keeps every ``n_slots``-th sample instead. Either way the ranks' sample
ids are disjoint within an epoch and together cover it. Past the last packed epoch the stream
says so (a warning, and ``stats["passes"]``, which the trainer writes to TensorBoard) and starts
again from the first: training never ends for lack of data (the scPRINT-2 sampler is not
rank-aware; this is the fix), but a run that wraps replays draws it has seen.

The shuffle is a block shuffle: each run of ``shuffle_buffer`` stream positions is permuted with
a key of (seed, epoch, slot, block). So the stream position is one integer and resuming needs no
replay: the slot skips whole epochs and shards from the manifest's sample counts without
opening them.

A run resumed with another slot layout (more or fewer ranks or workers, another batch size or
shuffle block) cannot continue each slot's stream, since the slots themselves change. The stream
is then dealt again (``Redeal``): from the earliest loader epoch some old slot had not finished,
the shards the old slots had read whole are left out and the others are dealt to the new slots.
No sample is skipped; the samples read again are those the old slots had taken from shards they
had not finished (at most a shard and a shuffle block per old slot).

Readers (``DataConfig.reader``): ``"auto"`` (default) memory-maps local shard files and streams
URLs and ``pipe:`` specs (manifest shard paths, or ``shards`` given as a URL prefix) through
webdataset's tar iterator. Why two: webdataset's iterator (Python ``tarfile`` in stream mode, one
``bytes`` per member) is the only way to stream a remote shard, but costs more per member than a
memory map whose tar headers one compiled pass indexes at once (data_prep.shard_format's tar
index). ``"mmap"`` and ``"webdataset"`` force one reader (``"mmap"`` refuses URLs); both give
identical batches. Either way each valid member's body is decompressed here, once, so a damaged
sample is found and skipped before it reaches a batch.
"""

from __future__ import annotations

import functools
import json
import logging
import mmap
import os
import tarfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field

import numba
import numpy as np
import zstandard
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from data_prep.shard_format import (
    FLAG_FLOAT_COUNTS,
    FORMAT_VERSION,
    HEADER,
    HEADER_WORDS,
    MAGIC_WORD,
    MANIFEST,
    MAX_NEIGHBOURS,
    SAMPLE_EXT,
    W_BODY,
    W_EXPR,
    W_NBR,
    W_PAD,
    W_VERSION,
    FormatVersionError,
    check_manifest,
    is_remote,
    is_url,
    load_manifest,
    locate,
    member_key,
    tar_index,
)
from pretrain.batches import Item, record
from pretrain.random_streams import keyed

STATS = ("corrupt_shards", "corrupt_samples")  # counters, summed over a rank's workers
POSITION = ("epoch", "passes")  # where the latest batch came from
log = logging.getLogger(__name__)


class ShardStream:
    """The deterministic sample stream of one slot: ``Item``s from position ``start``.

    ``sample_id = shard index * 2**32 + sample key``. Positions count the manifest's samples that
    belong to this slot, so a resumed stream finds its place from the manifest alone.
    """

    def __init__(self, cfg, slot: int, n_slots: int, table: ShardTable | None = None,
                 redeal: Redeal | None = None, orders: dict | None = None) -> None:
        self.root = cfg.shards
        self.table = table if table is not None else ShardTable.read(cfg.shards, cfg.split)
        self.train = cfg.split == "train"
        self.epochs = self.table.epochs()
        self.slot, self.n_slots = slot, n_slots
        self.seed, self.block = cfg.seed, cfg.shuffle_buffer if self.train else 1
        self.redeal = redeal
        self.first_epoch = redeal.epoch if redeal else 0  # where position 0 lies
        self.key = redeal.key if redeal else ()  # keeps a re-dealt stream's shuffles fresh
        # The latest two epochs' reading orders (an epoch's plan is asked for several times; a
        # corpus epoch has 350,000 shards), shared by streams of one layout when given.
        self.orders = {} if orders is None else orders
        if cfg.reader == "mmap" and self.table.url.any():
            src = self.table.source(int(np.argmax(self.table.url)))
            raise ValueError(f"{src}: the mmap reader needs a local shard file; use "
                             "reader='auto' or 'webdataset' for URLs and pipe: specs")
        self.reader = cfg.reader
        self.stats = dict.fromkeys(STATS + POSITION, 0)
        self.zstd = zstandard.ZstdDecompressor()

    def order(self, epoch: int) -> np.ndarray:
        """Loader epoch ``epoch``'s shards in reading order (it reads packed epoch
        ``epochs[epoch % E]``), less those a re-deal marks as read."""
        if epoch in self.orders:
            return self.orders[epoch]
        order = self.table.epoch_shards[epoch % len(self.epochs)]
        if self.train:
            order = keyed(self.seed, 0, epoch).permutation(order)
        if self.redeal is not None and epoch in self.redeal.done:
            order = order[~np.isin(order, self.redeal.done[epoch])]
        if len(self.orders) >= 2:
            del self.orders[next(iter(self.orders))]
        self.orders[epoch] = order
        return order

    def by_sample(self, epoch: int) -> bool:
        """Whether loader epoch ``epoch`` has fewer shards than slots (deal samples instead)."""
        return len(self.order(epoch)) < self.n_slots

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, samples of it that are this slot's) in loader epoch ``epoch``'s
        reading order."""
        order = self.order(epoch)
        if len(order) < self.n_slots:  # samples slot, slot + n_slots, ... of every shard
            n = self.table.n_samples[order]
            mine = np.maximum(0, (n - self.slot + self.n_slots - 1) // self.n_slots)
            return list(zip(order.tolist(), mine.tolist(), strict=True))
        order = order[self.slot :: self.n_slots]
        return list(zip(order.tolist(), self.table.n_samples[order].tolist(), strict=True))

    def reader_of(self, shard: int) -> str:
        """``"mmap"`` or ``"webdataset"``: how ``shard`` is read (DataConfig.reader)."""
        if self.reader != "auto":
            return self.reader
        return "webdataset" if self.table.url[shard] else "mmap"

    def epoch_size(self, epoch: int) -> int:
        return sum(n for _, n in self.plan(epoch))

    def position(self, start: int) -> tuple[int, int]:
        """Stream position ``start`` as (loader epoch, samples of it read before)."""
        epoch = self.first_epoch
        while start >= (size := self.epoch_size(epoch)) > 0:
            start, epoch = start - size, epoch + 1
        return epoch, start

    def samples(self, start: int = 0) -> Iterator[Item]:
        epoch, start = self.position(start)
        if self.epoch_size(epoch) == 0:
            raise ValueError(f"{self.root}: slot {self.slot}/{self.n_slots} has no samples")
        # a re-dealt stream's first epoch was entered by the old slots (they said so)
        resumed = start > 0 or (self.redeal is not None and epoch == self.first_epoch)
        while True:
            self._enter(epoch, resumed)
            block0 = start - start % self.block
            got = 0
            for b, block in enumerate(self._blocks(epoch, block0)):
                got += len(block)
                if self.block > 1:
                    perm = keyed(self.seed, 1, epoch, self.slot, block0 // self.block + b,
                                 *self.key)
                    block = [block[i] for i in perm.permutation(len(block))]
                yield from block[start - block0 :] if b == 0 else block
            if got == 0:
                raise RuntimeError(f"{self.root}: no readable sample in epoch {epoch}")
            start, epoch, resumed = 0, epoch + 1, False

    def _enter(self, epoch: int, resumed: bool) -> None:
        """Record which packed epoch the stream reads; say so when it starts a new pass."""
        passes, j = divmod(epoch, len(self.epochs))
        self.stats["epoch"], self.stats["passes"] = self.epochs[j], passes
        if passes and j == 0 and not resumed and self.train:
            log.warning("%s: slot %d ran past the last packed epoch (%d); starting again from "
                        "epoch %d (pass %d): pack more epochs for fresh draws", self.root,
                        self.slot, self.epochs[-1], self.epochs[0], passes + 1)

    def _blocks(self, epoch: int, start: int) -> Iterator[list[Item]]:
        pos, block = 0, []
        for shard, n in self.plan(epoch):
            if pos + n <= start:
                pos += n
                continue
            for items in self._read(shard, max(0, start - pos), self.by_sample(epoch)):
                at = 0
                while at < len(items):
                    take = self.block - len(block)
                    block += items[at : at + take]
                    at += take
                    if len(block) == self.block:
                        yield block
                        block = []
            pos += n
        if block:
            yield block

    def _read(self, shard: int, skip: int, by_sample: bool) -> Iterator[list[Item]]:
        """This slot's valid samples of one shard after its first ``skip`` ones, in runs."""
        src = self.table.source(shard)
        chunks = _mmap_chunks(src) if self.reader_of(shard) == "mmap" else _wds_chunks(src)
        seen = kept = 0  # .cell members of the shard / of this slot
        try:
            for raw, keys, offs, sizes in chunks:
                if by_sample:
                    mine = (np.arange(seen, seen + len(keys)) % self.n_slots) == self.slot
                    seen += len(keys)
                    keys, offs, sizes = keys[mine], offs[mine], sizes[mine]
                drop = min(len(keys), max(0, skip - kept))
                kept += len(keys)
                keys, offs, sizes = keys[drop:], offs[drop:], sizes[drop:]
                yield self._decompress(src, shard, raw, keys, offs, sizes)
        except FormatVersionError:
            raise
        except (OSError, tarfile.TarError, ValueError) as e:
            self.stats["corrupt_shards"] += 1
            warnings.warn(f"{src}: unreadable shard ({e}); rest of it skipped", stacklevel=2)

    def _decompress(self, src: str, shard: int, raw: np.ndarray, keys: np.ndarray,
                    offs: np.ndarray, sizes: np.ndarray) -> list[Item]:
        """The valid members among these as ``Item``s; the others counted and reported."""
        problem, body_bytes = _problems(raw, keys, offs, sizes)
        if (problem == _VERSION).any():
            off = int(offs[np.argmax(problem == _VERSION)])
            raise FormatVersionError(
                f"{src}: a sample of format version {int(raw[off + 4]) | int(raw[off + 5]) << 8}; "
                f"this loader reads version {FORMAT_VERSION} (rebuild the shards with "
                "data_prep.build_shards)")
        items, mem, head = [], memoryview(raw), HEADER.itemsize
        for key, off, size, bad, n in zip(keys.tolist(), offs.tolist(), sizes.tolist(),
                                          problem.tolist(), body_bytes.tolist()):
            why = _PROBLEMS[bad]
            if not bad:
                try:
                    body = self.zstd.decompress(mem[off + head:off + size])
                except zstandard.ZstdError as e:
                    body, why = b"", f"body does not decompress ({e})"
                if len(body) == n:
                    items.append(((shard << 32) + key, record(mem[off:off + head], body)))
                    continue
                why = why or f"body is {len(body)} bytes, header says {n}"
            self.stats["corrupt_samples"] += 1
            warnings.warn(f"{src}: member at byte {off}: {why}; skipped", stacklevel=3)
        return items


@dataclass(frozen=True)
class Redeal:
    """A train stream dealt again to a new slot layout part-way through (module docstring).

    Loader epochs before ``epoch`` were read whole under the earlier layouts. In ``epoch`` and
    after, the shards of ``done[t]`` were read whole and are left out of loader epoch ``t``; the
    new slots' positions count from the start of ``epoch``. ``source`` is the loader state it was
    dealt from (layout, batches taken and any earlier re-deal's source): a few numbers that the
    loader state keeps instead of the shard lists (which can hold an epoch's 350,000 shards),
    since ``redeal_after`` makes the same re-deal from them again. ``generation`` counts the
    re-deals of the run (each keys its own shuffles); ``reread`` is how many samples the old
    slots had read that the new ones read again.
    """

    epoch: int
    done: dict[int, np.ndarray] = field(default_factory=dict)
    generation: int = 1
    reread: int = 0
    source: dict = field(default_factory=dict)

    @property
    def key(self) -> tuple[int, int]:
        return self.epoch, self.generation


def redeal_after(cfg, positions: list[int], table: ShardTable, earlier: Redeal | None = None,
                 source: dict | None = None) -> Redeal:
    """Deal a train stream again after its ``len(positions)`` slots (``cfg``'s seed and shuffle
    block, ``earlier``'s re-deal if any) had read ``positions[s]`` samples each.

    A shard is read whole when the slot's position has passed its last sample by a whole
    shuffle block (the shuffle mixes the samples of a block across its shards). In an epoch dealt
    by shard each shard is one slot's, so the union of the slots' whole shards is done; in one
    dealt by sample every slot reads a share of every shard, so only shards every slot has
    finished are. The old slots' streams share their epochs' orders (hundreds of slots of a
    corpus-sized epoch) and, through the table, its shard lists.
    """
    orders: dict = {}
    streams = [ShardStream(cfg, slot, len(positions), table, earlier, orders)
               for slot in range(len(positions))]
    where = [s.position(p) for s, p in zip(streams, positions, strict=True)]
    first = min(epoch for epoch, _ in where)
    done: dict[int, np.ndarray] = {}
    reread = 0
    for t in range(first, max(epoch for epoch, _ in where) + 1):
        plans, whole = [], []
        for s, (epoch, offset) in zip(streams, where, strict=True):
            plan = np.array(s.plan(t), dtype=np.int64).reshape(-1, 2)  # (shard, samples)
            ends = np.cumsum(plan[:, 1])
            taken = int(ends[-1]) if t < epoch and len(plan) else offset if t == epoch else 0
            full = taken - taken % s.block if t == epoch else taken
            plans.append((plan, taken))
            whole.append(plan[ends <= full, 0])
        by_sample = streams[0].by_sample(t)
        finished = (functools.reduce(np.intersect1d, whole) if by_sample
                    else np.unique(np.concatenate(whole)))
        reread += sum(taken - int(plan[np.isin(plan[:, 0], finished), 1].sum())
                      for plan, taken in plans)
        if earlier is not None and t in earlier.done:
            finished = np.union1d(finished, earlier.done[t])
        if len(finished):
            done[t] = finished.astype(np.int64)
    return Redeal(first, done, earlier.generation + 1 if earlier else 1, reread, source or {})


@dataclass(frozen=True)
class ShardTable:
    """One split's shards of a manifest as arrays: what a stream needs of them.

    A manifest lists every shard of every packed epoch: 350,000 an epoch for the reference corpus
    at 1,000 samples a shard, ~150 MB an epoch as parsed JSON in every process that keeps it. The
    table is ~60 bytes a shard; a rank reads the manifest once and its DataLoader workers
    inherit the table.
    """

    root: str
    paths: np.ndarray  # each shard's manifest path, utf-8 (dtype S)
    n_samples: np.ndarray  # int64
    epoch: np.ndarray  # int64: the packed epoch of each train shard (0: eval shards, old builds)
    url: np.ndarray  # bool: read from a URL or pipe: spec (else a local file)

    @classmethod
    def read(cls, root: str, split: str) -> ShardTable:
        entries = read_manifest(root)["shards" if split == "train" else "eval_shards"]
        if not entries:
            raise ValueError(f"{root}: the manifest lists no {split} shards")
        train = split == "train"
        return cls(
            root=root,
            paths=np.array([e["path"].encode() for e in entries]),
            n_samples=np.array([e["n_samples"] for e in entries], dtype=np.int64),
            epoch=np.array([e.get("epoch", 0) if train else 0 for e in entries], dtype=np.int64),
            url=np.array([is_remote(root, e["path"]) for e in entries], dtype=bool),
        )

    def __len__(self) -> int:
        return self.paths.shape[0]

    def epochs(self) -> list[int]:
        """The packed epochs, in reading order (a manifest without epochs is one epoch, 0)."""
        return list(self._epochs)

    @functools.cached_property
    def _epochs(self) -> tuple[int, ...]:  # every stream of a rank asks (350,000 shards an epoch)
        return tuple(np.unique(self.epoch).tolist())

    @functools.cached_property
    def epoch_shards(self) -> list[np.ndarray]:
        """Each packed epoch's shard indices (``epochs()`` order), made once for the streams of
        a process."""
        return [np.flatnonzero(self.epoch == e) for e in self._epochs]

    def source(self, shard: int) -> str:
        """Shard ``shard`` as a local file or a URL/pipe spec."""
        return locate(self.root, self.paths[shard].decode())


def read_manifest(root: str) -> dict:
    """The manifest of a local build_shards output, or of one behind a URL prefix."""
    root = root.removeprefix("file://")
    if not is_url(root):
        return load_manifest(root)
    url = f"{root.rstrip('/')}/{MANIFEST}"
    with gopen(url) as f:
        return check_manifest(json.load(f), url)


# A run of a shard's ``.cell`` members: the bytes holding them (uint8), sample keys (-2: the
# member name is not ``<number>.cell``), byte offsets and byte sizes of the members in it.
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _mmap_chunks(path: str) -> Iterator[Chunk]:
    """A local shard as one chunk of views into its memory map: no read or copy of a member
    before its body is decompressed."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        # One populate call maps every page; faulting them in one by one costs ~3x more.
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    raw = np.frombuffer(mm, dtype=np.uint8)
    keys, offs, sizes, problem = tar_index(raw)
    yield raw, keys, offs, sizes
    if problem:
        raise tarfile.TarError(problem)


def _wds_chunks(url: str) -> Iterator[Chunk]:
    """Shard members through webdataset's streaming tar iterator (URLs, ``pipe:`` specs, any
    file): one chunk per member, its bytes as the buffer."""
    with gopen(url) as stream:
        for rec in tar_file_iterator(stream):
            key = member_key(rec["fname"])
            if key == -1:
                continue
            data = rec["data"]
            yield (np.frombuffer(data, dtype=np.uint8), np.array([key]), np.zeros(1, np.int64),
                   np.array([len(data)]))


_VERSION = 4
_PROBLEMS = ("", f"name is not <number>.{SAMPLE_EXT}", "shorter than the header",
             "bad magic", "other format version", "bad header (neighbours or flags)",
             "body size in the header is too small for its arrays")


@numba.njit(cache=True, nogil=True)
def _problems(raw, keys, offs, sizes):
    """What is wrong with each member's name and header (an index into ``_PROBLEMS``; 0: none):
    a numeric name, magic/version, field ranges, and a body size that holds the arrays; and
    each valid member's body size."""
    out = np.zeros(keys.shape[0], np.int64)
    body_bytes = np.zeros(keys.shape[0], np.int64)
    words = raw[: raw.shape[0] // 4 * 4].view(np.uint32)
    for r in range(keys.shape[0]):
        off, size = offs[r], sizes[r]
        if keys[r] < 0:
            out[r] = 1
            continue
        if off % 4 or size <= 4 * HEADER_WORDS:
            out[r] = 2
            continue
        s = off // 4
        if words[s] != MAGIC_WORD:
            out[r] = 3
            continue
        if words[s + W_VERSION] & 0xFFFF != FORMAT_VERSION:
            out[r] = _VERSION
            continue
        ne, npd, nn = np.int64(words[s + W_EXPR]), np.int64(words[s + W_PAD]), words[s + W_NBR]
        if nn > MAX_NEIGHBOURS or (words[s + W_VERSION] >> 16) >= 2 * FLAG_FLOAT_COUNTS:
            out[r] = 5
            continue
        ng = ne + npd
        need = 8 * np.int64(nn) + np.int64(nn) * ((ng + 7) // 8) + ne + ng
        body_bytes[r] = words[s + W_BODY]
        if body_bytes[r] < need:
            out[r] = 6
    return out, body_bytes
