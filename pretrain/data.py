"""Shards -> model-ready training batches: a distinct, seeded, resumable stream per rank and worker.

The loader is four parts, each its own module: the stream plan (pretrain.shard_stream: which
samples each rank and DataLoader worker reads, in which order, and the shard readers), the
random streams (pretrain.random_streams), the batch kernel (pretrain.batches: context sampling
and neighbour alignment) and the corruption policy (pretrain.corruption). This module holds the
settings and wires them into a torch DataLoader with a resumable position.

All batch randomness (context length, neighbour count, context genes, corruption) is keyed by
(seed, slot, batch index), so the stream position is one integer, the number of batches the
trainer has taken, and resuming needs no replay.

Trainer API (exact names)::

    cfg = DataConfig(shards=OUT, context=3200, batch_size=32, seed=0, num_workers=2)
    loader = CellLoader(cfg, rank=rank, world_size=world_size)   # endless train stream
    for step, batch in zip(range(start, max_steps), loader): ...
    state = loader.state_dict()         # {"batches": n, ...}: save one per rank in the checkpoint
    loader.load_state_dict(state)       # before iterating: continues with batch n; a state
                                        # saved with other ranks, workers or batch size re-deals
    loader.stats["corrupt_shards"]      # also "corrupt_samples"; updated as batches arrive
    ev = CellLoader(dataclasses.replace(cfg, split="eval"), rank=rank, world_size=world_size)
    for batch in itertools.islice(ev, n): ...   # deterministic; restarts on every iter()

The eval stream reads ``manifest["eval_shards"]`` in order without shuffling and cycles, so every
rank can take the same number of batches; ``ev.n_batches`` is one pass for this rank.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data_prep.shard_format import CONTEXT_GENES, MAX_NEIGHBOURS
from pretrain.batches import BatchBuilder, Item
from pretrain.random_streams import keyed
from pretrain.shard_stream import POSITION, STATS, Redeal, ShardStream, ShardTable, redeal_after

# What makes the slots of a saved stream: a state saved with other values is dealt again.
LAYOUT = ("world_size", "num_workers", "batch_size", "shuffle_buffer")


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
    pad_alone: bool = True  # a cell given no neighbours is still padded with its neighbours' genes
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


def slot_batches(batches: int, worker: int, n_workers: int) -> int:
    """Batches worker role ``worker`` of a rank had built when the rank had taken ``batches``
    (the DataLoader takes them round-robin from the workers, starting at role 0)."""
    return max(0, -(-(batches - worker) // n_workers))


class CellBatches(IterableDataset):
    """Whole batches from one slot per (rank, worker); iterate it directly for one process."""

    def __init__(self, cfg: DataConfig, rank: int = 0, world_size: int = 1,
                 start_batch: int = 0, table: ShardTable | None = None,
                 redeal: Redeal | None = None) -> None:
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.start_batch = start_batch
        self.table = table  # the manifest's shards (read from it when None)
        self.redeal = redeal
        self.stream: ShardStream | None = None

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        n_workers = info.num_workers if info else 1
        # A DataLoader hands out batches round-robin from its worker 0: in a stream resumed at
        # batch n, worker i plays the role of the uninterrupted stream's worker (i + n) % W.
        worker = ((info.id if info else 0) + self.start_batch) % n_workers
        slot, n_slots = self.rank * n_workers + worker, self.world_size * n_workers
        b = slot_batches(self.start_batch, worker, n_workers)
        self.stream = stream = ShardStream(self.cfg, slot, n_slots, self.table, self.redeal)
        build, B = BatchBuilder(self.cfg), self.cfg.batch_size
        items: list[Item] = []
        for item in stream.samples(b * B):
            items.append(item)
            if len(items) == B:
                batch = build(items, keyed(self.cfg.seed, 2, slot, n_slots, b, *stream.key))
                if info:  # counters travel with the batch out of the worker process
                    batch["_stats"] = torch.tensor([stream.stats[s] for s in STATS + POSITION])
                yield batch
                items, b = [], b + 1


class CellLoader:
    """A rank's batch iterator over a torch DataLoader, with a resumable position and stats."""

    def __init__(self, cfg: DataConfig, rank: int | None = None,
                 world_size: int | None = None) -> None:
        self.cfg = cfg
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.batches = 0  # batches handed to the trainer: the stream position
        self.stats = dict.fromkeys(STATS + POSITION, 0)
        self.redeal: Redeal | None = None  # set when a state of another layout was loaded
        self._worker_stats: dict[int, list[int]] = {}
        self.table = ShardTable.read(cfg.shards, cfg.split)  # once per rank, not per worker
        if cfg.split == "eval":
            n_slots = self.world_size * max(cfg.num_workers, 1)
            sizes = [ShardStream(cfg, self.rank * max(cfg.num_workers, 1) + w, n_slots,
                                 self.table).epoch_size(0)
                     for w in range(max(cfg.num_workers, 1))]
            self.n_batches = sum(-(-s // cfg.batch_size) for s in sizes)
        else:
            self.epochs = self.table.epochs()

    def state_dict(self) -> dict:
        state = {"batches": self.batches, "seed": self.cfg.seed, "rank": self.rank,
                 "world_size": self.world_size, "num_workers": self.cfg.num_workers,
                 "batch_size": self.cfg.batch_size, "shuffle_buffer": self.cfg.shuffle_buffer}
        if self.cfg.split == "train":
            state.update({"epoch": self.stats["epoch"], "passes": self.stats["passes"],
                          "epochs": list(self.epochs)})
            if self.redeal is not None:
                state["redeal"] = self.redeal.source
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue where ``state`` was saved. The manifest may have gained epochs since (packed
        while training went on): the position stays exact if the run had not yet wrapped.

        A state saved with another number of ranks or workers, batch size or shuffle block
        (``LAYOUT``) cannot continue its slots' streams: the stream is dealt again from where
        the old slots were (``shard_stream.redeal_after``; ``self.redeal`` says what was read
        and what is read again). Any one rank's state places all the old slots.
        """
        mine = self.state_dict()
        if state["seed"] != mine["seed"]:
            raise ValueError(f"loader state is for seed={state['seed']}, this loader has "
                             f"{mine['seed']}: another seed is another stream")
        old = state.get("epochs", mine.get("epochs"))
        if old != mine.get("epochs"):  # (a re-deal's source was saved over a prefix of these)
            new = mine["epochs"]
            if new[: len(old)] != old or state["passes"]:
                raise ValueError(
                    f"loader state was saved over packed epochs {old} (pass "
                    f"{state['passes'] + 1}), the manifest now has {new}: the position can be "
                    "kept only when epochs were added after the saved ones before a wrap")
        saved = {key: state.get(key, mine[key]) for key in LAYOUT}
        if saved == {key: mine[key] for key in LAYOUT}:
            if state["rank"] != mine["rank"]:
                raise ValueError(f"loader state is for rank {state['rank']}, this loader is "
                                 f"rank {mine['rank']}")
            self.redeal = self._redeal(state["redeal"]) if state.get("redeal") else None
            self.batches = int(state["batches"])
            for key in POSITION:
                self.stats[key] = int(state.get(key, 0))
            return
        if self.cfg.split != "train":
            raise ValueError("an eval stream has no position to resume")
        source = {**saved, "batches": int(state["batches"])}
        if state.get("redeal"):
            source["redeal"] = state["redeal"]
        self.redeal = self._redeal(source)
        self.batches = 0
        passes, j = divmod(self.redeal.epoch, len(self.epochs))
        self.stats["epoch"], self.stats["passes"] = self.epochs[j], passes

    def _redeal(self, source: dict) -> Redeal:
        """The stream dealt again after the old slots of ``source`` (layout, batches taken, its
        own earlier re-deal) had read what they had: every rank took ``batches`` (lockstep), so
        worker role w of every old rank had built ``slot_batches(batches, w, W)``."""
        earlier = self._redeal(source["redeal"]) if source.get("redeal") else None
        n_workers = max(source["num_workers"], 1)
        taken = [slot_batches(source["batches"], worker, n_workers) * source["batch_size"]
                 for _ in range(source["world_size"]) for worker in range(n_workers)]
        old_cfg = replace(self.cfg, shuffle_buffer=source["shuffle_buffer"])
        return redeal_after(old_cfg, taken, self.table, earlier, source)

    def __iter__(self) -> Iterator[dict]:
        cfg = self.cfg
        start = self.batches if cfg.split == "train" else 0
        data = CellBatches(cfg, self.rank, self.world_size, start_batch=start, table=self.table,
                           redeal=self.redeal)
        loader = DataLoader(data, batch_size=None, num_workers=cfg.num_workers,
                            pin_memory=cfg.pin_memory,
                            persistent_workers=False)
        for i, batch in enumerate(loader):
            if cfg.num_workers:
                latest = batch.pop("_stats").tolist()
            else:
                latest = [data.stream.stats[s] for s in STATS + POSITION]
            self._worker_stats[i % max(cfg.num_workers, 1)] = latest
            for j, name in enumerate(STATS):
                self.stats[name] = sum(t[j] for t in self._worker_stats.values())
            if cfg.split == "train":
                self.stats.update(zip(POSITION, latest[len(STATS):]))
                self.batches += 1
            yield batch
