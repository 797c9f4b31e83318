"""The build configuration: one typed dataclass composed of each stage's settings.

Every constant of the pipeline is a field here and a ``build_shards`` flag, generated from the
fields and their comments (``utils.flags``), so the two cannot drift apart.
``BuildConfig.to_dict()`` is what the manifest records; settings that only change how the
work is scheduled (``--jobs``, the split over machines) are not in it, so a split build and a
single run produce the same manifest.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, field

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
from utils import flags


@dataclass
class WeightConfig:
    """Sampling weights (see data_prep.weights)."""

    group_scale: float = GROUP_SCALE  # S of the group weight S*n/(n+S)
    # one sampling group per annotated cell type across datasets (unannotated cells keep their
    # dataset's clusters); docs/training.md has the measurement behind the default
    pool_cell_types: bool = POOL_CELL_TYPES
    gamma: float | None = None  # fixed group-weight exponent (default: the curriculum)
    curriculum_offset: float = CURRICULUM_OFFSET  # gamma = min(1, (epoch+offset)/span)
    curriculum_span: float = CURRICULUM_SPAN  # see --curriculum-offset
    depth_scale: float = DEPTH_SCALE  # w = 1 + scale*sigmoid(slope*(nnz - midpoint))
    depth_slope: float = DEPTH_SLOPE  # see --depth-scale
    depth_midpoint: float = DEPTH_MIDPOINT  # see --depth-scale

    def gamma_of(self, epoch: int) -> float:
        """The group-weight exponent of epoch ``epoch``: the curriculum, unless fixed."""
        if self.gamma is not None:
            return float(self.gamma)
        return curriculum_gamma(epoch, self.curriculum_offset, self.curriculum_span)


@dataclass
class BuildConfig:
    seed: int = 0  # seed of every random choice (PCA, kNN, Leiden, hold-out, stream)
    strict: bool = False  # stop at the first bad dataset (instead of counting it as rejected)
    vocab: str | None = None  # extend the vocabularies of a previous output (PREV_OUT/vocab)
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


# How the build's settings are spelled on the command line (utils.flags): every setting
# is ``--section.field-name``; the sections below also take the short ``--field-name`` (the
# vocabulary sizing ``--vocab-<field>``), and three fields keep their own short names.
SECTIONS = [
    flags.Section("ingest", "", "ingest settings (per dataset: QC, genes, cells)"),
    flags.Section("graph", "", "graph settings (per dataset: PCA, kNN, Leiden, pseudo-labels)"),
    flags.Section("weights", "", "sampling weight settings"),
    flags.Section("pack", "", "stream and shard settings"),
    flags.Section("vocab_sizing", "vocab-", "gene vocabulary sizing"),
]
SHORT_NAMES = {"graph.chunk_rows": "graph-chunk-rows", "graph.chunk_nnz": "graph-chunk-nnz",
               "graph.n_neighbours_kept": "neighbours"}
# Set by other means: --gene-table (repeated, ORGANISM=FILE), and the neighbours stored with
# each sample, which are the graph's (--neighbours).
SKIP = {"gene_tables", "pack.neighbours"}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    flags.add_flags(parser, BuildConfig, SECTIONS, SHORT_NAMES, SKIP, top_title="build settings")
    parser.add_argument("--keep-going", dest="strict", action="store_false",
                        default=argparse.SUPPRESS,
                        help="count bad datasets as rejected and go on (the default)")
    parser.add_argument(
        "--gene-table", dest="gene_tables", action="append", default=[],
        metavar="ORGANISM=FILE.tsv",
        help="map gene symbols of ORGANISM to Ensembl ids with this table (tab-separated, header "
             "with a gene id and a symbol column, optional synonyms: an Ensembl BioMart export); "
             "repeat per organism")


def config_from_args(args: argparse.Namespace) -> BuildConfig:
    values = {k: v for k, v in flags.given(args).items() if k in flags.paths(BuildConfig)}
    values["gene_tables"] = parse_gene_table_flags(args.gene_tables)
    cfg = flags.build(BuildConfig, values)
    cfg.pack.neighbours = cfg.graph.n_neighbours_kept
    if cfg.ingest.organism is not None:  # one spelling in the manifest: the curie
        cfg.ingest.organism = resolve_organism(cfg.ingest.organism).curie
    return cfg
