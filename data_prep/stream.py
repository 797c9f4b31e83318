"""Drawing the streams with memory bounded by design: the plan holds tables of (group, dataset)
pairs and one dataset or one bucket of samples at a time, never an array over every cell of the
corpus or over a whole stream, so it runs in the same memory at 400 or 20,000 datasets.

An epoch's stream of N independent draws from the weights' P(i) (``weights.py``) is made in
three steps that give it the same distribution:

1. how often each (group, dataset) pair is drawn: Multinomial(N, P(pair)), O(pairs);
2. dataset by dataset, each pair's draws among its cells, in proportion to their depth weights,
   and which samples become meta-cells (an exact share of the stream: a hypergeometric number
   per dataset, then a uniform subset of its samples, so the flag is independent of the cell);
3. a keyed external shuffle across datasets: each sample goes to a random bucket file on disk
   (about BUCKET_SAMPLES each); then each bucket in turn is permuted in memory and appended to
   the stream files. Random buckets with a uniform order within each are a uniform permutation
   of the whole stream, so the stream is ordered like independent draws.

Every random choice is keyed by (seed, what it is for, dataset or bucket), so a stream is the
same bytes however often it is rerun.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.pack import shard_bounds
from data_prep.weights import GROUP_SCALE, group_probabilities, pair_probabilities
from utils import atomic

# Samples per bucket of the external shuffle (on average): 21 MiB of records in memory at once.
BUCKET_SAMPLES = 1 << 20
# A sample on its way through the shuffle: its global cell, weight, size bound and meta-cell flag.
RECORD = np.dtype([("cell", "<i8"), ("weight", "<f8"), ("bytes", "<i8"), ("metacell", "?")])


@dataclass
class DatasetCells:
    """One dataset's cells as the draw sees them."""

    offset: int  # global index of its first cell
    group: np.ndarray  # int64 global group of each cell; -1 for a cell never drawn (held out)
    depth: np.ndarray  # float64 depth weight w_i of each cell
    multiplier: float


@dataclass
class PairTable:
    """The (group, dataset) pairs of the training cells: how many cells each has and the sum of
    their depth weights, all the corpus-wide state the weights need. Pairs are in dataset
    order, each dataset's sorted by group."""

    group: np.ndarray  # int64
    dataset: np.ndarray  # int64
    n_cells: np.ndarray  # int64
    depth_sum: np.ndarray  # float64
    multiplier: np.ndarray  # float64, the dataset's

    @classmethod
    def of(cls, dataset: int, cells: DatasetCells) -> PairTable:
        """The pairs of one dataset (index ``dataset``)."""
        pool = cells.group >= 0
        groups, inverse = np.unique(cells.group[pool], return_inverse=True)
        n = groups.shape[0]
        return cls(groups.astype(np.int64), np.full(n, dataset, np.int64),
                   np.bincount(inverse, minlength=n).astype(np.int64),
                   np.bincount(inverse, cells.depth[pool], minlength=n),
                   np.full(n, cells.multiplier, np.float64))

    @classmethod
    def concat(cls, tables: list[PairTable]) -> PairTable:
        """The tables of the datasets, in dataset order, as one."""
        fields = list(cls.__dataclass_fields__)
        return cls(*(np.concatenate([getattr(t, k) for t in tables]) for k in fields))

    def pairs_of(self, d: int) -> slice:
        """Dataset ``d``'s pairs."""
        return slice(int(np.searchsorted(self.dataset, d, side="left")),
                     int(np.searchsorted(self.dataset, d, side="right")))

    @property
    def n_pool(self) -> int:
        """Training cells of the corpus."""
        return int(self.n_cells.sum())

    def probabilities(self, gamma: float, S: float = GROUP_SCALE) -> np.ndarray:
        return pair_probabilities(self.group, self.n_cells, self.depth_sum, self.multiplier,
                                  S=S, gamma=gamma)

    def group_target(self, prob: np.ndarray, n_groups: int) -> np.ndarray:
        """Each group's probability: its target share of the stream."""
        return group_probabilities(self.group, prob, n_groups)

    def save(self, path: Path) -> None:
        with atomic.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, **{k: getattr(self, k) for k in self.__dataclass_fields__})

    @classmethod
    def load(cls, path: Path) -> PairTable:
        with np.load(path) as z:
            return cls(**{k: z[k] for k in cls.__dataclass_fields__})


class StreamWriter:
    """Writes one stream of the plan in pieces (``cells``, ``metacell``, ``weight``: 1-D npy
    files appended chunk by chunk) and cuts it into shards of at most ``max_samples`` samples
    and ``max_bytes`` bytes as samples arrive; ``bounds.npy`` (O(shards)) is the only array held
    whole. ``stream.json`` goes last and marks the stream complete; shards done for an earlier
    version of the stream are forgotten when it is rewritten."""

    ARRAYS = (("cells", "<i8"), ("metacell", "?"), ("weight", "<f8"))

    def __init__(self, sdir: Path, max_samples: int, max_bytes: int):
        self.sdir = sdir
        sdir.mkdir(parents=True, exist_ok=True)
        (sdir / "stream.json").unlink(missing_ok=True)
        for side in (sdir / "done").glob("*.json"):
            side.unlink()
        self.files = {k: atomic.NpyAppender(sdir / f"{k}.npy", t) for k, t in self.ARRAYS}
        self.max_samples, self.max_bytes = max_samples, max_bytes
        self.bounds = [0]
        self.start = 0  # first sample of the shard being filled
        self.pending = np.zeros(0, dtype=np.int64)  # its samples' size bounds

    def add(self, cells: np.ndarray, metacell: np.ndarray, weight: np.ndarray,
            nbytes: np.ndarray) -> None:
        for (k, _), v in zip(self.ARRAYS, (cells, metacell, weight)):
            self.files[k].append(v)
        # cutting from the open shard's start gives the cuts of the whole stream, except the
        # last, which may still grow
        sizes = np.concatenate([self.pending, nbytes.astype(np.int64)])
        cuts = shard_bounds(sizes, self.max_samples, self.max_bytes)
        if cuts.shape[0] > 1:
            self.bounds.extend((self.start + cuts[1:-1]).tolist())
            self.start += int(cuts[-2])
            sizes = sizes[cuts[-2]:]
        self.pending = sizes

    def close(self, fingerprint: str, **extra: np.ndarray) -> None:
        """Finish the files, save the shard bounds and ``extra`` arrays, then ``stream.json``."""
        if self.pending.shape[0]:
            self.bounds.append(self.start + self.pending.shape[0])
        for f in self.files.values():
            f.close()
        for k, v in extra.items():
            atomic.save_npy(self.sdir / f"{k}.npy", v)
        atomic.save_npy(self.sdir / "bounds.npy", np.asarray(self.bounds, dtype=np.int64))
        atomic.write_text(self.sdir / "stream.json", json.dumps({"fingerprint": fingerprint}))


def draw_within_pairs(cells: DatasetCells, pair_groups: np.ndarray, counts: np.ndarray,
                      rng: np.random.Generator) -> np.ndarray:
    """Local rows of ``counts[p]`` draws from each pair ``p`` (group ``pair_groups[p]``, sorted)
    of one dataset, with replacement and in proportion to the cells' depth weights; grouped by
    pair. One search over the dataset's cells: pair ``p``'s cells own the interval (p, p + 1]
    in proportion to their weights."""
    pool = np.flatnonzero(cells.group >= 0)
    order = pool[np.argsort(cells.group[pool], kind="stable")]
    pair = np.searchsorted(pair_groups, cells.group[order])
    w = cells.depth[order]
    cum = np.cumsum(w)
    first = np.searchsorted(pair, np.arange(pair_groups.shape[0]))
    last = np.concatenate([first[1:], [order.shape[0]]]) - 1
    base = np.concatenate([[0.0], cum])[first]
    share = (cum - base[pair]) / (cum[last] - base)[pair]
    share[last] = 1.0  # exactly: rounding must not let a draw spill into the next pair
    targets = np.repeat(np.arange(counts.shape[0]), counts) + rng.random(int(counts.sum()))
    pos = np.searchsorted(pair + share, targets, side="right")
    return order[np.minimum(pos, order.shape[0] - 1)]


def draw_stream(
    sdir: Path,
    writer: StreamWriter,
    table: PairTable,
    prob: np.ndarray,
    datasets: Iterable[DatasetCells],
    size: int,
    metacell_fraction: float,
    seed: int,
    measure: Callable[[int, np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Draw ``size`` samples with the pair probabilities ``prob`` of ``table`` (one
    ``DatasetCells`` per dataset of the table, in order) and write them, shuffled, through
    ``writer``; ``round(metacell_fraction * size)`` of them are flagged as meta-cells. A
    sample's weight is ``P(cell) * n_pool`` (1 = drawn as often as uniform sampling would).
    ``measure(dataset, rows, metacell)`` is called once per dataset with its drawn rows and
    returns their shard-size bounds (and can record what it needs of them). Returns the draws
    per pair."""
    rng = np.random.default_rng([seed, 2])
    counts = rng.multinomial(size, prob) if size else np.zeros(prob.shape[0], np.int64)
    n_buckets = max(1, math.ceil(size / BUCKET_SAMPLES))
    bucket_dir = sdir / "buckets"
    shutil.rmtree(bucket_dir, ignore_errors=True)
    bucket_dir.mkdir(parents=True)
    buckets = [open(bucket_dir / f"{b:06d}.bin", "wb") for b in range(n_buckets)]
    meta_left, left = int(round(metacell_fraction * size)), size
    n_pool = table.n_pool
    try:
        for d, cells in enumerate(datasets):
            sl = table.pairs_of(d)
            k = counts[sl]
            total = int(k.sum())
            if total == 0:
                continue
            own = np.random.default_rng([seed, 3, d])
            rows = draw_within_pairs(cells, table.group[sl], k, own)
            pair = np.repeat(np.arange(k.shape[0]), k)
            n_meta = int(rng.hypergeometric(meta_left, left - meta_left, total)) if left else 0
            meta_left, left = meta_left - n_meta, left - total
            rec = np.empty(total, RECORD)
            rec["cell"] = cells.offset + rows
            rec["weight"] = (prob[sl][pair] * cells.depth[rows] / table.depth_sum[sl][pair]
                             * n_pool)
            rec["metacell"] = False
            rec["metacell"][own.permutation(total)[:n_meta]] = True
            rec["bytes"] = measure(d, rows, rec["metacell"])
            bucket = own.integers(0, n_buckets, total)
            order = np.argsort(bucket, kind="stable")
            split = np.cumsum(np.bincount(bucket, minlength=n_buckets))[:-1]
            for b, part in enumerate(np.split(rec[order], split)):
                part.tofile(buckets[b])
    finally:
        for f in buckets:
            f.close()
    for b in range(n_buckets):
        path = bucket_dir / f"{b:06d}.bin"
        rec = np.fromfile(path, dtype=RECORD)
        rec = rec[np.random.default_rng([seed, 4, b]).permutation(rec.shape[0])]
        writer.add(rec["cell"], rec["metacell"], rec["weight"], rec["bytes"])
        path.unlink()
    bucket_dir.rmdir()
    return counts
