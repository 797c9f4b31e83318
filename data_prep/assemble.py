"""The corpus-wide stages: vocabularies, sampling groups and weights, the streams, shards,
manifest and report, from the per-dataset artifacts of one run or of several machines' parts.

Three steps, each resumable, which a cluster runs as separate jobs (``data_prep.merge
--stage``): ``plan`` (one machine: vocabularies, groups, the epochs' streams and shard cuts,
into OUT/work/pack), ``pack.pack_all`` (any number of machines, each a range of the shards)
and ``finish`` (one machine, once every shard exists: manifest and report). ``assemble`` runs
the three in turn. Memory is bounded by design: the plan goes through the datasets one at a
time and keeps O(groups x datasets) tables, never a per-cell array of the whole corpus
(``stream.py``); the packer reads per shard only its slice.

Inputs are ``DatasetRecord`` s in the build's global dataset order (the order of
``discover_inputs``), so a single run and a merge of machines' parts see the same sequence and
produce byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_prep import manifest as manifest_mod
from data_prep import pack, report
from data_prep.config import BuildConfig
from data_prep.genes import SymbolMap
from data_prep.ingest import IngestedDataset
from data_prep.labels import LabelVocab, map_labels
from data_prep.shard_format import CLASSES
from data_prep.stream import DatasetCells, PairTable, StreamWriter, draw_stream
from data_prep.vocab import GeneVocab
from data_prep.weights import depth_weight, group_ids
from utils import atomic

log = logging.getLogger("data_prep")

# Label classes that, with the pseudo-label, make a cell's sampling group (as in scPRINT-2).
GROUP_CLASSES = ("tissue", "disease", "assay", "self_reported_ethnicity", "sex", "organism",
                 "cell_culture")
CORPUS_FILE = "corpus.json"  # the plan's corpus-wide counts, for the report
DRAWN_FILE = "drawn.json"  # what an epoch's draw holds, for the report


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


def plan_dir(out: Path) -> Path:
    return Path(out) / "work" / "pack"


def stream_names(cfg: BuildConfig) -> list[str]:
    """The plan's streams: one per epoch, then the eval stream."""
    return [*(pack.stream_name(e) for e in range(cfg.pack.epochs)), pack.EVAL]


def assemble(out: Path, records: list[DatasetRecord], cfg: BuildConfig, jobs: int,
             mp_context, progress, symbols: SymbolMap) -> dict:
    """Build everything after the per-dataset stages on this machine; returns the manifest."""
    plan(out, records, cfg, symbols)
    pack.pack_all(plan_dir(out), out, stream_names(cfg), jobs, mp_context, progress)
    return finish(out, records, cfg)


def plan(out: Path, records: list[DatasetRecord], cfg: BuildConfig, symbols: SymbolMap) -> None:
    """Vocabularies, groups, the eval stream and each epoch's stream with its shard cuts, into
    OUT/vocab and OUT/work/pack; what is already planned with the same inputs is kept.

    ``symbols`` (the build's symbol map) gives the gene vocabulary its aliases. The plan
    (vocabularies, groups, the eval cells) is shared by all epochs; each epoch's draw is a
    stream of its own with its seed and curriculum gamma, so rerunning with more ``--epochs``
    draws and packs only the new ones, byte-identical to packing them at once.
    """
    records = sorted(records, key=lambda r: r.index)
    pack.check_pack_config(cfg.pack, [r.name for r in records])
    ok = [r for r in records if r.status == "ok"]
    pdir = plan_dir(out)
    fingerprint = _fingerprint(cfg, records)
    if pack.plan_fingerprint(pdir) != fingerprint:
        _plan_corpus(Path(out), ok, cfg, symbols, fingerprint)
    meta = json.loads((pdir / "plan.json").read_text())
    datasets = [pack.PackDataset(**d) for d in meta["datasets"]]
    corpus = json.loads((pdir / CORPUS_FILE).read_text())
    table = PairTable.load(pdir / "pairs.npz")
    for e in range(cfg.pack.epochs):
        if pack.plan_fingerprint(pdir, pack.stream_name(e)) != f"{fingerprint}:{e}":
            _draw_epoch(pdir, datasets, ok, table, cfg, e, corpus["n_groups"],
                        f"{fingerprint}:{e}")


def _plan_corpus(out: Path, ok: list[DatasetRecord], cfg: BuildConfig, symbols: SymbolMap,
                 fingerprint: str) -> None:
    """The part of the plan every epoch shares, one dataset at a time: vocabularies, each
    dataset's maps, the corpus-wide group and pseudo-label files (written in pieces), the
    (group, dataset) pair table, the eval stream and the counts the report needs."""
    pdir = plan_dir(out)
    pdir.mkdir(parents=True, exist_ok=True)
    (pdir / "plan.json").unlink(missing_ok=True)
    vocab, labels = _vocabularies(cfg, ok, symbols)
    group_file = atomic.NpyAppender(pdir / "group.npy", np.int32)
    pseudo_file = atomic.NpyAppender(pdir / "pseudo.npy", np.int32)
    eval_stream = StreamWriter(pdir / pack.EVAL, cfg.pack.shard_samples,
                               int(cfg.pack.shard_mb * 2**20))
    datasets, tables = [], []
    counts = _Counts(len(pack.N_EXPR_EDGES) - 1)
    offset = 0
    for i, rec in enumerate(ok):
        x = _load(rec)
        n = x.ds.n_cells
        label_map = labels.label_map(x.ds.label_values)
        pack.save_dataset_maps(pdir, i, vocab.lookup(x.ds.organism, x.ds.genes), label_map)
        cell_labels = map_labels(label_map, x.ds.label_codes)
        pl_ids = labels.add("pseudo_label", _pseudo_names(x, cfg.weights.pool_cell_types))
        pseudo = pl_ids[x.pseudo_codes].astype(np.int32)
        group = _groups(labels, pseudo, cell_labels)
        held = pack.held_out_cells(rec.name, n, cfg.pack, cfg.seed)
        group_file.append(group)
        pseudo_file.append(pseudo)
        ds = pack.PackDataset(i, rec.name, str(x.ds.dir), rec.graph_dir, x.ds.organism.taxon,
                              offset, n, int(held.sum()))
        datasets.append(ds)
        nnz = np.asarray(x.ds.nnz)
        tables.append(PairTable.of(i, _cells(ds, group, held, nnz, rec.multiplier, cfg)))
        rows = np.flatnonzero(held)
        eval_stream.add(offset + rows, np.zeros(rows.shape[0], bool), np.ones(rows.shape[0]),
                        pack.member_bytes_bound(ds, rows, np.zeros(rows.shape[0], bool),
                                                cfg.pack))
        counts.add_before(nnz, cfg.pack.context_genes, group[~held], cell_labels[~held])
        offset += n
    group_file.close()
    pseudo_file.close()
    if offset == 0:  # plan.json is not written, so nothing of this half-made plan is used
        raise ValueError("no cells left to pack: every dataset was rejected or empty")
    table = PairTable.concat(tables)
    if table.n_pool == 0:
        raise ValueError("no training cells: every dataset or cell is held out for evaluation")
    vocab.save(out / "vocab")
    labels.save(out / "vocab")
    table.save(pdir / "pairs.npz")
    eval_stream.close(fingerprint)
    n_groups = len(labels.values("groups"))
    atomic.save_npy(pdir / "group_before.npy", counts.groups(n_groups))
    atomic.write_text(pdir / CORPUS_FILE, json.dumps(
        {"n_groups": n_groups, "n_cells": offset, "nnz_hist": counts.hist.tolist(),
         "n_above_context": counts.above, "classes": counts.class_lists()}))
    pack.save_plan(pdir, cfg.pack, datasets, fingerprint)


def _draw_epoch(pdir: Path, datasets: list[pack.PackDataset], ok: list[DatasetRecord],
                table: PairTable, cfg: BuildConfig, epoch: int, n_groups: int,
                fingerprint: str) -> None:
    """Epoch ``epoch``'s stream (``stream.draw_stream``), its group targets and what the
    report needs of it (distinct cells, label counts, drawn groups)."""
    w = cfg.weights
    prob = table.probabilities(w.gamma_of(epoch), S=w.group_scale)
    size = cfg.pack.stream_size if cfg.pack.stream_size is not None else table.n_pool
    name = pack.stream_name(epoch)
    counts = _Counts(0)
    distinct = 0

    def measure(d: int, rows: np.ndarray, metacell: np.ndarray) -> np.ndarray:
        nonlocal distinct
        ds = datasets[d]
        distinct += np.unique(rows).shape[0]
        label_map = np.load(pdir / f"labelmap-{d}.npy")
        codes = pack.read_rows(Path(ds.ingest_dir) / "label_codes.npy", rows)
        counts.add_classes(map_labels(label_map, codes))
        return pack.member_bytes_bound(ds, rows, metacell, cfg.pack)

    group_file = pdir / "group.npy"
    cells = (_cells(ds, pack.read_range(group_file, ds.offset, ds.offset + ds.n_cells),
                    pack.held_out_cells(ds.name, ds.n_cells, cfg.pack, cfg.seed),
                    np.load(Path(ds.ingest_dir) / "nnz.npy"), rec.multiplier, cfg)
             for ds, rec in zip(datasets, ok))
    writer = StreamWriter(pdir / name, cfg.pack.shard_samples, int(cfg.pack.shard_mb * 2**20))
    drawn = draw_stream(pdir / name, writer, table, prob, cells, size,
                        cfg.pack.metacell_fraction, pack.epoch_seed(cfg.seed, epoch), measure)
    atomic.write_text(pdir / name / DRAWN_FILE, json.dumps(
        {"n_distinct_cells": distinct, "classes": counts.class_lists()}))
    writer.close(fingerprint, group_target=table.group_target(prob, n_groups),
                 drawn_groups=np.bincount(table.group, drawn, n_groups).astype(np.int64))


def _cells(ds: pack.PackDataset, group: np.ndarray, held: np.ndarray, nnz: np.ndarray,
           multiplier: float, cfg: BuildConfig) -> DatasetCells:
    w = cfg.weights
    return DatasetCells(ds.offset, np.where(held, -1, group).astype(np.int64),
                        depth_weight(nnz, scale=w.depth_scale, slope=w.depth_slope,
                                     midpoint=w.depth_midpoint), multiplier)


class _Counts:
    """Corpus-wide counts for the report, added dataset by dataset: expressed genes of the
    input cells, groups and labels of the training cells (or of the drawn samples)."""

    def __init__(self, n_bins: int):
        self.hist = np.zeros(n_bins, dtype=np.int64)
        self.above = 0
        self.group = np.zeros(0, dtype=np.int64)
        self.classes = [np.zeros(1, dtype=np.int64) for _ in CLASSES]  # [unknown, id 0, ...]

    def add_before(self, nnz: np.ndarray, context: int, group: np.ndarray,
                   cell_labels: np.ndarray) -> None:
        self.hist += np.histogram(nnz, pack.N_EXPR_EDGES)[0]
        self.above += int((nnz > context).sum())
        self.group = _add(self.group, np.bincount(group))
        self.add_classes(cell_labels)

    def add_classes(self, cell_labels: np.ndarray) -> None:
        for j in range(len(CLASSES)):
            self.classes[j] = _add(self.classes[j], np.bincount(cell_labels[:, j] + 1))

    def groups(self, n_groups: int) -> np.ndarray:
        return _add(np.zeros(n_groups, dtype=np.int64), self.group)

    def class_lists(self) -> dict[str, list[int]]:
        return {c: v.tolist() for c, v in zip(CLASSES, self.classes)}


def _add(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a + b`` of count vectors of different lengths (the shorter padded with zeros)."""
    out = np.zeros(max(a.shape[0], b.shape[0]), dtype=np.int64)
    out[:a.shape[0]] += a
    out[:b.shape[0]] += b
    return out


def check_plan(out: Path, records: list[DatasetRecord], cfg: BuildConfig) -> None:
    """Raise ValueError unless OUT's plan and all its streams were made from these records and
    settings (a pack or manifest stage must not work from a stale plan)."""
    pdir = plan_dir(out)
    fingerprint = _fingerprint(cfg, sorted(records, key=lambda r: r.index))
    expected = [*(f"{fingerprint}:{e}" for e in range(cfg.pack.epochs)), fingerprint]
    stale = [s for s, f in zip(stream_names(cfg), expected) if pack.plan_fingerprint(pdir, s) != f]
    if pack.plan_fingerprint(pdir) != fingerprint or stale:
        raise ValueError(f"{pdir}: the plan is missing or was made for other inputs or settings "
                         f"({', '.join(stale) or 'plan.json'}); run the plan stage first")


def finish(out: Path, records: list[DatasetRecord], cfg: BuildConfig,
           num_machines: int = 1) -> dict:
    """The manifest and report, once every shard of the plan is packed (by ``num_machines``
    machines: a missing shard is named with the machine that packs it); returns the manifest."""
    out = Path(out)
    records = sorted(records, key=lambda r: r.index)
    ok = [r for r in records if r.status == "ok"]
    pdir = plan_dir(out)
    names = stream_names(cfg)
    check_plan(out, records, cfg)
    shards = pack.packed_shards(pdir, out, names, num_machines)
    meta = json.loads((pdir / "plan.json").read_text())
    datasets = [pack.PackDataset(**d) for d in meta["datasets"]]
    corpus = json.loads((pdir / CORPUS_FILE).read_text())
    vocab = GeneVocab.load(out / "vocab", cfg.vocab_sizing)
    labels = LabelVocab.load(out / "vocab")
    w = cfg.weights
    epochs, targets, drawn_groups = [], [], []
    class_after = _Counts(0)
    for e, name in enumerate(names[:-1]):
        sdir = pdir / name
        drawn = json.loads((sdir / DRAWN_FILE).read_text())
        target, groups = np.load(sdir / "group_target.npy"), np.load(sdir / "drawn_groups.npy")
        class_after.classes = [_add(a, np.asarray(drawn["classes"][c], np.int64))
                               for a, c in zip(class_after.classes, CLASSES)]
        recs = shards[name]
        n_samples = sum(r["n_samples"] for r in recs)
        epochs.append({
            "epoch": e, "gamma": w.gamma_of(e), "seed": pack.epoch_seed(cfg.seed, e),
            "n_samples": n_samples,
            "n_distinct_cells": drawn["n_distinct_cells"],
            "n_metacells": int(sum(r["stats"]["n_metacells"] for r in recs)),
            "share_above_context": round(
                sum(r["stats"]["n_above_context"] for r in recs) / max(1, n_samples), 6),
            "group_tv": round(float(0.5 * np.abs(groups / max(1, n_samples) - target).sum()),
                              6),
        })
        for r in recs:
            r["epoch"] = e
        targets.append(target)
        drawn_groups.append(groups)
    train = [r for name in names[:-1] for r in shards[name]]
    metas = [_metas(r) for r in ok]
    stats = report.collect(
        corpus=corpus, group_before=np.load(pdir / "group_before.npy"),
        group_after=np.sum(drawn_groups, axis=0), target=np.mean(targets, axis=0),
        class_after=class_after.class_lists(), train=train, labels=labels,
        context=cfg.pack.context_genes, epochs=epochs,
        datasets=[{"name": r.name, "organism": m["organism_name"] or m["organism"],
                   "n_cells": int(m["n_kept"]), "n_clusters": int(g.get("n_clusters", 0))}
                  for r, (m, g) in zip(ok, metas)])
    man = manifest_mod.build(
        cfg=cfg, records=records, loaded=[(r, m, g) for r, (m, g) in zip(ok, metas)],
        vocab=vocab.to_manifest(), labels=labels.to_manifest(), train=train,
        eval_=shards[pack.EVAL], held_per_dataset=[d.n_held for d in datasets],
        epochs=epochs,
        stream={"n_samples": int(sum(e["n_samples"] for e in epochs)),
                "n_metacells": stats["n_metacells"],
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


def _vocabularies(cfg: BuildConfig, ok: list[DatasetRecord],
                  symbols: SymbolMap) -> tuple[GeneVocab, LabelVocab]:
    """The gene vocabulary of every dataset (read one at a time, in dataset order) with the
    build's aliases, and the label vocabulary to fill; both extend ``cfg.vocab`` when given."""
    if cfg.vocab:
        vocab = GeneVocab.load(cfg.vocab, cfg.vocab_sizing)
        labels = LabelVocab.load(cfg.vocab)
    else:
        vocab, labels = GeneVocab(cfg.vocab_sizing), LabelVocab()
    vocab.add_datasets((ds.organism, ds.genes)
                       for ds in (IngestedDataset.load(r.ingest_dir) for r in ok))
    vocab.add_aliases(symbols)
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


def _metas(rec: DatasetRecord) -> tuple[dict, dict]:
    """An accepted dataset's ingest and graph meta (small JSON files)."""
    ingest = json.loads((Path(rec.ingest_dir) / "meta.json").read_text())
    graph = Path(rec.graph_dir) / "meta.json"
    return ingest, json.loads(graph.read_text()) if graph.exists() else {"n_clusters": 0}


def _fingerprint(cfg: BuildConfig, records: list[DatasetRecord]) -> str:
    """Changes whenever the plan would: configuration, datasets and their artifacts. The number
    of epochs is left out: adding epochs keeps the plan and the epochs already drawn."""
    config = cfg.to_dict()
    config["pack"].pop("epochs")
    metas = [_metas(r) for r in records if r.status == "ok"]
    doc = {
        "config": config,
        "records": [r.public() for r in records],
        "ingest": [m for m, _ in metas],
        "graph": [{k: g.get(k) for k in ("config", "seed", "n_cells", "n_clusters")}
                  for _, g in metas],
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()
