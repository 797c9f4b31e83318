"""The scPRINT-2-style cell model: gene tokens -> criss-cross (or full) attention trunk -> cell
tokens, with a ZINB expression decoder, per-class classifiers and a contrastive cell embedding.

Gene token = gene embedding + expression encoding of log2(1 + corrupted count) + the DeepSet
encoding of the neighbours' log2(1 + counts) at that gene. The trunk's criss-cross blocks let
genes read M latents and latents read genes (never gene-gene); ``attention="full"`` swaps in
dense attention over genes. Ten cell tokens (1 general + 1 per metadata class) form a small
transformer that cross-attends to the trunk's gene states.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from data_prep.shard_format import CLASSES, MAX_NEIGHBOURS
from kernels import (
    DeepSetEncoder,
    DeepSetEncoderReference,
    criss_cross_attention,
    reference_criss_cross_attention,
)
from pretrain.losses import (
    classification_loss,
    hierarchy_children,
    info_nce,
    parent_logits,
    softmax_classification_loss,
    zinb_nll,
)

N_CELL_TOKENS = 1 + len(CLASSES)
LN_EPS = 1e-6
INIT_STD = 0.02


@dataclass
class ModelConfig:
    """Architecture and objective settings; ``preset`` gives the four standard sizes."""

    d_model: int = 256  # width of the gene tokens
    n_layers: int = 8  # transformer blocks of the trunk
    n_heads: int = 4  # attention heads (d_model must divide by it)
    attention: str = "criss_cross"  # criss_cross (genes <-> latents) or full
    n_latents: int = 200  # latent tokens of criss-cross attention
    latent_dim: int = 128  # width of the latent tokens (scPRINT-2: s = 128)
    cell_layers: int = 2  # depth of the cell-token transformer
    mlp_ratio: int = 4  # MLP hidden width / d_model
    dropout: float = 0.1  # dropout of the trunk
    # dropout inside the DeepSet neighbour encoder; > 0 makes training take its unfused
    # reference path (the fused kernel has no dropout), which materialises [B, K, L, d]
    neighbour_dropout: float = 0.0
    checkpointing: bool = False  # activation checkpointing of the trunk blocks
    kernels: str = "auto"  # auto: fused kernels where they run; reference: PyTorch only
    # precomputed gene embeddings (.npy [n_genes, E], frozen) + a trainable 2-layer adapter;
    # unset: a learned table over the global vocabulary (id 0 = padding)
    gene_embedding_file: str | None = None
    # scale of the ZINB mean: context = the cell's total count over its context genes (the
    # softmax covers exactly those genes), library = the full profile's library size
    mean_scale: str = "context"
    # how cell identity reaches the heads (docs/benchmarks/learning.md measures each switch):
    # the gene token is LN(gene embedding) + LN(expression) + LN(neighbours), so no component
    # can swamp the others
    token_norm: bool = True
    # initial gain of the neighbour component's norm (0: it starts switched off and grows only
    # as far as it helps)
    neighbour_scale_init: float = 0.0
    # what the neighbour branch reads as each neighbour's distance: raw (the PCA distance, ~10
    # next to log counts of ~1, and not comparable between datasets) or relative (divided by
    # the mean distance of the cell's present neighbours, ~1)
    neighbour_distance: str = "raw"
    pooled_readout: bool = True  # the cell tokens start from the normalised mean of the gene states
    # how that mean weighs the genes: attention (a learned score per gene state, softmax over
    # the cell's genes; uniform at initialisation) or uniform. Attention lets the readout
    # discount genes that never told the training cells apart, such as an interferon programme
    # absent from training (docs/benchmarks/quality.md: CTRL -> STIM head 0.833 -> 0.881)
    pooled_weights: str = "attention"
    # softmax (cross-entropy over a class's leaf labels) or bce (the reference's per-label
    # binary cross-entropy)
    classification: str = "softmax"
    w_zinb: float = 1.0  # weight of the ZINB expression loss
    w_mse: float = 0.0  # weight of an optional MSE between log2(1 + mean) and log2(1 + counts)
    w_classification: float = 6.0  # weight of the cell-label classification loss
    w_contrastive: float = 1.0  # weight of the contrastive loss (when a batch has two views)
    temperature: float = 0.1  # temperature of the contrastive loss

    def __post_init__(self):
        if self.attention not in ("criss_cross", "full"):
            raise ValueError(f"ModelConfig.attention: {self.attention!r} not in criss_cross, full")
        if self.kernels not in ("auto", "reference"):
            raise ValueError(f"ModelConfig.kernels: {self.kernels!r} not in auto, reference")
        if self.classification not in ("softmax", "bce"):
            raise ValueError(f"ModelConfig.classification: {self.classification!r} not in "
                             "softmax, bce")
        if self.pooled_weights not in ("uniform", "attention"):
            raise ValueError(f"ModelConfig.pooled_weights: {self.pooled_weights!r} not in "
                             "uniform, attention")
        if self.neighbour_distance not in ("raw", "relative"):
            raise ValueError(f"ModelConfig.neighbour_distance: {self.neighbour_distance!r} not "
                             "in raw, relative")
        if self.mean_scale not in ("context", "library"):
            raise ValueError(f"ModelConfig.mean_scale: {self.mean_scale!r} not in context, library")
        if self.d_model % self.n_heads:
            raise ValueError(f"ModelConfig: d_model {self.d_model} not divisible by n_heads")

    @classmethod
    def preset(cls, name: str, **overrides) -> ModelConfig:
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})

    def to_dict(self) -> dict:
        return asdict(self)


# Model settings added after runs and model files had been saved, at the value those had: a
# saved configuration without one of them meant this.
SETTINGS_BEFORE_THEY_EXISTED = {"pooled_weights": "uniform"}


def saved_model_settings(saved: dict) -> dict:
    """A saved model configuration (a run's config.json, an exported file) as ModelConfig
    keywords, the settings it predates at the value it had."""
    return {**SETTINGS_BEFORE_THEY_EXISTED, **saved}


# Sizes of scPRINT-2 for small/medium/large; tiny trains on 2 CPU ranks in about a minute.
# Parameter counts depend on the vocabulary: a learned gene table adds n_genes x d_model. Without
# it: small ~10M, medium ~65M, large ~675M; small with a 60k-gene table ~25M (count_for_vocab).
PRESETS = {
    "tiny": dict(d_model=64, n_layers=2, n_heads=2, n_latents=16, latent_dim=32, cell_layers=1),
    "small": dict(d_model=256, n_layers=8, n_heads=4),
    "medium": dict(d_model=512, n_layers=16, n_heads=8),
    "large": dict(d_model=1280, n_layers=30, n_heads=20),
}


def _split_heads(t: torch.Tensor, n_heads: int) -> tuple[torch.Tensor, ...]:
    """[B, N, 3 * H * D] -> three [B, H, N, D] views."""
    b, n, _ = t.shape
    return t.view(b, n, 3, n_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)


def _merge_heads(t: torch.Tensor) -> torch.Tensor:
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


class Mlp(nn.Sequential):
    def __init__(self, d: int, ratio: int, dropout: float):
        super().__init__(nn.Linear(d, ratio * d), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(ratio * d, d))


def full_attention(q, k, v, mask: torch.Tensor) -> torch.Tensor:
    """Dense attention over genes ([B, H, N, D]); keys at padding (mask False) are ignored.

    SDPA with a boolean key mask (on CUDA its memory-efficient kernel). Unpadding for
    flash-attn's variable-length kernel would need the real positions on the host (a
    ``nonzero()`` and a max length, two device syncs per layer), so the forward stays sync-free
    and flash-attn is only the benchmarks' dense baseline.
    """
    keep = mask | ~mask.any(1, keepdim=True)  # a row without genes attends everywhere: no NaN
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :])


class CrissCrossBlock(nn.Module):
    """Genes read latents and latents read genes, from the same layer input (pre-norm).

    Genes: residual attention + residual MLP. Latents: residual ``Z + Wo_z Z_mix``, no MLP. The
    last block has no latent update (``last=True``): nothing would read it.
    """

    def __init__(self, cfg: ModelConfig, attend, last: bool = False):
        super().__init__()
        d, s = cfg.d_model, cfg.latent_dim
        self.n_heads, self.attend = cfg.n_heads, attend
        self.norm_x, self.norm_z = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(s, eps=LN_EPS)
        self.qkv_x, self.qkv_z = nn.Linear(d, 3 * d), nn.Linear(s, 3 * d)
        self.out_x = nn.Linear(d, d)
        self.out_z = None if last else nn.Linear(d, s)
        self.norm_mlp = nn.LayerNorm(d, eps=LN_EPS)
        self.mlp = Mlp(d, cfg.mlp_ratio, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, z, mask):
        b = x.shape[0]
        q_x, k_x, v_x = _split_heads(self.qkv_x(self.norm_x(x)), self.n_heads)
        if z.stride(0) == 0:  # latents still shared by the batch: project once, pass stride 0
            qkv_z = _split_heads(self.qkv_z(self.norm_z(z[:1])), self.n_heads)
            q_z, k_z, v_z = (t.expand(b, -1, -1, -1) for t in qkv_z)
        else:
            q_z, k_z, v_z = _split_heads(self.qkv_z(self.norm_z(z)), self.n_heads)
        mix_x, mix_z = self.attend(q_x, k_x, v_x, q_z, k_z, v_z, mask)
        x = x + self.drop(self.out_x(_merge_heads(mix_x)))
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        if self.out_z is not None:
            z = z + self.drop(self.out_z(_merge_heads(mix_z)))
        return x, z


class FullBlock(nn.Module):
    """Pre-norm transformer block with dense self-attention over the gene positions."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.norm_attn, self.norm_mlp = nn.LayerNorm(d, eps=LN_EPS), nn.LayerNorm(d, eps=LN_EPS)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = Mlp(d, cfg.mlp_ratio, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x, z, mask):
        q, k, v = _split_heads(self.qkv(self.norm_attn(x)), self.n_heads)
        x = x + self.drop(self.out(_merge_heads(full_attention(q, k, v, mask))))
        x = x + self.drop(self.mlp(self.norm_mlp(x)))
        return x, z


class CellBlock(nn.Module):
    """Cell tokens: self-attention among themselves, cross-attention to real genes, MLP."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.norm_self, self.norm_cross, self.norm_mlp = (
            nn.LayerNorm(d, eps=LN_EPS) for _ in range(3))
        self.qkv, self.out_self = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.q, self.kv, self.out_cross = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)
        self.mlp = Mlp(d, cfg.mlp_ratio, cfg.dropout)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, c, genes, mask):
        q, k, v = _split_heads(self.qkv(self.norm_self(c)), self.n_heads)
        c = c + self.drop(self.out_self(_merge_heads(F.scaled_dot_product_attention(q, k, v))))
        b, n, d = genes.shape
        h = self.n_heads
        q = self.q(self.norm_cross(c)).view(b, -1, h, d // h).transpose(1, 2)
        k, v = self.kv(genes).view(b, n, 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
        keep = (mask | ~mask.any(1, keepdim=True))[:, None, None, :]
        mix = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        c = c + self.drop(self.out_cross(_merge_heads(mix)))
        return c + self.drop(self.mlp(self.norm_mlp(c)))


class GeneEmbedding(nn.Module):
    """Learned table (id 0 = padding) or frozen precomputed vectors + trainable 2-layer adapter."""

    def __init__(self, cfg: ModelConfig, n_genes: int):
        super().__init__()
        d = cfg.d_model
        if cfg.gene_embedding_file is None:
            self.table = nn.Embedding(n_genes, d, padding_idx=0)
            self.adapter = None
            return
        path = cfg.gene_embedding_file
        try:
            vectors = np.load(path, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise ValueError(f"{path}: cannot read gene embeddings ({err})") from err
        if vectors.ndim != 2 or vectors.shape[0] != n_genes:
            raise ValueError(f"{path}: gene embeddings must be [n_genes={n_genes}, E], "
                             f"got shape {vectors.shape}")
        # Frozen and not saved with checkpoints: the file is part of the run configuration.
        self.register_buffer("vectors", torch.tensor(np.asarray(vectors, dtype=np.float32)),
                             persistent=False)
        self.table = None
        e = vectors.shape[1]
        self.adapter = nn.Sequential(nn.Linear(e, d), nn.GELU(), nn.Linear(d, d))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.table is not None:
            return self.table(ids)
        return self.adapter(self.vectors[ids])


class ScPrintModel(nn.Module):
    """See the module docstring; ``forward(batch)`` takes the training batch of pretrain.data."""

    def __init__(self, cfg: ModelConfig, n_genes: int, n_labels: dict[str, int],
                 label_hierarchy: dict | None = None):
        super().__init__()
        unknown = set(n_labels) - set(CLASSES)
        if unknown:
            raise ValueError(f"n_labels: unknown classes {sorted(unknown)}; expected {CLASSES}")
        unknown = set(label_hierarchy or {}) - set(n_labels)
        if unknown:
            raise ValueError(f"label hierarchy: classes {sorted(unknown)} have no labels")
        self.cfg, self.n_genes = cfg, n_genes
        d = cfg.d_model
        reference = cfg.kernels == "reference"
        self.gene_embedding = GeneEmbedding(cfg, n_genes)
        self.expression = nn.Sequential(nn.Linear(1, d), nn.GELU(), nn.Linear(d, d))
        deepset = DeepSetEncoderReference if reference else DeepSetEncoder
        self.neighbours = deepset(d, cfg.neighbour_dropout)
        # One norm per gene-token component (identity, expression, neighbours): see encode().
        self.token_norms = nn.ModuleList(
            nn.LayerNorm(d, eps=LN_EPS) for _ in range(3)) if cfg.token_norm else None
        if cfg.attention == "criss_cross":
            attend = reference_criss_cross_attention if reference else criss_cross_attention
            self.latents = nn.Parameter(torch.empty(cfg.n_latents, cfg.latent_dim))
            self.blocks = nn.ModuleList(CrissCrossBlock(cfg, attend, last=i == cfg.n_layers - 1)
                                        for i in range(cfg.n_layers))
        else:
            self.latents = None
            self.blocks = nn.ModuleList(FullBlock(cfg) for _ in range(cfg.n_layers))
        self.norm_genes = nn.LayerNorm(d, eps=LN_EPS)
        self.norm_pooled = nn.LayerNorm(d, eps=LN_EPS) if cfg.pooled_readout else None
        self.pool_score = (nn.Linear(d, 1) if cfg.pooled_readout
                           and cfg.pooled_weights == "attention" else None)
        self.cell_tokens = nn.Parameter(torch.empty(N_CELL_TOKENS, d))
        self.cell_blocks = nn.ModuleList(CellBlock(cfg) for _ in range(cfg.cell_layers))
        self.norm_cells = nn.LayerNorm(d, eps=LN_EPS)
        # The decoder reads each gene state plus the general cell embedding, so reconstruction
        # also trains the cell tokens (and the 100%-zeroed pass can decode from the cell state).
        self.decoder_cell = nn.Linear(d, d)
        self.decoder = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, 3))
        self.class_index = {c: i for i, c in enumerate(CLASSES) if n_labels.get(c, 0) > 0}
        self.heads = nn.ModuleDict({c: nn.Linear(d, n_labels[c]) for c in self.class_index})
        # InfoNCE compares projections of the general cell token, not the token itself (as in
        # SimCLR): instance discrimination pushes apart cells of the same type, and behind a
        # projection that push stays out of the embedding users get.
        self.contrastive_projection = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
        # Bool [n, n] leaves-under-parent matrices, only for classes that have a hierarchy.
        self.hierarchy = sorted(label_hierarchy or {})
        for c in self.hierarchy:
            children = hierarchy_children(label_hierarchy[c], n_labels[c])
            self.register_buffer(f"children_{c}", children, persistent=False)
        self.apply(self._init)
        nn.init.normal_(self.cell_tokens, std=INIT_STD)
        if self.token_norms is not None:
            nn.init.constant_(self.token_norms[2].weight, cfg.neighbour_scale_init)
        if self.latents is not None:
            nn.init.normal_(self.latents, std=INIT_STD)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=INIT_STD)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=INIT_STD)
            if m.padding_idx is not None:
                m.weight.data[m.padding_idx].zero_()

    def _children(self, c: str) -> torch.Tensor | None:
        return getattr(self, f"children_{c}") if c in self.hierarchy else None

    def encode(self, gene_ids, input_counts, nbr_counts, nbr_dist, nbr_mask, gene_mask):
        """Gene states after the trunk ([B, L, d], final-normed) and cell tokens ([B, 10, d]).

        Why the gene token normalises its parts: summed raw, the DeepSet output (whose neighbour
        branch sees raw PCA distances of ~10 next to log counts of ~1) is ~6x the gene
        embedding from the first step, over 90% of it the same vector at every gene of a cell,
        and it grows; the model fitted that per-cell nuisance instead of which genes a cell
        expresses (benchmarks/bench_learning.py prints both sizes).
        Why the cell tokens start from the pooled genes: at initialisation their cross-attention
        is a mean over ~1,000 genes added to a token shared by all cells, so the heads saw
        nearly the same vector for every cell and learned the class frequencies only.
        """
        # Float inputs follow the parameters' dtype (a bf16-cast model gets bf16 values).
        dtype = self.cell_tokens.dtype
        x_self = torch.log2(1 + input_counts.float()).to(dtype)
        if self.cfg.neighbour_distance == "relative":
            present = nbr_mask.bool()
            dist = torch.where(present, nbr_dist.float(), 0.0)
            mean = dist.sum(1, keepdim=True) / present.sum(1, keepdim=True).clamp(min=1)
            nbr_dist = torch.where(present, dist / mean.clamp(min=1e-6), 0.0)
        parts = (self.gene_embedding(gene_ids), self.expression(x_self.unsqueeze(-1)),
                 self.neighbours(x_self, torch.log2(1 + nbr_counts.float()).to(dtype),
                                 nbr_dist.to(dtype), nbr_mask))
        if self.token_norms is not None:
            parts = tuple(norm(part) for norm, part in zip(self.token_norms, parts))
        x = parts[0] + parts[1] + parts[2]
        b = x.shape[0]
        z = None if self.latents is None else self.latents.unsqueeze(0).expand(b, -1, -1)
        for block in self.blocks:
            if self.cfg.checkpointing and self.training:
                x, z = checkpoint(block, x, z, gene_mask, use_reentrant=False)
            else:
                x, z = block(x, z, gene_mask)
        genes = self.norm_genes(x)
        cells = self.cell_tokens.unsqueeze(0).expand(b, -1, -1)
        if self.norm_pooled is not None:
            # uniform weights are the softmax of a zero score; a row without genes pools to 0
            score = (genes.new_zeros(genes.shape[:2], dtype=torch.float32)
                     if self.pool_score is None else self.pool_score(genes).squeeze(-1).float())
            weight = torch.softmax(score.masked_fill(~gene_mask, float("-inf")), dim=1)
            pooled = (genes * torch.nan_to_num(weight).to(genes.dtype).unsqueeze(-1)).sum(1)
            cells = cells + self.norm_pooled(pooled).unsqueeze(1)
        for block in self.cell_blocks:
            cells = block(cells, genes, gene_mask)
        return genes, self.norm_cells(cells)

    def forward(self, batch: dict) -> dict:
        """Training batch (pretrain.data contract) -> loss, loss terms and outputs.

        With ``input_counts_2`` both views run as one 2B batch: ZINB and classification average
        over both, InfoNCE pairs them; ``cell_emb``, ``pred_mean`` and ``class_logits`` are view
        1's. ``losses`` holds "zinb", "classification" (mean of the "cls_<class>" terms over the
        classes labelled in the batch), and "mse" / "contrastive" when active; "loss" is their
        weighted sum. ``zeroed`` cells need no special path (their input is already zero) and
        ``weight`` is not applied (the sampler already drew cells with those probabilities).
        """
        mask = batch["gene_mask"]
        counts = batch["counts"].float()
        views = [batch["input_counts"]]
        if "input_counts_2" in batch:
            views.append(batch["input_counts_2"])
        n_views = len(views)
        rep = lambda t: t if n_views == 1 else t.repeat(n_views, *([1] * (t.dim() - 1)))
        genes, cells = self.encode(rep(batch["gene_ids"]), torch.cat(views),
                                   rep(batch["nbr_counts"]), rep(batch["nbr_dist"]),
                                   rep(batch["nbr_mask"]), rep(mask))
        mask_v, counts_v = rep(mask), rep(counts)

        # ZINB decoder: mean = softmax over the cell's context genes x scale.
        raw = self.decoder(genes + self.decoder_cell(cells[:, :1])).float()
        if self.cfg.mean_scale == "context":
            scale = (counts_v * mask_v).sum(1, keepdim=True)
        else:
            scale = rep(batch["total_count"].float()).unsqueeze(1)
        share = torch.softmax(raw[..., 0].masked_fill(~mask_v, float("-inf")), dim=1)
        share = torch.nan_to_num(share)  # a row without genes predicts zeros, not NaN
        mean = share * scale
        theta = torch.exp(raw[..., 1].clamp(-15.0, 15.0))
        n_real = mask_v.sum().clamp(min=1)
        nll = zinb_nll(counts_v, mean, theta, raw[..., 2])
        losses = {"zinb": (nll * mask_v).sum() / n_real}
        if self.cfg.w_mse > 0:
            err = (torch.log2(1 + mean) - torch.log2(1 + counts_v)) ** 2
            losses["mse"] = (err * mask_v).sum() / n_real

        b = len(counts)
        class_logits, class_losses = {}, []
        labels = rep(batch["labels"])
        for c, i in self.class_index.items():
            logits, children = self.heads[c](cells[:, 1 + i]).float(), self._children(c)
            loss = (softmax_classification_loss if self.cfg.classification == "softmax"
                    else classification_loss)
            class_losses.append(loss(logits, labels[:, i], children))
            losses[f"cls_{c}"] = class_losses[-1]
            class_logits[c] = logits[:b] if children is None else parent_logits(logits[:b],
                                                                                children)
        if class_losses:
            # Mean over the classes that have at least one labelled cell in the batch.
            has = torch.stack([(labels[:, i] >= 0).any() for i in self.class_index.values()])
            losses["classification"] = torch.stack(class_losses).sum() / has.sum().clamp(min=1)

        if n_views == 2:
            z = self.contrastive_projection(cells[:, 0])
            losses["contrastive"] = info_nce(z[:b], z[b:], self.cfg.temperature)
        weights = {"zinb": self.cfg.w_zinb, "mse": self.cfg.w_mse,
                   "classification": self.cfg.w_classification,
                   "contrastive": self.cfg.w_contrastive}
        total = sum(weights[k] * v for k, v in losses.items() if k in weights)
        return {"loss": total, "losses": losses, "cell_emb": cells[:b, 0],
                "pred_mean": mean[:b], "class_logits": class_logits}

    @torch.no_grad()
    def predict(self, batch: dict) -> dict:
        """Inference on an uncorrupted batch (``input_counts`` = the cell's counts): the general
        cell embedding ``cell_emb`` [B, d] and, per supervised class, ``class_probs`` [B, n]:
        the probability of each leaf label (parent labels of a hierarchy get 0), a softmax
        over the leaves, or each label's own sigmoid under the "bce" objective."""
        _, cells = self.encode(batch["gene_ids"], batch["input_counts"], batch["nbr_counts"],
                               batch["nbr_dist"], batch["nbr_mask"], batch["gene_mask"])
        probs = {}
        for c, i in self.class_index.items():
            logits, children = self.heads[c](cells[:, 1 + i]).float(), self._children(c)
            if children is not None:
                logits = logits.masked_fill(children.any(1), float("-inf"))
            probs[c] = (torch.softmax(logits, -1) if self.cfg.classification == "softmax"
                        else torch.sigmoid(logits))
        return {"cell_emb": cells[:, 0].float(), "class_probs": probs}

    def num_parameters(self, trainable_only: bool = False, exclude_gene_table: bool = False) -> int:
        """Parameter count; ``exclude_gene_table`` drops the learned gene table (vocab-sized)."""
        skip = {id(self.gene_embedding.table.weight)} if (
            exclude_gene_table and self.gene_embedding.table is not None) else set()
        return sum(p.numel() for p in self.parameters()
                   if id(p) not in skip and (p.requires_grad or not trainable_only))

    def flops_per_cell(self, context: int, n_neighbours: int = MAX_NEIGHBOURS,
                       training: bool = False) -> float:
        """Matmul FLOPs (2 per multiply-add) of one forward pass of one cell-view at ``context``
        genes; ``training`` counts forward + backward as 3x forward. Norms, softmaxes and other
        elementwise work are left out. The DeepSet neighbour branch is counted in its fused form
        (its output Linear applied once to the sum over neighbours). A two-view batch costs two
        cell-views per cell (plus the contrastive projection, 4 d^2 per cell-view, left out)."""
        cfg, n = self.cfg, context
        d, s, m, t = cfg.d_model, cfg.latent_dim, cfg.n_latents, N_CELL_TOKENS
        r = cfg.mlp_ratio
        f = 0.0
        if self.gene_embedding.adapter is not None:
            f += 2 * n * (self.gene_embedding.vectors.shape[1] * d + d * d)
        f += 2 * n * (d + d * d)  # expression encoding
        f += 2 * n * (d + d * d)  # DeepSet self branch
        f += 2 * n * (n_neighbours * 2 * d + d * d)  # DeepSet neighbour branch
        f += 2 * n * 2 * d * d  # DeepSet output projection
        mlp = 2 * 2 * n * d * r * d
        for layer in range(cfg.n_layers):
            if cfg.attention == "criss_cross":
                # projections (genes; latents except at layer 0, where they are shared by the
                # batch), 4*N*M*d per direction, outputs (no latent one in the last layer), MLP
                f += 2 * n * d * 3 * d + (layer > 0) * 2 * m * s * 3 * d + 8 * n * m * d
                f += 2 * n * d * d + (layer < cfg.n_layers - 1) * 2 * m * d * s + mlp
            else:
                f += 2 * n * d * 3 * d + 4 * n * n * d + 2 * n * d * d + mlp
        if self.pool_score is not None:
            f += 2 * n * d  # score of each gene state for the pooled readout
        for _ in range(cfg.cell_layers):
            f += 2 * t * d * 3 * d + 4 * t * t * d + 2 * t * d * d  # self-attention
            f += 2 * t * d * d + 2 * n * d * 2 * d + 4 * t * n * d + 2 * t * d * d  # cross
            f += 2 * 2 * t * d * r * d  # MLP
        f += 2 * d * d + 2 * n * (d * d + 3 * d)  # ZINB decoder (cell projection once)
        f += sum(2 * d * head.out_features for head in self.heads.values())
        return 3 * f if training else f


def count_for_vocab(name: str, n_genes: int, n_labels: dict[str, int] | None = None) -> dict:
    """Parameter counts of a preset for a vocabulary size, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = ScPrintModel(ModelConfig.preset(name), n_genes, n_labels or {})
    return {"total": model.num_parameters(),
            "without_gene_table": model.num_parameters(exclude_gene_table=True)}

