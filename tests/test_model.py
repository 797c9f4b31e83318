"""The model on tiny shapes: outputs, masking, learning, presets and the FLOP count.

Most tests use ``kernels="reference"`` (the kernels have their own tests; under the Triton
interpreter the fused path is slow); one test checks that the fused path agrees with it.
"""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from data_prep.shard_format import CLASSES, MAX_NEIGHBOURS
from pretrain.model import ModelConfig, ScPrintModel, count_for_vocab

N_GENES = 60
N_LABELS = {c: 4 for c in CLASSES}


def make_batch(b=4, length=20, views=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, N_GENES, (b, length), generator=g)
    mask = torch.ones(b, length, dtype=torch.bool)
    mask[0, length - 6 :] = False
    mask[b - 1, length - 3 :] = False
    ids[~mask] = 0
    counts = torch.poisson(torch.full((b, length), 4.0), generator=g) * mask
    drop = lambda: counts * (torch.rand(b, length, generator=g) > 0.3)
    batch = {
        "gene_ids": ids,
        "gene_mask": mask,
        "expressed": counts > 0,
        "counts": counts,
        "input_counts": drop(),
        "zeroed": torch.zeros(b, dtype=torch.bool),
        "nbr_counts": torch.poisson(torch.full((b, MAX_NEIGHBOURS, length), 3.0), generator=g),
        "nbr_dist": torch.rand(b, MAX_NEIGHBOURS, generator=g),
        "nbr_mask": torch.rand(b, MAX_NEIGHBOURS, generator=g) > 0.3,
        "total_count": counts.sum(1) + 50,
        "labels": torch.randint(-1, 4, (b, len(CLASSES)), generator=g),
        "organism": torch.full((b,), 9606),
        "dataset": torch.zeros(b, dtype=torch.long),
        "group": torch.zeros(b, dtype=torch.long),
        "weight": torch.ones(b),
        "sample_id": torch.arange(b),
    }
    batch["nbr_dist"][~batch["nbr_mask"]] = float("inf")  # missing neighbours, as stored
    if views == 2:
        batch["input_counts_2"] = drop()
    return batch


def tiny(**overrides):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", kernels="reference", dropout=0.0, **overrides)
    return ScPrintModel(cfg, N_GENES, N_LABELS)


@pytest.mark.parametrize("attention", ["criss_cross", "full"])
def test_forward_shapes_and_finite_outputs(attention):
    model = tiny(attention=attention, w_mse=1.0)
    batch = make_batch()
    out = model(batch)
    b, length = batch["gene_ids"].shape
    assert out["cell_emb"].shape == (b, model.cfg.d_model)
    assert out["pred_mean"].shape == (b, length)
    assert set(out["class_logits"]) == set(CLASSES)
    assert all(v.shape == (b, 4) for v in out["class_logits"].values())
    assert {"zinb", "mse", "classification", "contrastive"} <= set(out["losses"])
    assert out["loss"].dim() == 0 and torch.isfinite(out["loss"])
    assert all(torch.isfinite(v) for v in out["losses"].values())
    # The predicted means are zero at padding and sum to the context's total count per cell.
    assert torch.equal(out["pred_mean"][~batch["gene_mask"]], torch.zeros(9))
    torch.testing.assert_close(out["pred_mean"].sum(1), batch["counts"].sum(1))
    out["loss"].backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    total = (model.cfg.w_zinb * out["losses"]["zinb"] + out["losses"]["mse"]
             + 6 * out["losses"]["classification"] + out["losses"]["contrastive"])
    torch.testing.assert_close(out["loss"], total)
    assert "contrastive" not in model(make_batch(views=1))["losses"]


def test_fused_kernel_path_matches_reference():
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", dropout=0.0)
    fused = ScPrintModel(cfg, N_GENES, N_LABELS).eval()
    reference = ScPrintModel(ModelConfig.preset("tiny", dropout=0.0, kernels="reference"),
                             N_GENES, N_LABELS).eval()
    reference.load_state_dict(fused.state_dict())
    batch = make_batch(b=2, length=12, views=1)
    a, b = fused(batch), reference(batch)
    torch.testing.assert_close(a["cell_emb"], b["cell_emb"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a["loss"], b["loss"], rtol=1e-4, atol=1e-5)
    a["loss"].backward()
    b["loss"].backward()
    for (name, p), q in zip(fused.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-5, msg=name)


@pytest.mark.parametrize("attention", ["criss_cross", "full"])
def test_padding_does_not_change_real_positions(attention):
    model = tiny(attention=attention).eval()
    batch = make_batch()
    other = {k: v.clone() for k, v in batch.items()}
    pad = ~batch["gene_mask"]
    other["gene_ids"][pad] = torch.randint(1, N_GENES, (int(pad.sum()),))
    other["input_counts"][pad] = 7.0
    other["input_counts_2"][pad] = 3.0
    other["nbr_counts"][pad.unsqueeze(1).expand_as(other["nbr_counts"])] = 11.0
    with torch.no_grad():
        a, b = model(batch), model(other)
    real = batch["gene_mask"]
    torch.testing.assert_close(a["pred_mean"][real], b["pred_mean"][real])
    torch.testing.assert_close(a["cell_emb"], b["cell_emb"])
    torch.testing.assert_close(a["loss"], b["loss"])
    for c in CLASSES:
        torch.testing.assert_close(a["class_logits"][c], b["class_logits"][c])


def test_unknown_labels_give_zero_classification_gradient():
    model = tiny().eval()
    batch = make_batch(views=1)
    batch["labels"][0] = -1
    batch["labels"][1:] = 1
    counts = batch["input_counts"].clone().requires_grad_()
    batch["input_counts"] = counts
    model(batch)["losses"]["classification"].backward()
    assert torch.equal(counts.grad[0], torch.zeros_like(counts.grad[0]))
    assert counts.grad[1].abs().sum() > 0


def test_overfits_one_batch():
    model = tiny()
    batch = make_batch(b=4, length=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    history = []
    for _ in range(50):
        out = model(batch)
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        history.append({"total": out["loss"].item()}
                       | {k: v.item() for k, v in out["losses"].items()})
    first, last = history[0], history[-1]
    assert last["total"] < 0.55 * first["total"], history[::10]
    for term in ("zinb", "classification", "contrastive"):
        assert last[term] < 0.8 * first[term], (term, history[::10])


def test_checkpointing_gives_identical_loss_and_gradients():
    batch = make_batch()
    results = []
    for flag in (False, True):
        model = tiny(checkpointing=flag).train()
        out = model(batch)
        out["loss"].backward()
        results.append((out["loss"].detach(), [p.grad.clone() for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for g0, g1 in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g0, g1)


def test_precomputed_gene_embeddings_are_frozen_behind_an_adapter(tmp_path):
    path = tmp_path / "genes.npy"
    np.save(path, np.random.default_rng(0).normal(size=(N_GENES, 12)).astype(np.float32))
    model = tiny(gene_embedding_file=str(path))
    assert model.gene_embedding.table is None
    assert "gene_embedding.vectors" not in model.state_dict()
    adapter = 12 * 64 + 64 + 64 * 64 + 64
    assert model.num_parameters() == tiny().num_parameters() - N_GENES * 64 + adapter
    out = model(make_batch())
    out["loss"].backward()
    assert model.gene_embedding.adapter[0].weight.grad.abs().sum() > 0
    np.save(path, np.zeros((N_GENES + 1, 12), dtype=np.float32))
    with pytest.raises(ValueError, match="genes.npy"):
        tiny(gene_embedding_file=str(path))


def test_label_hierarchy_parent_logits():
    torch.manual_seed(0)
    model = ScPrintModel(ModelConfig.preset("tiny", kernels="reference"), N_GENES, N_LABELS,
                         label_hierarchy={"cell_type": {"3": [0, 1]}})
    batch = make_batch(views=1)
    batch["labels"][:, 0] = torch.tensor([3, 0, 2, -1])
    out = model.eval()(batch)
    logits = out["class_logits"]["cell_type"]
    head = model.heads["cell_type"]
    assert torch.isfinite(out["loss"])
    torch.testing.assert_close(logits[:, 3], torch.logsumexp(logits[:, :2], 1))
    assert head.out_features == 4
    with pytest.raises(ValueError, match="have no labels"):
        ScPrintModel(model.cfg, N_GENES, {"sex": 2}, label_hierarchy={"cell_type": {1: [0]}})


def test_presets_sizes():
    n_labels = {c: 20 for c in CLASSES}
    small = count_for_vocab("small", 60_000, n_labels)
    medium = count_for_vocab("medium", 60_000, n_labels)
    large = count_for_vocab("large", 60_000, n_labels)
    # small ~20M with a 60k-gene learned table (the table is 60k x 256 = 15.4M of it)
    assert small["total"] - small["without_gene_table"] == 60_000 * 256
    assert 15e6 < small["total"] < 30e6
    assert 55e6 < medium["without_gene_table"] < 75e6
    assert 600e6 < large["without_gene_table"] < 720e6
    assert ModelConfig.preset("large").d_model == 1280
    assert tiny().num_parameters() < 300_000
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")


def test_flops_per_cell_matches_counted_matmuls():
    """Linear-layer FLOPs measured by torch's counter + the attention terms = our count."""
    for attention in ("criss_cross", "full"):
        model = tiny(attention=attention)
        cfg, d, t = model.cfg, model.cfg.d_model, 10
        b, length = 4, 20
        batch = make_batch(b=b, length=length, views=1)
        with FlopCounterMode(display=False) as counter:
            model(batch)
        counted = counter.get_flop_counts()["Global"]
        # Only the Linear layers are counted (SDPA is not, on the CPU).
        assert set(map(str, counted)) <= {"aten.addmm", "aten.mm"}
        linear = sum(counted.values()) / b
        # The reference DeepSet applies its last neighbour Linear per neighbour, not to the sum.
        linear -= (MAX_NEIGHBOURS - 1) * 2 * length * d * d
        cell_attention = cfg.cell_layers * (4 * t * t * d + 4 * t * length * d)
        if attention == "criss_cross":
            attention_flops = cfg.n_layers * 8 * length * cfg.n_latents * d
            linear -= 2 * cfg.n_latents * cfg.latent_dim * 3 * d / b  # shared layer-0 latents
        else:
            attention_flops = cfg.n_layers * 4 * length * length * d
        expected = model.flops_per_cell(length)
        assert linear + attention_flops + cell_attention == pytest.approx(expected, rel=1e-9)
        assert model.flops_per_cell(length, training=True) == 3 * expected
    cc, full = tiny(), tiny(attention="full")
    # Criss-cross is linear in the context, full attention quadratic.
    steps = [cc.flops_per_cell(n) for n in (1000, 2000, 3000)]
    assert steps[2] - steps[1] == pytest.approx(steps[1] - steps[0])
    assert full.flops_per_cell(3000) - full.flops_per_cell(2000) > (
        full.flops_per_cell(2000) - full.flops_per_cell(1000)) * 1.1


def test_predict_gives_label_probabilities():
    """Softmax over the leaf labels (parents 0); the reference's BCE gives per-label sigmoids."""
    torch.manual_seed(0)
    model = ScPrintModel(ModelConfig.preset("tiny", kernels="reference"), N_GENES, N_LABELS,
                         label_hierarchy={"cell_type": {"3": [0, 1]}}).eval()
    batch = make_batch(views=1)
    out = model.predict(batch)
    assert out["cell_emb"].shape == (4, model.cfg.d_model)
    probs = out["class_probs"]
    assert set(probs) == set(CLASSES)
    torch.testing.assert_close(probs["sex"].sum(1), torch.ones(4))
    assert torch.equal(probs["cell_type"][:, 3], torch.zeros(4))
    torch.testing.assert_close(probs["cell_type"].sum(1), torch.ones(4))
    bce = tiny(classification="bce").eval().predict(batch)["class_probs"]["sex"]
    assert ((bce > 0) & (bce < 1)).all() and not torch.allclose(bce.sum(1), torch.ones(4))


def test_neighbour_part_of_the_gene_token_starts_switched_off():
    """With neighbour_scale_init = 0 the neighbours change nothing at initialisation (they are
    learned in as they help); at 1, or with the reference's raw token sum, they do."""
    batch = make_batch(views=1)
    other = dict(batch, nbr_counts=batch["nbr_counts"] * 3 + 1)
    for overrides, changes in [({}, False), ({"neighbour_scale_init": 1.0}, True),
                               ({"token_norm": False}, True)]:
        model = tiny(**overrides).eval()
        a, b = model.predict(batch)["cell_emb"], model.predict(other)["cell_emb"]
        assert (not torch.equal(a, b)) is changes, overrides
    with pytest.raises(ValueError, match="classification"):
        tiny(classification="ce")


def test_relative_neighbour_distances_do_not_depend_on_the_datasets_scale():
    """With neighbour_distance = relative the neighbour branch reads each distance over the mean
    of the cell's present neighbours: scaling a cell's distances (another dataset's PCA) or
    changing those of absent neighbours changes nothing; raw distances change the output."""
    batch = make_batch(views=1)
    scale = torch.tensor([7.0, 0.5, 3.0, 20.0])[:, None]
    scaled = dict(batch, nbr_dist=batch["nbr_dist"] * scale)
    absent = dict(batch, nbr_dist=torch.where(batch["nbr_mask"], batch["nbr_dist"], 99.0))
    relative = tiny(neighbour_scale_init=1.0, neighbour_distance="relative").eval()
    raw = tiny(neighbour_scale_init=1.0).eval()
    emb = lambda m, b: m.predict(b)["cell_emb"]
    torch.testing.assert_close(emb(relative, scaled), emb(relative, batch))
    torch.testing.assert_close(emb(relative, absent), emb(relative, batch))
    assert not torch.allclose(emb(raw, scaled), emb(raw, batch))
    with pytest.raises(ValueError, match="neighbour_distance"):
        tiny(neighbour_distance="rank")


def test_attention_pooled_readout_can_discount_genes():
    """The pooled readout's gene weights start uniform (with a zero score it is the uniform
    mean exactly) and are learned from the classification loss, so the readout can weigh
    down genes that never told the training cells apart."""
    batch = make_batch(views=1)
    uniform = tiny(pooled_weights="uniform").eval()
    attention = tiny().eval()
    assert attention.cfg.pooled_weights == "attention"
    attention.load_state_dict(uniform.state_dict(), strict=False)
    torch.nn.init.zeros_(attention.pool_score.weight)
    torch.testing.assert_close(attention.predict(batch)["cell_emb"],
                               uniform.predict(batch)["cell_emb"])
    attention.train()
    attention(batch)["losses"]["classification"].backward()
    assert attention.pool_score.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pooled_weights"):
        tiny(pooled_weights="max")


def test_reference_form_still_trains_a_step():
    """Every design switch back to the reference's form (raw token sum, cross-attention-only
    readout, per-label BCE) is a working model, for ablations."""
    model = tiny(token_norm=False, pooled_readout=False, classification="bce")
    out = model(make_batch())
    out["loss"].backward()
    assert torch.isfinite(out["loss"])
    assert model.gene_embedding.table.weight.grad.abs().sum() > 0


def test_contrastive_term_compares_projections_not_the_embedding():
    """InfoNCE trains a projection of the general cell token; the embedding users get is the
    token itself (SimCLR's arrangement: the push apart of same-type cells stays behind it)."""
    model = tiny()
    batch = make_batch(views=2)
    out = model(batch)
    out["losses"]["contrastive"].backward()
    projection = model.contrastive_projection
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in projection.parameters())
    model.eval()
    torch.testing.assert_close(model(batch)["cell_emb"], model.predict(batch)["cell_emb"])
    assert model.predict(batch)["cell_emb"].shape[1] == model.cfg.d_model
