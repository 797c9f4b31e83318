"""The GPU path's device rules, checked on the CPU.

NCCL reduces only tensors on the rank's GPU: every collective of the trainer and the evaluation
must receive tensors on the device it is given. The collectives are replaced by spies and the
code runs with the "meta" device injected, a device no CPU tensor can pass for; a tensor built on
the CPU by mistake would reach the spy on "cpu" (or fail to combine with the meta tensors).
The forward must not read device values back to the host (a sync per call on a GPU): it runs
under a dispatch mode that records every operator.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from data_prep.shard_format import CLASSES
from pretrain import distributed
from pretrain.evaluate import EvalAccumulator, evaluate
from tests.test_model import N_GENES, N_LABELS, make_batch, tiny

META = torch.device("meta")


class _Stop(Exception):
    """Raised by a spy: the values after a collective cannot be read on the meta device."""


@pytest.fixture
def collectives(monkeypatch):
    """Spies for all_reduce / all_gather in a pretend 2-rank group; returns the devices seen.
    With ``stop`` set, a spy raises _Stop after recording (the caller reads values next)."""
    seen = SimpleNamespace(devices=[], stop=False)
    dist = distributed.dist

    def spy(name):
        def collective(out, *args, **kwargs):
            tensors = list(out) if isinstance(out, list) else [out]
            tensors += [a for a in args if torch.is_tensor(a)]
            seen.devices += [(name, t.device) for t in tensors]
            if seen.stop:
                raise _Stop
        return collective

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_reduce", spy("all_reduce"))
    monkeypatch.setattr(dist, "all_gather", spy("all_gather"))
    return seen


def test_helpers_run_collectives_on_the_given_device(collectives):
    values = torch.arange(4, dtype=torch.float64)  # on the CPU, as host figures are
    total = distributed.sum_across_ranks(values, META)
    gathered = distributed.gather_across_ranks(values, META)
    assert total.device == META and gathered.shape == (2, 4) and gathered.device == META
    assert collectives.devices and all(d == META for _, d in collectives.devices)
    assert {n for n, _ in collectives.devices} == {"all_reduce", "all_gather"}


def test_trainer_log_and_memory_reduce_on_the_engine_device(collectives):
    from pretrain import train

    model = tiny()
    engine = SimpleNamespace(device=META, module=model,
                             optimizer=torch.optim.AdamW(model.parameters()))
    trainer = train.Trainer.__new__(train.Trainer)
    trainer.engine, trainer.device, trainer.world = engine, META, 2
    trainer.loader = SimpleNamespace(stats={"corrupt_shards": 0})
    losses = {"loss/total": torch.tensor(2.0, dtype=torch.float64, device=META),
              "loss/zinb": torch.tensor(1.5, dtype=torch.float64, device=META)}
    counts = {"lr": 1e-3, "cells": 8.0, "tokens": 100.0, "flops": 1e9, "data_wait": 0.1}
    collectives.stop = True
    with pytest.raises(_Stop):
        trainer.log(losses, counts, 0.5)
    with pytest.raises(_Stop):
        train.memory_per_rank(engine)
    assert [n for n, _ in collectives.devices][:1] == ["all_reduce"]
    assert "all_gather" in {n for n, _ in collectives.devices}
    assert all(d == META for _, d in collectives.devices), collectives.devices


def test_evaluation_keeps_every_tensor_on_one_device(collectives):
    """The batch is moved once; model outputs, statistics and the reduction share its device."""
    batch = make_batch(b=4, length=12)
    seen_batches = []

    def forward(b):
        seen_batches.append({k: v.device for k, v in b.items() if torch.is_tensor(v)})
        n, length = b["gene_ids"].shape
        return {"loss": torch.zeros((), device=b["gene_ids"].device),
                "losses": {"zinb": torch.zeros((), device=b["gene_ids"].device)},
                "pred_mean": torch.rand(n, length).to(b["gene_ids"].device),
                "class_logits": {c: torch.zeros(n, 4, device=b["gene_ids"].device)
                                 for c in CLASSES}}

    collectives.stop = True
    with pytest.raises(_Stop):
        evaluate(forward, [batch], N_LABELS, n_batches=2, device=META)
    assert len(seen_batches) == 2
    assert all(d == META for devices in seen_batches for d in devices.values())
    assert collectives.devices and all(d == META for _, d in collectives.devices)


def test_eval_statistics_match_a_direct_computation():
    """The sync-free accumulator (masked sums, scatter-added counts) gives the textbook metrics."""
    batch = make_batch(b=6, length=10, views=1, seed=3)
    batch["labels"][:, 0] = torch.tensor([0, 1, 1, 2, -1, 3])
    logits = torch.zeros(6, 4)
    logits[torch.arange(6), torch.tensor([0, 1, 2, 2, 0, 1])] = 1.0  # 3 of 5 known right
    pred = torch.rand(6, 10) * 5
    assert not batch["gene_mask"].all()
    pred[~batch["gene_mask"]] = float("nan")  # what a row without genes predicts: ignored
    out = {"loss": torch.tensor(3.0), "losses": {}, "pred_mean": pred,
           "class_logits": {"cell_type": logits}}
    acc = EvalAccumulator({"cell_type": 4})
    acc.add(batch, out)
    acc.all_reduce()  # no process group: the sums stay
    m = acc.metrics()
    context = batch["gene_mask"]
    scopes = {"context": context, "input_zero": context & (batch["input_counts"] == 0),
              "dropped": context & ((batch["input_counts"] != batch["counts"])
                                    | batch["zeroed"][:, None])}
    sizes = {n: int(w.sum()) for n, w in scopes.items()}
    assert sizes["context"] > max(sizes["input_zero"], sizes["dropped"]) > 1
    assert not torch.equal(scopes["input_zero"], scopes["dropped"])  # three different sets
    for scope, where in scopes.items():
        x = torch.log2(1 + pred[where]).double()
        y = torch.log2(1 + batch["counts"][where]).double()
        pearson = float(torch.corrcoef(torch.stack([x, y]))[0, 1])
        assert m[f"eval/recon_pearson/{scope}"] == pytest.approx(pearson, rel=1e-9)
    assert m["eval/loss"] == 3.0
    assert m["eval/cell_type_accuracy"] == pytest.approx(3 / 5)
    # F1 = 2 tp / (predicted + true) per label, over the known cells:
    # 0: 2*1/(1+1); 1: 2*1/(2+2) (cell 5 predicted 1); 2: 2*1/(2+1); 3: 0
    assert m["eval/cell_type_macro_f1"] == pytest.approx((1 + 1 / 2 + 2 / 3 + 0) / 4)


# Operators that read a device value back to the host, or whose output size depends on values.
_SYNC_OPS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.nonzero.default,
             torch.ops.aten.masked_select.default, torch.ops.aten.item.default,
             torch.ops.aten.unique_consecutive.default, torch.ops.aten._unique2.default,
             torch.ops.aten.bincount.default, torch.ops.aten.repeat_interleave.Tensor}
_INDEX_OPS = {torch.ops.aten.index.Tensor, torch.ops.aten.index_put.default,
              torch.ops.aten.index_put_.default, torch.ops.aten._index_put_impl_.default}


class _SyncRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.syncs: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.syncs.append(str(func))
        elif func in _INDEX_OPS and any(  # boolean-mask indexing runs a nonzero() inside
                t is not None and torch.is_tensor(t) and t.dtype in (torch.bool, torch.uint8)
                for t in (args[1] if len(args) > 1 else [])):
            self.syncs.append(f"{func} with a boolean mask")
        return func(*args, **kwargs)


def test_sync_recorder_sees_syncs():
    """The recorder itself: it must catch what the forward is checked against."""
    x = torch.arange(5.0)
    with _SyncRecorder() as rec:
        float(x.sum())
        x[x > 2].sum()
        (x > 1).nonzero()
    assert len(rec.syncs) == 3, rec.syncs


@pytest.mark.parametrize("attention,classification", [
    ("criss_cross", "softmax"), ("full", "softmax"), ("criss_cross", "bce")])
def test_forward_and_backward_do_not_sync(attention, classification, monkeypatch):
    """No host sync in the training forward and backward, with two views, a label hierarchy and
    the contrastive term. (On CPU tensors the kernels' PyTorch references run; the Triton path
    only launches kernels from shapes.)"""
    from pretrain.model import ModelConfig, ScPrintModel

    monkeypatch.setenv("TRITON_INTERPRET", "0")
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", attention=attention, classification=classification,
                             dropout=0.1, w_mse=1.0)
    model = ScPrintModel(cfg, N_GENES, N_LABELS, {"cell_type": {"3": [0, 1]}})
    batch = make_batch()
    with _SyncRecorder() as rec:
        out = model(batch)
        out["loss"].backward()
    assert rec.syncs == [], rec.syncs
    assert torch.isfinite(out["loss"])
