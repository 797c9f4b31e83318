"""Raw samples -> the fixed-shape training batch: context sampling, neighbour alignment and the
corruption, in one compiled pass per batch.

A batch's records (each the sample's header and decompressed body, data_prep.shard_format) are
laid end to end in one buffer; one numba kernel then decodes each cell's gene ids, picks its
context, gathers the counts of the cell and of the neighbours it is given there, and applies the
corruption (pretrain.corruption), writing every output element once in its final dtype.
"""

from __future__ import annotations

import numba
import numpy as np
import torch

from data_prep.shard_format import (
    CLASSES,
    FLAG_FLOAT_COUNTS,
    FLAG_METACELL,
    HEADER,
    HEADER_WORDS,
    MAX_NEIGHBOURS,
    W_BODY,
    W_EXPR,
    W_NBR,
    W_PAD,
    W_VERSION,
    as_count,
    read_varints,
)
from pretrain.corruption import cdf_table, corrupt, draw_strengths
from pretrain.random_streams import GOLDEN, mix

# A sample as the stream hands it over: (sample id, record), the record being the sample's
# header and decompressed body, zero-padded to a multiple of RECORD_ALIGN bytes (``record``).
Item = tuple[int, bytes]
RECORD_ALIGN = 8
_LOWEST_BIT = np.array([(b & -b).bit_length() - 1 for b in range(256)], dtype=np.int64)


def record(head: bytes | memoryview, body: bytes) -> bytes:
    """The record of a sample: laid end to end in a batch buffer, every record starts at a
    multiple of RECORD_ALIGN bytes, so the kernel reads 4-byte fields in place."""
    return b"".join((head, body, bytes(-(len(head) + len(body)) % RECORD_ALIGN)))


@numba.njit(cache=True, nogil=True, boundscheck=False)
def _fill_batch(buf, starts, k_ask, k_full, pad_alone, zeroed, p, seed, gene_ids, gene_mask,
                expressed, counts, inputs, nbr_counts, nbr_dist, nbr_mask):
    """Every output row of the batch whose records lie at ``starts`` in ``buf``.

    Per cell: its counts and gene ids decoded; context positions by partial Fisher-Yates over the
    expressed genes, then the top padding genes (a contiguous run; none for a cell given no
    neighbours unless ``pad_alone``); the cell's and its given neighbours' counts gathered there
    (a neighbour's are decoded only when it is given); the corruption of each view. All
    randomness comes from the cell's own SplitMix64 stream keyed by (``seed``, batch row).
    Outputs are written whole (padding included), so they may be allocated with ``np.empty``.
    Reads stay inside each record's body whatever its bytes."""
    u32, f32 = buf.view(np.uint32), buf.view(np.float32)
    L, V, K = gene_ids.shape[1], inputs.shape[0], nbr_counts.shape[1]
    need, body_max = 1, 1
    for i in range(starts.shape[0]):
        w0 = starts[i] >> 2
        need = max(need, np.int64(u32[w0 + W_EXPR]) + np.int64(u32[w0 + W_PAD]))
        body_max = max(body_max, np.int64(u32[w0 + W_BODY]))
    values = np.empty(max(body_max, 2 * need), np.uint64)
    scratch = np.empty(need, np.int64)
    gid = np.empty(need, np.int64)
    row = np.empty(need + 8, np.float32)  # + 8: mask bits past the genes land in the margin
    bits_u32 = np.zeros(1, np.uint32)
    bits_f32 = bits_u32.view(np.float32)
    cdf, ready = cdf_table()
    for i in range(starts.shape[0]):
        w0 = starts[i] >> 2
        floats = ((u32[w0 + W_VERSION] >> 16) & FLAG_FLOAT_COUNTS) != 0
        ne, npd = np.int64(u32[w0 + W_EXPR]), np.int64(u32[w0 + W_PAD])
        nn = np.int64(u32[w0 + W_NBR])
        ng = ne + npd
        mb = (ng + 7) >> 3  # mask bytes per neighbour
        b0 = starts[i] + 4 * HEADER_WORDS
        end = b0 + np.int64(u32[w0 + W_BODY])
        n_values = read_varints(buf, b0 + 8 * nn + nn * mb, end, values)
        if n_values < ne + ng:  # a damaged body: its missing values read as 0
            values[n_values:ne + ng] = 0
        prev = np.int64(0)
        for j in range(ng):
            v = values[ne + j]
            prev += np.int64(v >> np.uint64(1)) ^ -np.int64(v & np.uint64(1))
            gid[j] = prev
        at = ne + ng  # the next neighbour value
        give = min(nn, k_full if zeroed[i] else k_ask)
        m = min(L, ne)
        w = m + min(L - m, npd) if give > 0 or pad_alone else m
        s = mix(seed + np.uint64(i + 1) * GOLDEN)
        for j in range(ne):
            scratch[j] = j
        for j in range(m):
            s += GOLDEN
            r = j + np.int64(((mix(s) >> np.uint64(32)) * np.uint64(ne - j)) >> np.uint64(32))
            scratch[j], scratch[r] = scratch[r], scratch[j]
        for j in range(m):
            gene_ids[i, j] = gid[scratch[j]]
            x = as_count(values[scratch[j]], floats, bits_u32, bits_f32)
            counts[i, j] = x
            expressed[i, j] = x > 0
            gene_mask[i, j] = True
        for j in range(m, w):
            gene_ids[i, j] = gid[ne + j - m]
            gene_mask[i, j] = True
        gene_ids[i, w:] = 0
        gene_mask[i, w:] = False
        counts[i, m:] = 0
        expressed[i, m:] = False
        for k in range(K):
            if k >= give:
                nbr_counts[i, k] = 0
                nbr_dist[i, k] = 0
                nbr_mask[i, k] = False
                continue
            row[:ng] = 0
            mask_at = b0 + 8 * nn + k * mb
            for q in range(mb):
                byte = np.int64(buf[mask_at + q])
                while byte and at < n_values:  # its set bits, lowest first
                    row[8 * q + _LOWEST_BIT[byte]] = as_count(values[at], floats, bits_u32,
                                                              bits_f32)
                    at += 1
                    byte &= byte - 1
            for j in range(m):
                nbr_counts[i, k, j] = row[scratch[j]]
            for j in range(m, w):
                nbr_counts[i, k, j] = row[ne + j - m]
            nbr_counts[i, k, w:] = 0
            nbr_dist[i, k] = f32[(b0 >> 2) + k]
            nbr_mask[i, k] = True
        for v in range(V):
            inputs[v, i, m:] = 0
            if zeroed[i]:
                inputs[v, i, :m] = 0
                continue
            s = corrupt(counts[i], inputs[v, i], m, p[v, i], s, cdf, ready)


class BatchBuilder:
    """Turns ``batch_size`` raw samples into the fixed-shape training batch (torch tensors)."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg  # a pretrain.data.DataConfig

    def __call__(self, items: list[Item], rng: np.random.Generator) -> dict:
        cfg, B = self.cfg, len(items)
        L = cfg.context
        if cfg.short_context_min < L and rng.random() < cfg.short_context_prob:
            L = int(rng.integers(cfg.short_context_min, L))
        k = cfg.n_neighbours
        if k is None:
            k = int(rng.integers(0, cfg.max_neighbours + 1))
        buf = np.frombuffer(b"".join(r for _, r in items), dtype=np.uint8)
        starts = np.zeros(B, dtype=np.int64)
        np.cumsum([len(r) for _, r in items[:-1]], out=starts[1:])
        head = buf.view(np.uint32)[(starts >> 2)[:, None] + np.arange(HEADER_WORDS)].view(HEADER)
        head = head.reshape(B)
        metacell = (head["flags"] & FLAG_METACELL) != 0
        zeroed, p = draw_strengths(rng, metacell, cfg.full_pass_prob, cfg.mask_scale,
                                   cfg.mask_max, cfg.views)
        seed = rng.integers(0, 2**64, dtype=np.uint64)

        gene_ids = np.empty((B, L), dtype=np.int64)
        gene_mask = np.empty((B, L), dtype=bool)
        expressed = np.empty((B, L), dtype=bool)
        counts = np.empty((B, L), dtype=np.float32)
        inputs = np.empty((cfg.views, B, L), dtype=np.float32)
        nbr_counts = np.empty((B, MAX_NEIGHBOURS, L), dtype=np.float32)
        nbr_dist = np.empty((B, MAX_NEIGHBOURS), dtype=np.float32)
        nbr_mask = np.empty((B, MAX_NEIGHBOURS), dtype=bool)
        _fill_batch(buf, starts, k, cfg.max_neighbours, cfg.pad_alone, zeroed, p, seed, gene_ids,
                    gene_mask, expressed, counts, inputs, nbr_counts, nbr_dist, nbr_mask)
        batch = {
            "gene_ids": gene_ids,
            "gene_mask": gene_mask,
            "expressed": expressed,
            "counts": counts,
            "input_counts": inputs[0],
            "zeroed": zeroed,
            "nbr_counts": nbr_counts,
            "nbr_dist": nbr_dist,
            "nbr_mask": nbr_mask,
            "total_count": head["total_count"].astype(np.float32),
            "labels": head["labels"].astype(np.int64).reshape(B, len(CLASSES)),
            "organism": head["organism"].astype(np.int64),
            "dataset": head["dataset"].astype(np.int64),
            "group": head["group"].astype(np.int64),
            "weight": head["weight"].astype(np.float32),
            "sample_id": np.fromiter((s for s, _ in items), dtype=np.int64, count=B),
        }
        if cfg.views == 2:
            batch["input_counts_2"] = inputs[1]
        return {name: torch.from_numpy(a) for name, a in batch.items()}

