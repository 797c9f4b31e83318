"""benchmarks/bench_quality.py's bookkeeping: the per-seed table and the reuse of finished runs
(the science itself is the script's run, docs/benchmarks/quality.md)."""

import importlib.util
import json
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def bq():
    spec = importlib.util.spec_from_file_location("bench_quality",
                                                  REPO / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_quality"] = module  # its dataclasses resolve their module by name
    spec.loader.exec_module(module)
    yield module
    del sys.modules["bench_quality"]


def test_table_gives_mean_sd_and_every_seed_and_keeps_settings_together(bq):
    scores = bq.Scores()
    truth = np.array(["a", "a", "b", "b"])
    scores.add("(a)", "baseline", np.array(["a", "a", "b", "a"]), truth)
    scores.add("(b)", "baseline", np.array(["a", "a", "a", "a"]), truth)
    for pred in (["a", "a", "b", "b"], ["a", "b", "b", "b"]):  # two seeds of a model
        scores.add("(a)", "model", np.array(pred), truth)
    every, zero, dropped = bq.DENOISING_SCOPES
    recon = {"model": {every: [0.5, 0.7], zero: [0.1, 0.1], dropped: [0.2, 0.3]},
             "no denoising": {every: [0.6], zero: [float("nan")], dropped: [0.4]}}
    lines = bq.format_table(scores, recon).splitlines()
    rows = [line for line in lines if line.startswith("| (")]
    assert [r.split(" | ")[0:2] for r in rows] == [["| (a)", "baseline"], ["| (a)", "model"],
                                                   ["| (b)", "baseline"]]
    assert rows[0].split(" | ")[2] == "0.750"  # one run: its value alone
    # two runs, accuracy 1.0 and 0.75: mean, sample sd, then each seed's value
    assert rows[1].split(" | ")[2] == f"0.875 ± {np.std([1.0, 0.75], ddof=1):.3f} (1.000 / 0.750)"
    assert ("| model | 0.600 ± 0.141 (0.500 / 0.700) | 0.100 | 0.250 ± 0.071 (0.200 / 0.300) |"
            in lines)
    assert "| no denoising | 0.600 | – | 0.400 |" in lines  # NaN: constant over the scope


def test_a_finished_run_is_reused_only_by_the_same_command(bq, tmp_path, monkeypatch):
    args = Namespace(ranks=1, model="tiny", steps=5, context=64, batch_size=2, trainer_args="")
    calls = []

    def fake_trainer(cmd, **kw):
        calls.append(cmd)
        return Namespace(returncode=0, stdout="", stderr="")

    monkeypatch.setattr(bq.subprocess, "run", fake_trainer)
    run = tmp_path / "seed3" / "run"
    run.mkdir(parents=True)
    first = bq.train(args, tmp_path / "shards", run, seed=3)
    assert len(calls) == 1 and calls[0][calls[0].index("--seed") + 1] == "3"
    record = json.loads((run / "bench_training.json").read_text())
    assert record == {"command": calls[0], "seconds": first}
    assert bq.train(args, tmp_path / "shards", run, seed=3) == first and len(calls) == 1
    with pytest.raises(SystemExit, match="trained by another command"):
        bq.train(Namespace(**{**vars(args), "steps": 6}), tmp_path / "shards", run, seed=3)
    assert len(calls) == 1


def test_held_out_baselines_on_the_models_genes_see_only_the_genes_it_reads(bq, real_data,
                                                                           tmp_path):
    """(b)'s baselines restricted to the model's genes: the file's columns the model's
    vocabulary holds (here its first 2,000 genes), every cell in the file's order."""
    from pretrain.export import load_model_file

    pbmc, path = _pbmc_and_model(bq, real_data, tmp_path)
    held = bq.held_out_cells(tmp_path / "cells.h5ad", "cell_type")
    scores = bq.Scores()
    model = load_model_file(path)
    bq.held_out_model_gene_baselines(scores, held, model)
    genes = f"the model's 2,000 of {pbmc.n_vars:,} genes"
    averaged = f"{genes}, {bq.AVERAGED}"
    assert list(scores.rows) == [(held.setting, f"{method}, {view}")
                                 for view in (genes, averaged)
                                 for method in ("kNN on PCA-50", "logistic regression")]
    x = bq.log_normalised(pbmc.X[:, :2000])
    truth = held.y[held.keep]
    expected = bq.accuracy_f1(truth, bq._cross_validated(held, bq.logreg_predict, x))
    assert scores.rows[(held.setting, f"logistic regression, {genes}")] == [expected]
    all_genes = bq.accuracy_f1(truth, bq._cross_validated(held, bq.logreg_predict, held.x))
    assert expected != all_genes  # the other 12,053 genes change the fit
    # the averaged rows read the graph pretrain.embed gives the model: 6 neighbours a cell
    nbr_idx, known, _ = bq.model_view(model, held.path)
    assert nbr_idx.shape == (200, 6) and (nbr_idx >= 0).all() and known.sum() == 2000
    smoothed = bq.accuracy_f1(truth, bq._cross_validated(
        held, bq.logreg_predict, bq.neighbour_averaged(x, nbr_idx)))
    assert scores.rows[(held.setting, f"logistic regression, {averaged}")] == [smoothed]
    assert smoothed != expected


def test_neighbour_averaged_takes_the_cell_and_its_present_neighbours(bq):
    """Each row is the mean of the cell's row and its neighbours' rows; -1 (no neighbour)
    leaves the neighbour out of the mean; the input is not changed."""
    x = np.array([[0.0, 3.0], [3.0, 0.0], [6.0, 6.0]], dtype=np.float32)
    nbr_idx = np.array([[1, 2], [0, -1], [-1, -1]])
    before = x.copy()
    np.testing.assert_allclose(bq.neighbour_averaged(x, nbr_idx),
                               [[3.0, 3.0], [1.5, 1.5], [6.0, 6.0]])
    np.testing.assert_array_equal(x, before)


def test_models_are_scored_with_and_without_their_neighbours(bq, real_data, tmp_path):
    """(a) and (b) score every model twice: with the 6 neighbours pretrain.embed gives it, and
    with none (neighbours=0); a model that reads its neighbours then embeds the cells apart."""
    from pretrain.export import load_model_file

    pbmc, path = _pbmc_and_model(bq, real_data, tmp_path, neighbour_scale_init=1.0)
    models = {"model": load_model_file(path)}
    cells, y = tmp_path / "cells.h5ad", pbmc.obs["cell_type"].astype(str).to_numpy()
    scores = bq.Scores()
    embeddings = bq.score_models(scores, models, cells, cells, y, y, "fp32")
    held = bq.held_out_cells(cells, "cell_type")
    bq.held_out_models(scores, held, models, "fp32")
    a, b = bq.SHIFT, held.setting
    assert list(scores.rows) == [
        (a, "model: head"), (a, "model: kNN probe on the embedding"),
        (a, "model, no neighbours given: head"),
        (a, "model, no neighbours given: kNN probe on the embedding"),
        (b, "model: kNN probe on the embedding"), (b, "model: head"),
        (b, "model, no neighbours given: kNN probe on the embedding"),
        (b, "model, no neighbours given: head")]
    from pretrain.embed import embed_anndata

    alone = embed_anndata(models["model"], cells, precision="fp32", neighbours=0)
    assert not np.allclose(embeddings["model"], alone.obsm["X_scpretrain"], atol=1e-4)


def _pbmc_and_model(bq, real_data, tmp_path, **settings):
    """200 PBMC cells written to ``tmp_path/cells.h5ad`` and an untrained ``tiny`` model file
    (ModelConfig ``settings`` over the preset) whose vocabulary holds their first 2,000 genes."""
    import anndata

    from data_prep.labels import LabelVocab
    from data_prep.vocab import GeneVocab
    from pretrain.export import write_model_file
    from pretrain.model import ModelConfig, ScPrintModel

    pbmc = anndata.read_h5ad(real_data / bq.PBMC.name)[:200].copy()
    pbmc.write_h5ad(tmp_path / "cells.h5ad")
    vocab = GeneVocab()
    vocab.add("NCBITaxon:9606", list(pbmc.var_names[:2000]))
    labels = LabelVocab()
    labels.add("cell_type", sorted(pbmc.obs["cell_type"].astype(str).unique()))
    cfg = ModelConfig.preset("tiny", kernels="reference", **settings)
    model = ScPrintModel(cfg, vocab.n_ids, labels.n_labels())
    return pbmc, write_model_file(tmp_path / "model.pt", model.state_dict(), cfg, vocab,
                                  labels.class_names(), 64)


def test_random_init_keeps_the_vocabularies_and_takes_another_size_when_given(bq, real_data,
                                                                              tmp_path):
    from pretrain.export import load_model_file
    from pretrain.model import ModelConfig

    _, path = _pbmc_and_model(bq, real_data, tmp_path)
    trained = load_model_file(path)
    same = load_model_file(bq.save_random_init(path, tmp_path / "same.pt", seed=5))
    again = load_model_file(bq.save_random_init(path, tmp_path / "again.pt", seed=5))
    small = load_model_file(bq.save_random_init(path, tmp_path / "small.pt", 5,
                                                ModelConfig.preset("small"), 512))
    assert same.config == trained.config and same.train_context == 64
    assert (small.config.d_model, small.train_context) == (256, 512)
    for other in (same, small):
        assert other.vocab.ranges == trained.vocab.ranges and other.labels == trained.labels

    def weights(exported):
        return torch.cat([t.flatten() for t in exported.model.state_dict().values()])

    assert torch.equal(weights(same), weights(again))  # the seed fixes it
    assert not torch.equal(weights(same), weights(trained))


@pytest.mark.parametrize("ds,precision", [
    ({"bf16": {"enabled": False}, "torch_autocast": {"enabled": True, "dtype": "bfloat16"}},
     "bf16-mixed"),
    ({"bf16": {"enabled": True}}, "bf16"), ({"torch_autocast": {"enabled": False}}, "fp32")])
def test_the_page_names_the_precision_the_run_trained_in(bq, tmp_path, ds, precision):
    (tmp_path / "config.json").write_text(json.dumps({"deepspeed": ds}))
    assert bq.trained_precision(tmp_path) == precision


def test_denoising_scores_every_predictor_in_every_scope(bq, real_data, tmp_path):
    from pretrain.export import load_model_file

    # neighbours on from the start, so that taking them away changes the prediction
    pbmc, path = _pbmc_and_model(bq, real_data, tmp_path, neighbour_scale_init=1.0)
    model = load_model_file(path)
    shares = bq.gene_shares(model, tmp_path / "cells.h5ad")
    r = bq.denoising({"model": model}, tmp_path / "cells.h5ad", shares, seed=0)
    blend = "model and neighbour average, mean of their log2(1 + x)"
    alone, smoothed = "model, no neighbours given", "the cell and its neighbours, averaged"
    none = "no denoising: the corrupted input"
    assert list(r) == ["model", alone, none, "library-size mean", "neighbour average",
                       smoothed, blend]
    every, zero, dropped = bq.DENOISING_SCOPES
    assert all(list(v) == list(bq.DENOISING_SCOPES) for v in r.values())
    assert np.isnan(r[none][zero])  # the input is 0 there: no correlation to speak of
    scored = [x for name, v in r.items() for scope, x in v.items() if (name, scope) != (none, zero)]
    assert all(-1 <= x <= 1 for x in scored)
    # an untrained model knows nothing; the neighbours know a lot
    assert r["neighbour average"][dropped] > 0.5 > abs(r["model"][dropped])
    # the remaining counts are the cell's own, just thinned: they add to the neighbours'
    assert r[smoothed][every] > r["neighbour average"][every]
    assert r[alone][every] != r["model"][every]
    assert r[blend][dropped] not in (r["model"][dropped], r["neighbour average"][dropped])
