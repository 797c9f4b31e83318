"""The exported model file and ``pretrain.embed`` on a 300-cell slice of a real PBMC file.

The model is untrained (tiny preset, PyTorch kernels): these tests check the plumbing (the file
is self-contained, the output is a faithful copy with the results added, embeddings are
deterministic and independent of the batch size, bad inputs fail naming the file), not the
quality of the embedding.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import anndata
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

from data_prep.genes import SymbolMap
from data_prep.labels import LabelVocab
from data_prep.vocab import GeneVocab
from pretrain.data import DataConfig
from pretrain.device_peaks import native_bf16
from pretrain.embed import (
    EMBEDDING_KEY,
    UNS_KEY,
    default_workers,
    embed_anndata,
    embed_cells,
    inference_config,
    iter_batches,
    main,
    open_cells,
)
from pretrain.export import export, load_exported, load_model_file, write_model_file
from pretrain.label_transfer import (
    EXACT_WORK_BELOW,
    search_method,
    search_threads,
    transfer_labels,
)
from pretrain.model import ModelConfig, ScPrintModel

SOURCE = "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
N_CELLS = 300
N_GENES = 14053
N_UNKNOWN = 25  # genes renamed in the slice, so the model does not know them
EMPTY_CELL = 5  # a cell whose counts are all zeroed
CONTEXT = 128  # below every cell's expressed genes: the per-cell gene choice is exercised
TRAINED = ("cell_type", "sex", "organism")  # classes with labels in the model file


@pytest.fixture(scope="module")
def pbmc(real_data):
    return anndata.read_h5ad(real_data / SOURCE)


@pytest.fixture(scope="module")
def model_file(pbmc, tmp_path_factory):
    """An untrained tiny model over the full file's genes, saved as a model file."""
    vocab = GeneVocab()
    vocab.add("NCBITaxon:9606", list(pbmc.var_names))
    labels = LabelVocab()
    labels.add("cell_type", sorted(pbmc.obs["cell_type"].astype(str).unique()))
    labels.add("sex", ["female", "male"])
    labels.add("organism", ["NCBITaxon:9606"])
    torch.manual_seed(0)
    cfg = ModelConfig.preset("tiny", kernels="reference")
    model = ScPrintModel(cfg, vocab.n_ids, labels.n_labels()).eval()
    path = write_model_file(tmp_path_factory.mktemp("model") / "model.pt", model.state_dict(),
                            cfg, vocab, labels.class_names(), CONTEXT)
    return path, model, vocab, labels


@pytest.fixture(scope="module")
def cells(pbmc, tmp_path_factory) -> Path:
    """The first 300 cells; the most-counted genes renamed to unknown names, one cell emptied."""
    adata = pbmc[:N_CELLS].copy()
    keep = np.ones(N_CELLS, dtype=np.float32)
    keep[EMPTY_CELL] = 0
    adata.X = sp.csr_matrix(sp.diags(keep) @ adata.X)
    adata.X.eliminate_zeros()
    top = np.argsort(-np.asarray(adata.X.sum(axis=0)).ravel())[:N_UNKNOWN]
    names = adata.var_names.to_numpy().copy()
    names[top] = [f"UNKNOWN-{i}" for i in range(N_UNKNOWN)]
    adata.var_names = names
    path = tmp_path_factory.mktemp("cells") / "pbmc300.h5ad"
    adata.write_h5ad(path)
    return path


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_model_file_is_self_contained(model_file, cells):
    """Plain types only; the vocabularies come back in id order and the reloaded model gives
    the same outputs as the one in memory."""
    path, model, vocab, labels = model_file
    payload = torch.load(path, weights_only=True)
    human = payload["genes"]["NCBITaxon:9606"]
    assert human["genes"] == vocab.ranges["NCBITaxon:9606"].genes
    assert (human["start"], human["taxon"], human["name"]) == (1, 9606, "human")
    assert payload["labels"]["cell_type"] == labels.values("cell_type")
    assert payload["train_context"] == CONTEXT
    exported = load_model_file(path)
    assert exported.train_context == CONTEXT
    assert exported.labels["sex"] == ["female", "male"] and exported.labels["tissue"] == []
    gene = vocab.ranges["NCBITaxon:9606"].genes[100]
    assert exported.genes["NCBITaxon:9606"].index[gene] == vocab.lookup(9606, [gene])[0]
    rows, batch = next(iter_batches(exported, cells, batch_size=16))
    assert rows.tolist() == list(range(16))
    assert (batch["labels"] == -1).all() and not batch["zeroed"].any()
    assert torch.equal(batch["input_counts"], batch["counts"])  # no corruption
    expected = model.predict(batch)
    for reloaded in (exported.model, load_exported(path)):
        got = reloaded.predict(batch)
        assert torch.equal(got["cell_emb"], expected["cell_emb"])
        for c in TRAINED:
            assert torch.equal(got["class_probs"][c], expected["class_probs"][c])


def test_cli_writes_an_annotated_copy(repo_root, model_file, cells, tmp_path):
    out = tmp_path / "out.h5ad"
    before = _sha256(cells)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "pretrain.embed", str(model_file[0]), str(cells), "--out",
         str(out)], cwd=repo_root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{N_GENES - N_UNKNOWN} of {N_GENES} genes" in proc.stdout
    assert _sha256(cells) == before
    given, result = anndata.read_h5ad(cells), anndata.read_h5ad(out)
    assert (given.X != result.X).nnz == 0
    pd.testing.assert_frame_equal(result.obs[list(given.obs.columns)], given.obs)
    pd.testing.assert_frame_equal(result.var, given.var)
    emb = result.obsm[EMBEDDING_KEY]
    assert emb.shape == (N_CELLS, 64) and emb.dtype == np.float32 and np.isfinite(emb).all()
    vocab_labels = model_file[3]
    for c in TRAINED:
        predicted = result.obs[f"predicted_{c}"]
        assert isinstance(predicted.dtype, pd.CategoricalDtype) and predicted.notna().all()
        assert set(predicted.cat.categories) <= set(vocab_labels.values(c))
        score = result.obs[f"predicted_{c}_score"].to_numpy()
        assert ((score >= 0) & (score <= 1)).all()
    assert not any(f"predicted_{c}" in result.obs for c in ("tissue", "disease"))
    summary = result.uns[UNS_KEY]
    assert summary["n_genes"] == N_GENES and summary["n_genes_known"] == N_GENES - N_UNKNOWN
    unknown = given[:, [n.startswith("UNKNOWN-") for n in given.var_names]].X.sum()
    assert summary["share_counts_known"] == pytest.approx(1 - unknown / given.X.sum(), rel=1e-5)
    assert summary["n_cells_no_known_gene"] == 1
    assert (summary["n_cells"], summary["neighbours"], summary["context"]) == (N_CELLS, 6, CONTEXT)
    assert summary["model"] == "model.pt" and summary["organism"] == "NCBITaxon:9606"


@pytest.mark.parametrize("precision, atol", [("fp32", 1e-5), ("bf16", 5e-3)])
def test_embedding_is_deterministic_and_independent_of_batch_size(model_file, cells, precision,
                                                                 atol):
    """Bitwise on a rerun; another batch size moves the embedding by rounding only (in bf16
    the matmuls' blocking follows the batch shape)."""
    exported = load_model_file(model_file[0])
    first = embed_cells(exported, cells, batch_size=64, precision=precision)
    again = embed_cells(exported, cells, batch_size=64, precision=precision)
    small = embed_cells(exported, cells, batch_size=7, precision=precision)
    emb = first.obsm[EMBEDDING_KEY]
    assert first.uns[UNS_KEY]["precision"] == precision
    assert np.array_equal(again.obsm[EMBEDDING_KEY], emb)
    # batches built by two worker processes (43 batches: worker 0 builds one more), in order
    workers = embed_cells(exported, cells, batch_size=7, precision=precision, workers=2)
    assert np.array_equal(workers.obsm[EMBEDDING_KEY], small.obsm[EMBEDDING_KEY])
    np.testing.assert_allclose(small.obsm[EMBEDDING_KEY], emb, rtol=0, atol=atol)
    for c in TRAINED:
        np.testing.assert_allclose(small.obs[f"predicted_{c}_score"],
                                   first.obs[f"predicted_{c}_score"], rtol=0, atol=atol)
    if precision == "bf16":  # against fp32: the same embedding up to bf16 rounding
        fp32 = embed_cells(exported, cells, batch_size=64, precision="fp32").obsm[EMBEDDING_KEY]
        cosine = (fp32 * emb).sum(1) / np.linalg.norm(fp32, axis=1) / np.linalg.norm(emb, axis=1)
        assert cosine.min() > 0.999
        auto = embed_cells(exported, cells, batch_size=64, precision="auto")
        assert auto.uns[UNS_KEY]["precision"] == ("bf16" if native_bf16("cpu") else "fp32")
        with pytest.raises(ValueError, match="precision 'fp16': one of auto, bf16, fp32"):
            embed_cells(exported, cells, precision="fp16")


def test_cells_pickle_by_their_counts_folder_and_workers_default_to_spare_cpus(
        model_file, cells, monkeypatch):
    """A worker started by spawn gets the cells by unpickling: the counts are mapped again
    from their folder, not sent; it makes the same samples."""
    exported = load_model_file(model_file[0])
    cfg = inference_config(CONTEXT, 6, batch_size=16)
    with open_cells(exported, cells) as opened:
        data = pickle.dumps(opened)
        assert len(data) < opened.counts.data.nbytes  # the counts are not in it
        copy = pickle.loads(data)
        assert not copy.counts.data.flags.owndata  # mapped, not read in
        for b in (0, 18):  # the first and the last, short, batch
            (rows, mine), (their_rows, theirs) = opened.records(cfg, b), copy.records(cfg, b)
            assert np.array_equal(rows, their_rows) and mine == theirs
        assert rows.tolist() == list(range(288, 300))
    monkeypatch.setattr("pretrain.embed.usable_cpus", lambda: 16)
    assert default_workers(torch.device("cpu")) == 0
    assert default_workers(torch.device("cuda")) == 4
    monkeypatch.setattr("pretrain.embed.usable_cpus", lambda: 2)
    assert default_workers(torch.device("cuda")) == 1
    with pytest.raises(ValueError, match="workers must be >= 0, not -1"):
        embed_cells(exported, cells, workers=-1)


def test_csc_file_embeds_as_its_csr_copy(model_file, cells, tmp_path):
    adata = anndata.read_h5ad(cells)
    adata.X = sp.csc_matrix(adata.X)
    adata.write_h5ad(tmp_path / "csc.h5ad")
    exported = load_model_file(model_file[0])
    by_rows = embed_cells(exported, cells, batch_size=64)
    by_cols = embed_cells(exported, tmp_path / "csc.h5ad", batch_size=64)
    assert np.array_equal(by_cols.obsm[EMBEDDING_KEY], by_rows.obsm[EMBEDDING_KEY])
    for c in TRAINED:
        assert by_cols.obs[f"predicted_{c}"].tolist() == by_rows.obs[f"predicted_{c}"].tolist()


def test_no_neighbours_and_corrupted_batches(model_file, cells):
    adata = embed_anndata(model_file[0], cells, neighbours=0, batch_size=100)
    assert adata.obsm[EMBEDDING_KEY].shape == (N_CELLS, 64)
    assert np.isfinite(adata.obsm[EMBEDDING_KEY]).all()
    assert adata.uns[UNS_KEY]["neighbours"] == 0
    _, batch = next(iter_batches(model_file[0], cells, neighbours=0, batch_size=8))
    assert not batch["nbr_mask"].any()
    # A benchmark passes its own loader settings, e.g. the training corruption.
    noisy = DataConfig(context=CONTEXT, short_context_min=CONTEXT, batch_size=8, n_neighbours=6)
    _, batch = next(iter_batches(model_file[0], cells, data_config=noisy))
    assert batch["nbr_mask"].all() and batch["gene_mask"].all()
    assert (batch["input_counts"] <= batch["counts"]).all()
    assert not torch.equal(batch["input_counts"], batch["counts"])


def test_embed_anndata_in_memory(model_file, cells):
    """An AnnData in memory gets what its file gets: in place (X untouched), on a copy with
    copy=True (the input unchanged), and a view of some of its cells works too."""
    exported = load_model_file(model_file[0])
    from_file = embed_cells(exported, cells, batch_size=64)
    adata = anndata.read_h5ad(cells)
    x_before = adata.X.copy()
    copied = embed_anndata(exported, adata, copy=True)
    assert EMBEDDING_KEY not in adata.obsm and "predicted_cell_type" not in adata.obs
    assert embed_anndata(exported, adata) is adata
    for result in (adata, copied):
        np.testing.assert_array_equal(result.obsm[EMBEDDING_KEY], from_file.obsm[EMBEDDING_KEY])
        assert result.obs["predicted_cell_type"].tolist() == \
            from_file.obs["predicted_cell_type"].tolist()
        assert result.uns[UNS_KEY]["model_sha256"] == _sha256(model_file[0])
    assert (adata.X != x_before).nnz == 0
    subset = embed_anndata(exported, anndata.read_h5ad(cells)[:40], neighbours=0)
    assert subset.obsm[EMBEDDING_KEY].shape == (40, 64) and subset.n_obs == 40
    backed = anndata.read_h5ad(cells, backed="r")  # read from its own file
    on_disk = embed_anndata(exported, backed, copy=True)
    np.testing.assert_array_equal(on_disk.obsm[EMBEDDING_KEY], from_file.obsm[EMBEDDING_KEY])
    assert not on_disk.isbacked and EMBEDDING_KEY not in backed.obsm


def test_cli_rejects_bad_inputs_naming_the_file(model_file, cells, tmp_path, capsys):
    text = tmp_path / "notes.h5ad"
    text.write_text("not an AnnData file\n")
    negative = tmp_path / "negative.h5ad"
    x = np.ones((3, 4), dtype=np.float32)
    x[1, 2] = -1
    bad = anndata.AnnData(sp.csr_matrix(x), obs=pd.DataFrame(index=["a", "b", "c"]),
                          var=pd.DataFrame(index=["CD3D", "CD3E", "MS4A1", "LYZ"]))
    bad.uns["organism"] = "human"
    bad.write_h5ad(negative)
    model = str(model_file[0])
    cases = [
        ([model, str(text)], [str(text), "not HDF5"]),
        ([model, str(negative)], [str(negative), "negative values in X"]),
        ([model, str(cells), "--organism", "mouse"], [str(cells), "NCBITaxon:10090", "model.pt"]),
        ([model, str(cells), "--organism", "martian"], [str(cells), "unknown organism"]),
        ([model, str(cells), "--neighbours", "9"], ["neighbours must be in 0..6"]),
        ([str(cells), str(cells)], [str(cells), "not an exported model file"]),
        ([str(text), str(cells)], [str(text), "not an exported model file"]),
    ]
    out = tmp_path / "out.h5ad"
    for argv, words in cases:
        assert main([*argv, "--out", str(out)]) == 2, argv
        err = capsys.readouterr().err
        assert all(w in err for w in words), (argv, err)
        assert not out.exists()
    assert main([model, str(cells), "--out", str(cells)]) == 2
    assert "the output must be another file" in capsys.readouterr().err


def test_transfer_labels_votes_among_the_nearest_reference_cells():
    """Three separated clusters: a query cell takes its cluster's label with the share of its
    votes; unlabelled reference cells take no part; a tie goes to the first label in order."""
    rng = np.random.default_rng(0)
    centres = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    reference = np.concatenate([c + rng.normal(0, 0.5, (20, 2)) for c in centres])
    labels = np.array(["T"] * 20 + ["B"] * 20 + ["NK"] * 20, dtype=object)
    labels[[0, 25, 45]] = [None, np.nan, ""]  # unlabelled
    query = np.concatenate([centres, [[5.0, 0.0]]])  # the last is halfway between T and B
    got, score = transfer_labels(reference, labels, query, k=19)
    assert list(got.categories) == ["B", "NK", "T"]
    assert list(got[:3]) == ["T", "B", "NK"] and (score[:3] == 1).all()
    line = np.array([[0.0], [1.0], [3.0], [4.0]])
    near, near_score = transfer_labels(line, ["b", "a", "a", "b"], np.array([[2.0]]), k=2)
    assert list(near) == ["a"] and near_score[0] == 1
    tie, tie_score = transfer_labels(line, ["b", "a", "a", "b"], np.array([[2.0]]), k=4)
    assert list(tie) == ["a"] and tie_score[0] == 0.5  # 2 votes each: the first label
    with pytest.raises(ValueError, match="k = 58: the reference has 57 labelled cells"):
        transfer_labels(reference, labels, query, k=58)
    with pytest.raises(ValueError, match="60 reference embeddings for 3 labels"):
        transfer_labels(reference, labels[:3], query)


def test_approximate_search_gives_the_exact_searchs_labels(monkeypatch):
    """The NN-descent index (what "auto" picks for atlas-sized searches) votes the labels the
    exact search votes on clustered 32-d cells, and gives the same labels on a rerun."""
    rng = np.random.default_rng(1)
    centres = rng.normal(0, 4, (12, 32))
    reference = np.concatenate([c + rng.normal(0, 1, (300, 32)) for c in centres])
    labels = np.repeat([f"type{i}" for i in range(12)], 300)
    query = np.concatenate([c + rng.normal(0, 1, (40, 32)) for c in centres])
    exact, exact_score = transfer_labels(reference, labels, query, method="exact")
    approx, approx_score = transfer_labels(reference, labels, query, method="approximate")
    assert (np.asarray(exact) == np.repeat([f"type{i}" for i in range(12)], 40)).mean() > 0.99
    assert (np.asarray(approx) == np.asarray(exact)).mean() >= 0.99
    assert np.abs(approx_score - exact_score).mean() < 0.02
    again, again_score = transfer_labels(reference, labels, query, method="approximate")
    np.testing.assert_array_equal(np.asarray(again), np.asarray(approx))
    np.testing.assert_array_equal(again_score, approx_score)
    assert search_method(1000, 1000, 64) == "exact"
    assert search_method(100_000, 200_000, 256, threads=1) == "approximate"
    assert search_method(100_000, 200_000, 256, threads=4) == "exact"  # work shared by threads
    assert search_method(1, int(EXACT_WORK_BELOW) // 2, 2, threads=1) == "approximate"
    assert search_method(100_000, 200_000, 256, "exact", threads=1) == "exact"
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the threads "auto" counts on: OpenMP's
    assert search_threads() == 4 and search_method(100_000, 200_000, 256) == "exact"
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert search_threads() >= 1
    with pytest.raises(ValueError, match="method 'fast': one of auto, exact, approximate"):
        transfer_labels(reference, labels, query, method="fast")


def test_cli_carries_a_reference_files_labels(model_file, cells, tmp_path, capsys):
    """--reference: the reference is embedded by the same model and its labels voted onto the
    input's cells; with the input as its own reference and k = 1 every cell takes its own. A
    reference this model file already embedded with the same settings is not embedded again."""
    out = tmp_path / "out.h5ad"
    model = str(model_file[0])
    assert main([model, str(cells), "--out", str(out), "--reference", str(cells),
                 "--reference-label", "cell_type", "--transfer-k", "1"]) == 0
    assert "300 labelled of 300 cells, computed embedding, exact search" in capsys.readouterr().out
    result = anndata.read_h5ad(out)
    own = result.obs["cell_type"].astype(str).to_numpy()
    np.testing.assert_array_equal(result.obs["transferred_cell_type"].astype(str), own)
    assert (result.obs["transferred_cell_type_score"] == 1).all()
    assert result.uns[UNS_KEY]["label_transfer"] == {
        "reference": cells.name, "column": "cell_type", "k": 1,
        "n_reference_cells": N_CELLS, "n_reference_labelled": N_CELLS,
        "reference_embedding": "computed", "search": "exact"}
    assert result.uns[UNS_KEY]["model_sha256"] == _sha256(model_file[0])
    assert "predicted_cell_type" in result.obs  # the heads' predictions are still written

    # the output, embedded by this model, serves as a reference without a second embedding
    again = tmp_path / "again.h5ad"
    assert main([model, str(cells), "--out", str(again), "--reference", str(out),
                 "--reference-label", "cell_type", "--transfer-k", "1"]) == 0
    assert "stored embedding" in capsys.readouterr().out
    reused = anndata.read_h5ad(again)
    assert reused.uns[UNS_KEY]["label_transfer"]["reference_embedding"] == "stored"
    np.testing.assert_array_equal(reused.obs["transferred_cell_type"].astype(str), own)
    # another seed makes another embedding: the stored one is not used
    assert main([model, str(cells), "--out", str(again), "--reference", str(out),
                 "--reference-label", "cell_type", "--seed", "1"]) == 0
    assert "computed embedding" in capsys.readouterr().out

    assert main([model, str(cells), "--out", str(out), "--reference", str(cells),
                 "--reference-label", "lineage"]) == 2
    assert f"{cells}: no obs column 'lineage'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([model, str(cells), "--out", str(out), "--reference", str(cells)])


def test_export_and_load_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export(tmp_path, tmp_path / "model.pt")
    (tmp_path / "config.json").write_text(json.dumps({"train": {"shards": str(tmp_path)}}))
    with pytest.raises(FileNotFoundError, match="latest.*no checkpoint"):
        export(tmp_path, tmp_path / "model.pt")
    (tmp_path / "checkpoints" / "step1").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="manifest.json.*--shards"):
        export(tmp_path, tmp_path / "model.pt", tag="step1")
    other = tmp_path / "weights.pt"
    torch.save({"weights": torch.zeros(2)}, other)
    with pytest.raises(ValueError, match=f"{other}: not an exported model file"):
        load_model_file(other)
    with pytest.raises(FileNotFoundError, match="no such model file"):
        load_exported(tmp_path / "missing.pt")


def test_symbol_named_file_matches_a_vocabulary_of_ensembl_ids(pbmc, cells, tmp_path):
    """Builds key genes by Ensembl id and keep the symbols as aliases; the model file carries
    them, so a new file named by symbols still finds its genes."""
    symbols = list(pbmc.var_names)
    ids = [f"ENSG{i:011d}" for i in range(1, len(symbols) + 1)]
    vocab = GeneVocab()
    vocab.add("NCBITaxon:9606", ids)
    vocab.add_aliases(SymbolMap({"NCBITaxon:9606": dict(zip(symbols, ids))}))
    labels = LabelVocab()
    labels.add("organism", ["NCBITaxon:9606"])
    cfg = ModelConfig.preset("tiny", kernels="reference")
    model = ScPrintModel(cfg, vocab.n_ids, labels.n_labels()).eval()
    path = write_model_file(tmp_path / "ensembl.pt", model.state_dict(), cfg, vocab,
                            labels.class_names(), CONTEXT)
    exported = load_model_file(path)
    assert exported.genes["NCBITaxon:9606"].aliases == dict(zip(symbols, ids))
    with open_cells(exported, cells) as found:
        summary, col2gid = found.summary(), found.col2gid
    assert summary["n_genes"] == N_GENES and summary["n_genes_known"] == N_GENES - N_UNKNOWN
    names = list(anndata.read_h5ad(cells, backed="r").var_names)
    known = [j for j, n in enumerate(names) if not n.startswith("UNKNOWN-")]
    np.testing.assert_array_equal(col2gid[known], vocab.lookup(9606, [ids[j] for j in known]))
