"""The dataset sheet: which files to ingest, their organism, and where their labels live.

A sheet is a CSV with one row per dataset. Columns:

- ``path`` (required): an .h5ad file, relative to the sheet's folder unless absolute.
- ``organism``: the dataset's organism, an ``NCBITaxon:N`` id or a built-in name (see
  ``data_prep.organisms``). Empty: read it from the file (obs ``organism_ontology_term_id`` /
  ``organism`` or the same keys in uns), else the build's ``--organism``.
- one optional column per label class of ``shard_format.CLASSES`` except ``organism`` (which is
  the dataset organism above): the obs column holding that label. An empty cell means "not given":
  the CELLxGENE schema column is used if the file has it. ``-`` means the dataset has no such label.
- ``name`` (optional): the dataset's name in the output (default: the file stem).
- ``gene_column`` (optional): a var column holding the gene ids to use instead of var_names.
- ``multiplier`` (optional, default 1): scales the dataset's share of the sampling mass.
- ``min_genes`` (optional): this dataset's QC threshold (expressed genes per cell), overriding
  ``--min-genes``; for files that hold only a gene panel or a slice of the transcriptome.
- ``min_dataset_genes`` (optional): the fewest genes this dataset must measure, overriding
  ``--min-dataset-genes`` (which rejects targeted panels); for small fixtures or a panel wanted
  on purpose.

Files given on the command line without a sheet row use the CELLxGENE schema columns.
"""

from __future__ import annotations

import csv
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from .organisms import resolve_organism
from .shard_format import CLASSES, Organism

NO_LABEL = "-"  # sheet value: this dataset has no such label
LABEL_CLASSES = tuple(c for c in CLASSES if c != "organism")
SHEET_COLUMNS = (
    "path", "organism", "name", "gene_column", "multiplier", "min_genes", "min_dataset_genes",
    *LABEL_CLASSES
)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]*")


def safe_name(stem: str) -> str:
    """A file stem made usable as a dataset (and folder) name."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", stem).lstrip("._+-")
    return name or "dataset"


class SheetError(ValueError):
    """A problem in the dataset sheet; the message names the sheet, the row and the problem."""


@dataclass(frozen=True)
class DatasetSpec:
    """One dataset to ingest, as resolved from the command line and the sheet."""

    name: str
    path: Path  # absolute
    organism: Organism | None = None  # None: read it from the file
    # class -> obs column, or NO_LABEL; classes absent here fall back to the schema columns
    label_columns: dict[str, str] = field(default_factory=dict)
    gene_column: str | None = None
    multiplier: float = 1.0
    min_genes: int | None = None  # None: the build's --min-genes
    min_dataset_genes: int | None = None  # None: the build's --min-dataset-genes

    def to_config(self) -> dict:
        """JSON-able description, for the build configuration in the manifest."""
        return {
            "name": self.name,
            "path": str(self.path),
            "organism": self.organism.curie if self.organism else None,
            "label_columns": dict(sorted(self.label_columns.items())),
            "gene_column": self.gene_column,
            "multiplier": self.multiplier,
            "min_genes": self.min_genes,
            "min_dataset_genes": self.min_dataset_genes,
        }


def read_sheet(sheet: str | Path) -> list[DatasetSpec]:
    """Parse and check a sheet; errors name the sheet, the row (1 = header) and the problem.

    Names are provisional (``discover_inputs`` makes them unique).
    """
    sheet = Path(sheet)
    try:
        text = sheet.read_text(encoding="utf-8-sig")
    except OSError as e:
        raise SheetError(f"{sheet}: cannot read the dataset sheet ({e.strerror or e})") from None
    rows = list(csv.reader(text.splitlines()))
    rows = [r for r in rows if any(c.strip() for c in r)]
    if not rows:
        raise SheetError(f"{sheet}: empty dataset sheet (a header with a 'path' column is needed)")
    header = [c.strip() for c in rows[0]]
    unknown = [c for c in header if c not in SHEET_COLUMNS]
    if unknown:
        raise SheetError(
            f"{sheet}, row 1: unknown column(s) {unknown}; allowed: {', '.join(SHEET_COLUMNS)}"
        )
    if "path" not in header:
        raise SheetError(f"{sheet}, row 1: no 'path' column")
    dupes = sorted({c for c in header if header.count(c) > 1})
    if dupes:
        raise SheetError(f"{sheet}, row 1: duplicated column(s) {dupes}")
    if len(rows) == 1:
        raise SheetError(f"{sheet}: no dataset rows under the header")
    specs = []
    for number, row in enumerate(rows[1:], start=2):
        if len(row) > len(header):
            raise SheetError(f"{sheet}, row {number}: {len(row)} cells, header has {len(header)}")
        cells = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
        specs.append(_parse_row(sheet, number, cells))
    return specs


def _parse_row(sheet: Path, number: int, cells: dict[str, str]) -> DatasetSpec:
    where = f"{sheet}, row {number}"
    if not cells["path"]:
        raise SheetError(f"{where}: empty 'path'")
    path = Path(cells["path"]).expanduser()
    if not path.is_absolute():
        path = sheet.parent / path
    path = path.resolve()
    if not path.is_file():
        raise SheetError(f"{where}: file not found: {path}")
    organism = None
    if cells.get("organism"):
        try:
            organism = resolve_organism(cells["organism"])
        except ValueError as e:
            raise SheetError(f"{where}: {e}") from None
    multiplier = 1.0
    if cells.get("multiplier"):
        try:
            multiplier = float(cells["multiplier"])
        except ValueError:
            multiplier = math.nan
        if not (math.isfinite(multiplier) and multiplier > 0):
            raise SheetError(
                f"{where}: multiplier must be a positive number, got {cells['multiplier']!r}"
            )
    min_genes, min_dataset_genes = (_count(where, cells, c)
                                    for c in ("min_genes", "min_dataset_genes"))
    name = cells.get("name") or safe_name(path.stem)
    if not _NAME.fullmatch(name):
        raise SheetError(f"{where}: dataset name {name!r} must be letters, digits, '.', '_', '-'")
    return DatasetSpec(
        name=name,
        path=path,
        organism=organism,
        label_columns={c: cells[c] for c in LABEL_CLASSES if cells.get(c)},
        gene_column=cells.get("gene_column") or None,
        multiplier=multiplier,
        min_genes=min_genes,
        min_dataset_genes=min_dataset_genes,
    )


def _count(where: str, cells: dict[str, str], column: str) -> int | None:
    """A non-negative integer cell of the sheet (None when empty)."""
    if not cells.get(column):
        return None
    if not cells[column].isdigit():
        raise SheetError(f"{where}: {column} must be a non-negative integer, got "
                         f"{cells[column]!r}")
    return int(cells[column])


def discover_inputs(
    inputs: list[str | Path], sheet: str | Path | None = None
) -> list[DatasetSpec]:
    """All datasets of a build: the sheet's rows first (sheet order), then the other inputs.

    Directories expand to their ``*.h5ad`` files (sorted, not recursive). A file named both on
    the command line and in the sheet keeps its sheet row. Names are made unique by suffixing
    ``-2``, ``-3``... in this order, so the result is deterministic.
    """
    specs = read_sheet(sheet) if sheet is not None else []
    seen = {s.path for s in specs}
    if len(seen) != len(specs):
        dup = next(s.path for s in specs if sum(t.path == s.path for t in specs) > 1)
        raise SheetError(f"{sheet}: {dup} appears in more than one row")
    for item in inputs:
        item = Path(item).expanduser()
        if item.is_dir():
            files = sorted(p for p in item.glob("*.h5ad") if p.is_file())
            if not files:
                raise FileNotFoundError(f"{item}: directory holds no .h5ad files")
        elif item.is_file():
            files = [item]
        else:
            raise FileNotFoundError(f"{item}: no such file or directory")
        for f in files:
            f = f.resolve()
            if f not in seen:
                seen.add(f)
                specs.append(DatasetSpec(name=safe_name(f.stem), path=f))
    if not specs:
        raise ValueError("no input datasets: give .h5ad files, directories or --sheet")
    return _unique_names(specs)


def _unique_names(specs: list[DatasetSpec]) -> list[DatasetSpec]:
    taken: set[str] = set()
    out = []
    for s in specs:
        name, k = s.name, 1
        while name in taken:
            k += 1
            name = f"{s.name}-{k}"
        taken.add(name)
        out.append(s if name == s.name else DatasetSpec(**{**s.__dict__, "name": name}))
    return out
