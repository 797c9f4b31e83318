"""The on-disk contract between data preparation and training: one binary record per sample.

A shard is a plain POSIX tar file read by stock ``webdataset``: each sample is one member named
``<key>.cell`` where ``key`` is the sample's 10-digit position in the packed stream. The member's
bytes are a fixed little-endian header (``HEADER``) followed by flat arrays, so a reader needs
``np.frombuffer`` and nothing else (no pickle, no per-sample compression). docs/shard-format.md
is the human-readable version of this file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_NAME = "scpretrain-cells"
FORMAT_VERSION = 2  # 2: meta-cells sum their members and carry no neighbours; epochs
MAGIC = b"SCC1"
SAMPLE_EXT = "cell"
MANIFEST = "manifest.json"

# The 9 supervised metadata classes, in CELLxGENE schema names; a sample's ``labels[i]`` is the
# id of its class-i label in the label vocabulary, -1 when unknown.
CLASSES = (
    "cell_type",
    "disease",
    "development_stage",
    "tissue",
    "assay",
    "self_reported_ethnicity",
    "sex",
    "cell_culture",
    "organism",
)
UNKNOWN = -1
MAX_NEIGHBOURS = 6
CONTEXT_GENES = 3200

# counts are the sum of the cell and its neighbours over their gene union (integers, a deeper
# profile); a meta-cell carries no neighbours, since they are inside its counts
FLAG_METACELL = 1

HEADER = np.dtype(
    [
        ("magic", "S4"),
        ("version", "<u2"),
        ("flags", "<u2"),
        ("n_expr", "<u4"),  # genes expressed in the cell (count > 0)
        ("n_pad", "<u4"),  # extra genes expressed only in neighbours, best first
        ("n_nbr", "<u4"),  # neighbours stored (<= MAX_NEIGHBOURS)
        ("dataset", "<u4"),  # dataset id (manifest "datasets")
        ("cell", "<u4"),  # row of the cell in its input file (obs index)
        ("organism", "<u4"),  # NCBI taxon number, e.g. 9606
        ("group", "<u4"),  # sampling group id (labels file "groups")
        ("nnz", "<u4"),  # expressed genes of the cell's full profile
        ("pseudo_label", "<i4"),  # labels file "pseudo_label"
        ("total_count", "<f4"),  # sum of the full profile's counts (library size)
        ("weight", "<f4"),  # sampling probability x pool size (1.0 = uniform rate)
        ("labels", "<i4", (len(CLASSES),)),
    ]
)
assert HEADER.itemsize % 4 == 0


@dataclass
class CellSample:
    """One training sample: a cell, its neighbours aligned to the same genes, and its labels.

    ``gene_ids`` holds ``n_expr`` expressed genes (ascending id) then ``n_pad`` padding genes that
    only neighbours express, ranked by summed neighbour counts (descending). ``counts`` covers the
    first ``n_expr`` genes (the cell's counts at the padding genes are zero by construction);
    ``nbr_counts`` covers all ``n_expr + n_pad`` genes.
    """

    gene_ids: np.ndarray  # uint32 [n_expr + n_pad], global vocabulary ids
    counts: np.ndarray  # float32 [n_expr]
    nbr_counts: np.ndarray  # float32 [n_nbr, n_expr + n_pad]
    nbr_dist: np.ndarray  # float32 [n_nbr], Euclidean distance in the dataset's PCA space
    nbr_cells: np.ndarray  # uint32 [n_nbr], neighbours' rows in the input file
    labels: np.ndarray  # int32 [9]
    dataset: int
    cell: int
    organism: int
    group: int
    nnz: int
    pseudo_label: int
    total_count: float
    weight: float
    flags: int = 0

    @property
    def n_expr(self) -> int:
        return int(self.counts.shape[0])

    @property
    def is_metacell(self) -> bool:
        return bool(self.flags & FLAG_METACELL)


def sample_key(position: int) -> str:
    return f"{position:010d}"


def encode_sample(s: CellSample) -> bytes:
    n_expr = s.counts.shape[0]
    n_genes = s.gene_ids.shape[0]
    n_nbr = s.nbr_dist.shape[0]
    if s.nbr_counts.shape != (n_nbr, n_genes) or s.nbr_cells.shape != (n_nbr,):
        raise ValueError(f"neighbour arrays do not match {n_nbr} neighbours x {n_genes} genes")
    if n_genes < n_expr or n_nbr > MAX_NEIGHBOURS or s.labels.shape != (len(CLASSES),):
        raise ValueError("inconsistent sample shapes")
    head = np.zeros((), dtype=HEADER)
    head["magic"] = MAGIC
    head["version"] = FORMAT_VERSION
    head["flags"] = s.flags
    head["n_expr"] = n_expr
    head["n_pad"] = n_genes - n_expr
    head["n_nbr"] = n_nbr
    head["dataset"] = s.dataset
    head["cell"] = s.cell
    head["organism"] = s.organism
    head["group"] = s.group
    head["nnz"] = s.nnz
    head["pseudo_label"] = s.pseudo_label
    head["total_count"] = s.total_count
    head["weight"] = s.weight
    head["labels"] = s.labels
    parts = [
        head.tobytes(),
        np.ascontiguousarray(s.gene_ids, dtype="<u4").tobytes(),
        np.ascontiguousarray(s.counts, dtype="<f4").tobytes(),
        np.ascontiguousarray(s.nbr_counts, dtype="<f4").tobytes(),
        np.ascontiguousarray(s.nbr_dist, dtype="<f4").tobytes(),
        np.ascontiguousarray(s.nbr_cells, dtype="<u4").tobytes(),
    ]
    return b"".join(parts)


def decode_header(buf: bytes | memoryview) -> np.void:
    head = np.frombuffer(buf, dtype=HEADER, count=1)[0]
    if head["magic"] != MAGIC:
        raise ValueError(f"not a cell sample (magic {head['magic']!r})")
    if head["version"] != FORMAT_VERSION:
        raise ValueError(f"unsupported sample format version {head['version']}")
    return head


def decode_sample(buf: bytes | memoryview) -> CellSample:
    """Zero-copy decode: the arrays are read-only views into ``buf``."""
    head = decode_header(buf)
    n_expr, n_genes, n_nbr = int(head["n_expr"]), int(head["n_expr"] + head["n_pad"]), int(
        head["n_nbr"]
    )
    expected = HEADER.itemsize + 4 * (n_genes + n_expr + n_nbr * n_genes + 2 * n_nbr)
    if len(buf) != expected:
        raise ValueError(f"sample is {len(buf)} bytes, header says {expected}")
    off = HEADER.itemsize

    def take(dtype: str, count: int) -> np.ndarray:
        nonlocal off
        arr = np.frombuffer(buf, dtype=dtype, count=count, offset=off)
        off += 4 * count
        return arr

    gene_ids = take("<u4", n_genes)
    counts = take("<f4", n_expr)
    nbr_counts = take("<f4", n_nbr * n_genes).reshape(n_nbr, n_genes)
    nbr_dist = take("<f4", n_nbr)
    nbr_cells = take("<u4", n_nbr)
    return CellSample(
        gene_ids=gene_ids,
        counts=counts,
        nbr_counts=nbr_counts,
        nbr_dist=nbr_dist,
        nbr_cells=nbr_cells,
        labels=np.array(head["labels"], dtype=np.int32),
        dataset=int(head["dataset"]),
        cell=int(head["cell"]),
        organism=int(head["organism"]),
        group=int(head["group"]),
        nnz=int(head["nnz"]),
        pseudo_label=int(head["pseudo_label"]),
        total_count=float(head["total_count"]),
        weight=float(head["weight"]),
        flags=int(head["flags"]),
    )


def load_manifest(out_dir: str | Path) -> dict:
    """Read ``OUT/manifest.json`` and check that it is a manifest of this format."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; is this a build_shards output?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} v{manifest.get('format_version')}, "
            f"expected {FORMAT_NAME!r} v{FORMAT_VERSION}"
        )
    return manifest
