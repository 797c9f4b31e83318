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
(``organism``, ``alias``, ``gene``) and ``ranges.json``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import atomic
from .genes import SymbolMap
from .organisms import Organism, resolve_organism

GENES_FILE = "genes.tsv"
ALIASES_FILE = "aliases.tsv"
ALIASES_HEADER = "organism\talias\tgene"
RANGES_FILE = "ranges.json"
PAD_ID = 0


class VocabFullError(ValueError):
    """An organism's id range has no headroom left for new genes."""


@dataclass
class OrganismRange:
    organism: Organism
    start: int
    size: int
    genes: list[str] = field(default_factory=list)  # id = start + position
    index: dict[str, int] = field(default_factory=dict, repr=False)  # gene -> id
    aliases: dict[str, str] = field(default_factory=dict, repr=False)  # symbol -> gene

    @property
    def end(self) -> int:
        return self.start + self.size


@dataclass(frozen=True)
class VocabConfig:
    headroom: float = 0.25  # spare gene ids per organism, as a fraction of its genes ...
    min_headroom: int = 1024  # ... but at least this many
    block: int = 1024  # organism ranges are multiples of this size


class GeneVocab:
    """Organism-namespaced gene ids. ``n_ids`` is the embedding table size (end of last range)."""

    def __init__(self, cfg: VocabConfig | None = None):
        self.cfg = cfg or VocabConfig()
        self.ranges: dict[str, OrganismRange] = {}  # curie -> range, in id order

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

    def symbol_map(self) -> SymbolMap:
        """The aliases as a ``SymbolMap``, to name a new file's genes as the vocabulary does."""
        return SymbolMap({curie: r.aliases for curie, r in self.ranges.items()})

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
    @property
    def n_ids(self) -> int:
        """Ids in use including padding: the embedding table size."""
        return max((r.end for r in self.ranges.values()), default=PAD_ID + 1)

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

    def gene_of(self, gene_id: int) -> tuple[str, str]:
        """(organism curie, gene) of a global id."""
        for curie, r in self.ranges.items():
            if r.start <= gene_id < r.start + len(r.genes):
                return curie, r.genes[gene_id - r.start]
        raise KeyError(f"gene id {gene_id} is not assigned")

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
        lines = ["id\torganism\tgene"]
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
        d = Path(directory)
        try:
            ranges = json.loads((d / RANGES_FILE).read_text())
            rows = (d / GENES_FILE).read_text().splitlines()
        except FileNotFoundError as e:
            raise FileNotFoundError(f"{d}: not a gene vocabulary ({e.filename} missing)") from None
        vocab = cls(cfg or VocabConfig(**ranges.get("config", {})))
        for curie, o in sorted(ranges["organisms"].items(), key=lambda kv: kv[1]["start"]):
            organism = Organism(int(o["taxon"]), curie, o["name"])
            vocab.ranges[curie] = OrganismRange(organism, int(o["start"]), int(o["size"]))
        if not rows or rows[0] != "id\torganism\tgene":
            raise ValueError(f"{d / GENES_FILE}: missing header 'id<TAB>organism<TAB>gene'")
        for n, line in enumerate(rows[1:], start=2):
            try:
                gid, curie, gene = line.split("\t")
                r = vocab.ranges[curie]
            except (ValueError, KeyError):
                raise ValueError(f"{d / GENES_FILE}, line {n}: malformed row {line!r}") from None
            if int(gid) != r.start + len(r.genes):
                raise ValueError(f"{d / GENES_FILE}, line {n}: id {gid} out of sequence")
            r.index[gene] = int(gid)
            r.genes.append(gene)
        for curie, r in vocab.ranges.items():
            if len(r.genes) != ranges["organisms"][curie]["n_genes"] or len(r.genes) > r.size:
                raise ValueError(f"{d}: genes.tsv and ranges.json disagree for {curie}")
        vocab._load_aliases(d / ALIASES_FILE)
        return vocab

    def _load_aliases(self, path: Path) -> None:
        """Read ``aliases.tsv`` (absent in vocabularies written before aliases existed)."""
        if not path.is_file():
            return
        rows = path.read_text(encoding="utf-8").splitlines()
        if not rows or rows[0] != ALIASES_HEADER:
            raise ValueError(f"{path}: missing header 'organism<TAB>alias<TAB>gene'")
        for n, line in enumerate(rows[1:], start=2):
            try:
                curie, alias, gene = line.split("\t")
                r = self.ranges[curie]
            except (ValueError, KeyError):
                raise ValueError(f"{path}, line {n}: malformed row {line!r}") from None
            if gene not in r.index:
                raise ValueError(f"{path}, line {n}: {gene!r} is not a gene of {curie}")
            r.aliases[alias] = gene


def _check_gene(gene: str, organism: Organism) -> None:
    if not gene or any(c in gene for c in "\t\n\r"):
        raise ValueError(f"gene id {gene!r} of {organism.curie} is empty or has tabs/newlines")

