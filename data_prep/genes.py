"""One canonical id per gene and organism, whatever a file calls its genes.

Files name genes by Ensembl id in some collections and by symbol in others, and carry features
that are not genes. Each var row of a file is described by a ``FileGenes`` and turned into a
canonical gene name by ``plan_genes``:

1. Left out (and counted): ERCC spike-ins (name ``ERCC-NNNNN`` or CELLxGENE ``feature_biotype``
   ``spike-in``), features whose ``feature_types`` (10x) is not "Gene Expression" or whose
   CELLxGENE ``feature_biotype`` is not "gene" (antibody capture, CRISPR guides...), and genes
   whose CELLxGENE ``feature_reference`` is another organism (e.g. viral genes in a human file).
2. The organism's gene id when the file gives one: var_names, or else the first var column
   holding mostly such ids (``organisms.gene_id_pattern``: Ensembl ids, FlyBase for the fly, AGI
   for Arabidopsis...), version suffixes stripped (``ENSG00000141510.16`` -> ``ENSG00000141510``).
3. Else its symbol (the names themselves, or a symbol column such as ``feature_name`` or
   ``gene_symbol`` next to ids) mapped to an id by the build's ``SymbolMap``.
4. Else the symbol itself, kept as the organism's gene name (``drop_unmapped`` leaves it out).

Rows that end on the same name (two symbols of one gene, ``.1``/``.2`` versions of one id) are
merged: their counts are summed. ``SymbolMap.build`` collects symbol -> id pairs from, in order
of precedence, the vocabulary being extended (ids stay stable), the user's gene tables
(``--gene-table ORGANISM=FILE``: an Ensembl/BioMart export), the build's own files that carry
both ids and symbols, and the tables' synonyms (only where a synonym names a single gene).
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from data_prep.organisms import gene_id_pattern, resolve_organism
from data_prep.shard_format import Organism
from utils import atomic

SPIKE_IN = re.compile(r"^ERCC-\d{5}$")
# var columns that may hold a symbol for each id (CELLxGENE, Cell Ranger, scanpy, Seurat habits)
SYMBOL_COLUMNS = ("feature_name", "gene_symbol", "gene_symbols", "symbol", "symbols",
                  "gene_name", "gene_names", "gene_short_name")
FEATURE_TYPES, GENE_EXPRESSION = "feature_types", "gene expression"
FEATURE_BIOTYPE, GENE_BIOTYPE, SPIKE_IN_BIOTYPE = "feature_biotype", "gene", "spike-in"
FEATURE_REFERENCE = "feature_reference"  # CELLxGENE: the organism (curie) a feature belongs to
ID_SHARE = 0.5  # a column names genes by id when at least this share of its values are ids
SPIKE_IN_REASON, FEATURE_REASON, UNMAPPED_REASON = "spike_in", "not_gene_expression", "unmapped"
OTHER_ORGANISM_REASON = "other_organism"
MISSING = frozenset({"", "nan", "none", "na", "<na>"})


def canonical_id(value: str, pattern: re.Pattern) -> str | None:
    """The organism's gene id in ``value`` without version suffix, or None if it is not one."""
    m = pattern.fullmatch(value.strip())
    return m.group(1) if m else None


@dataclass
class FileGenes:
    """A file's var rows as genes: per row its id (or None), symbol (or None) and, for rows that
    are not genes, the reason they are left out."""

    organism: Organism
    names: list[str]  # the file's own gene names (var_names or the sheet's gene_column)
    ids: list[str | None]
    symbols: list[str | None]
    excluded: list[str | None]
    id_source: str | None  # where the ids come from ("var_names", "var['gene_ids']"), if any
    symbol_source: str | None

    def pairs(self) -> Iterable[tuple[str, str]]:
        """(symbol, id) for rows that carry both (the mapping a file teaches the build)."""
        for gid, sym, out in zip(self.ids, self.symbols, self.excluded):
            if gid is not None and sym is not None and out is None and sym != gid:
                yield sym, gid

    def symbols_to_map(self) -> set[str]:
        """Symbols of the gene rows without an id: the part of a symbol map the file uses."""
        return {s for s, g, out in zip(self.symbols, self.ids, self.excluded)
                if s is not None and g is None and out is None}

    def to_json(self) -> dict:
        return {"organism": self.organism.curie, "names": self.names, "ids": self.ids,
                "symbols": self.symbols, "excluded": self.excluded, "id_source": self.id_source,
                "symbol_source": self.symbol_source}

    @classmethod
    def from_json(cls, d: dict) -> FileGenes:
        return cls(resolve_organism(d["organism"]), d["names"], d["ids"], d["symbols"],
                   d["excluded"], d["id_source"], d["symbol_source"])


def describe_var(organism: Organism, names: Sequence[str], columns: dict[str, Sequence],
                 names_source: str = "var_names") -> FileGenes:
    """``FileGenes`` of a var table: ``names`` one per row (from ``names_source``), ``columns``
    its other text columns (column name -> values, missing values as None or NaN)."""
    pattern = gene_id_pattern(organism)
    text = {k: [_text(v) for v in vs] for k, vs in columns.items()}
    ids = [canonical_id(n, pattern) for n in names]  # a name that is an id is one, in any file
    id_source = names_source if any(g is not None for g in ids) else None
    symbol_source, symbols = None, [None] * len(names)
    if _share(ids) >= ID_SHARE:  # named by id: symbols may sit in a column beside them
        for col in SYMBOL_COLUMNS:
            values = text.get(col)
            if values is not None and _share([v if v is None else canonical_id(v, pattern)
                                              for v in values]) < ID_SHARE:
                symbol_source, symbols = f"var[{col!r}]", values
                break
    else:  # named by symbol: ids may sit in a column beside them
        symbol_source = names_source
        symbols = [n if g is None else None for n, g in zip(names, ids)]
        for col, values in text.items():
            found = [v if v is None else canonical_id(v, pattern) for v in values]
            if _share(found) >= ID_SHARE:
                id_source = f"var[{col!r}]"
                ids = [g if g is not None else f for g, f in zip(ids, found)]
                break
    symbols = [s if s is not None else (n if g is None else None)
               for s, n, g in zip(symbols, names, ids)]
    none = [None] * len(names)
    types, biotypes, refs = (text.get(c, none) for c in (FEATURE_TYPES, FEATURE_BIOTYPE,
                                                         FEATURE_REFERENCE))
    excluded = []
    for n, s, t, b, r in zip(names, symbols, types, biotypes, refs):
        if SPIKE_IN.match(n) or (s is not None and SPIKE_IN.match(s)) or (
                b is not None and b.lower() == SPIKE_IN_BIOTYPE):
            excluded.append(SPIKE_IN_REASON)
        elif (t is not None and t.lower() != GENE_EXPRESSION) or (
                b is not None and b.lower() != GENE_BIOTYPE):
            excluded.append(FEATURE_REASON)
        elif r is not None and r.startswith("NCBITaxon:") and r != organism.curie:
            excluded.append(OTHER_ORGANISM_REASON)
        else:
            excluded.append(None)
    return FileGenes(organism, list(names), ids, symbols, excluded, id_source, symbol_source)


def _share(values: list) -> float:
    return sum(v is not None for v in values) / max(1, len(values))


def _text(value) -> str | None:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    s = str(value).strip()
    return None if s.lower() in MISSING else s


@dataclass
class GenePlan:
    """How a file's var rows become the organism's genes: output gene names (unique, in order
    of first row) and, per var row, its output column (-1: left out)."""

    genes: list[str]
    column: np.ndarray  # int64 [n_var]
    counts: dict[str, int]  # by_id, mapped, unmapped, merged, and left out per reason

    @property
    def identity(self) -> bool:
        return len(self.genes) == self.column.shape[0] and bool(
            np.array_equal(self.column, np.arange(self.column.shape[0])))


def plan_genes(fg: FileGenes, symbols: dict[str, str], drop_unmapped: bool = False) -> GenePlan:
    """Canonical gene of each var row (see the module docstring); ``symbols`` maps the file
    organism's symbols to ids."""
    counts = Counter({"by_id": 0, "mapped": 0, "unmapped": 0, "merged": 0})
    index: dict[str, int] = {}
    column = np.full(len(fg.names), -1, dtype=np.int64)
    for i, (name, gid, sym, out) in enumerate(zip(fg.names, fg.ids, fg.symbols, fg.excluded)):
        if out is not None:
            counts[f"left_out_{out}"] += 1
            continue
        if gid is not None:
            counts["by_id"] += 1
        elif sym is not None and sym in symbols:
            gid = symbols[sym]
            counts["mapped"] += 1
        elif drop_unmapped:
            counts[f"left_out_{UNMAPPED_REASON}"] += 1
            continue
        else:
            gid = sym if sym is not None else name
            counts["unmapped"] += 1
        if gid in index:
            counts["merged"] += 1
        else:
            index[gid] = len(index)
        column[i] = index[gid]
    return GenePlan(list(index), column, dict(sorted(counts.items())))


# ---------------------------------------------------------------------------- symbol map


class SymbolMap:
    """Per organism (curie): symbol -> canonical gene id."""

    HEADER = "organism\tsymbol\tgene"

    def __init__(self, maps: dict[str, dict[str, str]] | None = None):
        self.maps = {c: dict(m) for c, m in (maps or {}).items()}

    def get(self, organism: Organism | str) -> dict[str, str]:
        return self.maps.get(resolve_organism(organism).curie, {})

    def restrict(self, organism: Organism | str, symbols: Iterable[str]) -> SymbolMap:
        """The part of the map one file uses: its organism, its symbols."""
        m = self.get(organism)
        curie = resolve_organism(organism).curie
        return SymbolMap({curie: {s: m[s] for s in sorted(set(symbols)) if s in m}})

    def digest(self) -> str:
        return hashlib.sha256(self.dumps().encode()).hexdigest()

    def dumps(self) -> str:
        lines = [self.HEADER]
        for curie in sorted(self.maps):
            lines += [f"{curie}\t{s}\t{g}" for s, g in sorted(self.maps[curie].items())]
        return "\n".join(lines) + "\n"

    def save(self, path: str | Path) -> None:
        atomic.write_text(Path(path), self.dumps())

    @classmethod
    def load(cls, path: str | Path) -> SymbolMap:
        path = Path(path)
        rows = path.read_text(encoding="utf-8").splitlines()
        if not rows or rows[0] != cls.HEADER:
            raise ValueError(f"{path}: not a symbol map (header {cls.HEADER!r} expected)")
        maps: dict[str, dict[str, str]] = defaultdict(dict)
        for n, line in enumerate(rows[1:], start=2):
            parts = line.split("\t")
            if len(parts) != 3 or not all(parts):
                raise ValueError(f"{path}, line {n}: malformed row {line!r}")
            maps[parts[0]][parts[1]] = parts[2]
        return cls(maps)

    @classmethod
    def build(cls, files: Iterable[FileGenes], tables: dict[str, GeneTable] | None = None,
              previous: SymbolMap | None = None) -> SymbolMap:
        """The build's map (see the module docstring for the precedence). A symbol with several
        candidate ids takes the one most of the build's files use, then the smallest id."""
        tables = tables or {}
        file_ids: dict[str, Counter] = defaultdict(Counter)  # organism -> id -> files using it
        pairs: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for fg in files:
            curie = fg.organism.curie
            file_ids[curie].update(set(g for g in fg.ids if g is not None))
            for sym, gid in fg.pairs():
                pairs[curie][sym].add(gid)
        maps: dict[str, dict[str, str]] = {}
        for curie in sorted(set(file_ids) | set(tables) | set(previous.maps if previous else {})):
            used = file_ids[curie]
            m = dict(previous.maps.get(curie, {})) if previous else {}
            table = tables.get(curie)
            sources = [table.symbols if table else {}, pairs[curie],
                       table.unique_synonyms() if table else {}]
            for source in sources:
                for sym in sorted(source):
                    if sym not in m:
                        m[sym] = min(source[sym], key=lambda g: (-used[g], g))
            maps[curie] = m
        return cls(maps)


@dataclass
class GeneTable:
    """A user's gene table for one organism: symbol -> candidate ids, synonym -> ids."""

    path: Path
    organism: Organism
    symbols: dict[str, set[str]] = field(default_factory=dict)
    synonyms: dict[str, set[str]] = field(default_factory=dict)

    def unique_synonyms(self) -> dict[str, set[str]]:
        return {s: ids for s, ids in self.synonyms.items() if len(ids) == 1}


_ID_HEADERS = ("gene stable id", "gene_id", "gene id", "ensembl_gene_id", "ensembl gene id",
               "gene_stable_id", "id")
_SYMBOL_HEADERS = ("gene name", "gene_name", "symbol", "gene_symbol", "gene symbol",
                   "external_gene_name", "name")
_SYNONYM_HEADERS = ("gene synonym", "gene_synonym", "synonym", "synonyms", "external_synonym",
                    "gene synonyms", "aliases", "alias")


def read_gene_table(path: str | Path, organism: Organism | str) -> GeneTable:
    """Read a tab-separated gene table (``.gz`` allowed) with a header naming an id column
    ("Gene stable ID", "gene_id", ...), a symbol column ("Gene name", "symbol", ...) and an
    optional synonym column (one synonym per row as BioMart writes them, or several separated
    by ``,``, ``|`` or ``;``). Ids must be the organism's (version suffixes are stripped).
    Raises ValueError naming the file, the line and the problem."""
    path, organism = Path(path), resolve_organism(organism)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ValueError(f"{path}: cannot read the gene table ({e.strerror or e})") from None
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except OSError as e:
            raise ValueError(f"{path}: not a gzip file ({e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{path}: gene table is not UTF-8 text") from None
    rows = [r for r in csv.reader(io.StringIO(text), delimiter="\t") if any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{path}: empty gene table")
    header = [c.strip().lower() for c in rows[0]]

    def find(names):
        return next((header.index(n) for n in names if n in header), None)

    id_col, sym_col, syn_col = find(_ID_HEADERS), find(_SYMBOL_HEADERS), find(_SYNONYM_HEADERS)
    if id_col is None or sym_col is None:
        raise ValueError(
            f"{path}, line 1: gene table header {rows[0]} needs a gene id column (e.g. "
            f"'Gene stable ID' or 'gene_id') and a symbol column (e.g. 'Gene name' or 'symbol'),"
            " tab-separated")
    pattern = gene_id_pattern(organism)
    table = GeneTable(path, organism)
    for n, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {n}: {len(row)} fields, the header has {len(header)}")
        gid = canonical_id(row[id_col], pattern)
        if gid is None:
            raise ValueError(f"{path}, line {n}: {row[id_col].strip()!r} is not a "
                             f"{organism.name} gene id (expected ids like {pattern.pattern})")
        sym = row[sym_col].strip()
        if sym:
            table.symbols.setdefault(sym, set()).add(gid)
        if syn_col is not None:
            for syn in re.split(r"[,|;]", row[syn_col]):
                syn = syn.strip()
                if syn and syn != sym:
                    table.synonyms.setdefault(syn, set()).add(gid)
    if not table.symbols:
        raise ValueError(f"{path}: gene table has no symbols")
    return table


def parse_gene_table_flags(values: Sequence[str]) -> dict[str, str]:
    """``ORGANISM=FILE`` flag values -> {organism curie: file}; ValueError for a malformed one."""
    out: dict[str, str] = {}
    for value in values:
        organism, sep, path = value.partition("=")
        if not sep or not organism.strip() or not path.strip():
            raise ValueError(f"--gene-table {value!r}: expected ORGANISM=FILE.tsv")
        curie = resolve_organism(organism).curie
        if curie in out:
            raise ValueError(f"--gene-table: two tables for {curie}")
        out[curie] = path.strip()
    return dict(sorted(out.items()))
