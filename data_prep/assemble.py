"""The corpus-wide stages: vocabularies, sampling groups and weights, the stream, shards, manifest
and report, from the per-dataset artifacts of one run or of several machines' parts.

Inputs are ``DatasetRecord`` s in the build's global dataset order (the order of
``discover_inputs``), so a single run and a merge of machines' parts see the same sequence and
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
from data_prep.labels import LabelVocab, map_labels
from data_prep.shard_format import CLASSES
from data_prep.vocab import GeneVocab
from data_prep.weights import cell_probabilities, group_ids, group_probabilities

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

    ``symbols`` (the build's symbol map) gives the gene vocabulary its aliases. The plan
    (vocabularies, groups, the eval cells) is shared by all epochs; each epoch's draw is a
    stream of its own with its seed and curriculum gamma, so rerunning with more ``--epochs``
    draws and packs only the new ones, byte-identical to packing them at once.
    """
    records = sorted(records, key=lambda r: r.index)
    pack.check_pack_config(cfg.pack, [r.name for r in records])
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
        cell_labels = map_labels(x.label_map, x.ds.label_codes)
        pl_ids = labels.add("pseudo_label", _pseudo_names(x, cfg.weights.pool_cell_types))
        pseudo[sl] = pl_ids[x.pseudo_codes]
        group[sl] = _groups(labels, pseudo[sl], cell_labels)
        nnz[sl] = x.ds.nnz
        mult[sl] = x.rec.multiplier
        held[sl] = pack.held_out_cells(x.rec.name, n, cfg.pack, cfg.seed)
        offset += n

    pool = ~held
    n_pool = int(pool.sum())
    if n_pool == 0:
        raise ValueError("no training cells: every dataset or cell is held out for evaluation")
    stream_size = cfg.pack.stream_size if cfg.pack.stream_size is not None else n_pool
    vocab.save(out / "vocab")
    labels.save(out / "vocab")

    plan_dir = out / "work" / "pack"
    fingerprint = _fingerprint(cfg, records, loaded)
    if pack.plan_fingerprint(plan_dir) != fingerprint:
        pack.save_plan(plan_dir, cfg.pack, datasets, col2gid, label_maps, group, pseudo,
                       fingerprint)
    if pack.plan_fingerprint(plan_dir, pack.EVAL) != fingerprint:
        eval_cells = np.flatnonzero(held)  # each held-out cell once, unweighted
        pack.save_stream(plan_dir, pack.EVAL, eval_cells, np.zeros(eval_cells.shape[0], bool),
                         np.ones(eval_cells.shape[0]), fingerprint)
    w = cfg.weights
    epochs, targets = [], []
    for e in range(cfg.pack.epochs):
        prob = np.zeros(n_total, dtype=np.float64)
        prob[pool] = cell_probabilities(
            group[pool], nnz[pool], mult[pool], S=w.group_scale, gamma=w.gamma_of(e),
            scale=w.depth_scale, slope=w.depth_slope, midpoint=w.depth_midpoint,
        )
        name, seed = pack.stream_name(e), pack.epoch_seed(cfg.seed, e)
        targets.append(group_probabilities(group, prob))
        if pack.plan_fingerprint(plan_dir, name) != f"{fingerprint}:{e}":
            cells, metacell = pack.draw_stream(prob, stream_size, cfg.pack.metacell_fraction,
                                               seed)
            pack.save_stream(plan_dir, name, cells, metacell, prob[cells] * n_pool,
                             f"{fingerprint}:{e}", targets[-1])
        epochs.append({"epoch": e, "gamma": w.gamma_of(e), "seed": seed})
    streams = [pack.stream_name(e) for e in range(cfg.pack.epochs)]
    shards = pack.pack_all(plan_dir, out, [*streams, pack.EVAL], jobs, mp_context, progress)

    draws = np.zeros(n_total, dtype=np.int64)
    for info, name, target in zip(epochs, streams, targets):
        cells = np.load(plan_dir / name / "cells.npy")
        counts = np.bincount(cells, minlength=n_total)
        draws += counts
        freq = np.bincount(group, weights=counts, minlength=target.shape[0]) / cells.shape[0]
        recs = shards[name]
        info.update({
            "n_samples": int(cells.shape[0]),
            "n_distinct_cells": int(np.count_nonzero(counts)),
            "n_metacells": int(sum(r["stats"]["n_metacells"] for r in recs)),
            "share_above_context": round(
                sum(r["stats"]["n_above_context"] for r in recs) / max(1, cells.shape[0]), 6),
            "group_tv": round(float(0.5 * np.abs(freq - target).sum()), 6),
        })
        for r in recs:
            r["epoch"] = info["epoch"]
    train = [r for name in streams for r in shards[name]]
    stats = report.collect(loaded, datasets, group, np.mean(targets, axis=0), pool, nnz, train,
                           draws, labels, cfg.pack.context_genes, epochs)
    man = manifest_mod.build(
        cfg=cfg, records=records, loaded=[(x.rec, x.ds.meta, x.graph_meta) for x in loaded],
        vocab=vocab.to_manifest(), labels=labels.to_manifest(), train=train,
        eval_=shards[pack.EVAL],
        held_per_dataset=[int(held[d.offset:d.offset + d.n_cells].sum()) for d in datasets],
        epochs=epochs,
        stream={"n_samples": int(draws.sum()), "n_metacells": stats["n_metacells"],
                "share_above_context_input": stats["share_above_before"],
                "share_above_context_stream": stats["share_above_after"]},
    )
    report.write(out / "report", man, stats)
    manifest_mod.write(out, man)
    return man


def _pseudo_names(x: _Loaded, pool_cell_types: bool) -> list[str]:
    """Global names of a dataset's pseudo-labels. Per dataset (``<dataset>/<cell type>_<cluster>``)
    by default; with ``pool_cell_types`` an annotated pseudo-label becomes ``*/<cell type>``,
    shared by every dataset with that cell type, while unannotated cells keep their dataset's
    ``<dataset>/unknown_<cluster>``."""
    names = [f"{x.rec.name}/{v}" for v in x.pseudo_values]
    if not pool_cell_types or not len(x.pseudo_codes):
        return names
    cell_type = x.ds.labels("cell_type")
    first = np.unique(x.pseudo_codes, return_index=True)
    for code, cell in zip(*first):  # one cell type per pseudo-label (cell type x cluster)
        if cell_type[cell] is not None:
            names[code] = f"*/{cell_type[cell]}"
    return names


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
        x.label_map = labels.label_map(x.ds.label_values)
    return vocab, labels


def _groups(labels: LabelVocab, pseudo: np.ndarray, cell_labels: np.ndarray) -> np.ndarray:
    """Global group id per cell: the joint key (pseudo-label, GROUP_CLASSES labels) coded by
    ``weights.group_ids``, each key named in the label vocabulary's ``groups``."""
    cols = [CLASSES.index(c) for c in GROUP_CLASSES]
    ids, keys = group_ids(np.column_stack([pseudo, cell_labels[:, cols]]).astype(np.int64))
    pl_values = labels.values("pseudo_label")
    cls_values = {c: labels.values(c) for c in GROUP_CLASSES}
    key_strings = [
        (pl_values[row[0]], *(cls_values[c][v] if v >= 0 else "" for c, v in
                              zip(GROUP_CLASSES, row[1:])))
        for row in keys.tolist()
    ]
    return labels.add("groups", key_strings)[ids].astype(np.int32)


def _fingerprint(cfg: BuildConfig, records: list[DatasetRecord], loaded: list[_Loaded]) -> str:
    """Changes whenever the plan would: configuration, datasets and their artifacts. The number
    of epochs is left out: adding epochs keeps the plan and the epochs already drawn."""
    config = cfg.to_dict()
    config["pack"].pop("epochs")
    doc = {
        "config": config,
        "records": [r.public() for r in records],
        "ingest": [x.ds.meta for x in loaded],
        "graph": [{k: x.graph_meta.get(k) for k in ("config", "seed", "n_cells", "n_clusters")}
                  for x in loaded],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
