"""The build configuration: one typed dataclass composed of each stage's settings.

Every constant of the pipeline is a field here and a ``build_shards`` flag (generated from the
fields, so the two cannot drift apart). ``BuildConfig.to_dict()`` is what the manifest records;
settings that only change how the work is scheduled (``--jobs``, worker split) are not in it, so a
split build and a single run produce the same manifest.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field, fields

from data_prep.genes import parse_gene_table_flags
from data_prep.graph import GraphConfig
from data_prep.ingest import IngestConfig
from data_prep.organisms import resolve_organism
from data_prep.pack import PackConfig
from data_prep.vocab import VocabConfig
from data_prep.weights import (
    CURRICULUM_OFFSET,
    CURRICULUM_SPAN,
    DEPTH_MIDPOINT,
    DEPTH_SCALE,
    DEPTH_SLOPE,
    GROUP_SCALE,
    POOL_CELL_TYPES,
    curriculum_gamma,
)


@dataclass
class WeightConfig:
    """Sampling weights (see data_prep.weights)."""

    group_scale: float = GROUP_SCALE  # S in W_c = S n_c / (n_c + S)
    # annotated cell types make one group across datasets (unannotated cells keep their
    # dataset's clusters); see docs/training.md for the measurement behind the default
    pool_cell_types: bool = POOL_CELL_TYPES
    gamma: float | None = None  # fixed gamma (overrides the curriculum)
    curriculum_offset: float = CURRICULUM_OFFSET
    curriculum_span: float = CURRICULUM_SPAN
    depth_scale: float = DEPTH_SCALE  # w_i = 1 + scale * sigmoid(slope * (nnz_i - midpoint))
    depth_slope: float = DEPTH_SLOPE
    depth_midpoint: float = DEPTH_MIDPOINT

    def gamma_of(self, epoch: int) -> float:
        """The group-weight exponent of epoch ``epoch``: the curriculum, unless fixed."""
        if self.gamma is not None:
            return float(self.gamma)
        return curriculum_gamma(epoch, self.curriculum_offset, self.curriculum_span)


@dataclass
class BuildConfig:
    seed: int = 0
    strict: bool = False  # stop at the first bad dataset instead of counting it as rejected
    vocab: str | None = None  # previous output's vocab/ folder to extend (ids stay stable)
    gene_tables: dict[str, str] = field(default_factory=dict)  # organism curie -> gene table
    ingest: IngestConfig = field(default_factory=IngestConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    weights: WeightConfig = field(default_factory=WeightConfig)
    pack: PackConfig = field(default_factory=PackConfig)
    vocab_sizing: VocabConfig = field(default_factory=VocabConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BuildConfig:
        d = dict(d)
        return cls(
            ingest=IngestConfig(**d.pop("ingest")),
            graph=GraphConfig(**d.pop("graph")),
            weights=WeightConfig(**d.pop("weights")),
            pack=PackConfig(**d.pop("pack")),
            vocab_sizing=VocabConfig(**d.pop("vocab_sizing")),
            **d,
        )


# flag -> (section, field, help). Section None = a top-level BuildConfig field.
FLAGS: dict[str, tuple[str | None, str, str]] = {
    "--seed": (None, "seed", "seed of every random choice (PCA, kNN, Leiden, hold-out, stream)"),
    "--min-genes": ("ingest", "min_genes", "QC: drop cells with fewer expressed genes"),
    "--chunk-cells": ("ingest", "chunk_cells", "cells read per chunk while ingesting"),
    "--counts-source": ("ingest", "counts_source",
                        "raw counts matrix: auto, X, raw (raw.X) or a layer name"),
    "--min-dataset-genes": ("ingest", "min_dataset_genes",
                            "reject datasets measuring fewer genes (targeted panels); the "
                            "sheet's min_dataset_genes column overrides it per dataset"),
    "--keep-non-primary": ("ingest", "keep_non_primary",
                           "keep cells with is_primary_data == False (CELLxGENE duplicates)"),
    "--drop-unmapped-genes": ("ingest", "drop_unmapped_genes",
                              "leave out gene symbols no Ensembl id is known for (default: keep "
                              "them under their own name)"),
    "--organism": ("ingest", "organism",
                   "organism (name or NCBITaxon:N) of files with none in the sheet, obs or uns"),
    "--target-sum": ("graph", "target_sum", "normalise each cell to this total before log1p"),
    "--n-hvg": ("graph", "n_hvg", "highly variable genes for the PCA"),
    "--hvg-bins": ("graph", "hvg_bins", "mean bins for the HVG dispersion z-score"),
    "--n-pcs": ("graph", "n_pcs", "PCA components"),
    "--pca-oversample": ("graph", "pca_oversample", "randomized SVD oversampling"),
    "--pca-power-iters": ("graph", "pca_power_iters", "randomized SVD power iterations"),
    "--k": ("graph", "k", "nearest neighbours of the kNN graph (for Leiden)"),
    "--neighbours": ("graph", "n_neighbours_kept",
                     "nearest neighbours stored with each sample (<= 6)"),
    "--dense-pca-max-entries": ("graph", "dense_pca_max_entries",
                                "exact dense SVD when cells x HVGs is at most this"),
    "--exact-knn-below": ("graph", "exact_knn_below",
                          "exact kNN below this many cells, pynndescent above"),
    "--nnd-neighbours": ("graph", "nnd_neighbours",
                         "NN-descent graph degree (the k nearest are kept; 30: recall@6 ~0.99)"),
    "--nnd-jobs": ("graph", "nnd_jobs", "pynndescent threads (1 = reproducible)"),
    "--nnd-n-iters": ("graph", "nnd_n_iters", "pynndescent iterations (default: its own)"),
    "--leiden-resolution": ("graph", "leiden_resolution", "Leiden resolution"),
    "--leiden-iterations": ("graph", "leiden_iterations", "Leiden iterations (-1: until stable)"),
    "--leiden-backend": ("graph", "leiden_backend",
                         "leidenalg, or igraph (its C Leiden on the same objective)"),
    "--min-subcluster": ("graph", "min_subcluster",
                         "pseudo-label sub-clusters smaller than this fold into their cell type"),
    "--graph-chunk-rows": ("graph", "chunk_rows", "rows per streaming chunk of the graph stage"),
    "--group-scale": ("weights", "group_scale", "S of the group weight S*n/(n+S)"),
    "--pool-cell-types": ("weights", "pool_cell_types",
                          "one sampling group per annotated cell type across datasets"),
    "--gamma": ("weights", "gamma", "fixed group-weight exponent (default: curriculum)"),
    "--curriculum-offset": ("weights", "curriculum_offset", "gamma = min(1, (epoch+offset)/span)"),
    "--curriculum-span": ("weights", "curriculum_span", "see --curriculum-offset"),
    "--depth-scale": ("weights", "depth_scale", "w = 1 + scale*sigmoid(slope*(nnz - midpoint))"),
    "--depth-slope": ("weights", "depth_slope", "see --depth-scale"),
    "--depth-midpoint": ("weights", "depth_midpoint", "see --depth-scale"),
    "--stream-size": ("pack", "stream_size",
                      "train samples drawn per epoch (default: train cells)"),
    "--epochs": ("pack", "epochs", "epochs to pack, each a fresh draw with its curriculum gamma; "
                 "rerun with more to add epochs"),
    "--eval-fraction": ("pack", "eval_fraction",
                        "share of each dataset's cells held out into eval shards"),
    "--eval-datasets": ("pack", "eval_datasets",
                        "datasets held out whole into eval shards (names as in the manifest; "
                        "give it after the inputs)"),
    "--metacell-fraction": ("pack", "metacell_fraction",
                            "share of drawn samples packed as meta-cells (sum with neighbours)"),
    "--shard-samples": ("pack", "shard_samples", "at most this many samples per shard"),
    "--shard-mb": ("pack", "shard_mb", "at most this many MiB per shard"),
    "--context-genes": ("pack", "context_genes",
                        "pad each sample's genes with neighbour genes up to this many"),
    "--vocab": (None, "vocab", "extend the vocabularies of a previous output (PREV_OUT/vocab)"),
    "--vocab-headroom": ("vocab_sizing", "headroom",
                         "spare gene ids per organism, as a fraction of its genes"),
    "--vocab-min-headroom": ("vocab_sizing", "min_headroom", "at least this many spare ids"),
    "--vocab-block": ("vocab_sizing", "block", "organism ranges are multiples of this size"),
}


# Fields set by other means: --strict/--keep-going, --gene-table (repeated), and
# pack.neighbours = --neighbours.
NOT_FLAGS = {(None, "strict"), (None, "gene_tables"), ("pack", "neighbours")}


def _check_flags() -> None:
    """Every configuration field has a flag (or is in NOT_FLAGS): fail at import otherwise."""
    have = {(section, name) for section, name, _ in FLAGS.values()} | NOT_FLAGS
    cfg = BuildConfig()
    want = set()
    for f in fields(BuildConfig):
        value = getattr(cfg, f.name)
        if hasattr(value, "__dataclass_fields__"):
            want |= {(f.name, g.name) for g in fields(value)}
        else:
            want.add((None, f.name))
    missing = sorted(want - have, key=str)
    if missing:
        raise TypeError(f"configuration fields without a build_shards flag: {missing}")


_check_flags()


def _field_type(section: str | None, name: str):
    owner = BuildConfig if section is None else type(getattr(BuildConfig(), section))
    default = getattr(owner(), name)
    kind = {f.name: f.type for f in fields(owner)}[name]
    kind = kind if isinstance(kind, str) else kind.__name__
    if kind.startswith("list"):
        return list, default
    for t in (bool, int, float, str):
        if t.__name__ in kind:
            return t, default
    raise TypeError(f"no flag type for {owner.__name__}.{name}")


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    groups: dict[str | None, argparse._ArgumentGroup] = {}
    for flag, (section, name, help_) in FLAGS.items():
        if section not in groups:
            groups[section] = parser.add_argument_group(f"{section or 'build'} settings")
        t, default = _field_type(section, name)
        if t is bool:
            kind = {"action": argparse.BooleanOptionalAction}
        elif t is list:
            kind = {"nargs": "*", "metavar": "NAME"}
        else:
            kind = {"type": t, "metavar": flag.lstrip("-").replace("-", "_").upper()}
        groups[section].add_argument(flag, dest=f"cfg_{section}_{name}", default=default,
                                     help=f"{help_} (default: {default})", **kind)
    groups[None].add_argument(
        "--gene-table", dest="gene_tables", action="append", default=[],
        metavar="ORGANISM=FILE.tsv",
        help="map gene symbols of ORGANISM to Ensembl ids with this table (tab-separated, header "
             "with a gene id and a symbol column, optional synonyms: an Ensembl BioMart export); "
             "repeat per organism")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    cfg = BuildConfig()
    for section, name, _ in FLAGS.values():
        value = getattr(args, f"cfg_{section}_{name}")
        target = cfg if section is None else getattr(cfg, section)
        if section == "vocab_sizing":
            target = cfg.vocab_sizing = VocabConfig(**{**asdict(target), name: value})
        else:
            setattr(target, name, value)
    cfg.strict = bool(getattr(args, "strict", False))
    cfg.pack.neighbours = cfg.graph.n_neighbours_kept
    cfg.gene_tables = parse_gene_table_flags(args.gene_tables)
    if cfg.ingest.organism is not None:  # one spelling in the manifest: the curie
        cfg.ingest.organism = resolve_organism(cfg.ingest.organism).curie
    return cfg
