"""Gene and label vocabularies: contiguous organism ranges, determinism, stability on extension."""

import json

import numpy as np
import pytest

from data_prep.genes import SymbolMap
from data_prep.labels import LabelVocab, map_labels
from data_prep.shard_format import CLASSES
from data_prep.vocab import GeneVocab, VocabConfig, VocabFullError

SMALL = VocabConfig(headroom=0.25, min_headroom=4, block=8)


def genes(prefix, n):
    return [f"{prefix}{i:03d}" for i in range(n)]


def assert_contiguous(vocab):
    ranges = list(vocab.ranges.values())
    assert ranges[0].start == 1  # id 0 is padding
    for a, b in zip(ranges, ranges[1:]):
        assert a.end == b.start
    assert vocab.n_ids == ranges[-1].end
    for r in ranges:
        assert r.size % vocab.cfg.block == 0 and len(r.genes) <= r.size
        ids = vocab.lookup(r.organism, r.genes)
        np.testing.assert_array_equal(ids, np.arange(r.start, r.start + len(r.genes)))


def test_ranges_sizes_and_lookup():
    v = GeneVocab(SMALL)
    v.add_datasets([("human", ["b", "a", "c"]), ("mouse", genes("m", 10)),
                    ("human", ["d", "a"])])
    assert_contiguous(v)
    human, mouse = v.ranges["NCBITaxon:9606"], v.ranges["NCBITaxon:10090"]
    assert human.genes == ["a", "b", "c", "d"]  # dataset order, sorted within a dataset
    assert (human.start, human.size) == (1, 8)  # 4 genes + 4 headroom -> 8
    assert (mouse.start, mouse.size) == (9, 16)  # 10 + max(4, 3) = 14 -> 16
    assert v.lookup("Homo sapiens", ["d", "a"]).tolist() == [4, 1]
    assert v.lookup("human", ["d"]).dtype == np.uint32
    assert v.gene_of(10) == ("NCBITaxon:10090", "m001")
    with pytest.raises(KeyError, match="'zz'"):
        v.lookup("human", ["zz"])
    with pytest.raises(KeyError, match="NCBITaxon:7955"):
        v.lookup("zebrafish", ["a"])
    m = v.to_manifest()
    assert m["genes"] == "vocab/genes.tsv" and m["n_ids"] == 25
    assert m["organisms"]["NCBITaxon:9606"] == {"taxon": 9606, "name": "human", "start": 1,
                                                 "size": 8, "n_genes": 4}


def test_default_headroom():
    v = GeneVocab()
    v.add("human", genes("h", 20000))
    r = v.ranges["NCBITaxon:9606"]
    assert r.size == 25600 and r.size % 1024 == 0 and r.size >= 20000 * 1.25


def test_extension_never_renumbers(tmp_path):
    v = GeneVocab(SMALL)
    v.add_datasets([("human", genes("h", 5)), ("fly", genes("f", 3))])
    v.save(tmp_path / "v1")
    before = (tmp_path / "v1" / "genes.tsv").read_text()
    old = {(c, g): i for c, r in v.ranges.items() for g, i in r.index.items()}

    w = GeneVocab.load(tmp_path / "v1")
    w.add_datasets([("human", genes("h", 7) + ["x"]), ("mouse", genes("m", 4)),
                    ("fly", ["f000"])])
    assert_contiguous(w)
    new = {(c, g): i for c, r in w.ranges.items() for g, i in r.index.items()}
    assert all(new[k] == i for k, i in old.items())  # existing ids unchanged
    assert list(w.ranges) == ["NCBITaxon:9606", "NCBITaxon:7227", "NCBITaxon:10090"]
    assert w.ranges["NCBITaxon:9606"].genes[5:] == ["h005", "h006", "x"]  # into headroom
    assert w.ranges["NCBITaxon:10090"].start == v.n_ids  # new organism appended
    w.save(tmp_path / "v2")
    after = (tmp_path / "v2" / "genes.tsv").read_text().splitlines()
    assert set(before.splitlines()) < set(after)  # every old (id, organism, gene) row kept
    again = GeneVocab.load(tmp_path / "v2")
    assert again.to_manifest() == w.to_manifest()
    ranges = json.loads((tmp_path / "v2" / "ranges.json").read_text())
    assert ranges["n_ids"] == w.n_ids


def test_deterministic_files(tmp_path):
    for d in ("a", "b"):
        v = GeneVocab(SMALL)
        v.add_datasets([("mouse", ["z", "y"]), ("human", ["q", "p", "q"])])
        v.save(tmp_path / d)
    for f in ("genes.tsv", "ranges.json"):
        assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
    assert (tmp_path / "a" / "genes.tsv").read_text().splitlines() == [
        "id\torganism\tgene", "1\tNCBITaxon:10090\ty", "2\tNCBITaxon:10090\tz",
        "9\tNCBITaxon:9606\tp", "10\tNCBITaxon:9606\tq",
    ]


def test_headroom_overflow():
    v = GeneVocab(SMALL)
    v.add_datasets([("human", genes("h", 4)), ("mouse", genes("m", 4))])
    with pytest.raises(VocabFullError, match="rebuild"):
        v.add("human", genes("x", 5))  # human has 8 ids and mouse follows it
    assert len(v.ranges["NCBITaxon:9606"].genes) == 4  # nothing half-added
    ids = v.add("mouse", genes("x", 30))  # the last range grows in place
    assert_contiguous(v)
    assert ids.min() == 13 and v.ranges["NCBITaxon:10090"].size >= 34


def test_rejects_bad_gene_ids():
    with pytest.raises(ValueError, match="tabs"):
        GeneVocab().add("human", ["ok", "bad\tgene"])


def test_label_vocab_stability(tmp_path):
    lv = LabelVocab()
    assert lv.add("cell_type", ["T", "B", "T", None]).tolist() == [0, 1, 0, -1]
    assert lv.add("groups", [("a", "x"), ("b", "x"), ("a", "x")]).tolist() == [0, 1, 0]
    lv.add("pseudo_label", ["T_0", "unknown_3"])
    lv.save(tmp_path)
    doc = json.loads((tmp_path / "labels.json").read_text())
    assert doc["classes"]["cell_type"] == ["T", "B"] and doc["groups"] == [["a", "x"], ["b", "x"]]
    assert list(doc["classes"]) == list(CLASSES)

    again = LabelVocab.load(tmp_path)
    codes = np.array([[0, -1, -1, -1, -1, -1, 1, -1, 0], [1, -1, -1, -1, -1, -1, -1, -1, 0]])
    values = {c: [] for c in CLASSES}
    values.update(cell_type=["NK", "T"], sex=["female", "male"], organism=["NCBITaxon:9606"])
    mapped = map_labels(again.label_map(values), codes)  # what the build runs
    assert mapped.dtype == np.int32
    assert mapped[:, 0].tolist() == [2, 0]  # NK appended, T keeps id 0
    assert mapped[:, 6].tolist() == [1, -1] and mapped[:, 8].tolist() == [0, 0]
    assert again.values("cell_type") == ["T", "B", "NK"]
    assert again.lookup("groups", [["b", "x"]]).tolist() == [1]
    with pytest.raises(KeyError, match="not in the label vocabulary"):
        again.lookup("cell_type", ["DC"])
    with pytest.raises(KeyError, match="unknown label kind"):
        again.add("colour", ["red"])
    m = again.to_manifest()
    assert m["n_labels"]["cell_type"] == 3 and m["n_groups"] == 2 and m["n_pseudo_labels"] == 2
    assert m["file"] == "vocab/labels.json" and m["classes"] == list(CLASSES)


def test_aliases_name_vocabulary_genes(tmp_path):
    v = GeneVocab(SMALL)
    v.add_datasets([("mouse", ["ENSMUSG00000000001", "ENSMUSG00000000002", "Novel"])])
    v.add_aliases(SymbolMap({"NCBITaxon:10090": {"Actb": "ENSMUSG00000000001",
                                                 "Gapdh": "ENSMUSG00000000002",
                                                 "Absent": "ENSMUSG00000000009"},
                             "NCBITaxon:9606": {"ACTB": "ENSG00000075624"}}))
    r = v.ranges["NCBITaxon:10090"]
    assert r.aliases == {"Actb": "ENSMUSG00000000001", "Gapdh": "ENSMUSG00000000002"}
    v.save(tmp_path / "v")
    assert (tmp_path / "v" / "aliases.tsv").read_text().splitlines() == [
        "organism\talias\tgene", "NCBITaxon:10090\tActb\tENSMUSG00000000001",
        "NCBITaxon:10090\tGapdh\tENSMUSG00000000002"]
    again = GeneVocab.load(tmp_path / "v")
    assert SymbolMap(again.aliases()).maps == {"NCBITaxon:10090": r.aliases}
    assert v.to_manifest()["aliases"] == "vocab/aliases.tsv"
    # an earlier alias is kept when the vocabulary is extended
    again.add_aliases(SymbolMap({"NCBITaxon:10090": {"Actb": "ENSMUSG00000000002"}}))
    assert again.ranges["NCBITaxon:10090"].aliases["Actb"] == "ENSMUSG00000000001"
    (tmp_path / "v" / "aliases.tsv").write_text("organism\talias\tgene\n"
                                                "NCBITaxon:10090\tX\tENSMUSG00000000777\n")
    with pytest.raises(ValueError, match="line 2: 'ENSMUSG00000000777' is not a gene"):
        GeneVocab.load(tmp_path / "v")
    (tmp_path / "v" / "aliases.tsv").unlink()  # written before aliases existed: none
    assert SymbolMap(GeneVocab.load(tmp_path / "v").aliases()).maps == {"NCBITaxon:10090": {}}
