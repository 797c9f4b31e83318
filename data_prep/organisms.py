"""Organism names -> NCBI taxon ids, so a dataset sheet can say "mouse" or "NCBITaxon:10090".

The gene vocabulary is namespaced by organism, so every dataset must resolve to exactly one taxon.
The built-in table covers the 16 organisms of the reference corpus; any ``NCBITaxon:N`` id is
accepted as well, even when it is not in the table.
"""

from __future__ import annotations

import re
from dataclasses import dataclass


@dataclass(frozen=True)
class Organism:
    taxon: int
    curie: str  # "NCBITaxon:<taxon>"
    name: str  # common name, or the curie for taxa outside the built-in table

    @classmethod
    def from_taxon(cls, taxon: int) -> Organism:
        known = _BY_TAXON.get(int(taxon))
        curie = f"NCBITaxon:{int(taxon)}"
        return known if known is not None else cls(int(taxon), curie, curie)


# taxon, common name, further aliases (scientific name first). Lookups are case-insensitive.
_TABLE: tuple[tuple[int, str, tuple[str, ...]], ...] = (
    (9606, "human", ("homo sapiens", "h. sapiens", "hsapiens")),
    (10090, "mouse", ("mus musculus", "m. musculus", "mmusculus", "house mouse")),
    (9544, "macaque", ("macaca mulatta", "rhesus", "rhesus macaque", "rhesus monkey")),
    (9483, "marmoset", ("callithrix jacchus", "common marmoset")),
    (9598, "chimpanzee", ("pan troglodytes", "chimp")),
    (9913, "cow", ("bos taurus", "cattle", "bovine")),
    (9823, "pig", ("sus scrofa", "swine", "sus scrofa domesticus")),
    (9940, "sheep", ("ovis aries",)),
    (9986, "rabbit", ("oryctolagus cuniculus", "european rabbit")),
    (10181, "naked mole-rat", ("heterocephalus glaber", "naked mole rat")),
    (9031, "chicken", ("gallus gallus",)),
    (7955, "zebrafish", ("danio rerio",)),
    (7227, "fruit fly", ("drosophila melanogaster", "fly", "drosophila", "d. melanogaster")),
    (6239, "worm", ("caenorhabditis elegans", "c. elegans", "c elegans", "nematode")),
    (3702, "arabidopsis", ("arabidopsis thaliana", "thale cress", "a. thaliana")),
    (4577, "maize", ("zea mays", "corn")),
)

_BY_TAXON: dict[int, Organism] = {t: Organism(t, f"NCBITaxon:{t}", n) for t, n, _ in _TABLE}
_BY_ALIAS: dict[str, Organism] = {}
for _taxon, _name, _aliases in _TABLE:
    for _alias in (_name, *_aliases):
        _BY_ALIAS[_alias] = _BY_TAXON[_taxon]

_CURIE = re.compile(r"^(?:ncbitaxon[:_])?(\d+)$")


def known_organisms() -> list[Organism]:
    """The built-in table, in its fixed order."""
    return [_BY_TAXON[t] for t, _, _ in _TABLE]


def resolve_organism(value: str | int | Organism) -> Organism:
    """Map a common name, scientific name, ``NCBITaxon:N`` curie or bare taxon number to a taxon.

    Raises ValueError naming the value when it is neither a known name nor a taxon id.
    """
    if isinstance(value, Organism):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"invalid NCBI taxon id {value}")
        return Organism.from_taxon(value)
    key = " ".join(str(value).strip().lower().replace("_", " ").split())
    if key in _BY_ALIAS:
        return _BY_ALIAS[key]
    match = _CURIE.match(str(value).strip().lower())
    if match and int(match.group(1)) > 0:
        return Organism.from_taxon(int(match.group(1)))
    names = ", ".join(o.name for o in known_organisms())
    raise ValueError(
        f"unknown organism {str(value)!r}: use an NCBITaxon id such as 'NCBITaxon:9606' "
        f"or one of the built-in names ({names})"
    )
