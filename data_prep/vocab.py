"""The global gene vocabulary: one contiguous id range per organism, stable under extension.

Id 0 is padding. Organisms get ranges ``[start, start + size)`` in the order they first appear;
``size`` is the organism's gene count plus headroom, rounded up to a block, so later datasets can
add genes to an organism without moving anyone. New genes are numbered in the order datasets are
added, sorted within a dataset, so the same inputs always give the same ids. Extending a saved
vocabulary never renumbers: when an organism's headroom runs out, the last range simply grows
(nothing follows it); any other range raises ``VocabFullError`` asking for a rebuild with more
headroom.

Genes are the organism's canonical ids (``data_prep.genes``: Ensembl ids, or a symbol no id is
known for). Each organism also keeps its aliases, the symbols that name its genes, so that a file
named by symbols (a new dataset to embed, a later build) finds the same ids.

On disk (``vocab/``): ``genes.tsv`` (``id``, ``organism``, ``gene``), ``aliases.tsv``
(``organism``, ``alias``, ``gene``) and ``ranges.json``; written here, read by
``shard_format.read_gene_vocab``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_prep.genes import SymbolMap
from data_prep.organisms import resolve_organism
from data_prep.shard_format import (
    ALIASES_FILE,
    ALIASES_HEADER,
    GENES_FILE,
    GENES_HEADER,
    RANGES_FILE,
    GeneRanges,
    Organism,
    OrganismRange,
    read_gene_vocab,
)
from utils import atomic


class VocabFullError(ValueError):
    """An organism's id range has no headroom left for new genes."""


@dataclass(frozen=True)
class VocabConfig:
    headroom: float = 0.25  # spare gene ids per organism, as a fraction of its genes ...
    min_headroom: int = 1024  # ... but at least this many
    block: int = 1024  # organism ranges are multiples of this size


class GeneVocab(GeneRanges):
    """Organism-namespaced gene ids, built and saved here. The queries a reader needs (``ranges``,
    ``n_ids``, ``gene_of``, ``aliases``) and the reading of a saved one (``read_gene_vocab``) are
    ``shard_format``'s, the one module of data_prep that training and export import."""

    def __init__(self, cfg: VocabConfig | None = None,
                 ranges: dict[str, OrganismRange] | None = None):
        super().__init__(ranges)
        self.cfg = cfg or VocabConfig()

    # -- building
    def add_datasets(self, datasets: Iterable[tuple[Organism | str | int, Sequence[str]]]) -> None:
        """Add the genes of several datasets, in order (a build's whole batch at once).

        Sizing new organisms from the whole batch keeps one organism's many datasets in one
        range even when its first dataset has few genes.
        """
        new_genes: dict[str, list[str]] = {}
        organisms: dict[str, Organism] = {}
        for organism, genes in datasets:
            organism = resolve_organism(organism)
            organisms[organism.curie] = organism
            known = self.ranges[organism.curie].index if organism.curie in self.ranges else {}
            pending = new_genes.setdefault(organism.curie, [])
            seen = set(pending)
            for g in sorted(set(map(str, genes))):
                if g not in known and g not in seen:
                    _check_gene(g, organism)
                    pending.append(g)
        for curie, genes in new_genes.items():
            r = self.ranges.get(curie)
            if r is None:
                r = OrganismRange(organisms[curie], self.n_ids, self._size_for(len(genes)))
                self.ranges[curie] = r
            if len(r.genes) + len(genes) > r.size:
                self._grow(r, len(r.genes) + len(genes))
            for g in genes:
                r.index[g] = r.start + len(r.genes)
                r.genes.append(g)

    def add(self, organism: Organism | str | int, genes: Sequence[str]) -> np.ndarray:
        """Add one dataset's genes; returns their ids (uint32, in the given order)."""
        self.add_datasets([(organism, genes)])
        return self.lookup(organism, genes)

    def add_aliases(self, symbols: SymbolMap) -> None:
        """Keep the symbols that name genes of the vocabulary (earlier aliases stay)."""
        for curie, r in self.ranges.items():
            for sym, gene in sorted(symbols.maps.get(curie, {}).items()):
                if gene in r.index and sym not in r.aliases:
                    r.aliases[sym] = gene

    def _size_for(self, n: int) -> int:
        c = self.cfg
        extra = max(c.min_headroom, math.ceil(c.headroom * n))
        return max(c.block, math.ceil((n + extra) / c.block) * c.block)

    def _grow(self, r: OrganismRange, needed: int) -> None:
        if r is not list(self.ranges.values())[-1]:
            raise VocabFullError(
                f"gene vocabulary: {r.organism.curie} ({r.organism.name or 'unnamed'}) needs "
                f"{needed} ids but its range [{r.start}, {r.end}) holds {r.size} and another "
                "organism's range follows it; rebuild the vocabulary from scratch (without the "
                "previous vocab) or with more headroom (larger --vocab-headroom)"
            )
        r.size = self._size_for(needed)

    # -- queries
    def lookup(self, organism: Organism | str | int, genes: Sequence[str]) -> np.ndarray:
        """Global ids (uint32) of an organism's genes; KeyError naming any missing gene."""
        organism = resolve_organism(organism)
        r = self.ranges.get(organism.curie)
        if r is None:
            raise KeyError(f"gene vocabulary has no organism {organism.curie}")
        try:
            return np.fromiter((r.index[str(g)] for g in genes), dtype=np.uint32, count=len(genes))
        except KeyError as e:
            missing = e.args[0]
            raise KeyError(f"gene {missing!r} of {organism.curie} not in the vocabulary") from None

    def to_manifest(self, folder: str = "vocab") -> dict:
        """The manifest's ``vocab`` entry (``folder`` relative to the output folder)."""
        return {
            "genes": f"{folder}/{GENES_FILE}",
            "aliases": f"{folder}/{ALIASES_FILE}",
            "n_ids": self.n_ids,
            "organisms": {
                curie: {"taxon": r.organism.taxon, "name": r.organism.name, "start": r.start,
                        "size": r.size, "n_genes": len(r.genes)}
                for curie, r in self.ranges.items()
            },
        }

    # -- files
    def save(self, directory: str | Path) -> None:
        """Write ``genes.tsv``, ``aliases.tsv`` and ``ranges.json``, each atomically."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        lines = [GENES_HEADER]
        for curie, r in self.ranges.items():
            lines.extend(f"{r.start + i}\t{curie}\t{g}" for i, g in enumerate(r.genes))
        atomic.write_text(d / GENES_FILE, "\n".join(lines) + "\n")
        aliases = [ALIASES_HEADER]
        for curie, r in self.ranges.items():
            aliases.extend(f"{curie}\t{a}\t{g}" for a, g in sorted(r.aliases.items()))
        atomic.write_text(d / ALIASES_FILE, "\n".join(aliases) + "\n")
        ranges = {"n_ids": self.n_ids, "config": self.cfg.__dict__,
                  "organisms": self.to_manifest()["organisms"]}
        atomic.write_text(d / RANGES_FILE, json.dumps(ranges, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path, cfg: VocabConfig | None = None) -> GeneVocab:
        """Read a saved vocabulary; ``cfg`` (default: the saved one) sizes organisms added later."""
        ranges, sizing = read_gene_vocab(directory)
        return cls(cfg or VocabConfig(**sizing), ranges)


def _check_gene(gene: str, organism: Organism) -> None:
    if not gene or any(c in gene for c in "\t\n\r"):
        raise ValueError(f"gene id {gene!r} of {organism.curie} is empty or has tabs/newlines")

