"""The on-disk contract between data preparation and training: one record per sample.

A shard is a plain POSIX tar file read by stock ``tarfile`` and ``webdataset``: each sample is one
member named ``<key>.cell`` where ``key`` is the sample's 10-digit position in the packed stream.
A member is a fixed little-endian header (``HEADER``, uncompressed, so a reader can route and
check a sample before decompressing it) followed by one zstd frame holding the sample's arrays
in a compact encoding (``encode_body``): integer counts as varints (each the bytes it needs),
gene ids as varint deltas, neighbour counts as a bit mask of their non-zero genes plus those
values. docs/shard-format.md is the human-readable version of this file.

Everything the writer (data_prep.pack) and the readers (pretrain's loader, trainer and export)
share lives here; this module imports nothing else of the project: the format, its one size
bound, encode/decode, the manifest and the gene and label vocabulary readers, and the tar index
the loader reads local shards with. Of data_prep, training imports this module only (a test
holds it to that), so the build may change without touching training.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numba
import numpy as np
import zstandard

FORMAT_NAME = "scpretrain-cells"
# 2: meta-cells sum their members and carry no neighbours; epochs
# 3: compact zstd-compressed body after an uncompressed header
FORMAT_VERSION = 3
MAGIC = b"SCC1"
SAMPLE_EXT = "cell"
MANIFEST = "manifest.json"
# zstd level of the sample bodies, chosen by measurement (docs/benchmarks/data_prep.md): every
# level meets the size target, and the loader is the bound: -1 (fast, raw literals) decompresses
# 2x faster than 1 for frames 40% larger
ZSTD_LEVEL = -1

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
# counts (own and neighbours') are non-negative integers stored as varints; a sample with any
# other count sets this flag and stores each count's float32 bit pattern as a varint instead
FLAG_FLOAT_COUNTS = 2

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
        ("body_bytes", "<u4"),  # size of the body once decompressed
    ]
)
assert HEADER.itemsize % 4 == 0
HEADER_WORDS = HEADER.itemsize // 4
# header word of a field (the loader reads headers as little-endian uint32 words)
W_VERSION = HEADER.fields["version"][1] // 4  # version | flags << 16
W_EXPR = HEADER.fields["n_expr"][1] // 4
W_PAD = HEADER.fields["n_pad"][1] // 4
W_NBR = HEADER.fields["n_nbr"][1] // 4
W_BODY = HEADER.fields["body_bytes"][1] // 4
MAGIC_WORD = int.from_bytes(MAGIC, "little")
TAR_BLOCK = 512


class FormatVersionError(ValueError):
    """A shard or manifest of another format version: rebuilding it is the only fix, so readers
    stop on it instead of skipping it as damaged."""


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


# ---------------------------------------------------------------------------------------------
# Encoding
#
# Body, in this order (G = n_expr + n_pad genes, K = n_nbr neighbours):
#   nbr_dist   K float32
#   nbr_cells  K uint32
#   nbr_mask   K x ceil(G/8) bytes: bit j (byte j // 8, bit j % 8) of row k is set when
#              neighbour k has a non-zero count at gene j
#   varints    unsigned LEB128 (7 bits a byte, low first, high bit: more follow), in this order:
#              counts    n_expr: the cell's counts at its expressed genes
#              gene_ids  G: zigzag of gene_ids[j] - gene_ids[j-1] (gene_ids[-1] = 0)
#              nbr_values  one per set mask bit: the neighbours' non-zero counts, neighbour by
#                          neighbour in gene order
# A count is its integer value, or under FLAG_FLOAT_COUNTS its float32 bit pattern. Each count
# takes the bytes it needs (1 below 128, 2 below 16,384), and a reader that stops after the
# neighbours it wants never decodes the others.


@numba.njit(cache=True, nogil=True, inline="always")
def _put(out, n, v):
    """Write the unsigned varint of ``v`` at ``out[n]``; return the next position."""
    while v >= 0x80:
        out[n] = np.uint8(v & np.uint64(0x7F)) | np.uint8(0x80)
        v >>= np.uint64(7)
        n += 1
    out[n] = np.uint8(v)
    return n + 1


@numba.njit(cache=True, nogil=True)
def _integral(values):
    """Whether every value is a non-negative integer below 2**32 (else stored as float bits)."""
    for x in values:
        if not (0.0 <= x < 4294967296.0) or x != np.floor(x):
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _encode(counts, gene_ids, nbr):
    """(mask bytes [K, ceil(G/8)], varint bytes, float flag) of a sample's arrays (layout above):
    one pass per array, no temporaries."""
    n_nbr, n_genes = nbr.shape
    floats = not (_integral(counts) and _integral(nbr.ravel()))
    counts_bits, nbr_bits = counts.view(np.uint32), nbr.view(np.uint32)
    mask = np.zeros((n_nbr, (n_genes + 7) // 8), np.uint8)
    out = np.empty(5 * (counts.shape[0] + n_genes * (1 + n_nbr)) + 1, np.uint8)
    n = 0
    for j in range(counts.shape[0]):
        n = _put(out, n, np.uint64(counts_bits[j]) if floats else np.uint64(counts[j]))
    prev = np.int64(0)
    for j in range(n_genes):
        d = np.int64(gene_ids[j]) - prev
        prev = np.int64(gene_ids[j])
        n = _put(out, n, np.uint64((d << 1) ^ (d >> 63)))
    for k in range(n_nbr):
        for j in range(n_genes):
            if nbr[k, j] != 0:
                mask[k, j >> 3] |= np.uint8(1 << (j & 7))
                n = _put(out, n, np.uint64(nbr_bits[k, j]) if floats else np.uint64(nbr[k, j]))
    return mask, out[:n], floats


def _unvarints(buf: np.ndarray, n: int) -> np.ndarray:
    """The ``n`` unsigned varints that fill ``buf`` exactly (uint64); ValueError otherwise."""
    ends = np.flatnonzero(buf < 0x80)
    if ends.shape[0] != n or (n and ends[-1] != buf.shape[0] - 1) or (not n and buf.size):
        raise ValueError(f"body: {buf.shape[0]} bytes of varints do not hold {n} values")
    starts = np.concatenate([[0], ends[:-1] + 1])
    if n and (ends - starts).max() > 9:
        raise ValueError("body: varint longer than 10 bytes")
    group = np.repeat(np.arange(n), ends - starts + 1)
    shift = (np.arange(buf.shape[0]) - starts[group]).astype(np.uint64) * np.uint64(7)
    part = (buf & 0x7F).astype(np.uint64) << shift
    return np.add.reduceat(part, starts) if n else np.zeros(0, np.uint64)


def encode_body(s: CellSample) -> tuple[bytes, int]:
    """The uncompressed body of ``s`` and the flags that describe it (see the layout above)."""
    mask, varints, floats = _encode(np.ascontiguousarray(s.counts, dtype=np.float32),
                                    np.ascontiguousarray(s.gene_ids, dtype=np.uint32),
                                    np.ascontiguousarray(s.nbr_counts, dtype=np.float32))
    parts = [
        np.ascontiguousarray(s.nbr_dist, dtype="<f4").tobytes(),
        np.ascontiguousarray(s.nbr_cells, dtype="<u4").tobytes(),
        mask.tobytes(),
        varints.tobytes(),
    ]
    return b"".join(parts), FLAG_FLOAT_COUNTS if floats else 0


def encode_header(s: CellSample, flags: int, body_bytes: int) -> bytes:
    n_expr, n_genes, n_nbr = s.counts.shape[0], s.gene_ids.shape[0], s.nbr_dist.shape[0]
    if s.nbr_counts.shape != (n_nbr, n_genes) or s.nbr_cells.shape != (n_nbr,):
        raise ValueError(f"neighbour arrays do not match {n_nbr} neighbours x {n_genes} genes")
    if n_genes < n_expr or n_nbr > MAX_NEIGHBOURS or s.labels.shape != (len(CLASSES),):
        raise ValueError("inconsistent sample shapes")
    head = np.zeros((), dtype=HEADER)
    head["magic"] = MAGIC
    head["version"] = FORMAT_VERSION
    head["flags"] = (s.flags & FLAG_METACELL) | flags
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
    head["body_bytes"] = body_bytes
    return head.tobytes()


def encode_parts(s: CellSample) -> tuple[bytes, bytes]:
    """(header, uncompressed body): what a reader holds once it has decompressed a member."""
    body, flags = encode_body(s)
    return encode_header(s, flags, len(body)), body


def compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    """The body compressor: a frame with its content size and a checksum, so damage is caught
    when a body is decompressed."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True)


def encode_sample(s: CellSample, zstd: zstandard.ZstdCompressor | None = None) -> bytes:
    """The member bytes of ``s``: header + zstd frame of the body (``compressor()`` by default;
    pass one to reuse it across samples)."""
    head, body = encode_parts(s)
    return head + (zstd or compressor()).compress(body)


# ---------------------------------------------------------------------------------------------
# Sizes


def body_bytes_bound(n_genes: np.ndarray, n_expr: np.ndarray, n_nbr: np.ndarray) -> np.ndarray:
    """Largest body of a sample with these shapes (every neighbour count non-zero, every varint
    of a 32-bit value: 5 bytes)."""
    return 8 * n_nbr + n_nbr * ((n_genes + 7) // 8) + 5 * (n_expr + n_genes + n_nbr * n_genes)


def zstd_bound(n: np.ndarray) -> np.ndarray:
    """ZSTD_COMPRESSBOUND plus the frame header and checksum: the largest frame of n bytes."""
    return n + (n >> 8) + np.where(n < 128 << 10, ((128 << 10) - n) >> 11, 0) + 18 + 4


def member_bytes(sample_bytes: np.ndarray) -> np.ndarray:
    """Bytes a sample takes in a tar: one header block plus the data padded to whole blocks."""
    return TAR_BLOCK + -(-sample_bytes // TAR_BLOCK) * TAR_BLOCK


def sample_bytes_bound(
    nnz: np.ndarray, nbr_nnz_sum: np.ndarray, n_nbr: np.ndarray, metacell: np.ndarray, context: int
) -> np.ndarray:
    """Upper bound of each sample's encoded size, known before packing (so shard boundaries are
    fixed up front and every shard can be built, skipped or resumed independently). A meta-cell
    holds at most the genes of all its members and no neighbours."""
    nnz = nnz.astype(np.int64)
    n_pad = np.minimum(np.maximum(0, context - nnz), nbr_nnz_sum)
    n_genes = np.where(metacell, nnz + nbr_nnz_sum, nnz + n_pad)
    n_expr = np.where(metacell, n_genes, nnz)
    n_nbr = np.where(metacell, 0, n_nbr)
    return HEADER.itemsize + zstd_bound(body_bytes_bound(n_genes, n_expr, n_nbr))


# ---------------------------------------------------------------------------------------------
# Decoding


def decode_header(buf: bytes | memoryview) -> np.void:
    if len(buf) < HEADER.itemsize:
        raise ValueError(f"{len(buf)} bytes, shorter than the {HEADER.itemsize}-byte header")
    head = np.frombuffer(buf, dtype=HEADER, count=1)[0]
    if head["magic"] != MAGIC:
        raise ValueError(f"not a cell sample (magic {head['magic']!r})")
    if head["version"] != FORMAT_VERSION:
        raise FormatVersionError(f"sample format version {head['version']}; this reader reads "
                                 f"version {FORMAT_VERSION} (rebuild the shards)")
    if int(head["n_nbr"]) > MAX_NEIGHBOURS or head["flags"] >= 2 * FLAG_FLOAT_COUNTS:
        raise ValueError(f"bad header ({head['n_nbr']} neighbours, flags {head['flags']:#x})")
    return head


def decompress_body(buf: bytes | memoryview, head: np.void,
                    zstd: zstandard.ZstdDecompressor | None = None) -> bytes:
    """The body of a member whose header ``decode_header`` returned; ValueError when it is
    damaged (zstd checksum) or of another size than the header says."""
    try:
        body = (zstd or zstandard.ZstdDecompressor()).decompress(
            memoryview(buf)[HEADER.itemsize:])
    except zstandard.ZstdError as e:
        raise ValueError(f"body does not decompress ({e})") from None
    if len(body) != head["body_bytes"]:
        raise ValueError(f"body is {len(body)} bytes, header says {head['body_bytes']}")
    return body


def decode_sample(buf: bytes | memoryview) -> CellSample:
    """Decode and check one member; every array is a fresh array."""
    head = decode_header(buf)
    return decode_record(head, decompress_body(buf, head))


def decode_record(head: np.void | bytes, body: bytes) -> CellSample:
    """A sample from its header and its decompressed body, checked."""
    if not isinstance(head, np.void):
        head = decode_header(head)
    body = np.frombuffer(body, dtype=np.uint8)
    n_expr, n_nbr = int(head["n_expr"]), int(head["n_nbr"])
    n_genes = n_expr + int(head["n_pad"])
    fixed = 8 * n_nbr + n_nbr * ((n_genes + 7) // 8)
    if body.shape[0] < fixed:
        raise ValueError(f"body is {body.shape[0]} bytes, too short for its arrays")
    nbr_dist = body[: 4 * n_nbr].view("<f4").astype(np.float32)
    nbr_cells = body[4 * n_nbr: 8 * n_nbr].view("<u4").astype(np.uint32)
    mask = body[8 * n_nbr: fixed].reshape(n_nbr, (n_genes + 7) // 8)
    nonzero = np.unpackbits(mask, axis=1, count=n_genes, bitorder="little").astype(bool)
    if n_nbr and np.unpackbits(mask, axis=1, bitorder="little")[:, n_genes:].any():
        raise ValueError("neighbour mask has bits past its genes")
    n_values = int(nonzero.sum())
    values = _unvarints(body[fixed:], n_expr + n_genes + n_values)

    def counts_of(v: np.ndarray) -> np.ndarray:
        if int(head["flags"]) & FLAG_FLOAT_COUNTS:
            if v.size and v.max() >= 2**32:
                raise ValueError("a float count's bit pattern is wider than 32 bits")
            return v.astype(np.uint32).view(np.float32)
        return v.astype(np.float32)

    zz = values[n_expr: n_expr + n_genes]
    ids = np.cumsum((zz >> np.uint64(1)).astype(np.int64) ^ -(zz & np.uint64(1)).astype(np.int64))
    if n_genes and (ids.min() < 0 or ids.max() >= 2**32):
        raise ValueError("gene ids out of the uint32 range")
    nbr_counts = np.zeros((n_nbr, n_genes), dtype=np.float32)
    nbr_counts[nonzero] = counts_of(values[n_expr + n_genes:])
    counts = counts_of(values[:n_expr])
    return CellSample(
        gene_ids=ids.astype(np.uint32),
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
        flags=int(head["flags"]) & FLAG_METACELL,
    )


# Body readers for compiled code (the batch kernel)


@numba.njit(cache=True, nogil=True)
def read_varints(body, at, end, out):
    """Every varint in ``body[at:end]`` into ``out`` (uint64, at least ``end - at`` long); returns
    how many. Branch-free, one byte per step: ~1 ns a byte, where stopping at each varint's last
    byte costs an unpredictable branch each."""
    n = 0
    v = np.uint64(0)
    shift = np.uint64(0)
    for q in range(at, end):
        b = body[q]
        v |= np.uint64(b & 0x7F) << shift
        out[n] = v
        more = np.uint64(b >> 7)
        n += 1 - np.int64(more)
        v *= more
        shift = (shift + np.uint64(7)) * more
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def as_count(v, floats, bits_u32, bits_f32):
    """A stored count as float32: its value, or under ``floats`` (FLAG_FLOAT_COUNTS) its bit
    pattern, reinterpreted through ``bits_u32`` and ``bits_f32``, one element's two views."""
    if not floats:
        return np.float32(v)
    bits_u32[0] = np.uint32(v)
    return bits_f32[0]


# ---------------------------------------------------------------------------------------------
# The tar index: every member of a shard held in memory, in one compiled pass

TAR_ERRORS = ("", "bad tar header checksum at byte {}", "truncated: member at byte {} runs past "
              "the end", "truncated tar header at byte {}", "bad size field at byte {}")
SAMPLE_SUFFIX = np.frombuffer(("." + SAMPLE_EXT).encode(), dtype=np.uint8)


@numba.njit(cache=True, nogil=True)
def _octal(buf, at, n):
    """A tar numeric field (octal, or GNU base-256); -1 if malformed."""
    if buf[at] & 0x80:
        v = buf[at] & 0x3F
        for q in range(at + 1, at + n):
            v = v * 256 + buf[q]
        return v
    v, q = 0, at
    while q < at + n and buf[q] == 32:
        q += 1
    while q < at + n and buf[q] != 0 and buf[q] != 32:
        if not 48 <= buf[q] <= 55:
            return -1
        v = v * 8 + buf[q] - 48
        q += 1
    return v


@numba.njit(cache=True, nogil=True)
def _name_key(buf, at, ext):
    """``<digits><ext>`` in the NUL-terminated name at ``at`` -> the number; -2 other ``<ext>``
    names; -1 names not ending in ``ext``."""
    n = 0
    while n < 100 and buf[at + n] != 0:
        n += 1
    e = ext.shape[0]
    if n < e:
        return -1
    for q in range(e):
        if buf[at + n - e + q] != ext[q]:
            return -1
    if n == e or n - e > 18:
        return -2
    v = 0
    for q in range(at, at + n - e):
        if not 48 <= buf[q] <= 57:
            return -2
        v = v * 10 + buf[q] - 48
    return v


@numba.njit(cache=True, nogil=True)
def tar_scan(buf, ext):
    """Every member header of a tar held in ``buf`` (uint8) in one pass: (offsets of the data,
    sizes, type bytes, name keys, n members, error code (``TAR_ERRORS``), its byte offset)."""
    end = buf.shape[0]
    cap = end // 512 + 1
    offs = np.empty(cap, np.int64)
    sizes = np.empty(cap, np.int64)
    kinds = np.empty(cap, np.uint8)
    keys = np.empty(cap, np.int64)
    n, off = 0, 0
    while off + 512 <= end:
        total, zero = 0, True
        for q in range(off, off + 512):
            total += buf[q]
            zero = zero and buf[q] == 0
        if zero:
            return offs, sizes, kinds, keys, n, 0, off
        for q in range(off + 148, off + 156):
            total += 32 - buf[q]
        if _octal(buf, off + 148, 8) != total:
            return offs, sizes, kinds, keys, n, 1, off
        size = _octal(buf, off + 124, 12)
        if size < 0:
            return offs, sizes, kinds, keys, n, 4, off
        if off + 512 + size > end:
            return offs, sizes, kinds, keys, n, 2, off
        offs[n], sizes[n], kinds[n] = off + 512, size, buf[off + 156]
        keys[n] = _name_key(buf, off, ext)
        n += 1
        off += 512 + (size + 511) // 512 * 512
    if off < end:
        return offs, sizes, kinds, keys, n, 3, off
    return offs, sizes, kinds, keys, n, 0, off


def member_key(name: str) -> int:
    """The sample key of a member name: -1 not a sample member, -2 a sample member whose name
    is not ``<number>.cell``."""
    if not name.endswith("." + SAMPLE_EXT):
        return -1
    stem = name[: -len(SAMPLE_EXT) - 1]
    return int(stem) if stem.isdigit() else -2


def tar_index(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, str]:
    """The sample members of a tar held in ``raw`` (uint8): (keys, data offsets, sizes, the
    problem that ended the scan or ""). Long names (pax / GNU headers) are resolved."""
    offs, sizes, kinds, keys, n, err, err_at = tar_scan(raw, SAMPLE_SUFFIX)
    offs, sizes, kinds, keys = offs[:n], sizes[:n], kinds[:n], keys[:n]
    for r in np.flatnonzero((kinds == ord("x")) | (kinds == ord("L")))[::-1]:
        if r + 1 < n:  # pax / GNU long-name header: names the next member
            text = raw[offs[r]: offs[r] + sizes[r]].tobytes()
            name = (text.rstrip(b"\0").decode() if kinds[r] == ord("L") else dict(
                rec.split(" ", 1)[1].split("=", 1) for rec in text.decode().splitlines()
            ).get("path"))
            if name is not None:
                keys[r + 1] = member_key(name)
    cells = ((kinds == ord("0")) | (kinds == 0)) & (keys != -1)
    return keys[cells], offs[cells], sizes[cells], TAR_ERRORS[err].format(err_at)


# ---------------------------------------------------------------------------------------------
# Manifest and vocabulary readers


def check_manifest(manifest: dict, where: str) -> dict:
    if manifest.get("format") != FORMAT_NAME:
        raise ValueError(f"{where}: format {manifest.get('format')!r}, expected {FORMAT_NAME!r}")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise FormatVersionError(
            f"{where}: shards of format version {manifest.get('format_version')}; this reader "
            f"reads version {FORMAT_VERSION} (rebuild them with data_prep.build_shards)")
    return manifest


def load_manifest(out_dir: str | Path) -> dict:
    """Read ``OUT/manifest.json`` and check that it is a manifest of this format."""
    path = Path(out_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; is this a build_shards output?") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    return check_manifest(manifest, str(path))


# The gene vocabulary (``vocab/``): ``ranges.json`` (each organism's id range), ``genes.tsv``
# (id, organism, gene) and ``aliases.tsv`` (organism, alias, gene). data_prep.vocab builds and
# writes it; what a reader needs is here.
GENES_FILE = "genes.tsv"
GENES_HEADER = "id\torganism\tgene"
ALIASES_FILE = "aliases.tsv"
ALIASES_HEADER = "organism\talias\tgene"
RANGES_FILE = "ranges.json"
PAD_ID = 0


@dataclass(frozen=True)
class Organism:
    """An NCBI taxon as the vocabulary and the headers name it (data_prep.organisms resolves
    names such as "mouse" to one)."""

    taxon: int
    curie: str  # "NCBITaxon:<taxon>"
    name: str  # common name, or the curie for taxa outside the built-in table


@dataclass
class OrganismRange:
    """One organism's block of gene ids ``[start, start + size)``: its genes in id order, their
    ids and the symbols (aliases) that name them."""

    organism: Organism
    start: int
    size: int
    genes: list[str] = field(default_factory=list)  # id = start + position
    index: dict[str, int] = field(default_factory=dict, repr=False)  # gene -> id
    aliases: dict[str, str] = field(default_factory=dict, repr=False)  # symbol -> gene

    @property
    def end(self) -> int:
        return self.start + self.size


class GeneRanges:
    """The gene vocabulary as a reader uses it: organism curie -> ``OrganismRange``, in id order.
    ``data_prep.vocab.GeneVocab`` extends it with adding genes and saving."""

    def __init__(self, ranges: dict[str, OrganismRange] | None = None):
        self.ranges: dict[str, OrganismRange] = ranges if ranges is not None else {}

    @property
    def n_ids(self) -> int:
        """Ids in use including padding: the embedding table size."""
        return max((r.end for r in self.ranges.values()), default=PAD_ID + 1)

    def gene_of(self, gene_id: int) -> tuple[str, str]:
        """(organism curie, gene) of a global id."""
        for curie, r in self.ranges.items():
            if r.start <= gene_id < r.start + len(r.genes):
                return curie, r.genes[gene_id - r.start]
        raise KeyError(f"gene id {gene_id} is not assigned")

    def aliases(self) -> dict[str, dict[str, str]]:
        """{organism curie: {symbol: gene}}: how a file named by symbols finds the genes."""
        return {curie: dict(r.aliases) for curie, r in self.ranges.items()}


def read_gene_vocab(directory: str | Path) -> tuple[dict[str, OrganismRange], dict]:
    """A saved gene vocabulary: its ranges (organism curie -> ``OrganismRange``, in id order)
    and the sizing settings it was built with (``ranges.json``'s ``config``)."""
    d = Path(directory)
    try:
        saved = json.loads((d / RANGES_FILE).read_text())
        rows = (d / GENES_FILE).read_text().splitlines()
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{d}: not a gene vocabulary ({e.filename} missing)") from None
    ranges: dict[str, OrganismRange] = {}
    for curie, o in sorted(saved["organisms"].items(), key=lambda kv: kv[1]["start"]):
        organism = Organism(int(o["taxon"]), curie, o["name"])
        ranges[curie] = OrganismRange(organism, int(o["start"]), int(o["size"]))
    for n, (gid, r, gene) in _vocab_rows(d / GENES_FILE, rows, GENES_HEADER, (0, 1, 2),
                                         ranges):
        if int(gid) != r.start + len(r.genes):
            raise ValueError(f"{d / GENES_FILE}, line {n}: id {gid} out of sequence")
        r.index[gene] = int(gid)
        r.genes.append(gene)
    for curie, r in ranges.items():
        if len(r.genes) != saved["organisms"][curie]["n_genes"] or len(r.genes) > r.size:
            raise ValueError(f"{d}: genes.tsv and ranges.json disagree for {curie}")
    _read_aliases(d / ALIASES_FILE, ranges)
    return ranges, saved.get("config", {})


def _read_aliases(path: Path, ranges: dict[str, OrganismRange]) -> None:
    """Read ``aliases.tsv`` into ``ranges`` (absent in vocabularies written before aliases
    existed)."""
    if not path.is_file():
        return
    rows = path.read_text(encoding="utf-8").splitlines()
    for n, (alias, r, gene) in _vocab_rows(path, rows, ALIASES_HEADER, (1, 0, 2), ranges):
        if gene not in r.index:
            raise ValueError(f"{path}, line {n}: {gene!r} is not a gene of "
                             f"{r.organism.curie}")
        r.aliases[alias] = gene


def _vocab_rows(path: Path, rows: list[str], header: str, order: tuple[int, int, int],
                ranges: dict[str, OrganismRange]):
    """The rows of a 3-column vocabulary TSV after its header line, as (line number, (first,
    organism range, last)): ``order`` gives the columns of the first field, the organism CURIE
    and the last field. A wrong header, a row of another width or an unknown organism is an
    error naming the file and line."""
    if not rows or rows[0] != header:
        raise ValueError(f"{path}: missing header {header.replace(chr(9), '<TAB>')!r}")
    first, organism, last = order
    for n, line in enumerate(rows[1:], start=2):
        fields = line.split("\t")
        if len(fields) != 3 or fields[organism] not in ranges:
            raise ValueError(f"{path}, line {n}: malformed row {line!r}")
        yield n, (fields[first], ranges[fields[organism]], fields[last])


def read_labels(path: str | Path) -> dict:
    """A ``labels.json`` label vocabulary: ``{"classes": {class: [labels in id order]},
    "pseudo_label": [...], "groups": [[...], ...]}`` with every class present."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no label vocabulary") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: malformed label vocabulary ({e})") from None
    try:
        lists = {c: list(doc["classes"].get(c, [])) for c in CLASSES}
        out = {"classes": lists, "pseudo_label": list(doc.get("pseudo_label", [])),
               "groups": [list(g) for g in doc.get("groups", [])]}
    except (KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{path}: malformed label vocabulary ({e})") from None
    groups = [tuple(str(v) for v in g) for g in out["groups"]]
    for kind, values in (*lists.items(), ("pseudo_label", out["pseudo_label"]), ("groups", groups)):
        if None in values or len(set(values)) != len(values):
            raise ValueError(f"{path}: malformed label vocabulary (duplicated or null {kind} "
                             "labels)")
    return out


def is_url(path: str) -> bool:
    return path.startswith("pipe:") or "://" in path


def is_remote(root: str, path: str) -> bool:
    """``is_url(locate(root, path))`` without building the joined path (a manifest of 350,000
    shards an epoch is classified in a fraction of the time)."""
    path = path.removeprefix("file://")
    return is_url(path) or (is_url(root) and not os.path.isabs(path))


def locate(root: str, path: str) -> str:
    """A manifest shard path as a local file or a URL/pipe spec (relative paths join ``root``)."""
    path = path.removeprefix("file://")
    if is_url(path) or os.path.isabs(path):
        return path
    return f"{root.rstrip('/')}/{path}" if is_url(root) else str(Path(root) / path)
