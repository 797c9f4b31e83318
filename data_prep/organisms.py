"""Organism names -> NCBI taxon ids, so a dataset sheet can say "mouse" or "NCBITaxon:10090".

The gene vocabulary is namespaced by organism, so every dataset must resolve to exactly one taxon.
The built-in table covers the 16 organisms of the reference corpus; any ``NCBITaxon:N`` id is
accepted as well, even when it is not in the table. The table also says what the organism's
canonical gene ids look like (``gene_id_pattern``): its Ensembl prefix (``ENSG``, ``ENSMUSG``...),
FlyBase ``FBgn`` ids for the fly, WormBase ``WBGene`` ids for the worm, AGI locus codes for
Arabidopsis, B73 gene models for maize; any Ensembl gene id for taxa outside the table.
"""

from __future__ import annotations

import re

from data_prep.shard_format import Organism


def _ensembl(prefix: str) -> str:
    return rf"(ENS{prefix}G\d{{11}})(?:\.\d+)?"


# taxon, common name, further aliases (scientific name first), gene id regex (group 1: the id
# without version). Lookups of names are case-insensitive.
_TABLE: tuple[tuple[int, str, tuple[str, ...], str], ...] = (
    (9606, "human", ("homo sapiens", "h. sapiens", "hsapiens"), _ensembl("")),
    (10090, "mouse", ("mus musculus", "m. musculus", "mmusculus", "house mouse"),
     _ensembl("MUS")),
    (9544, "macaque", ("macaca mulatta", "rhesus", "rhesus macaque", "rhesus monkey"),
     _ensembl("MMU")),
    (9483, "marmoset", ("callithrix jacchus", "common marmoset"), _ensembl("CJA")),
    (9598, "chimpanzee", ("pan troglodytes", "chimp"), _ensembl("PTR")),
    (9913, "cow", ("bos taurus", "cattle", "bovine"), _ensembl("BTA")),
    (9823, "pig", ("sus scrofa", "swine", "sus scrofa domesticus"), _ensembl("SSC")),
    (9940, "sheep", ("ovis aries",), _ensembl("OAR")),
    (9986, "rabbit", ("oryctolagus cuniculus", "european rabbit"), _ensembl("OCU")),
    (10181, "naked mole-rat", ("heterocephalus glaber", "naked mole rat"), _ensembl("HGL")),
    (9031, "chicken", ("gallus gallus",), _ensembl("GAL")),
    (7955, "zebrafish", ("danio rerio",), _ensembl("DAR")),
    (7227, "fruit fly", ("drosophila melanogaster", "fly", "drosophila", "d. melanogaster"),
     r"(FBgn\d{7})"),
    (6239, "worm", ("caenorhabditis elegans", "c. elegans", "c elegans", "nematode"),
     r"(WBGene\d{8})"),
    (3702, "arabidopsis", ("arabidopsis thaliana", "thale cress", "a. thaliana"),
     r"(AT[1-5CM]G\d{5})(?:\.\d+)?"),
    (4577, "maize", ("zea mays", "corn"), r"(Zm\d{5}(?:d|eb)\d{6})(?:_[A-Z]\d+)?"),
)
_ANY_ENSEMBL = re.compile(r"(ENS[A-Z]{0,6}G\d{11})(?:\.\d+)?")

_BY_TAXON: dict[int, Organism] = {t: Organism(t, f"NCBITaxon:{t}", n) for t, n, _, _ in _TABLE}
_GENE_IDS: dict[int, re.Pattern] = {t: re.compile(p) for t, _, _, p in _TABLE}
_BY_ALIAS: dict[str, Organism] = {}
for _taxon, _name, _aliases, _ in _TABLE:
    for _alias in (_name, *_aliases):
        _BY_ALIAS[_alias] = _BY_TAXON[_taxon]

_CURIE = re.compile(r"^(?:ncbitaxon[:_])?(\d+)$")


def known_organisms() -> list[Organism]:
    """The built-in table, in its fixed order."""
    return [_BY_TAXON[t] for t, _, _, _ in _TABLE]


def gene_id_pattern(organism: Organism) -> re.Pattern:
    """What the organism's canonical gene ids look like (use with ``fullmatch``; group 1 is the
    id without its version suffix)."""
    return _GENE_IDS.get(organism.taxon, _ANY_ENSEMBL)


def _from_taxon(taxon: int) -> Organism:
    """The table's organism of ``taxon``, or one named by its curie."""
    curie = f"NCBITaxon:{taxon}"
    return _BY_TAXON.get(taxon) or Organism(taxon, curie, curie)


def resolve_organism(value: str | int | Organism) -> Organism:
    """Map a common name, scientific name, ``NCBITaxon:N`` curie or bare taxon number to a taxon.

    Raises ValueError naming the value when it is neither a known name nor a taxon id.
    """
    if isinstance(value, Organism):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"invalid NCBI taxon id {value}")
        return _from_taxon(value)
    key = " ".join(str(value).strip().lower().replace("_", " ").split())
    if key in _BY_ALIAS:
        return _BY_ALIAS[key]
    match = _CURIE.match(str(value).strip().lower())
    if match and int(match.group(1)) > 0:
        return _from_taxon(int(match.group(1)))
    names = ", ".join(o.name for o in known_organisms())
    raise ValueError(
        f"unknown organism {str(value)!r}: use an NCBITaxon id such as 'NCBITaxon:9606' "
        f"or one of the built-in names ({names})"
    )
