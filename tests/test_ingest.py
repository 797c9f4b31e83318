"""Ingest: validation rules, count-matrix choice, streaming, QC, labels, resume."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from data_prep import ingest as ingest_mod
from data_prep.genes import SymbolMap, read_gene_table
from data_prep.ingest import (
    CULTURE,
    NOT_CULTURE,
    DatasetError,
    IngestConfig,
    IngestedDataset,
    ingest_dataset,
)
from data_prep.organisms import resolve_organism
from data_prep.shard_format import CLASSES
from data_prep.sheet import DatasetSpec

FIXTURE = "human_cellxgene_schema_fixture_320cells_136genes_raw.h5ad"
CFG = IngestConfig(min_genes=2, chunk_cells=4)


def counts_matrix(n_cells=10, n_genes=8, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, size=(n_cells, n_genes)).astype(np.float32)
    x[0] = 0  # an empty cell
    x[1, :] = 0
    x[1, 0] = 5  # a cell with one expressed gene
    return x


def write_h5ad(path, x, genes=None, obs=None, uns=None, **kw):
    n, g = x.shape
    obs = pd.DataFrame(obs or {}, index=[f"c{i}" for i in range(n)])
    var = pd.DataFrame(index=genes if genes is not None else [f"g{j}" for j in range(g)])
    adata = ad.AnnData(X=x, obs=obs, var=var, uns=uns or {"organism": "human"}, **kw)
    adata.write_h5ad(path)
    return path


def spec_for(path, **kw):
    """A sheet row; the small synthetic files and the 136-gene fixture are accepted as panels."""
    kw.setdefault("min_dataset_genes", 0)
    return DatasetSpec(name=path.stem, path=path.resolve(), **kw)


def run(tmp_path, path, cfg=CFG, **kw):
    return ingest_dataset(spec_for(path, **kw), tmp_path / "out" / path.stem / "ingest", cfg)


@pytest.mark.parametrize(
    "value, problem",
    [(0.5, "non-integer"), (-1.0, "negative"), (np.nan, "NaN/inf"), (np.inf, "NaN/inf")],
)
def test_rejects_bad_values(tmp_path, value, problem):
    x = counts_matrix()
    x[6, 3] = value
    path = write_h5ad(tmp_path / "bad.h5ad", sp.csr_matrix(x))
    with pytest.raises(DatasetError, match=problem) as err:
        run(tmp_path, path)
    assert str(path) in str(err.value) and "cell 6" in str(err.value)
    assert not (tmp_path / "out" / "bad" / "ingest").exists()  # nothing half-written


@pytest.mark.filterwarnings("ignore:Variable names are not unique")
def test_rejects_duplicated_gene_ids(tmp_path):
    path = write_h5ad(tmp_path / "dup.h5ad", counts_matrix(), genes=["a", "b", "c", "a"] * 2)
    with pytest.raises(DatasetError, match="duplicated gene ids") as err:
        run(tmp_path, path)
    assert str(path) in str(err.value) and "'a'" in str(err.value)


def test_rejects_empty_dataset(tmp_path):
    path = write_h5ad(tmp_path / "empty.h5ad", sp.csr_matrix((0, 8), dtype=np.float32))
    with pytest.raises(DatasetError, match="no cells"):
        run(tmp_path, path)


def test_rejects_unreadable_files(tmp_path):
    text = tmp_path / "notes.h5ad"
    text.write_text("not an hdf5 file")
    with pytest.raises(DatasetError, match="not HDF5") as err:
        run(tmp_path, text)
    assert str(text) in str(err.value)
    import h5py

    with h5py.File(tmp_path / "plain.h5ad", "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(DatasetError, match="not an AnnData file"):
        run(tmp_path, tmp_path / "plain.h5ad")


def test_rejects_unknown_organism(tmp_path):
    path = write_h5ad(tmp_path / "alien.h5ad", counts_matrix(), uns={"organism": "martian"})
    with pytest.raises(DatasetError, match="unknown organism 'martian'"):
        run(tmp_path, path)
    path = write_h5ad(tmp_path / "none.h5ad", counts_matrix(), uns={"other": 1})
    with pytest.raises(DatasetError, match="unknown organism"):
        run(tmp_path, path)
    # the sheet's organism wins over the file
    assert run(tmp_path, path, organism=resolve_organism("zebrafish")).meta["taxon"] == 7955


def test_counts_layer_and_raw_are_preferred_over_normalised_x(tmp_path):
    x = counts_matrix()
    lognorm = sp.csr_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    layer = write_h5ad(tmp_path / "layer.h5ad", lognorm, layers={"counts": sp.csr_matrix(x)})
    ds = run(tmp_path, layer)
    assert ds.meta["counts_source"] == "layers['counts']"
    np.testing.assert_array_equal(ds.counts.toarray(), x[ds.cells])

    raw = ad.AnnData(X=sp.csr_matrix(x), var=pd.DataFrame(index=[f"r{j}" for j in range(8)]))
    path = write_h5ad(tmp_path / "raw.h5ad", lognorm, raw=raw)
    ds = run(tmp_path, path)
    assert ds.meta["counts_source"] == "raw.X"
    assert ds.genes == [f"r{j}" for j in range(8)]  # genes come from raw.var
    np.testing.assert_array_equal(ds.counts.toarray(), x[ds.cells])

    with pytest.raises(DatasetError, match="non-integer"):  # forcing X fails validation
        run(tmp_path, path, IngestConfig(min_genes=2, counts_source="X"))


def test_dense_and_integer_x_match_sparse(tmp_path):
    x = counts_matrix()
    sparse = run(tmp_path, write_h5ad(tmp_path / "sparse.h5ad", sp.csr_matrix(x)))
    dense = run(tmp_path, write_h5ad(tmp_path / "dense.h5ad", x))
    ints = run(tmp_path, write_h5ad(tmp_path / "ints.h5ad", sp.csr_matrix(x.astype(np.int32))))
    for ds in (dense, ints):
        assert ds.counts.data.dtype == np.float32
        np.testing.assert_array_equal(ds.counts.toarray(), sparse.counts.toarray())
        np.testing.assert_array_equal(ds.cells, sparse.cells)


def test_chunked_stream_is_identical_and_bounded(tmp_path, monkeypatch):
    x = counts_matrix(n_cells=23, n_genes=12, seed=3)
    path = write_h5ad(tmp_path / "big.h5ad", sp.csr_matrix(x))
    one = ingest_dataset(spec_for(path), tmp_path / "one", IngestConfig(min_genes=2))
    seen = []
    rows = ingest_mod._RowReader.rows
    monkeypatch.setattr(
        ingest_mod._RowReader, "rows", lambda self, a, b: seen.append(b - a) or rows(self, a, b)
    )
    chunked = ingest_dataset(spec_for(path), tmp_path / "chunked",
                             IngestConfig(min_genes=2, chunk_cells=3))
    assert max(seen) <= 3 and len(seen) >= 8  # the file was read in small chunks
    for name in ("indptr", "indices", "data", "cells", "nnz", "total", "label_codes"):
        assert (one.dir / f"{name}.npy").read_bytes() == (chunked.dir / f"{name}.npy").read_bytes()


def test_csc_matrix_is_read_in_one_pass_and_gives_the_csr_artifact(tmp_path, monkeypatch):
    """A CSC X is sorted into row ranges in one pass (each stored count read once, not once
    per chunk of rows) and ingests byte for byte as the same matrix stored as CSR."""
    import h5py

    from data_prep import csc_rows

    rng = np.random.default_rng(7)
    x = rng.poisson(0.6, size=(57, 30)).astype(np.float32)
    x[4] = 0
    csr_path = write_h5ad(tmp_path / "rows.h5ad", sp.csr_matrix(x))
    csc_path = write_h5ad(tmp_path / "cols.h5ad", sp.csc_matrix(x))
    with h5py.File(csc_path) as f:
        assert f["X"].attrs["encoding-type"] == "csc_matrix"
    monkeypatch.setattr(csc_rows, "RANGE_ENTRIES", 40)  # several ranges and column blocks
    monkeypatch.setattr(csc_rows, "BLOCK_ENTRIES", 25)
    read = []
    getitem = h5py.Dataset.__getitem__

    def counting(self, key):
        out = getitem(self, key)
        if self.name.endswith("X/indices"):
            read.append(np.size(out))
        return out

    monkeypatch.setattr(h5py.Dataset, "__getitem__", counting)
    cfg = IngestConfig(min_genes=2, chunk_cells=4)
    by_rows = run(tmp_path, csr_path, cfg)
    read.clear()
    by_cols = run(tmp_path, csc_path, cfg)
    assert sum(read) == np.count_nonzero(x) and len(read) > 5
    for name in ("indptr", "indices", "data", "cells", "nnz", "total", "label_codes"):
        assert (by_rows.dir / f"{name}.npy").read_bytes() == \
            (by_cols.dir / f"{name}.npy").read_bytes()
    assert sorted(p.name for p in by_cols.dir.iterdir()) == sorted(
        p.name for p in by_rows.dir.iterdir())  # the range files are gone


def test_csc_matrix_errors_name_the_cell_and_the_file(tmp_path):
    x = counts_matrix(n_cells=30, n_genes=8)
    x[21, 5] = 2.5
    path = write_h5ad(tmp_path / "bad_csc.h5ad", sp.csc_matrix(x))
    with pytest.raises(DatasetError, match="non-integer") as err:
        run(tmp_path, path, IngestConfig(min_genes=2, chunk_cells=4))
    assert str(path) in str(err.value) and "cell 21" in str(err.value)
    import h5py

    good = write_h5ad(tmp_path / "broken_csc.h5ad", sp.csc_matrix(counts_matrix()))
    with h5py.File(good, "r+") as f:
        f["X/indices"][0] = 99  # a row that does not exist
    with pytest.raises(DatasetError, match="row index outside 0..9") as err:
        run(tmp_path, good)
    assert str(good) in str(err.value)


def test_normalised_csc_x_falls_back_to_raw(tmp_path):
    x = counts_matrix()
    lognorm = sp.csc_matrix(np.log1p(x / np.maximum(x.sum(1, keepdims=True), 1) * 1e4))
    raw = ad.AnnData(X=sp.csc_matrix(x), var=pd.DataFrame(index=[f"g{j}" for j in range(8)]))
    ds = run(tmp_path, write_h5ad(tmp_path / "csc_raw.h5ad", lognorm, raw=raw))
    assert ds.meta["counts_source"] == "raw.X"
    np.testing.assert_array_equal(ds.counts.toarray(), x[ds.cells])


def test_qc_drops_and_accounts_cells(tmp_path):
    x = counts_matrix(n_cells=12, n_genes=8, seed=1)
    x[2, :3] = 0
    m = sp.csr_matrix(x)
    m.data[0] = 0  # an explicit stored zero must not count as expressed
    assert m.nnz == np.count_nonzero(x)
    path = write_h5ad(tmp_path / "qc.h5ad", m)
    nnz = (m.toarray() > 0).sum(1)
    ds = run(tmp_path, path, IngestConfig(min_genes=4, chunk_cells=5))
    keep = np.flatnonzero(nnz >= 4)
    assert ds.meta["n_input"] == 12 and ds.meta["n_kept"] == len(keep) > 0
    assert ds.meta["dropped"] == {"min_genes": 12 - len(keep)}
    np.testing.assert_array_equal(ds.cells, keep)
    np.testing.assert_array_equal(ds.nnz, nnz[keep])
    np.testing.assert_allclose(ds.total, m.toarray()[keep].sum(1))
    assert np.all(ds.counts.data > 0) and isinstance(ds.counts.data, np.memmap)
    np.testing.assert_array_equal(ds.counts.toarray(), m.toarray()[keep])


def test_sheet_min_genes_overrides_the_build_threshold(tmp_path):
    x = counts_matrix(n_cells=12, n_genes=8, seed=1)
    path = write_h5ad(tmp_path / "panel.h5ad", sp.csr_matrix(x))
    nnz = (x > 0).sum(1)
    ds = run(tmp_path, path, IngestConfig(min_genes=200, chunk_cells=5), min_genes=4)
    assert ds.meta["n_kept"] == int((nnz >= 4).sum()) > 0
    assert ds.meta["dropped"] == {"min_genes": int((nnz < 4).sum())}


def test_schema_labels_on_cellxgene_fixture(tmp_path, real_data):
    path = real_data / FIXTURE
    ds = ingest_dataset(spec_for(path), tmp_path / "fx", IngestConfig(min_genes=1))
    obs = ad.read_h5ad(path, backed="r").obs.iloc[ds.cells]
    assert ds.meta["organism"] == "NCBITaxon:9606"  # from uns
    assert ds.label_values["organism"] == ["NCBITaxon:9606"]
    assert ds.meta["label_columns"]["cell_type"] == "cell_type_ontology_term_id"
    assert ds.meta["label_columns"]["cell_culture"] == "tissue_type"
    culture = ds.labels("cell_culture")
    expected = np.where(obs["tissue_type"].astype(str).str.contains("cell culture"),
                        CULTURE, NOT_CULTURE)
    assert set(expected) == {CULTURE, NOT_CULTURE}
    np.testing.assert_array_equal(culture.astype(str), expected)
    sex = ds.labels("sex")
    unknown = obs["sex_ontology_term_id"].astype(str).to_numpy() == "unknown"
    assert unknown.any() and all(s is None for s in sex[unknown])
    assert np.all(ds.label_codes[unknown, CLASSES.index("sex")] == -1)
    np.testing.assert_array_equal(
        ds.labels("cell_type").astype(str), obs["cell_type_ontology_term_id"].astype(str)
    )
    assert ds.label_codes.shape == (ds.n_cells, 9)
    assert ds.label_values["development_stage"] == ["HsapDv:0000003"]


def test_sheet_label_columns(tmp_path):
    obs = {"annotation": ["T", "B", "unknown", "NaN", "T"] * 2, "sex": ["male"] * 10,
           "cell_type": ["ignored"] * 10, "cultured": [True, False] * 5}
    path = write_h5ad(tmp_path / "lab.h5ad", counts_matrix(), obs=obs)
    ds = run(tmp_path, path, IngestConfig(min_genes=0),
             label_columns={"cell_type": "annotation", "sex": "-", "cell_culture": "cultured"})
    assert ds.label_values["cell_type"] == ["B", "T"] and ds.label_values["sex"] == []
    assert ds.labels("cell_culture").tolist() == [CULTURE, NOT_CULTURE] * 5
    np.testing.assert_array_equal(ds.label_codes[:, 0], [1, 0, -1, -1, 1] * 2)
    assert np.all(ds.label_codes[:, CLASSES.index("sex")] == -1)
    with pytest.raises(DatasetError, match="'celltype'"):
        run(tmp_path, path, IngestConfig(min_genes=0), label_columns={"cell_type": "celltype"})


def test_resume_and_atomicity(tmp_path, monkeypatch):
    path = write_h5ad(tmp_path / "r.h5ad", sp.csr_matrix(counts_matrix()))
    out = tmp_path / "work" / "r" / "ingest"
    out.mkdir(parents=True)
    (out / "indptr.npy").write_bytes(b"partial")  # a stale incomplete artifact
    (out.parent / ".ingest.1.tmp").mkdir()  # a killed run's temporary folder
    first = ingest_dataset(spec_for(path), out, CFG)
    assert sorted(p.name for p in out.parent.iterdir()) == ["ingest"]
    assert json.loads((out / "meta.json").read_text())["n_kept"] == first.n_cells

    def boom(*a, **k):
        raise AssertionError("recomputed")

    monkeypatch.setattr(ingest_mod, "_convert", boom)
    again = ingest_dataset(spec_for(path), out, CFG)
    np.testing.assert_array_equal(again.counts.toarray(), first.counts.toarray())
    with pytest.raises(AssertionError, match="recomputed"):  # other settings: rebuilt
        ingest_dataset(spec_for(path), out, IngestConfig(min_genes=1))
    assert IngestedDataset.load(out).meta["n_kept"] == first.n_cells  # still intact


def test_real_files_ingest(tmp_path, real_data):
    """Every embedded real file ingests with its organism found in the file, and its copy with
    X stored column-major (CSC) gives the same artifact byte for byte."""
    taxa = {}
    for path in sorted(real_data.glob("*.h5ad")):
        ds = ingest_dataset(spec_for(path), tmp_path / path.stem, IngestConfig(min_genes=20))
        assert ds.meta["counts_source"] == "X" and ds.n_cells > 0
        assert ds.counts.shape == (ds.n_cells, len(ds.genes))
        assert np.all(ds.nnz >= 20)
        taxa[path.name.split("_")[0]] = ds.organism.taxon
        a = ad.read_h5ad(path)
        a.X = sp.csc_matrix(a.X)
        (tmp_path / "csc").mkdir(exist_ok=True)
        a.write_h5ad(tmp_path / "csc" / path.name)
        csc = ingest_dataset(spec_for(tmp_path / "csc" / path.name), tmp_path / "csc" / path.stem,
                             IngestConfig(min_genes=20, chunk_cells=1000))
        for name in (*ingest_mod._ARRAYS, "genes.json", "label_values.json"):
            name = name if "." in name else f"{name}.npy"
            assert (ds.dir / name).read_bytes() == (csc.dir / name).read_bytes(), (path, name)
    assert taxa == {"arabidopsis": 3702, "drosophila": 7227, "human": 9606, "mouse": 10090}


# ---------------------------------------------------------------------------- genes and cells

MOUSE_BRAIN = "mouse_brain_10x_scanpy_10kcells_1000genes_raw.h5ad"  # Ensembl, symbols in var
MOUSE_STOMACH = "mouse_stomach_intestine_MCA_scgoclust_219cells_raw.h5ad"  # symbols


def write_var(path, x, var, obs=None, uns=None):
    """An .h5ad with a full var table (gene names in its index)."""
    obs = pd.DataFrame(obs or {}, index=[f"c{i}" for i in range(x.shape[0])])
    ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var, uns=uns or {"organism": "mouse"}
               ).write_h5ad(path)
    return path


def test_symbol_and_ensembl_files_of_one_organism_share_ids(tmp_path, real_data):
    """The brain file's (id, symbol) pairs map the stomach file's symbols: 419 shared genes."""
    cfg = IngestConfig(min_genes=20)
    brain = ingest_mod.scan_genes(spec_for(real_data / MOUSE_BRAIN), cfg)
    stomach = ingest_mod.scan_genes(spec_for(real_data / MOUSE_STOMACH), cfg)
    assert brain.id_source == "var_names" and brain.symbol_source == "var['gene_symbol']"
    symbols = SymbolMap.build([brain, stomach])
    ds = ingest_dataset(spec_for(real_data / MOUSE_STOMACH), tmp_path / "stomach", cfg,
                        symbols.restrict("mouse", stomach.symbols_to_map()))
    assert ds.meta["genes"] == {"n_var": 14688, "by_id": 0, "mapped": 419, "unmapped": 14269,
                                "merged": 0, "id_source": None, "symbol_source": "var_names"}
    shared = set(ds.genes) & {g for g in brain.ids if g is not None}
    assert len(shared) == 419 and all(g.startswith("ENSMUSG") for g in shared)
    assert len(set(ds.genes) | set(brain.ids)) == 15269  # 15,688 when each file kept its names
    # the brain file names every gene by id: its artifact depends on no symbol of other files
    assert symbols.restrict("mouse", brain.symbols_to_map()).maps == {"NCBITaxon:10090": {}}
    # renaming columns moves no count
    plain = ingest_dataset(spec_for(real_data / MOUSE_STOMACH), tmp_path / "plain", cfg)
    assert (plain.counts != ds.counts).nnz == 0 and np.array_equal(plain.nnz, ds.nnz)


def test_gene_table_maps_symbols_and_merges_duplicates(tmp_path):
    ids = [f"ENSMUSG{i:011d}" for i in range(1, 7)]
    x = counts_matrix(n_cells=12, n_genes=6, seed=4)
    ensembl = write_var(tmp_path / "ens.h5ad", x, pd.DataFrame(
        index=[ids[0] + ".3", ids[1] + ".1", *ids[2:]]))  # version suffixes
    # symbols: Gapdh and its synonym Gapd are one gene, summed; Novel is in no table
    sym = ["Actb", "Gapdh", "Gapd", "Tp53", "Novel", "Sox2"]
    x2 = counts_matrix(n_cells=12, n_genes=6, seed=5)
    symbol = write_var(tmp_path / "sym.h5ad", x2, pd.DataFrame(index=sym))
    table = tmp_path / "mouse.tsv"
    table.write_text("Gene stable ID\tGene name\tGene Synonym\n" + "".join(
        f"{g}\t{s}\t{syn}\n" for g, s, syn in
        [(ids[0], "Actb", ""), (ids[1], "Gapdh", "Gapd"), (ids[2], "Trp53", "Tp53"),
         (ids[5], "Sox2", "")]))
    cfg = IngestConfig(min_genes=1)
    scans = [ingest_mod.scan_genes(spec_for(p), cfg) for p in (ensembl, symbol)]
    ens = ingest_dataset(spec_for(ensembl), tmp_path / "e", cfg, SymbolMap.build(scans))
    assert ens.genes == ids and ens.meta["genes"]["by_id"] == 6
    alone = ingest_dataset(spec_for(symbol), tmp_path / "s0", cfg, SymbolMap.build(scans))
    assert not set(alone.genes) & set(ens.genes)  # no table, no pairs: nothing shared
    symbols = SymbolMap.build(scans, {"NCBITaxon:10090": read_gene_table(table, "mouse")})
    ds = ingest_dataset(spec_for(symbol), tmp_path / "s1", cfg, symbols)
    assert ds.genes == [ids[0], ids[1], ids[2], "Novel", ids[5]]
    assert ds.meta["genes"] == {"n_var": 6, "by_id": 0, "mapped": 5, "unmapped": 1, "merged": 1,
                                "id_source": None, "symbol_source": "var_names"}
    expected = np.column_stack([x2[:, 0], x2[:, 1] + x2[:, 2], x2[:, 3], x2[:, 4], x2[:, 5]])
    np.testing.assert_array_equal(ds.counts.toarray(), expected[ds.cells])
    np.testing.assert_array_equal(ds.nnz, (expected[ds.cells] > 0).sum(1))  # after merging
    np.testing.assert_array_equal(ds.total, expected[ds.cells].sum(1))
    dropped = ingest_dataset(spec_for(symbol), tmp_path / "s2",
                             IngestConfig(min_genes=1, drop_unmapped_genes=True), symbols)
    assert "Novel" not in dropped.genes and dropped.meta["genes"]["left_out_unmapped"] == 1


def test_spike_ins_and_other_features_are_not_genes(tmp_path):
    names = ["ENSG00000000003", "ERCC-00002", "ENSG00000000005", "CD3-TotalSeqB",
             "ENSG00000000419", "ERCC-00130"]
    types = ["Gene Expression"] * 3 + ["Antibody Capture", "Gene Expression", "Gene Expression"]
    x = counts_matrix(n_cells=10, n_genes=6, seed=2)
    x[:, 1] += 50  # spike-ins and antibodies carry many counts
    x[:, 3] += 80
    path = write_var(tmp_path / "cite.h5ad", x, pd.DataFrame({"feature_types": types},
                                                               index=names),
                     uns={"organism": "human"})
    ds = run(tmp_path, path, IngestConfig(min_genes=1))
    genes = [0, 2, 4]
    assert ds.genes == [names[j] for j in genes]
    assert ds.meta["genes"]["left_out_spike_in"] == 2
    assert ds.meta["genes"]["left_out_not_gene_expression"] == 1
    kept = x[:, genes]
    np.testing.assert_array_equal(ds.nnz, (kept[ds.cells] > 0).sum(1))
    np.testing.assert_array_equal(ds.total, kept[ds.cells].sum(1))


def test_cellxgene_fixture_spike_in_and_non_primary_cells(tmp_path, real_data):
    path = real_data / FIXTURE
    ds = ingest_dataset(spec_for(path), tmp_path / "fx", IngestConfig(min_genes=0))
    assert "ERCC-00002" not in ds.genes and len(ds.genes) == 135
    assert ds.meta["genes"]["left_out_spike_in"] == 1
    primary = ad.read_h5ad(path, backed="r").obs["is_primary_data"].to_numpy()
    assert ds.meta["dropped"] == {"min_genes": 0, "non_primary": int((~primary).sum())} \
        and (~primary).sum() == 1
    assert primary[ds.cells].all()


def test_non_primary_cells_dropped_and_counted(tmp_path):
    x = counts_matrix(n_cells=12, n_genes=8, seed=1)
    primary = np.array([True, False] * 6)
    path = write_h5ad(tmp_path / "dup.h5ad", sp.csr_matrix(x),
                      obs={"is_primary_data": primary})
    nnz = (x > 0).sum(1)
    ds = run(tmp_path, path, IngestConfig(min_genes=2))
    keep = np.flatnonzero(primary & (nnz >= 2))
    np.testing.assert_array_equal(ds.cells, keep)
    assert ds.meta["dropped"] == {"non_primary": 6, "min_genes": 12 - 6 - len(keep)}
    both = run(tmp_path, path, IngestConfig(min_genes=2, keep_non_primary=True))
    np.testing.assert_array_equal(both.cells, np.flatnonzero(nnz >= 2))
    assert both.meta["dropped"] == {"min_genes": int((nnz < 2).sum())}
    text = write_h5ad(tmp_path / "text.h5ad", sp.csr_matrix(x),
                      obs={"is_primary_data": np.where(primary, "True", "False")})
    np.testing.assert_array_equal(run(tmp_path, text, IngestConfig(min_genes=2)).cells, keep)


def test_gene_panel_rejected_unless_the_sheet_accepts_it(tmp_path):
    x = counts_matrix(n_cells=10, n_genes=33, seed=6)
    path = write_h5ad(tmp_path / "panel.h5ad", sp.csr_matrix(x))
    spec = DatasetSpec(name="panel", path=path.resolve())  # the build's default: 1000
    with pytest.raises(DatasetError, match="gene panel of 33 genes, fewer than "
                                           "min_dataset_genes 1000") as err:
        ingest_dataset(spec, tmp_path / "a", IngestConfig(min_genes=2))
    assert str(path) in str(err.value)
    with pytest.raises(DatasetError, match="gene panel of 33 genes"):
        ingest_dataset(spec, tmp_path / "b", IngestConfig(min_genes=2, min_dataset_genes=34))
    ok = ingest_dataset(spec_for(path, min_dataset_genes=33), tmp_path / "c",
                        IngestConfig(min_genes=2))
    assert len(ok.genes) == 33 and ok.n_cells > 0


def test_organism_flag_for_files_without_one(tmp_path):
    path = write_h5ad(tmp_path / "none.h5ad", counts_matrix(), uns={"other": 1})
    with pytest.raises(DatasetError, match="--organism"):
        run(tmp_path, path)
    assert run(tmp_path, path, IngestConfig(min_genes=2, organism="mouse")).organism.taxon == 10090
    # the file's own organism and the sheet's come first
    human = write_h5ad(tmp_path / "human.h5ad", counts_matrix())
    assert run(tmp_path, human, IngestConfig(min_genes=2, organism="mouse")).meta["taxon"] == 9606
    fly = run(tmp_path, path, IngestConfig(min_genes=2, organism="mouse"),
              organism=resolve_organism("fly"))
    assert fly.meta["taxon"] == 7227
    cxg = write_h5ad(tmp_path / "cxg.h5ad", counts_matrix(),
                     obs={"organism_ontology_term_id": ["NCBITaxon:10090"] * 10})
    assert run(tmp_path, cxg, IngestConfig(min_genes=2, organism="human")).meta["taxon"] == 10090
