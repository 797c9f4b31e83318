"""Apply an exported model to a new .h5ad: cell embeddings and predicted labels, in a copy.

    python -m pretrain.embed MODEL IN.h5ad --out OUT.h5ad [--organism NAME|NCBITaxon:N]
        [--batch-size N] [--device cpu|cuda] [--neighbours K] [--context N] [--seed S]
        [--precision auto|bf16|fp32] [--workers N]
        [--reference REF.h5ad --reference-label COLUMN [--transfer-k 15]
         [--transfer-search auto|exact|approximate]]

The model must see a cell exactly as it saw cells in training, so the file goes through the code
that built the training data: data_prep.ingest.open_counts reads and validates the counts
(``X``, ``layers['counts']`` or ``raw.X``, same choice, same errors) and names its genes as the
training data did (Ensembl ids, symbols mapped through the aliases the model file carries,
spike-ins and non-gene features left out), data_prep.graph.neighbours
(HVG -> PCA -> kNN over all the file's cells and genes) finds the neighbours,
data_prep.pack.align_sample turns each cell into a ``CellSample`` and pretrain.batches.BatchBuilder
makes the batch, with every corruption and random shape switched off (``inference_config``).
That is why this module, unlike training and export (which import only ``data_prep.shard_format``
of data_prep), imports the build's ingest, graph and pack modules: a second reader of counts or a
second PCA -> kNN graph here would let the cells the model is applied to drift from the cells it
learnt from.

Where it differs from training:

- no cell is dropped (QC is for training data); a cell with no counts gets an embedding too;
- genes outside the model's vocabulary are dropped from the samples (the graph still uses them);
- a cell expressing more genes than the context keeps a random subset keyed by (seed, cell), not
  by its batch row as in the loader, so its embedding does not depend on batch size or order
  (in fp32; bf16 rounding follows the batch shape).

Counts are streamed in chunks of cells to a temporary CSR on disk (``TMPDIR``), so memory holds
one chunk plus the graph's normalised HVG matrix. The output is a byte copy of the input with
``obsm['X_scpretrain']``, ``obs['predicted_<class>']`` / ``obs['predicted_<class>_score']`` and
``uns['scpretrain']`` added; X, layers, raw and existing columns are untouched. With a labelled
``--reference`` file, embedded the same way (or already embedded by this model file: its stored
embedding is used), its labels are carried to every cell too (pretrain.label_transfer:
``obs['transferred_<column>']`` and ``..._score``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import anndata
import h5py
import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from anndata.io import write_elem
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm import tqdm

from data_prep.genes import SymbolMap
from data_prep.graph import GraphConfig, row_totals
from data_prep.graph import neighbours as find_neighbours
from data_prep.ingest import DatasetError, IngestConfig, open_counts
from data_prep.pack import GeneOrder, align_sample
from data_prep.shard_format import (
    CLASSES,
    MAX_NEIGHBOURS,
    UNKNOWN,
    CellSample,
    Organism,
    encode_parts,
)
from pretrain.batches import BatchBuilder, Item, record
from pretrain.data import DataConfig
from pretrain.device_peaks import native_bf16
from pretrain.export import ExportedModel, load_model_file
from pretrain.label_transfer import DEFAULT_K, METHODS, labelled, search_method, transfer_labels
from utils import atomic
from utils.cpus import usable_cpus

EMBEDDING_KEY = "X_scpretrain"
PRECISIONS = ("auto", "bf16", "fp32")
UNS_KEY = "scpretrain"
DEFAULT_NEIGHBOURS = 6


def inference_config(context: int, neighbours: int, batch_size: int, seed: int = 0) -> DataConfig:
    """Loader settings for inference: full context, ``neighbours`` neighbours, no corruption."""
    _check_neighbours(neighbours)
    if context < 1 or batch_size < 1:
        raise ValueError(f"context and batch size must be >= 1, not {context} and {batch_size}")
    return DataConfig(context=context, short_context_prob=0.0, short_context_min=context,
                      max_neighbours=neighbours, n_neighbours=neighbours, mask_scale=0.0,
                      full_pass_prob=0.0, views=1, batch_size=batch_size, seed=seed)


class CellInput:
    """One .h5ad's cells as the model sees them: validated counts, the file's genes matched to
    the model's vocabulary, and each cell's neighbours among the file's cells."""

    def __init__(self, path: Path, organism: Organism, counts_source: str, counts_dir: Path,
                 shape: tuple[int, int], col2gid: np.ndarray, nbr_idx: np.ndarray,
                 nbr_dist: np.ndarray, graph: GraphConfig):
        self.path, self.organism, self.counts_source = path, organism, counts_source
        self.counts_dir, self.shape = counts_dir, shape
        # float32 [n_cells, n_file_genes] (all genes) and [n_cells] (library size over them)
        self.counts, self.total = mapped_counts(counts_dir, shape)
        self.col2gid = col2gid  # int64 [n_file_genes]: global gene id, -1 = unknown to the model
        self.nbr_idx, self.nbr_dist = nbr_idx, nbr_dist  # [n_cells, k]: -1 / inf = missing
        known = col2gid >= 0
        self.compact = np.full(col2gid.shape[0], -1, dtype=np.int64)  # file column -> known col
        self.compact[known] = np.arange(int(known.sum()))
        self.genes = GeneOrder(col2gid[known])
        self.known_total = row_totals(self.counts, graph, known)  # per cell counts on known genes

    def __getstate__(self) -> dict:
        """Pickled (for a DataLoader worker started by spawn or forkserver) with the folder of
        its counts, which the worker maps again, not with their bytes."""
        state = dict(self.__dict__)
        del state["counts"], state["total"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.counts, self.total = mapped_counts(self.counts_dir, self.shape)

    @property
    def n_cells(self) -> int:
        return self.counts.shape[0]

    def summary(self) -> dict:
        """How well the file's genes match the model's vocabulary (for ``uns['scpretrain']``)."""
        n_genes, n_known = self.col2gid.shape[0], int((self.col2gid >= 0).sum())
        total = float(self.total.sum(dtype=np.float64))
        return {
            "organism": self.organism.curie,
            "organism_name": self.organism.name,
            "counts_source": self.counts_source,
            "n_cells": self.n_cells,
            "n_genes": n_genes,
            "n_genes_known": n_known,
            "share_genes_known": n_known / n_genes,
            "share_counts_known": float(self.known_total.sum()) / total if total > 0 else 0.0,
            "n_cells_no_known_gene": int((self.known_total == 0).sum()),
            "neighbours": int(self.nbr_idx.shape[1]),
        }

    def sample(self, row: int, context: int, seed: int) -> CellSample:
        """Cell ``row`` as a training sample (labels unknown): its known expressed genes padded
        with genes only its neighbours express, up to ``context``; a cell expressing more than
        ``context`` genes keeps a random subset of them, drawn from (``seed``, ``row``)."""
        nbr = self.nbr_idx[row]
        keep = (nbr >= 0) & (nbr != row)
        own_cols, own_vals = self._known_row(row)
        others = [self._known_row(int(j)) for j in nbr[keep]]
        gene_ids, counts, nbr_counts = align_sample(
            own_cols, own_vals, [c for c, _ in others], [v for _, v in others], self.genes,
            context, metacell=False)
        if counts.shape[0] > context:  # then there are no padding genes
            take = np.sort(np.random.default_rng([seed, row]).choice(counts.shape[0], context,
                                                                     replace=False))
            gene_ids, counts, nbr_counts = gene_ids[take], counts[take], nbr_counts[:, take]
        return CellSample(
            gene_ids=gene_ids, counts=counts, nbr_counts=nbr_counts,
            nbr_dist=self.nbr_dist[row][keep].astype(np.float32),
            nbr_cells=nbr[keep].astype(np.uint32),
            labels=np.full(len(CLASSES), UNKNOWN, dtype=np.int32), dataset=0, cell=row,
            organism=self.organism.taxon, group=0,
            nnz=int(self.counts.indptr[row + 1] - self.counts.indptr[row]), pseudo_label=UNKNOWN,
            total_count=float(self.total[row]), weight=1.0)

    def batches(self, cfg: DataConfig, workers: int = 0) -> Iterator[tuple[np.ndarray, dict]]:
        """(rows, model batch) over all cells in order, ``cfg.batch_size`` at a time. The
        samples (``records``, the costly part) are made in ``workers`` DataLoader processes
        (0: in this one) while the caller runs the model; the batch kernel runs here, so a
        worker sends a batch's compact records, not its ~20x larger tensors. Batch ``b``'s
        loader randomness (none under ``inference_config``) is keyed by (seed, b)."""
        loader = DataLoader(_InputRecords(self, cfg), batch_size=None, num_workers=workers,
                            collate_fn=_as_made)
        build = BatchBuilder(cfg)
        for b, (rows, items) in enumerate(loader):
            yield rows, build(items, np.random.default_rng([cfg.seed, b]))

    def records(self, cfg: DataConfig, b: int) -> tuple[np.ndarray, list[Item]]:
        """Batch ``b``'s rows [b * batch_size, (b + 1) * batch_size) and their samples, as the
        shard stream hands samples to the batch kernel."""
        rows = np.arange(b * cfg.batch_size, min(self.n_cells, (b + 1) * cfg.batch_size))
        return rows, [(int(r), record(*encode_parts(self.sample(int(r), cfg.context, cfg.seed))))
                      for r in rows]

    def _known_row(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """A cell's columns among the known genes (GeneOrder's numbering) and their counts."""
        a, b = int(self.counts.indptr[row]), int(self.counts.indptr[row + 1])
        cols = self.compact[self.counts.indices[a:b]]
        known = cols >= 0
        return cols[known], self.counts.data[a:b][known]


class _InputRecords(IterableDataset):
    """A CellInput's batches of samples for a DataLoader: worker ``w`` of ``W`` makes batches
    w, w + W, ..., which the DataLoader hands out round-robin from worker 0, i.e. in order."""

    def __init__(self, cells: CellInput, cfg: DataConfig) -> None:
        self.cells, self.cfg = cells, cfg

    def __iter__(self) -> Iterator[tuple[np.ndarray, list[Item]]]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        n_batches = -(-self.cells.n_cells // self.cfg.batch_size)
        for b in range(worker, n_batches, workers):
            yield self.cells.records(self.cfg, b)


def _as_made(batch):
    """The DataLoader's collate step: none (rows and records travel as they are)."""
    return batch


def default_workers(device: torch.device) -> int:
    """Sample-making processes beside the model: none on a CPU, whose cores run the forward;
    beside a GPU, up to 4 of the CPUs this process may use, one left to drive the GPU."""
    return 0 if device.type == "cpu" else max(0, min(4, usable_cpus() - 1))


def mapped_counts(counts_dir: Path, shape: tuple[int, int]) -> tuple[sp.csr_matrix, np.ndarray]:
    """The CSR counts and library sizes ``open_counts`` streamed to ``counts_dir``, mapped."""
    # plain ndarray views of the maps: np.memmap's slicing costs ~10 us a row
    arrays = {k: np.asarray(np.load(counts_dir / f"{k}.npy", mmap_mode="r"))
              for k in ("indptr", "indices", "data", "total")}
    counts = sp.csr_matrix(shape, dtype=np.float32)
    # the memory-mapped buffers as they are: the constructor would copy or upcast them
    counts.data, counts.indices, counts.indptr = arrays["data"], arrays["indices"], arrays["indptr"]
    return counts, arrays["total"]


@contextmanager
def open_cells(exported: ExportedModel, adata_path: str | Path, organism: str | None = None,
               neighbours: int = DEFAULT_NEIGHBOURS, seed: int = 0,
               progress: bool = False) -> Iterator[CellInput]:
    """Read, validate and match an .h5ad for ``exported`` and build its neighbour graph; the
    counts live in a temporary folder for as long as the context is open."""
    _check_neighbours(neighbours)
    path = Path(adata_path)
    cfg = IngestConfig(min_genes=0, keep_non_primary=True)  # every cell gets an output row
    with tempfile.TemporaryDirectory(prefix="scpretrain-embed-") as tmp_name:
        tmp = Path(tmp_name)
        with open_counts(path, cfg, organism=organism, organism_hint="pass --organism",
                         symbols=SymbolMap(exported.vocab.aliases())) as counts_file:
            col2gid = _match_genes(path, exported, counts_file.organism, counts_file.genes)
            with tqdm(total=counts_file.shape[0], desc="read counts", unit="cell",
                      disable=not progress) as bar:
                counts_file.stream(tmp, bar.update)
        counts, _ = mapped_counts(tmp, counts_file.shape)
        graph = GraphConfig(**exported.graph_config)
        nb = find_neighbours(counts, neighbours, graph, seed)
        yield CellInput(path, counts_file.organism, counts_file.source, tmp, counts_file.shape,
                        col2gid, nb.idx, nb.dist, graph)


def _match_genes(path: Path, exported: ExportedModel, organism: Organism,
                 genes: list[str]) -> np.ndarray:
    """Global id of each gene name in the organism's vocabulary range, -1 where unknown."""
    r = exported.genes.get(organism.curie)
    if r is None:
        have = ", ".join(f"{c} ({x.organism.name})" for c, x in exported.genes.items())
        raise DatasetError(path, f"organism {organism.curie} ({organism.name}): the model "
                                 f"{exported.path.name} has no genes of it (it knows {have})")
    col2gid = np.fromiter((r.index.get(g, -1) for g in genes), dtype=np.int64, count=len(genes))
    if not (col2gid >= 0).any():
        raise DatasetError(path, f"none of its {len(genes)} genes (e.g. {genes[:3]}) is in the "
                                 f"model's {organism.name} vocabulary (e.g. {r.genes[:3]})")
    return col2gid


def iter_batches(
    model_file: ExportedModel | str | Path,
    adata_path: str | Path,
    *,
    organism: str | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    batch_size: int = 64,
    context: int | None = None,
    seed: int = 0,
    data_config: DataConfig | None = None,
    workers: int = 0,
) -> Iterator[tuple[np.ndarray, dict]]:
    """(obs rows, model batch) for every cell of ``adata_path``, in order, for a caller that runs
    the model itself, built in ``workers`` processes (0: in this one). ``data_config`` replaces
    ``inference_config(context, neighbours, batch_size, seed)``, e.g. with ``mask_scale > 0`` to
    corrupt the inputs for a denoising score (its context, batch size and seed are then the
    ones used)."""
    exported = _exported(model_file)
    if data_config is None:
        data_config = inference_config(
            exported.train_context if context is None else context, neighbours, batch_size, seed)
    with open_cells(exported, adata_path, organism, neighbours, data_config.seed) as cells:
        yield from cells.batches(data_config, workers)


@dataclass
class Annotations:
    """What embedding adds to an AnnData, by slot."""

    obs: dict[str, pd.Categorical | np.ndarray]
    obsm: dict[str, np.ndarray]
    uns: dict[str, dict]


def embed_cells(
    model_file: ExportedModel | str | Path,
    adata_path: str | Path,
    *,
    organism: str | None = None,
    neighbours: int = DEFAULT_NEIGHBOURS,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    context: int | None = None,
    seed: int = 0,
    precision: str = "auto",
    workers: int | None = None,
    progress: bool = False,
) -> Annotations:
    """The cell embeddings, predicted labels and summary of every cell of ``adata_path``.

    ``context`` defaults to the model's training context. The model is moved to ``device``.
    ``precision``: "bf16" runs the forward under bf16 autocast (the weights stay fp32), "fp32"
    without; "auto" is bf16 where the device multiplies bf16 natively (as in training).
    ``workers``: processes that make the cells' samples while the model runs (default
    ``default_workers(device)``); they change the speed, not the results.
    """
    exported = _exported(model_file)
    context = exported.train_context if context is None else context
    cfg = inference_config(context, neighbours, batch_size, seed)
    device = _device(device)
    precision = _precision(precision, device)
    workers = default_workers(device) if workers is None else workers
    if workers < 0:
        raise ValueError(f"workers must be >= 0, not {workers}")
    model = exported.model.to(device).eval()
    with open_cells(exported, adata_path, organism, neighbours, seed, progress) as cells:
        n = cells.n_cells
        emb = np.empty((n, exported.config.d_model), dtype=np.float32)
        codes = {c: np.empty(n, dtype=np.int64) for c in model.class_index}
        scores = {c: np.empty(n, dtype=np.float32) for c in model.class_index}
        with tqdm(total=n, desc="embed", unit="cell", disable=not progress) as bar:
            for rows, batch in cells.batches(cfg, workers):
                with torch.autocast(device.type, torch.bfloat16, enabled=precision == "bf16"):
                    out = model.predict({k: v.to(device) for k, v in batch.items()})
                emb[rows] = out["cell_emb"].cpu().numpy()
                for c, probs in out["class_probs"].items():
                    score, code = probs.max(dim=1)
                    codes[c][rows] = code.cpu().numpy()
                    scores[c][rows] = score.clamp(0.0, 1.0).cpu().numpy()
                bar.update(rows.shape[0])
        summary = {"model": exported.path.name, "model_tag": exported.tag,
                   "model_sha256": exported.sha256, **cells.summary(),
                   "context": context, "seed": seed, "precision": precision}
    obs: dict[str, pd.Categorical | np.ndarray] = {}
    for c in model.class_index:
        obs[f"predicted_{c}"] = pd.Categorical.from_codes(
            codes[c], categories=exported.labels[c]).remove_unused_categories()
        obs[f"predicted_{c}_score"] = scores[c]
    return Annotations(obs=obs, obsm={EMBEDDING_KEY: emb}, uns={UNS_KEY: summary})


def embed_anndata(
    model_file: ExportedModel | str | Path,
    adata: anndata.AnnData | str | Path,
    out_path: str | Path | None = None,
    *,
    copy: bool = False,
    **options,
) -> anndata.AnnData:
    """``embed_cells`` (same keyword ``options``) applied to an .h5ad file or an AnnData.

    A file is never changed: with ``out_path`` an annotated copy is written there and returned
    opened backed (X stays on disk); without, the file is read into memory and returned
    annotated. An AnnData in memory is written to a temporary .h5ad, so that the same code reads
    and checks its counts as a file's, and gets the results in ``obs`` / ``obsm`` / ``uns`` (X,
    layers and existing columns untouched) like scanpy's tools: in place and returned (a view
    becomes an AnnData of its own, as anndata makes it when a view is written to), or on a copy
    with ``copy=True``; with ``out_path`` it is left as it is.
    """
    given_anndata = isinstance(adata, anndata.AnnData)
    with _as_file(adata) if given_anndata else nullcontext(Path(adata)) as path:
        if out_path is not None:
            _check_output(path, out_path)
        ann = embed_cells(model_file, path, **options)
        if out_path is not None:
            write_annotated_copy(path, out_path, ann)
            return anndata.read_h5ad(out_path, backed="r")
    if not given_anndata:
        adata = anndata.read_h5ad(adata)
    elif copy:
        adata = adata.to_memory() if adata.isbacked else adata.copy()
    return _annotated(adata, ann)


@contextmanager
def _as_file(adata: anndata.AnnData) -> Iterator[Path]:
    """The .h5ad holding ``adata``: its own file when it is backed (and not a view), else a
    temporary copy (the name says where the cells came from in any error about them)."""
    if adata.isbacked and not adata.is_view:
        yield Path(adata.filename)
        return
    with tempfile.TemporaryDirectory(prefix="scpretrain-embed-") as tmp:
        path = Path(tmp) / "in_memory_anndata.h5ad"
        adata.write_h5ad(path)
        yield path


def _annotated(adata: anndata.AnnData, ann: Annotations) -> anndata.AnnData:
    for key, values in ann.obs.items():
        adata.obs[key] = values
    adata.obsm.update(ann.obsm)
    adata.uns.update(ann.uns)
    return adata


def transfer_from(reference: str | Path, column: str, ann: Annotations, exported: ExportedModel,
                  k: int = DEFAULT_K, method: str = "auto", **options) -> Annotations:
    """``ann`` (a query file's annotations) with ``reference``'s ``obs[column]`` carried over:
    each query cell takes the majority label of its ``k`` nearest reference cells
    (``pretrain.label_transfer``, ``method`` "auto", "exact" or "approximate").

    The reference's embedding is the one it stores (``obsm['X_scpretrain']``) when this model file
    wrote it with the same context, neighbours and seed (and organism, when ``options`` names
    one): an atlas embedded once serves every query. Otherwise it is embedded here with the
    same model and ``options`` (``embed_cells``)."""
    try:
        ref = anndata.read_h5ad(reference, backed="r")
    except (OSError, KeyError) as e:
        raise ValueError(f"{reference}: cannot read the reference ({e})") from None
    if column not in ref.obs:
        raise ValueError(f"{reference}: no obs column {column!r} (columns: "
                         f"{', '.join(map(str, ref.obs.columns)) or 'none'})")
    labels = ref.obs[column].to_numpy()
    n_labelled = int(labelled(labels).sum())
    query = ann.uns[UNS_KEY]
    emb, source = stored_embedding(ref, query, options.get("organism") is not None), "stored"
    if emb is None:
        emb, source = embed_cells(exported, reference, **options).obsm[EMBEDDING_KEY], "computed"
    method = search_method(len(ann.obsm[EMBEDDING_KEY]), n_labelled, emb.shape[1], method)
    transferred, score = transfer_labels(emb, labels, ann.obsm[EMBEDDING_KEY], k, method,
                                         seed=int(query["seed"]))
    summary = {**query, "label_transfer": {
        "reference": Path(reference).name, "column": column, "k": k,
        "n_reference_cells": int(len(labels)),
        "n_reference_labelled": n_labelled,
        "reference_embedding": source,
        "search": method}}
    return Annotations(obs={**ann.obs, f"transferred_{column}": transferred,
                            f"transferred_{column}_score": score},
                       obsm=ann.obsm, uns={UNS_KEY: summary})


# what must be equal for a stored embedding to be the one this model and these options make;
# the device and precision change only its rounding (bf16 against fp32: cosine > 0.9999)
SAME_EMBEDDING = ("model_sha256", "context", "neighbours", "seed")


def stored_embedding(adata: anndata.AnnData, query_summary: dict,
                     named_organism: bool) -> np.ndarray | None:
    """``adata``'s ``obsm['X_scpretrain']`` if the embedding that made ``query_summary`` (the
    ``uns['scpretrain']`` of a file just embedded) would make it again: same model file, context,
    neighbours and seed, every cell embedded (and the same organism when it was named rather
    than read from each file). None otherwise."""
    stored = adata.uns.get(UNS_KEY)
    emb = adata.obsm.get(EMBEDDING_KEY)
    if not isinstance(stored, dict) or emb is None:
        return None
    keys = SAME_EMBEDDING + (("organism",) if named_organism else ())
    same = all(str(stored.get(key)) == str(query_summary[key]) for key in keys)
    if not same or int(stored.get("n_cells", -1)) != adata.n_obs:  # cells added or dropped
        return None
    return np.asarray(emb, dtype=np.float32)


def write_annotated_copy(src: str | Path, out: str | Path, ann: Annotations) -> Path:
    """Copy ``src`` to ``out`` byte for byte and add ``ann``'s entries there (atomically)."""
    src, out = Path(src), Path(out)
    _check_output(src, out)
    with atomic.atomic_path(out) as tmp:
        shutil.copyfile(src, tmp)
        with h5py.File(tmp, "r+") as f:
            for slot in ("obsm", "uns"):
                if slot not in f:
                    write_elem(f, slot, {})
                for key, value in getattr(ann, slot).items():
                    _write_entry(f[slot], key, value)
            if ann.obs:
                obs = f["obs"]
                order = [str(c) for c in obs.attrs.get("column-order", []) if c not in ann.obs]
                for key, value in ann.obs.items():
                    _write_entry(obs, key, value)
                obs.attrs["column-order"] = order + list(ann.obs)
    return out


def _write_entry(group: h5py.Group, key: str, value) -> None:
    if key in group:
        del group[key]
    write_elem(group, key, value)


def _check_output(src: str | Path, out: str | Path) -> None:
    if Path(out).resolve() == Path(src).resolve():
        raise ValueError(f"{out}: the output must be another file than the input")


def _check_neighbours(neighbours: int) -> None:
    if not 0 <= neighbours <= MAX_NEIGHBOURS:
        raise ValueError(f"neighbours must be in 0..{MAX_NEIGHBOURS}, not {neighbours}")


def _precision(precision: str, device: torch.device) -> str:
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if native_bf16(device) else "fp32"
    return precision


def _exported(model_file: ExportedModel | str | Path) -> ExportedModel:
    return model_file if isinstance(model_file, ExportedModel) else load_model_file(model_file)


def _device(name: str | torch.device) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as e:
        raise ValueError(f"device {name!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r}: CUDA is not available on this machine")
    return device


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pretrain.embed",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("model", help="model file written by python -m pretrain.export")
    parser.add_argument("input", help=".h5ad file with raw counts (X, layers['counts'] or raw.X)")
    parser.add_argument("--out", required=True, help="output .h5ad (a copy with the results)")
    parser.add_argument("--organism", default=None,
                        help="organism name or NCBITaxon:N (default: from the file's obs/uns)")
    parser.add_argument("--batch-size", type=int, default=64, help="cells per forward pass")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default: cpu)")
    parser.add_argument("--neighbours", type=int, default=DEFAULT_NEIGHBOURS,
                        help=f"neighbours per cell, 0..{MAX_NEIGHBOURS} (default: "
                             f"{DEFAULT_NEIGHBOURS})")
    parser.add_argument("--context", type=int, default=None,
                        help="genes per cell (default: the model's training context)")
    parser.add_argument("--seed", type=int, default=0, help="PCA/kNN and gene-choice seed")
    parser.add_argument("--workers", type=int, default=None,
                        help="processes making the cells' samples while the model runs "
                             "(default: 0 on a CPU, up to 4 beside a GPU)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto",
                        help="bf16 (autocast) or fp32 forward; auto: bf16 where the device "
                             "multiplies bf16 natively (GPUs from Ampere, AVX-512/AMX CPUs)")
    parser.add_argument("--reference", default=None,
                        help="a labelled .h5ad whose labels are carried to the input's cells "
                             "through the embedding (kNN vote); needs --reference-label")
    parser.add_argument("--reference-label", default=None,
                        help="the reference's obs column to carry over")
    parser.add_argument("--transfer-k", type=int, default=DEFAULT_K,
                        help=f"reference neighbours that vote (default: {DEFAULT_K})")
    parser.add_argument("--transfer-search", choices=METHODS, default="auto",
                        help="how the nearest reference cells are found: exact, approximate "
                             "(an NN-descent index, for atlas-sized references) or auto "
                             "(exact while query x reference cells is small; default)")
    args = parser.parse_args(argv)
    if bool(args.reference) != bool(args.reference_label):
        parser.error("--reference and --reference-label go together")
    try:
        _check_output(args.input, args.out)
        exported = load_model_file(args.model)
        options = dict(organism=args.organism, neighbours=args.neighbours,
                       batch_size=args.batch_size, device=args.device, context=args.context,
                       seed=args.seed, precision=args.precision, workers=args.workers,
                       progress=True)
        ann = embed_cells(exported, args.input, **options)
        if args.reference:
            ann = transfer_from(args.reference, args.reference_label, ann, exported,
                                args.transfer_k, args.transfer_search, **options)
        write_annotated_copy(args.input, args.out, ann)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    s = ann.uns[UNS_KEY]
    print(f"{args.input}: {s['n_genes_known']} of {s['n_genes']} genes "
          f"({s['share_genes_known']:.1%}) are in the model's {s['organism_name']} vocabulary, "
          f"holding {s['share_counts_known']:.1%} of the counts; "
          f"{s['n_cells_no_known_gene']} of {s['n_cells']} cells have no known expressed gene")
    if args.reference:
        t = s["label_transfer"]
        print(f"{args.reference}: {t['n_reference_labelled']} labelled of {t['n_reference_cells']} "
              f"cells, {t['reference_embedding']} embedding, {t['search']} search: "
              f"obs['transferred_{args.reference_label}']")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
