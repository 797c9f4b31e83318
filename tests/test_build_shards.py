"""End-to-end: all real multi-organism files -> shards, manifest, report; epochs, a held-out
dataset and held-out cells that leak nothing, resume, merge, verify.

One module-scoped build over the 6 real files (4 taxa) plus a bad file is shared by the tests;
the resumed and merged builds reuse its per-dataset artifacts where the test is not about them.
"""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import scipy.sparse as sp
import webdataset as wds

from data_prep import verify
from data_prep.shard_format import CLASSES, decode_sample, load_manifest

FIXTURE = "human_cellxgene_schema_fixture_320cells_136genes_raw.h5ad"
PANELS = {FIXTURE: 100}  # min_dataset_genes override: the 136-gene fixture is accepted
FILES = {  # file -> (organism, cell_type column, sex column)
    "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad": ("human", "cell_type", "-"),
    "mouse_stomach_intestine_MCA_scgoclust_219cells_raw.h5ad": ("mouse", "cell_type_annotation",
                                                                ""),
    "mouse_brain_10x_scanpy_10kcells_1000genes_raw.h5ad": ("mouse", "", ""),
    "drosophila_gut_flycellatlas_scgoclust_180cells_recovered_counts.h5ad": ("fly", "annotation",
                                                                             "sex"),
    "arabidopsis_scplant_2000cells_7000genes_raw.h5ad": ("NCBITaxon:3702", "", ""),
    FIXTURE: ("", "", ""),
}
SMALL = ["mouse_stomach_intestine_MCA_scgoclust_219cells_raw.h5ad",
         "drosophila_gut_flycellatlas_scgoclust_180cells_recovered_counts.h5ad"]
FLAGS = ["--min-genes", "100", "--shard-samples", "300", "--stream-size", "600", "--epochs", "2",
         "--eval-fraction", "0.05", "--metacell-fraction", "0.2", "--seed", "7", "--quiet"]
EVAL_DATASET = "human_cellxgene_schema_fixture_320cells_136genes_raw"  # held out whole


def _cli(module, *args, env=None, check=True):
    proc = subprocess.run([sys.executable, "-m", module, *map(str, args)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def _write_sheet(path, data_dir, files):
    lines = ["path,organism,cell_type,sex,min_dataset_genes"]
    lines += [f"{data_dir / f},{FILES[f][0]},{FILES[f][1]},{FILES[f][2]},{PANELS.get(f, '')}"
              for f in files]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def bad_file(tmp_path_factory):
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    # 1,200 genes: a whole transcriptome, rejected for its counts, not as a gene panel
    x = sp.random(40, 1200, density=0.9, format="csr", dtype=np.float32, random_state=0)
    x.data = np.round(x.data * 10) - 3  # negative counts: must be rejected
    path = tmp_path_factory.mktemp("bad") / "negative_counts.h5ad"
    ad.AnnData(X=x, obs=pd.DataFrame(index=[f"c{i}" for i in range(40)]),
               var=pd.DataFrame(index=[f"g{i}" for i in range(1200)]),
               uns={"organism": "human"}).write_h5ad(path)
    return path


@pytest.fixture(scope="module")
def first(tmp_path_factory, real_data):
    """A small earlier build whose vocabulary the main build extends."""
    root = tmp_path_factory.mktemp("first")
    _write_sheet(root / "sheet.csv", real_data, SMALL)
    _cli("data_prep.build_shards", "--sheet", root / "sheet.csv", "--out", root / "out", *FLAGS)
    return root / "out"


@pytest.fixture(scope="module")
def build(tmp_path_factory, real_data, bad_file, first):
    root = tmp_path_factory.mktemp("build")
    _write_sheet(root / "sheet.csv", real_data, list(FILES))
    args = ["--sheet", root / "sheet.csv", bad_file, "--vocab", first / "vocab", *FLAGS,
            "--eval-datasets", EVAL_DATASET]
    _cli("data_prep.build_shards", *args, "--out", root / "out", "--jobs", "2")
    return {"root": root, "out": root / "out", "args": args}


def _shard_bytes(out):
    man = load_manifest(out)
    return {s["path"]: (out / s["path"]).read_bytes() for s in man["shards"] + man["eval_shards"]}


def test_all_organisms_in_one_build(build):
    man = load_manifest(build["out"])
    taxa = {d["taxon"] for d in man["datasets"]}
    assert taxa == {9606, 10090, 7227, 3702}
    assert len(man["datasets"]) == 6 and len(man["rejected"]) == 1
    assert set(man["vocab"]["organisms"]) == {f"NCBITaxon:{t}" for t in taxa}
    labels = json.loads((build["out"] / man["labels"]["file"]).read_text())
    cell_types = set(labels["classes"]["cell_type"])
    assert {"CD14 Mono", "B"} <= cell_types  # PBMC column from the sheet
    pseudo = set(labels["pseudo_label"])  # annotated types pooled, unannotated per dataset
    assert {"*/CD14 Mono", "*/B"} <= pseudo
    assert any(p.startswith("mouse_brain_10x_scanpy_10kcells_1000genes_raw/unknown_")
               for p in pseudo)
    assert len(cell_types) > 13 + 18  # + stomach (sheet column) and fly annotations
    assert man["n_samples"] == 1200 and man["n_eval_samples"] > 0
    assert man["stream"]["n_metacells"] == 240
    assert [e["n_metacells"] for e in man["epochs"]] == [120, 120]
    for name in ("expressed_genes", "group_frequencies", "class_frequencies",
                 "clusters_per_dataset"):
        assert (build["out"] / "report" / f"{name}.png").stat().st_size > 10_000
    assert "rejected" in (build["out"] / "report" / "summary.txt").read_text()


def test_stock_readers_and_sample_contents(build):
    out = build["out"]
    man = load_manifest(out)
    ranges = {o["taxon"]: (o["start"], o["start"] + o["size"])
              for o in man["vocab"]["organisms"].values()}
    n_tar, groups = 0, []
    for shard in man["shards"]:
        with tarfile.open(out / shard["path"]) as tar:
            members = tar.getmembers()
            assert all(m.mtime == 0 and m.uid == 0 and m.mode == 0o644 for m in members)
            assert [m.name for m in members] == sorted(m.name for m in members)
            n_tar += len(members)
            for m in members:
                s = decode_sample(tar.extractfile(m).read())
                n_expr, n_genes = s.n_expr, s.gene_ids.shape[0]
                lo, hi = ranges[s.organism]
                assert ((s.gene_ids >= lo) & (s.gene_ids < hi)).all()
                assert (np.diff(s.gene_ids[:n_expr].astype(np.int64)) > 0).all()
                assert (s.counts > 0).all() and s.labels.shape == (len(CLASSES),)
                assert n_genes <= max(n_expr, 3200) and s.nbr_counts.shape[1] == n_genes
                if n_genes > n_expr:  # padding genes: neighbour-only, best first
                    pad = s.nbr_counts[:, n_expr:].sum(axis=0)
                    assert (pad > 0).all() and (np.diff(pad) <= 0).all()
                assert s.nbr_dist.shape[0] <= 6 and s.weight > 0
                groups.append(s.group)
    assert n_tar == man["n_samples"]
    for epoch in (0, 1):  # keys are positions within their epoch
        urls = [str(out / s["path"]) for s in man["shards"] if s["epoch"] == epoch]
        keys = [sample["__key__"] for sample in wds.WebDataset(urls, shardshuffle=False)]
        assert len(keys) == 600 == len(set(keys))
    # the packed stream is exactly the drawn stream, epoch after epoch
    plan = out / "work" / "pack"
    drawn = np.load(plan / "group.npy")[np.concatenate(
        [np.load(plan / f"train-e{e:04d}" / "cells.npy") for e in (0, 1)])]
    np.testing.assert_array_equal(groups, drawn)


def test_epochs_are_fresh_draws_with_a_rising_gamma(build):
    man = load_manifest(build["out"])
    plan = build["out"] / "work" / "pack"
    epochs = man["epochs"]
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert [e["gamma"] for e in epochs] == pytest.approx([5 / 15, 6 / 15])
    assert epochs[0]["seed"] != epochs[1]["seed"]
    assert [s["epoch"] for s in man["shards"]] == [0, 0, 1, 1]
    cells = [np.load(plan / f"train-e{e:04d}" / "cells.npy") for e in (0, 1)]
    assert (cells[0] != cells[1]).mean() > 0.9
    assert len(np.union1d(cells[0], cells[1])) > max(len(np.unique(c)) for c in cells)
    group = np.load(plan / "group.npy")
    for e, c in zip(epochs, cells):
        assert e["n_samples"] == 600 and e["n_distinct_cells"] == len(np.unique(c))
        assert 0 <= e["share_above_context"] <= 1
        target = np.load(plan / f"train-e{e['epoch']:04d}" / "group_target.npy")
        freq = np.bincount(group[c], minlength=target.size) / c.size
        assert e["group_tv"] == pytest.approx(0.5 * np.abs(freq - target).sum(), abs=1e-6)
    # a lower gamma flattens the group masses: the biggest group's target share is smaller
    t0, t1 = (np.load(plan / f"train-e{e:04d}" / "group_target.npy") for e in (0, 1))
    assert t0.max() < t1.max()
    summary = (build["out"] / "report" / "summary.txt").read_text()
    assert "epoch  gamma" in summary and "0.400" in summary


def _samples(out, entries):
    for shard in entries:
        with tarfile.open(out / shard["path"]) as tar:
            for m in tar.getmembers():
                yield decode_sample(tar.extractfile(m).read())


def test_held_out_dataset_is_only_in_eval_shards(build):
    out = build["out"]
    man = load_manifest(out)
    (ds,) = [d for d in man["datasets"] if d["name"] == EVAL_DATASET]
    assert ds["split"] == "eval"
    assert {d["split"] for d in man["datasets"] if d is not ds} == {"train"}
    acc = man["accounting"]["datasets"][EVAL_DATASET]
    assert acc["packed"] == 0 and acc["held_out"] == ds["n_kept"] > 0
    assert not any(s.dataset == ds["id"] for s in _samples(out, man["shards"]))
    held = [s for s in _samples(out, man["eval_shards"]) if s.dataset == ds["id"]]
    assert sorted(s.cell for s in held) == sorted(set(s.cell for s in held))  # each once
    assert len(held) == ds["n_kept"]
    assert all(s.weight == 1.0 and not s.is_metacell for s in held)


def test_no_eval_cell_in_any_training_sample(build):
    """Not as the cell, not as a neighbour, not as a member of a meta-cell; meta-cells are the
    integer sum of their members' counts and carry no neighbours."""
    out = build["out"]
    man = load_manifest(out)
    work, plan = out / "work" / "datasets", out / "work" / "pack"
    held = {(s.dataset, s.cell) for s in _samples(out, man["eval_shards"])}
    fraction_held = {d for d, _ in held} - {d["id"] for d in man["datasets"]
                                            if d["split"] == "eval"}
    assert len(fraction_held) >= 4  # --eval-fraction cells of the training datasets
    graphs = {}
    for d in man["datasets"]:
        ing = work / d["name"] / "ingest"
        cells = np.load(ing / "cells.npy")
        graphs[d["id"]] = (cells, np.load(work / d["name"] / "graph" / "nbr_idx.npy"),
                           sp.csr_matrix((np.load(ing / "data.npy"), np.load(ing / "indices.npy"),
                                          np.load(ing / "indptr.npy"))),
                           np.load(plan / f"col2gid-{d['id']}.npy"))
    n_meta = n_nbr = 0
    for s in _samples(out, man["shards"]):
        assert (s.dataset, s.cell) not in held
        assert not {(s.dataset, int(c)) for c in s.nbr_cells} & held
        n_nbr += len(s.nbr_cells)
        if not s.is_metacell:
            continue
        n_meta += 1
        cells, nbr_idx, counts, col2gid = graphs[s.dataset]
        row = int(np.searchsorted(cells, s.cell))
        members = [row, *(int(j) for j in nbr_idx[row, :6] if j >= 0)]
        assert len(members) > 1 and s.nbr_dist.shape == (0,) and s.nbr_counts.shape[0] == 0
        assert not {(s.dataset, int(cells[m])) for m in members} & held
        total = np.asarray(counts[members].sum(axis=0)).ravel()
        cols = np.flatnonzero(total)
        order = np.argsort(col2gid[cols])
        np.testing.assert_array_equal(s.gene_ids, col2gid[cols][order])
        np.testing.assert_array_equal(s.counts, total[cols][order])
        assert (s.counts == np.round(s.counts)).all() and s.nnz == len(cols)
    assert n_meta == 240 and n_nbr > 1000


def test_packed_shards_realise_the_target_group_weights(tmp_path, real_data):
    """Read back from the shards themselves: group shares of an 8,000-sample stream of the PBMC
    file are within total variation 0.05 of the target W_c^g / sum W^g."""
    pbmc = "human_pbmc_kang18_ifnb_rdeepmaps_2800cells_raw.h5ad"
    _write_sheet(tmp_path / "sheet.csv", real_data, [pbmc])
    out = tmp_path / "out"
    _cli("data_prep.build_shards", "--sheet", tmp_path / "sheet.csv", "--out", out,
         "--stream-size", "8000", "--shard-samples", "4000", "--context-genes", "0", "--quiet",
         "--no-pool-cell-types")
    man = load_manifest(out)
    groups = [decode_sample(sample["cell"]).group
              for sample in wds.WebDataset([str(out / s["path"]) for s in man["shards"]],
                                           shardshuffle=False)]
    assert len(groups) == 8000
    target = np.load(out / "work" / "pack" / "train-e0000" / "group_target.npy")
    assert target.size > 10  # cell type x Leiden cluster pseudo-labels
    freq = np.bincount(groups, minlength=target.size) / len(groups)
    assert 0.5 * np.abs(freq - target).sum() <= 0.05
    # and the weighting matters: uniform sampling of cells would be far from the target
    uniform = np.bincount(np.load(out / "work" / "pack" / "group.npy"), minlength=target.size)
    assert 0.5 * np.abs(uniform / uniform.sum() - target).sum() > 0.1


def test_pooled_cell_types_share_a_pseudo_label_across_datasets():
    from pathlib import Path
    from types import SimpleNamespace

    from data_prep.assemble import _pseudo_names
    from data_prep.ingest import IngestedDataset

    def dataset(name, types, values, codes):
        label_codes = np.full((len(codes), len(CLASSES)), -1)
        label_codes[:, 0] = types
        return SimpleNamespace(rec=SimpleNamespace(name=name), pseudo_values=values,
                               pseudo_codes=np.array(codes),
                               ds=IngestedDataset(Path("."), None, [], None, None, None,
                                                  label_codes, {"cell_type": ["T", "B"]}, {}))

    a = dataset("a", [0, 0, 1, -1], ["B", "T_0", "T_1", "unknown_2"], [1, 2, 0, 3])
    b = dataset("b", [1, 1], ["B_4"], [0, 0])
    assert _pseudo_names(a, True) == ["*/B", "*/T", "*/T", "a/unknown_2"]
    assert _pseudo_names(b, True) == ["*/B"]
    assert _pseudo_names(a, False) == ["a/B", "a/T_0", "a/T_1", "a/unknown_2"]


def test_accounting_adds_up_and_counts_the_rejected_file(build):
    acc = load_manifest(build["out"])["accounting"]
    for a in [*acc["datasets"].values(), acc["total"]]:
        assert a["input"] == a["packed"] + a["held_out"] + sum(a["dropped"].values())
    bad = acc["datasets"]["negative_counts"]
    assert bad["input"] == 40 and bad["packed"] == 0
    (reason,) = bad["dropped"]
    assert reason.startswith("rejected: negative values")
    assert acc["total"]["input"] == 2800 + 219 + 10000 + 180 + 2000 + 320 + 40


def test_vocabulary_extension_keeps_ids(build, first):
    old = (first / "vocab" / "genes.tsv").read_text().splitlines()
    new = set((build["out"] / "vocab" / "genes.tsv").read_text().splitlines())
    assert set(old) <= new
    old_labels = json.loads((first / "vocab" / "labels.json").read_text())["classes"]
    new_labels = json.loads((build["out"] / "vocab" / "labels.json").read_text())["classes"]
    for cls, values in old_labels.items():
        assert new_labels[cls][: len(values)] == values


def test_epoch_added_later_and_kill_resume_are_byte_identical(build):
    """Pack epoch 0, then add epoch 1 to the same output (killed inside its second shard, then
    rerun): manifest and shards equal those of the build that packed both at once, and the
    graph stage is not redone."""
    out = build["root"] / "resumed"
    shutil.copytree(build["out"] / "work" / "datasets", out / "work" / "datasets")
    one_epoch = [*build["args"], "--epochs", "1"]  # the last --epochs wins
    _cli("data_prep.build_shards", *one_epoch, "--out", out, "--jobs", "1")
    assert [e["epoch"] for e in load_manifest(out)["epochs"]] == [0]
    graphs = {p: p.stat().st_mtime_ns for p in (out / "work" / "datasets").glob("*/graph/*")}
    killed = _cli("data_prep.build_shards", *build["args"], "--out", out, "--jobs", "1",
                  env={"SCPRETRAIN_FAULT_AFTER_SAMPLES": "450"}, check=False)
    assert killed.returncode == -9
    assert (out / "shards" / "train-e0001-000000.tar").exists()
    assert not (out / "shards" / "train-e0001-000001.tar").exists()  # killed inside it
    _cli("data_prep.build_shards", *build["args"], "--out", out, "--jobs", "1")
    assert graphs == {p: p.stat().st_mtime_ns
                      for p in (out / "work" / "datasets").glob("*/graph/*")}
    assert (out / "manifest.json").read_bytes() == (build["out"] / "manifest.json").read_bytes()
    assert _shard_bytes(out) == _shard_bytes(build["out"])
    assert not list((out / "shards").glob(".*"))  # no temporaries left


@pytest.fixture(scope="module")
def merged(build):
    parts = [build["root"] / f"part{i}" for i in range(2)]
    # machine 0 has the large datasets: reuse their artifacts; machine 1 computes its own
    man = load_manifest(build["out"])
    for d in man["datasets"][::2]:
        shutil.copytree(build["out"] / "work" / "datasets" / d["name"],
                        parts[0] / "work" / "datasets" / d["name"])
    for i, part in enumerate(parts):
        _cli("data_prep.build_shards", *build["args"], "--num-machines", 2, "--machine-index", i,
             "--out", part)
    out = build["root"] / "merged"
    _cli("data_prep.merge", *parts, "--out", out, "--jobs", "1", "--quiet")
    return out


def test_two_machines_and_merge_equal_a_single_run(build, merged):
    assert (merged / "manifest.json").read_bytes() == (build["out"] / "manifest.json").read_bytes()
    assert _shard_bytes(merged) == _shard_bytes(build["out"])


def test_packing_split_over_three_machines_equals_a_single_run(build, merged):
    """The merge's plan, then three pack machines (one of them twice: a rerun keeps its
    shards), then the manifest: manifest and shards byte-identical to the one-machine build;
    the manifest stage names the shards a machine has not packed yet."""
    parts = [build["root"] / f"part{i}" for i in range(2)]
    out = build["root"] / "packed_by_three"

    def merge(*args, check=True):
        return _cli("data_prep.merge", *parts, "--out", out, "--quiet", *args, check=check)

    merge("--stage", "plan")
    for i in (0, 2, 2):
        merge("--stage", "pack", "--num-machines", 3, "--machine-index", i, "--jobs", 2)
    early = merge("--stage", "manifest", "--num-machines", 3, check=False)
    assert early.returncode == 1
    assert ("2 of 6 shards are not packed yet: shards/train-e0001-000000.tar, "
            "shards/train-e0001-000001.tar (packed by machine 1 of 3" in early.stderr)
    assert not (out / "manifest.json").exists()
    merge("--stage", "pack", "--num-machines", 3, "--machine-index", 1)
    merge("--stage", "manifest", "--num-machines", 3)
    assert (out / "manifest.json").read_bytes() == (build["out"] / "manifest.json").read_bytes()
    assert _shard_bytes(out) == _shard_bytes(build["out"])


def test_cluster_script_is_valid_bash(repo_root):
    script = repo_root / "scripts" / "slurm_build.sh"
    assert subprocess.run(["bash", "-n", script]).returncode == 0
    text = script.read_text()
    for step in ("data_prep.build_shards", "--stage plan", "--stage pack", "--stage manifest"):
        assert step in text


def test_verify_detects_corruption(merged):
    assert _cli("data_prep.verify", merged).returncode == 0
    shard = merged / load_manifest(merged)["shards"][1]["path"]
    original = shard.read_bytes()
    try:
        corrupt = bytearray(original)
        corrupt[2000] ^= 0xFF  # inside the first sample's payload
        shard.write_bytes(bytes(corrupt))
        proc = _cli("data_prep.verify", merged, check=False)
        assert proc.returncode == 1 and "sha256" in proc.stdout
        shard.unlink()
        assert verify.verify(merged) == [f"{shard.relative_to(merged)}: missing"]
    finally:
        shard.write_bytes(original)
    assert verify.verify(merged) == []


def test_genes_and_cells_screened_in_the_main_build(build):
    """The real files: one id per mouse gene across the Ensembl and the symbol file, the
    fixture's spike-in left out and its non-primary cell dropped, all of it reported."""
    out = build["out"]
    man = load_manifest(out)
    genes = {d["name"]: d["genes"] for d in man["datasets"]}
    assert genes["mouse_stomach_intestine_MCA_scgoclust_219cells_raw"]["mapped"] == 419
    assert genes["mouse_brain_10x_scanpy_10kcells_1000genes_raw"]["by_id"] == 1000
    fixture = genes["human_cellxgene_schema_fixture_320cells_136genes_raw"]
    assert fixture["left_out_spike_in"] == 1 and fixture["by_id"] == 135
    acc = man["accounting"]["datasets"]["human_cellxgene_schema_fixture_320cells_136genes_raw"]
    assert acc["dropped"]["non_primary"] == 1
    rows = [line.split("\t") for line in (out / "vocab" / "genes.tsv").read_text().splitlines()]
    human = {g for _, org, g in rows[1:] if org == "NCBITaxon:9606"}
    assert "ERCC-00002" not in human and "ENSG00000127472" in human
    # every stomach gene the brain file names by id is packed under that id
    plan = out / "work" / "pack"
    mouse = man["vocab"]["organisms"]["NCBITaxon:10090"]
    stomach, brain = (np.load(plan / f"col2gid-{i}.npy") for i, d in enumerate(man["datasets"])
                      if d["organism"] == "NCBITaxon:10090")
    assert len(set(stomach) & set(brain)) == 419
    assert ((stomach >= mouse["start"]) & (stomach < mouse["start"] + mouse["size"])).all()
    aliases = (out / "vocab" / "aliases.tsv").read_text().splitlines()
    assert "NCBITaxon:10090\tXkr4\tENSMUSG00000051951" in aliases
    summary = (out / "report" / "summary.txt").read_text()
    assert "non_primary: 1" in summary
    assert "mouse_stomach_intestine_MCA_scgoclust_219cells_raw: 14,688 -> 14,688: 0 by id, " \
           "419 mapped, 14,269 unmapped, 0 merged" in summary


def test_gene_table_organism_flag_and_panels_on_the_command_line(tmp_path):
    """Symbols mapped by --gene-table onto a file without organism (--organism), a 33-gene
    panel rejected with its size, the accounting exact; a broken table stops the build."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(0)
    ids = [f"ENSMUSG{i:011d}" for i in range(1, 1201)]
    symbols = [f"Gene{i}" for i in range(1, 1201)]

    def write(name, genes, uns, obs=None, n_cells=60):
        x = sp.csr_matrix(rng.poisson(0.6, size=(n_cells, len(genes))).astype(np.float32))
        obs = pd.DataFrame(obs or {}, index=[f"c{i}" for i in range(n_cells)])
        ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=genes), uns=uns).write_h5ad(
            tmp_path / name)
        return tmp_path / name

    write("ensembl.h5ad", [f"{g}.2" for g in ids], {"source": "no organism here"})
    primary = np.arange(60) % 10 != 0  # 6 cells published again elsewhere
    write("symbols.h5ad", symbols[:600] + [f"Other{i}" for i in range(600)],
          {"organism": "mouse"}, {"is_primary_data": primary})
    write("panel.h5ad", [f"P{i}" for i in range(33)], {"organism": "human"})
    table = tmp_path / "mouse_genes.tsv"
    table.write_text("Gene stable ID version\tGene stable ID\tGene name\n" + "".join(
        f"{g}.2\t{g}\t{s}\n" for g, s in zip(ids, symbols)))
    out = tmp_path / "out"
    args = [tmp_path / "ensembl.h5ad", tmp_path / "symbols.h5ad", tmp_path / "panel.h5ad",
            "--organism", "mouse", "--gene-table", f"mouse={table}", "--min-genes", "50",
            "--stream-size", "100", "--quiet"]
    _cli("data_prep.build_shards", *args, "--out", out)
    man = load_manifest(out)
    assert man["vocab"]["organisms"]["NCBITaxon:10090"]["n_genes"] == 1200 + 600
    assert [d["genes"]["mapped"] for d in man["datasets"]] == [0, 600]
    acc = man["accounting"]["datasets"]
    assert acc["symbols"]["dropped"]["non_primary"] == 6
    assert acc["panel"]["dropped"] == {
        "rejected: gene panel of 33 genes, fewer than min_dataset_genes 1000 (a targeted panel? "
        "accept it with the sheet's min_dataset_genes column)": 60}
    total = man["accounting"]["total"]
    assert total["input"] == 180 == total["packed"] + total["held_out"] + sum(
        total["dropped"].values())
    assert man["config"]["gene_tables"] == {"NCBITaxon:10090": str(table)}
    assert man["config"]["ingest"]["organism"] == "NCBITaxon:10090"
    # a malformed table: the build stops before any work, naming the file and line
    table.write_text("Gene stable ID\tGene name\nENSG00000141510\tTP53\n")
    proc = _cli("data_prep.build_shards", *args, "--out", tmp_path / "bad", check=False)
    assert proc.returncode == 1
    assert f"{table}, line 2: 'ENSG00000141510' is not a mouse gene id" in proc.stderr


def test_gene_names_stage_memory_does_not_grow_with_the_datasets(tmp_path):
    """Every machine reads the gene names of every dataset: the symbol map is folded from them
    one file at a time, so with the same genes in every file the stage's Python memory is
    about that of 10 files at 60 too (3.5 MB; it held all of them before: 10 MB, 53 MB), and the
    map is the one a list of all would give."""
    import tracemalloc

    import anndata as ad
    import pandas as pd

    from data_prep.build_shards import _read_scan, symbol_map
    from data_prep.config import BuildConfig
    from data_prep.genes import FileGenes, SymbolMap
    from data_prep.sheet import discover_inputs

    ids = [f"ENSG{i:011d}" for i in range(4000)]
    for d in range(60):  # ids and symbols side by side, as CELLxGENE files have them
        var = pd.DataFrame({"feature_name": [f"SYM{i}" for i in range(4000)]}, index=ids)
        ad.AnnData(X=sp.csr_matrix((2, 4000), dtype=np.float32), var=var,
                   uns={"organism": "human"}).write_h5ad(tmp_path / f"d{d:02d}.h5ad")
    specs = discover_inputs([str(tmp_path)], None)
    cfg = BuildConfig()

    class Bar:
        def update(self, n): pass
        def close(self): pass

    peaks = []
    for n in (10, 60):
        work = tmp_path / f"work{n}"
        symbol_map(specs[:n], work, cfg, 1, lambda total, desc: Bar())  # the scans, cached
        tracemalloc.start()
        path, readable = symbol_map(specs[:n], work, cfg, 1, lambda total, desc: Bar())
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        assert readable == [True] * n
    assert peaks[1] < 1.5 * peaks[0], peaks
    every = [FileGenes.from_json(_read_scan(tmp_path / "work60" / "genes" / f"{s.name}.json.gz")
                                 ["genes"]) for s in specs]
    assert SymbolMap.load(path).digest() == SymbolMap.build(every).digest()
