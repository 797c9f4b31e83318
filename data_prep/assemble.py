"""The corpus-wide stages: vocabularies, sampling groups and weights, the stream, shards, manifest
and report, from the per-dataset artifacts of one run or of several worker parts.

Inputs are ``DatasetRecord`` s in the build's global dataset order (the order of
``discover_inputs``), so a single run and a merge of worker parts see the same sequence and
produce byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from data_prep import manifest as manifest_mod
from data_prep import pack, report
from data_prep.config import BuildConfig
from data_prep.genes import SymbolMap
from data_prep.ingest import IngestedDataset
from data_prep.labels import LabelVocab
from data_prep.shard_format import CLASSES, UNKNOWN
from data_prep.vocab import GeneVocab
from data_prep.weights import cell_probabilities

log = logging.getLogger("data_prep")

# Label classes that, with the pseudo-label, make a cell's sampling group (as in scPRINT-2).
GROUP_CLASSES = ("tissue", "disease", "assay", "self_reported_ethnicity", "sex", "organism",
                 "cell_culture")


@dataclass
class DatasetRecord:
    """Outcome of the per-dataset stages for one dataset (written into a part's part.json)."""

    index: int  # position in the build's dataset order
    name: str
    path: str  # as given on the command line / in the sheet
    multiplier: float = 1.0
    status: str = "ok"  # "ok" or "rejected"
    problem: str = ""
    n_input: int = 0  # of a rejected dataset (best effort)
    ingest_dir: str = ""  # absolute, for reading; never written to the manifest
    graph_dir: str = ""

    def public(self) -> dict:
        d = asdict(self)
        d.pop("ingest_dir")
        d.pop("graph_dir")
        return d


@dataclass
class _Loaded:
    rec: DatasetRecord
    ds: IngestedDataset
    graph_meta: dict
    pseudo_values: list[str]
    pseudo_codes: np.ndarray
    n_cells: int = 0
    label_map: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))


def assemble(out: Path, records: list[DatasetRecord], cfg: BuildConfig, jobs: int,
             mp_context, progress, symbols: SymbolMap) -> dict:
    """Build everything after the per-dataset stages; returns the manifest written.
    ``symbols`` (the build's symbol map) gives the gene vocabulary its aliases."""
    records = sorted(records, key=lambda r: r.index)
    loaded = [_load(r) for r in records if r.status == "ok"]
    vocab, labels = _vocabularies(cfg, loaded)
    vocab.add_aliases(symbols)
    n_total = sum(x.ds.n_cells for x in loaded)
    if n_total == 0:
        raise ValueError("no cells left to pack: every dataset was rejected or empty")

    datasets, col2gid, label_maps = [], [], []
    group = np.empty(n_total, dtype=np.int32)
    pseudo = np.empty(n_total, dtype=np.int32)
    nnz = np.empty(n_total, dtype=np.float64)
    mult = np.empty(n_total, dtype=np.float64)
    held = np.empty(n_total, dtype=bool)
    offset = 0
    for i, x in enumerate(loaded):
        n = x.ds.n_cells
        sl = slice(offset, offset + n)
        datasets.append(pack.PackDataset(i, x.rec.name, str(x.ds.dir), x.rec.graph_dir,
                                         x.ds.organism.taxon, offset, n))
        col2gid.append(vocab.lookup(x.ds.organism, x.ds.genes).astype(np.int64))
        label_maps.append(x.label_map)
        cell_labels = x.label_map[np.arange(len(CLASSES)), np.asarray(x.ds.label_codes) + 1]
        pl_ids = labels.add("pseudo_label", [f"{x.rec.name}/{v}" for v in x.pseudo_values])
        pseudo[sl] = pl_ids[x.pseudo_codes]
        group[sl] = _groups(labels, pseudo[sl], cell_labels)
        nnz[sl] = x.ds.nnz
        mult[sl] = x.rec.multiplier
        held[sl] = pack.holdout_mask(n, cfg.pack.eval_fraction, cfg.seed, x.rec.name)
        offset += n

    pool = ~held
    w = cfg.weights
    prob = np.zeros(n_total, dtype=np.float64)
    prob[pool] = cell_probabilities(
        group[pool], nnz[pool], mult[pool], S=w.group_scale, gamma=w.effective_gamma(),
        scale=w.depth_scale, slope=w.depth_slope, midpoint=w.depth_midpoint,
    )
    n_pool = int(pool.sum())
    stream_size = cfg.pack.stream_size if cfg.pack.stream_size is not None else n_pool
    vocab.save(out / "vocab")
    labels.save(out / "vocab")

    plan_dir = out / "work" / "pack"
    fingerprint = _fingerprint(cfg, records, loaded)
    if pack.plan_fingerprint(plan_dir) != fingerprint:
        stream = pack.draw_stream(prob, stream_size, cfg.pack.metacell_fraction, cfg.seed)
        pack.save_plan(plan_dir, cfg.pack, datasets, col2gid, label_maps, group, pseudo, prob,
                       stream, np.flatnonzero(held).astype(np.int64), fingerprint)
    shards = pack.pack_all(plan_dir, out, jobs, mp_context, progress)
    stream_cells = np.load(plan_dir / "train_cells.npy", mmap_mode="r")
    stats = report.collect(loaded, datasets, group, prob, pool, nnz, shards, stream_cells, labels,
                           cfg.pack.context_genes)
    man = manifest_mod.build(
        cfg=cfg, records=records, loaded=[(x.rec, x.ds.meta, x.graph_meta) for x in loaded],
        vocab=vocab.to_manifest(), labels=labels.to_manifest(), shards=shards,
        held_per_dataset=[int(held[d.offset:d.offset + d.n_cells].sum()) for d in datasets],
        stream={"n_samples": int(stream_size),
                "n_distinct_cells": int(np.unique(np.asarray(stream_cells)).shape[0]),
                "n_metacells": stats["n_metacells"], "seed": cfg.seed,
                "gamma": cfg.weights.effective_gamma(),
                "share_above_context_input": stats["share_above_before"],
                "share_above_context_stream": stats["share_above_after"]},
    )
    report.write(out / "report", man, stats)
    manifest_mod.write(out, man)
    return man


def _load(rec: DatasetRecord) -> _Loaded:
    ds = IngestedDataset.load(rec.ingest_dir)
    if ds.n_cells == 0:
        return _Loaded(rec, ds, {"n_clusters": 0}, [], np.zeros(0, dtype=np.int64))
    gdir = Path(rec.graph_dir)
    graph_meta = json.loads((gdir / "meta.json").read_text())
    pl = json.loads((gdir / "pseudo_label.json").read_text())
    return _Loaded(rec, ds, graph_meta, list(pl["values"]), np.asarray(pl["codes"], np.int64))


def _vocabularies(cfg: BuildConfig, loaded: list[_Loaded]) -> tuple[GeneVocab, LabelVocab]:
    """Gene and label vocabularies (extending ``cfg.vocab`` when given), in dataset order."""
    if cfg.vocab:
        vocab = GeneVocab.load(cfg.vocab, cfg.vocab_sizing)
        labels = LabelVocab.load(cfg.vocab)
    else:
        vocab, labels = GeneVocab(cfg.vocab_sizing), LabelVocab()
    vocab.add_datasets([(x.ds.organism, x.ds.genes) for x in loaded])
    for x in loaded:
        width = 1 + max((len(v) for v in x.ds.label_values.values()), default=0)
        lm = np.full((len(CLASSES), width), UNKNOWN, dtype=np.int32)
        for j, cls in enumerate(CLASSES):
            ids = labels.add(cls, x.ds.label_values.get(cls, []))
            lm[j, 1:1 + ids.shape[0]] = ids
        x.label_map = lm
    return vocab, labels


def _groups(labels: LabelVocab, pseudo: np.ndarray, cell_labels: np.ndarray) -> np.ndarray:
    """Global group id per cell: the joint key (pseudo-label, GROUP_CLASSES labels)."""
    cols = [CLASSES.index(c) for c in GROUP_CLASSES]
    keys = np.column_stack([pseudo, cell_labels[:, cols]]).astype(np.int64)
    uniq, inv = np.unique(keys, axis=0, return_inverse=True)
    pl_values = labels.values("pseudo_label")
    cls_values = {c: labels.values(c) for c in GROUP_CLASSES}
    key_strings = [
        (pl_values[row[0]], *(cls_values[c][v] if v >= 0 else "" for c, v in
                              zip(GROUP_CLASSES, row[1:])))
        for row in uniq.tolist()
    ]
    return labels.add("groups", key_strings)[inv.reshape(-1)].astype(np.int32)


def _fingerprint(cfg: BuildConfig, records: list[DatasetRecord], loaded: list[_Loaded]) -> str:
    """Changes whenever the plan would: configuration, datasets and their artifacts."""
    doc = {
        "config": cfg.to_dict(),
        "records": [r.public() for r in records],
        "ingest": [x.ds.meta for x in loaded],
        "graph": [{k: x.graph_meta.get(k) for k in ("config", "seed", "n_cells", "n_clusters")}
                  for x in loaded],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
