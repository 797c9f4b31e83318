"""Shards -> model-ready training batches: a distinct, seeded, resumable stream per rank and worker.

Why it looks like this:

- Every (rank, worker) pair is one *slot* of ``world_size * num_workers``. The build packs one
  fresh weighted draw per epoch (``manifest["epochs"]``; each train shard names its ``epoch``).
  Loader epoch ``t`` reads packed epoch ``t mod E``: its shards, permuted with ``seed + t`` (the
  same on every rank), dealt round-robin to the slots, so within an epoch each shard is read by
  exactly one slot; epoch e's shards come after e-1's. With fewer shards than slots every slot
  reads every shard and keeps every ``n_slots``-th sample instead. Either way the ranks' sample
  ids are disjoint within an epoch and together cover it. Past the last packed epoch the stream
  says so (a warning, and ``stats["passes"]``, which the trainer writes to TensorBoard) and
  starts again from the first: training never ends for lack of data (the scPRINT-2 sampler is
  not rank-aware; this is the fix), but a run that wraps replays draws it has seen.
- The shuffle is a block shuffle: each run of ``shuffle_buffer`` stream positions is permuted with
  a key of (seed, epoch, slot, block). All batch randomness (context length, neighbour count,
  context genes, corruption) is keyed by (seed, slot, batch index). So the stream position is one
  integer, the number of batches the trainer has taken, and resuming needs no replay: the slot
  skips whole epochs and shards from the manifest's sample counts without opening them.
- Readers (``DataConfig.reader``): ``"auto"`` (default) memory-maps local shard files and
  streams URLs and ``pipe:`` specs (manifest shard paths, or ``shards`` given as a URL prefix)
  through webdataset's tar iterator. Why two: webdataset's iterator (Python ``tarfile`` in
  stream mode, one ``bytes`` per member) is the only way to stream a remote shard, but it costs
  ~100 us per 74 KB member here, more than the whole 67 us budget of a 15k samples/s loader.
  A local shard instead gets one populated ``mmap`` whose tar headers a numba pass indexes at
  once, so a sample is never copied before the batch kernel reads it. ``"mmap"`` and
  ``"webdataset"`` force one reader (``"mmap"`` refuses URLs); both give identical batches.
- One numba kernel per batch gathers the context of all 7 profiles (cell + 6 neighbours),
  samples genes without replacement and applies the denoising corruption, writing every output
  element once in its final dtype. Its randomness is a SplitMix64 stream per cell keyed by one
  64-bit draw of the batch's generator: pre-drawing numpy uniforms cost ~12 us per sample
  (numba calls into a ``Generator`` cost more), a fifth of the 15k samples/s budget.

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

import itertools
import json
import logging
import math
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
from webdataset.gopen import gopen
from webdataset.tariterators import tar_file_iterator

from data_prep.shard_format import (
    CLASSES,
    CONTEXT_GENES,
    FLAG_METACELL,
    FORMAT_NAME,
    FORMAT_VERSION,
    HEADER,
    MAGIC,
    MANIFEST,
    MAX_NEIGHBOURS,
    SAMPLE_EXT,
    load_manifest,
)

HEADER_WORDS = HEADER.itemsize // 4
_PREFIX = struct.Struct("<4sHHIII")  # magic, version, flags, n_expr, n_pad, n_nbr
_STATS = ("corrupt_shards", "corrupt_samples")  # counters, summed over a rank's workers
_POSITION = ("epoch", "passes")  # where the latest batch came from
log = logging.getLogger(__name__)
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
    reader: str = "auto"  # "auto": mmap for local shard files, webdataset for URLs / pipe: specs
    seed: int = 0

    def __post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"DataConfig.split must be 'train' or 'eval', not {self.split!r}")
        if self.reader not in ("auto", "mmap", "webdataset"):
            raise ValueError("DataConfig.reader must be 'auto', 'mmap' or 'webdataset', not "
                             f"{self.reader!r}")
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
        self.root = cfg.shards
        manifest = _load_manifest(cfg.shards)
        self.shards = manifest["shards" if cfg.split == "train" else "eval_shards"]
        if not self.shards:
            raise ValueError(f"{self.root}: the manifest lists no {cfg.split} shards")
        self.train = cfg.split == "train"
        self.epochs = packed_epochs(self.shards) if self.train else [0]
        of = [e.get("epoch", 0) if self.train else 0 for e in self.shards]
        self.epoch_shards = [np.flatnonzero(np.array(of) == e) for e in self.epochs]
        self.slot, self.n_slots = slot, n_slots
        self.seed, self.block = cfg.seed, cfg.shuffle_buffer if self.train else 1
        self.sources = [_locate(cfg.shards, e["path"]) for e in self.shards]
        self.readers = [_pick_reader(cfg.reader, src) for src in self.sources]
        self.stats = dict.fromkeys(_STATS + _POSITION, 0)

    def by_sample(self, epoch: int) -> bool:
        """Whether loader epoch ``epoch`` has fewer shards than slots (deal samples instead)."""
        return len(self.epoch_shards[epoch % len(self.epochs)]) < self.n_slots

    def plan(self, epoch: int) -> list[tuple[int, int]]:
        """(shard index, samples of it that are this slot's) in loader epoch ``epoch``'s reading
        order (it reads packed epoch ``epochs[epoch % E]``)."""
        order = self.epoch_shards[epoch % len(self.epochs)]
        if self.train:
            order = _key(self.seed, 0, epoch).permutation(order)
        if self.by_sample(epoch):
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
            self._enter(epoch, resumed=start > 0)
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
        src = self.sources[shard]
        chunks = _mmap_chunks(src) if self.readers[shard] == "mmap" else _wds_chunks(src)
        seen = kept = 0  # .cell members of the shard / of this slot
        try:
            for words, keys, offs, sizes in chunks:
                if by_sample:
                    mine = (np.arange(seen, seen + len(keys)) % self.n_slots) == self.slot
                    seen += len(keys)
                    keys, offs, sizes = keys[mine], offs[mine], sizes[mine]
                drop = min(len(keys), max(0, skip - kept))
                kept += len(keys)
                keys, offs, sizes = keys[drop:], offs[drop:], sizes[drop:]
                ok = _valid(words, keys, offs, sizes)
                for r in np.flatnonzero(~ok):
                    self.stats["corrupt_samples"] += 1
                    problem = _check(words, int(keys[r]), int(offs[r]), int(sizes[r]))
                    warnings.warn(f"{src}: member at byte {offs[r]}: {problem}; skipped",
                                  stacklevel=2)
                ids = (shard << 32) + keys[ok]
                yield list(zip(ids.tolist(), itertools.repeat(words), (offs[ok] // 4).tolist()))
        except (OSError, tarfile.TarError, ValueError) as e:
            self.stats["corrupt_shards"] += 1
            warnings.warn(f"{src}: unreadable shard ({e}); rest of it skipped", stacklevel=2)


def packed_epochs(shards: list[dict]) -> list[int]:
    """The packed epochs of a manifest's train shards, in reading order (a manifest without
    epochs is one epoch, 0)."""
    return sorted({e.get("epoch", 0) for e in shards})


def _is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def _locate(root: str, path: str) -> str:
    """A manifest shard path as a local file or a URL/pipe spec (relative paths join ``root``)."""
    path = path.removeprefix("file://")
    if _is_url(path) or os.path.isabs(path):
        return path
    return f"{root.rstrip('/')}/{path}" if _is_url(root) else str(Path(root) / path)


def _pick_reader(reader: str, src: str) -> str:
    if reader == "auto":
        return "webdataset" if _is_url(src) else "mmap"
    if reader == "mmap" and _is_url(src):
        raise ValueError(f"{src}: the mmap reader needs a local shard file; use reader='auto' "
                         "or 'webdataset' for URLs and pipe: specs")
    return reader


def _load_manifest(root: str) -> dict:
    """The manifest of a local build_shards output, or of one behind a URL prefix."""
    root = root.removeprefix("file://")
    if not _is_url(root):
        return load_manifest(root)
    url = f"{root.rstrip('/')}/{MANIFEST}"
    with gopen(url) as f:
        manifest = json.load(f)
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{url}: not a {FORMAT_NAME!r} v{FORMAT_VERSION} manifest")
    return manifest


# A run of a shard's ``.cell`` members: buffer (uint32 words), sample keys (-2: the member name
# is not ``<number>.cell``), byte offsets and byte sizes of the members in the buffer.
Chunk = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]
_EXT = np.frombuffer(("." + SAMPLE_EXT).encode(), dtype=np.uint8)
_TAR_ERRORS = ("", "bad tar header checksum at byte {}", "truncated: member at byte {} runs past "
               "the end", "truncated tar header at byte {}", "bad size field at byte {}")


@numba.njit(cache=True, nogil=True)
def _octal(buf, at, n):
    """A tar numeric field (octal, or GNU base-256); -1 if malformed."""
    if buf[at] & 0x80:
        v = buf[at] & 0x3F
        for q in range(at + 1, at + n):
            v = v * 256 + buf[q]
        return v
    v, q = 0, at
    while q < at + n and buf[q] == 32:
        q += 1
    while q < at + n and buf[q] != 0 and buf[q] != 32:
        if not 48 <= buf[q] <= 55:
            return -1
        v = v * 8 + buf[q] - 48
        q += 1
    return v


@numba.njit(cache=True, nogil=True)
def _name_key(buf, at, ext):
    """``<digits><ext>`` in the NUL-terminated name at ``at`` -> the number; -2 other ``<ext>``
    names; -1 names not ending in ``ext``."""
    n = 0
    while n < 100 and buf[at + n] != 0:
        n += 1
    e = ext.shape[0]
    if n < e:
        return -1
    for q in range(e):
        if buf[at + n - e + q] != ext[q]:
            return -1
    if n == e or n - e > 18:
        return -2
    v = 0
    for q in range(at, at + n - e):
        if not 48 <= buf[q] <= 57:
            return -2
        v = v * 10 + buf[q] - 48
    return v


@numba.njit(cache=True, nogil=True)
def _tar_scan(buf, ext):
    """Every member header of a tar held in ``buf`` (uint8) in one pass: (offsets of the data,
    sizes, type bytes, name keys, n members, error code (``_TAR_ERRORS``), its byte offset)."""
    end = buf.shape[0]
    cap = end // 512 + 1
    offs = np.empty(cap, np.int64)
    sizes = np.empty(cap, np.int64)
    kinds = np.empty(cap, np.uint8)
    keys = np.empty(cap, np.int64)
    n, off = 0, 0
    while off + 512 <= end:
        total, zero = 0, True
        for q in range(off, off + 512):
            total += buf[q]
            zero = zero and buf[q] == 0
        if zero:
            return offs, sizes, kinds, keys, n, 0, off
        for q in range(off + 148, off + 156):
            total += 32 - buf[q]
        if _octal(buf, off + 148, 8) != total:
            return offs, sizes, kinds, keys, n, 1, off
        size = _octal(buf, off + 124, 12)
        if size < 0:
            return offs, sizes, kinds, keys, n, 4, off
        if off + 512 + size > end:
            return offs, sizes, kinds, keys, n, 2, off
        offs[n], sizes[n], kinds[n] = off + 512, size, buf[off + 156]
        keys[n] = _name_key(buf, off, ext)
        n += 1
        off += 512 + (size + 511) // 512 * 512
    if off < end:
        return offs, sizes, kinds, keys, n, 3, off
    return offs, sizes, kinds, keys, n, 0, off


def _long_name_key(name: str) -> int:
    if not name.endswith("." + SAMPLE_EXT):
        return -1
    stem = name[: -len(SAMPLE_EXT) - 1]
    return int(stem) if stem.isdigit() else -2


_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def _mmap_chunks(path: str) -> Iterator[Chunk]:
    """A local shard as one chunk of views into its memory map: no read or copy per sample."""
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            raise ValueError("empty file")
        # One populate call maps every page; faulting them in one by one costs ~3x more.
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_SHARED | _POPULATE, prot=mmap.PROT_READ)
    raw = np.frombuffer(mm, dtype=np.uint8)
    offs, sizes, kinds, keys, n, err, err_at = _tar_scan(raw, _EXT)
    offs, sizes, kinds, keys = offs[:n], sizes[:n], kinds[:n], keys[:n]
    for r in np.flatnonzero((kinds == ord("x")) | (kinds == ord("L")))[::-1]:
        if r + 1 < n:  # pax / GNU long-name header: names the next member
            text = mm[offs[r] : offs[r] + sizes[r]]
            name = (text.rstrip(b"\0").decode() if kinds[r] == ord("L") else dict(
                rec.split(" ", 1)[1].split("=", 1) for rec in text.decode().splitlines()
            ).get("path"))
            if name is not None:
                keys[r + 1] = _long_name_key(name)
    cells = ((kinds == ord("0")) | (kinds == 0)) & (keys != -1)
    words = np.frombuffer(mm, dtype="<u4", count=len(mm) // 4)
    yield words, keys[cells], offs[cells], sizes[cells]
    if err:
        raise tarfile.TarError(_TAR_ERRORS[err].format(err_at))


def _wds_chunks(url: str) -> Iterator[Chunk]:
    """Shard members through webdataset's streaming tar iterator (URLs, ``pipe:`` specs, any
    file): one chunk per member, its bytes as the buffer."""
    with gopen(url) as stream:
        for rec in tar_file_iterator(stream):
            key = _long_name_key(rec["fname"])
            if key == -1:
                continue
            data = rec["data"]
            words = np.frombuffer(data, dtype="<u4", count=len(data) // 4)
            yield words, np.array([key]), np.zeros(1, np.int64), np.array([len(data)])


_MAGIC_WORD = int.from_bytes(MAGIC, "little")
_W_VERSION = HEADER.fields["version"][1] // 4
_W_EXPR = HEADER.fields["n_expr"][1] // 4
_W_PAD = HEADER.fields["n_pad"][1] // 4
_W_NBR = HEADER.fields["n_nbr"][1] // 4


@numba.njit(cache=True, nogil=True)
def _valid(words, keys, offs, sizes):
    """Which members are usable samples: a numeric name, magic/version, lengths that add up."""
    ok = np.zeros(keys.shape[0], np.bool_)
    for r in range(keys.shape[0]):
        s, size = offs[r] // 4, sizes[r]
        if keys[r] < 0 or offs[r] % 4 or size < 4 * HEADER_WORDS:
            continue
        if words[s] != _MAGIC_WORD or words[s + _W_VERSION] & 0xFFFF != FORMAT_VERSION:
            continue
        ne, npd, nn = np.int64(words[s + _W_EXPR]), np.int64(words[s + _W_PAD]), words[s + _W_NBR]
        if nn > MAX_NEIGHBOURS:
            continue
        ok[r] = size == 4 * (HEADER_WORDS + (ne + npd) * (1 + np.int64(nn)) + ne + 2 * nn)
    return ok


def _check(words: np.ndarray, key: int, off: int, size: int) -> str:
    """Why a member is unusable (the message for what ``_valid`` rejected)."""
    if key < 0:
        return f"name is not <number>.{SAMPLE_EXT}"
    if size < HEADER.itemsize:
        return f"{size} bytes, shorter than the header"
    magic, version, _, n_expr, n_pad, n_nbr = _PREFIX.unpack_from(words.data, off)
    if magic != MAGIC or version != FORMAT_VERSION:
        return f"bad magic/version {magic!r} v{version}"
    n_genes = n_expr + n_pad
    expected = HEADER.itemsize + 4 * (n_genes + n_expr + n_nbr * n_genes + 2 * n_nbr)
    return f"{size} bytes, header says {expected} ({n_nbr} neighbours)"


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_TO_UNIT = 2.0**-32
_CDF_MAX = 16  # integer counts up to this draw their drop from a per-cell CDF table (x4)


@numba.njit(cache=True, nogil=True, inline="always")
def _mix(z):
    """SplitMix64's output function: the i-th draw of a stream is ``_mix(base + i * golden)``
    (passes BigCrush; no state but one integer, so each cell gets its own stream cheaply)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


@numba.njit(cache=True, nogil=True)
def _poisson_ptrs(lam, s):
    """Poisson(lam >= 10) by Hoermann's transformed rejection (PTRS; numpy's algorithm) from the
    SplitMix64 stream at ``s``; returns (k, new stream position)."""
    slam, loglam = math.sqrt(lam), math.log(lam)
    b = 0.931 + 2.53 * slam
    a = -0.059 + 0.02483 * b
    invalpha = 1.1239 + 1.1328 / (b - 3.4)
    vr = 0.9277 - 3.6224 / (b - 2)
    while True:
        s += _GOLDEN
        z = _mix(s)
        u = (z >> np.uint64(32)) * _TO_UNIT - 0.5
        v = ((z & np.uint64(0xFFFFFFFF)) + 0.5) * _TO_UNIT
        us = 0.5 - abs(u)
        k = math.floor((2 * a / us + b) * u + lam + 0.43)
        if us >= 0.07 and v <= vr:
            return k, s
        if k < 0 or (us < 0.013 and v > us):
            continue
        if (math.log(v) + math.log(invalpha) - math.log(a / (us * us) + b)
                <= -lam + k * loglam - math.lgamma(k + 1)):
            return k, s


@numba.njit(cache=True, nogil=True)
def _cdf_row(cdf, row, x, lam):
    """cdf[row + k] = P(Poisson(lam) <= k) for k < x (the integer count x), then 2.0 (never
    below a uniform) up to a multiple of 4 entries (at least 4)."""
    pk = math.exp(-lam)
    acc = pk
    for k in range(x):
        cdf[row + k] = acc
        pk *= lam / (k + 1)
        acc += pk
    for k in range(x, max(4, (x + 3) // 4 * 4)):
        cdf[row + k] = 2.0


@numba.njit(cache=True, nogil=True)
def _drop(x, lam, u, s):
    """Poisson(lam) counts to drop from the count x, clipped at x: inversion of the uniform ``u``
    for lam < 12, else PTRS on the stream at ``s``; returns (count, new stream position)."""
    if lam >= 12.0:
        return _poisson_ptrs(lam, s)
    pk = math.exp(-lam)
    cdf, k = pk, 0
    while u > cdf and k < x:  # counts past x are clipped anyway
        k += 1
        pk *= lam / k
        cdf += pk
    return k, s


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _fill(words, rows, starts, k_ask, k_full, zeroed, p, seed, head, gene_ids, gene_mask,
          expressed, counts, inputs, nbr_counts, nbr_dist, nbr_mask):
    """Every output row of the batch rows ``rows`` whose samples lie in ``words``.

    Per cell: header words; context positions by partial Fisher-Yates over the expressed genes,
    then the top padding genes (a contiguous run, copied straight); the cell's and its
    neighbours' counts gathered there; scPRINT-2's corruption: drop Poisson(x p/2) counts
    (clipped at x), then zero the entry with probability p/2. The drop is sampled by inversion
    against a per-cell CDF row for each integer count value (built on first use: counts repeat
    a lot), by inversion for other counts and PTRS for large means. All randomness comes from the
    cell's own SplitMix64 stream keyed by (``seed``, batch row). Outputs are written whole
    (padding included), so they may be allocated with ``np.empty``."""
    fwords = words.view(np.float32)
    L, V, K = gene_ids.shape[1], inputs.shape[0], nbr_counts.shape[1]
    need = 1
    for t in range(rows.shape[0]):
        need = max(need, np.int64(words[starts[rows[t]] + _W_EXPR]))
    scratch = np.empty(need, np.int64)
    cdf = np.empty((_CDF_MAX + 1) * _CDF_MAX, np.float64)  # row x at x * _CDF_MAX
    ready = np.zeros(_CDF_MAX + 1, np.bool_)
    for t in range(rows.shape[0]):
        i = rows[t]
        s0 = starts[i]
        for q in range(HEADER_WORDS):
            head[i, q] = words[s0 + q]
        ne, npd = np.int64(words[s0 + _W_EXPR]), np.int64(words[s0 + _W_PAD])
        nn = np.int64(words[s0 + _W_NBR])
        ng = ne + npd
        g0 = s0 + HEADER_WORDS
        c0 = g0 + ng
        n0 = c0 + ne
        d0 = n0 + nn * ng
        m = min(L, ne)
        w = m + min(L - m, npd)
        s = _mix(seed + np.uint64(i + 1) * _GOLDEN)
        for j in range(ne):
            scratch[j] = j
        for j in range(m):
            s += _GOLDEN
            r = j + np.int64(((_mix(s) >> np.uint64(32)) * np.uint64(ne - j)) >> np.uint64(32))
            scratch[j], scratch[r] = scratch[r], scratch[j]
        for j in range(m):
            gene_ids[i, j] = words[g0 + scratch[j]]
            x = fwords[c0 + scratch[j]]
            counts[i, j] = x
            expressed[i, j] = x > 0
            gene_mask[i, j] = True
        for j in range(m, w):
            gene_ids[i, j] = words[g0 + ne + j - m]
            gene_mask[i, j] = True
        gene_ids[i, w:] = 0
        gene_mask[i, w:] = False
        counts[i, m:] = 0
        expressed[i, m:] = False
        give = min(nn, k_full if zeroed[i] else k_ask)
        for k in range(K):
            if k >= give:
                nbr_counts[i, k] = 0
                nbr_dist[i, k] = 0
                nbr_mask[i, k] = False
                continue
            base = n0 + k * ng
            for j in range(m):
                nbr_counts[i, k, j] = fwords[base + scratch[j]]
            for j in range(m, w):
                nbr_counts[i, k, j] = fwords[base + ne + j - m]
            nbr_counts[i, k, w:] = 0
            nbr_dist[i, k] = fwords[d0 + k]
            nbr_mask[i, k] = True
        for v in range(V):
            inputs[v, i, m:] = 0
            if zeroed[i]:
                inputs[v, i, :m] = 0
                continue
            h = 0.5 * p[v, i]
            ready[:] = False
            for j in range(m):
                x = counts[i, j]
                s += _GOLDEN
                z = _mix(s)
                u = (z & np.uint64(0xFFFFFFFF)) * _TO_UNIT
                xi = np.int64(x)
                if xi == x and xi <= _CDF_MAX:
                    row = xi * _CDF_MAX
                    if not ready[xi]:
                        _cdf_row(cdf, row, xi, xi * h)
                        ready[xi] = True
                    # count the CDF entries below u, 4 at a time without branches (rows are
                    # padded with 2.0): counts of 1..4 are most entries
                    c = 0
                    for q in range(row, row + max(xi, 1), 4):
                        c += (np.int64(u > cdf[q]) + np.int64(u > cdf[q + 1])
                              + np.int64(u > cdf[q + 2]) + np.int64(u > cdf[q + 3]))
                    y = np.float32(xi - c)
                else:
                    kk, s = _drop(x, x * h, u, s)
                    y = np.float32(max(x - kk, 0.0))
                # zeroed with probability p/2 (a select, not a branch)
                inputs[v, i, j] = y if (z >> np.uint64(32)) * _TO_UNIT >= h else np.float32(0)


class BatchBuilder:
    """Turns ``batch_size`` raw samples into the fixed-shape training batch (torch tensors)."""

    def __init__(self, cfg: DataConfig) -> None:
        self.cfg = cfg

    def __call__(self, items: list[Item], rng: np.random.Generator) -> dict:
        cfg, B = self.cfg, len(items)
        L = cfg.context
        if cfg.short_context_min < L and rng.random() < cfg.short_context_prob:
            L = int(rng.integers(cfg.short_context_min, L))
        k = cfg.n_neighbours
        if k is None:
            k = int(rng.integers(0, cfg.max_neighbours + 1))
        zeroed = rng.random(B) < cfg.full_pass_prob
        # a meta-cell has no neighbours to reconstruct it from: never zero its own input
        flags = np.fromiter((words[s + _W_VERSION] >> 16 for _, words, s in items),
                            dtype=np.int64, count=B)
        zeroed &= (flags & FLAG_METACELL) == 0
        p = cfg.mask_scale * rng.uniform(0.0, cfg.mask_max, size=(cfg.views, B))
        seed = rng.integers(0, 2**64, dtype=np.uint64)

        starts = np.fromiter((s for _, _, s in items), dtype=np.int64, count=B)
        groups: dict[int, tuple[np.ndarray, list[int]]] = {}
        for i, (_, words, _) in enumerate(items):
            groups.setdefault(id(words), (words, []))[1].append(i)
        head = np.empty(B, dtype=HEADER)
        gene_ids = np.empty((B, L), dtype=np.int64)
        gene_mask = np.empty((B, L), dtype=bool)
        expressed = np.empty((B, L), dtype=bool)
        counts = np.empty((B, L), dtype=np.float32)
        inputs = np.empty((cfg.views, B, L), dtype=np.float32)
        nbr_counts = np.empty((B, MAX_NEIGHBOURS, L), dtype=np.float32)
        nbr_dist = np.empty((B, MAX_NEIGHBOURS), dtype=np.float32)
        nbr_mask = np.empty((B, MAX_NEIGHBOURS), dtype=bool)
        for words, rows in groups.values():
            _fill(words, np.array(rows, dtype=np.int64), starts, k, cfg.max_neighbours, zeroed,
                  p, seed, head.view(np.uint32).reshape(B, HEADER_WORDS), gene_ids, gene_mask,
                  expressed, counts, inputs, nbr_counts, nbr_dist, nbr_mask)
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
                    batch["_stats"] = torch.tensor([stream.stats[s] for s in _STATS + _POSITION])
                yield batch
                items, b = [], b + 1


class CellLoader:
    """A rank's batch iterator over a torch DataLoader, with a resumable position and stats."""

    def __init__(self, cfg: DataConfig, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.batches = 0  # batches handed to the trainer: the stream position
        self.stats = dict.fromkeys(_STATS + _POSITION, 0)
        self._worker_stats: dict[int, list[int]] = {}
        if cfg.split == "eval":
            n_slots = self.world_size * max(cfg.num_workers, 1)
            sizes = [ShardStream(cfg, self.rank * max(cfg.num_workers, 1) + w, n_slots)
                     .epoch_size(0) for w in range(max(cfg.num_workers, 1))]
            self.n_batches = sum(-(-s // cfg.batch_size) for s in sizes)
        else:
            self.epochs = packed_epochs(_load_manifest(cfg.shards)["shards"])

    def state_dict(self) -> dict:
        state = {"batches": self.batches, "seed": self.cfg.seed, "rank": self.rank,
                 "world_size": self.world_size, "num_workers": self.cfg.num_workers,
                 "batch_size": self.cfg.batch_size}
        if self.cfg.split == "train":
            state.update({"epoch": self.stats["epoch"], "passes": self.stats["passes"],
                          "epochs": list(self.epochs)})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was saved. The manifest may have gained epochs since (packed
        while training went on): the position stays exact if the run had not yet wrapped."""
        mine = self.state_dict()
        for key in ("seed", "rank", "world_size", "num_workers", "batch_size"):
            if state[key] != mine[key]:
                raise ValueError(f"loader state is for {key}={state[key]}, this loader has "
                                 f"{mine[key]}: the stream cannot resume exactly")
        old = state.get("epochs", mine.get("epochs"))
        if old != mine.get("epochs"):
            new = mine["epochs"]
            if new[: len(old)] != old or state["passes"]:
                raise ValueError(
                    f"loader state was saved over packed epochs {old} (pass "
                    f"{state['passes'] + 1}), the manifest now has {new}: the position can be "
                    "kept only when epochs were added after the saved ones before a wrap")
        self.batches = int(state["batches"])
        for key in _POSITION:
            self.stats[key] = int(state.get(key, 0))

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        start = self.batches if cfg.split == "train" else 0
        data = CellBatches(cfg, self.rank, self.world_size, start_batch=start)
        loader = DataLoader(data, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_memory,
                            persistent_workers=False)
        for i, batch in enumerate(loader):
            if cfg.num_workers:
                latest = batch.pop("_stats").tolist()
            else:
                latest = [data.stream.stats[s] for s in _STATS + _POSITION]
            self._worker_stats[i % max(cfg.num_workers, 1)] = latest
            for j, name in enumerate(_STATS):
                self.stats[name] = sum(t[j] for t in self._worker_stats.values())
            if cfg.split == "train":
                self.stats.update(zip(_POSITION, latest[len(_STATS):]))
                self.batches += 1
            yield batch
