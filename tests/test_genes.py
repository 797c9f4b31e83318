"""Canonical gene ids: id and symbol columns, version suffixes, features that are not genes, the
symbol map (gene tables, pairs from files, precedence) and its errors."""

import gzip

import numpy as np
import pytest

from data_prep.genes import (
    SymbolMap,
    canonical_id,
    describe_var,
    parse_gene_table_flags,
    plan_genes,
    read_gene_table,
)
from data_prep.organisms import gene_id_pattern, resolve_organism

HUMAN, MOUSE = resolve_organism("human"), resolve_organism("mouse")
A, B, C = "ENSMUSG00000000001", "ENSMUSG00000000002", "ENSMUSG00000000003"


@pytest.mark.parametrize("organism, value, expected", [
    ("human", "ENSG00000141510.16", "ENSG00000141510"),
    ("human", " ENSG00000141510 ", "ENSG00000141510"),
    ("human", "ENSMUSG00000051951", None),  # a mouse id is not a human gene id
    ("human", "TP53", None),
    ("mouse", "ENSMUSG00000051951.5", "ENSMUSG00000051951"),
    ("fly", "FBgn0000008", "FBgn0000008"),
    ("arabidopsis", "AT1G01010.1", "AT1G01010"),
    ("NCBITaxon:9685", "ENSFCAG00000000001.2", "ENSFCAG00000000001"),  # outside the table
])
def test_canonical_ids_per_organism(organism, value, expected):
    assert canonical_id(value, gene_id_pattern(resolve_organism(organism))) == expected


def test_ids_in_var_names_with_a_symbol_column():
    fg = describe_var(MOUSE, [A + ".1", B, "ERCC-00002", C],
                      {"gene_symbol": ["Xkr4", "Rp1", "ERCC-00002", None],
                       "n_cells": ["3", "4", "5", "6"]})
    assert (fg.id_source, fg.symbol_source) == ("var_names", "var['gene_symbol']")
    assert fg.ids == [A, B, None, C]
    assert fg.excluded == [None, None, "spike_in", None]
    assert sorted(fg.pairs()) == [("Rp1", B), ("Xkr4", A)]


def test_symbols_in_var_names_with_an_id_column():
    fg = describe_var(MOUSE, ["Xkr4", "Rp1", "Sox17"], {"gene_ids": [A, B, float("nan")]})
    assert (fg.id_source, fg.symbol_source) == ("var['gene_ids']", "var_names")
    assert fg.ids == [A, B, None] and fg.symbols == ["Xkr4", "Rp1", "Sox17"]
    plan = plan_genes(fg, {})
    assert plan.genes == [A, B, "Sox17"]
    assert plan.counts == {"by_id": 2, "mapped": 0, "merged": 0, "unmapped": 1}


def test_plan_maps_merges_and_leaves_out():
    names = [A + ".1", A + ".2", "Actb", "Actb-ps", "Gfp", "CD3-TotalSeqB", "sgRNA-1", "ERCC-00130"]
    types = ["Gene Expression"] * 5 + ["Antibody Capture", "CRISPR Guide Capture",
                                       "Gene Expression"]
    fg = describe_var(MOUSE, names, {"feature_types": types})
    symbols = {"Actb": B, "Actb-ps": B}
    plan = plan_genes(fg, symbols)
    assert plan.genes == [A, B, "Gfp"]
    assert plan.column.tolist() == [0, 0, 1, 1, 2, -1, -1, -1]
    assert plan.counts == {"by_id": 2, "mapped": 2, "unmapped": 1, "merged": 2,
                           "left_out_not_gene_expression": 2, "left_out_spike_in": 1}
    assert not plan.identity
    dropped = plan_genes(fg, symbols, drop_unmapped=True)
    assert dropped.genes == [A, B] and dropped.column[4] == -1
    assert dropped.counts["left_out_unmapped"] == 1 and dropped.counts["unmapped"] == 0


def test_cellxgene_feature_biotype_and_reference():
    fg = describe_var(HUMAN, ["ENSG00000000003", "ERCC-00002", "ENSG00000000005",
                              "ENSSASG00005000002"],
                      {"feature_biotype": ["gene", "spike-in", "gene", "gene"],
                       "feature_name": ["TSPAN6", "ERCC-00002 spike-in", "TNMD", "ORF1ab"],
                       "feature_reference": ["NCBITaxon:9606", "NCBITaxon:32630",
                                             "NCBITaxon:9606", "NCBITaxon:2697049"]})
    assert fg.excluded == [None, "spike_in", None, "other_organism"]
    assert fg.symbol_source == "var['feature_name']"
    plan = plan_genes(fg, {})
    assert plan.genes == ["ENSG00000000003", "ENSG00000000005"] and plan.identity is False
    assert plan.counts["left_out_other_organism"] == 1


def test_symbol_map_precedence_and_ties(tmp_path):
    # file 1 names by id with symbols; file 2 too, but a different id for "Dup"
    f1 = describe_var(MOUSE, [A, B], {"gene_symbol": ["Xkr4", "Dup"]})
    f2 = describe_var(MOUSE, [C, B], {"gene_symbol": ["Dup", "Other"]})
    symbols = SymbolMap.build([f1, f2])
    m = symbols.get(MOUSE)
    assert m["Xkr4"] == A
    assert m["Dup"] == B  # B is used by two files, C by one
    table_path = tmp_path / "mouse.tsv"
    table_path.write_text("Gene stable ID\tGene name\tGene Synonym\n"
                          f"{C}.3\tDup\t\n{A}\tXkr4\tXrg4\n{B}\tRp1\tshared\n{C}\tSox17\tshared\n")
    table = read_gene_table(table_path, "mouse")
    m = SymbolMap.build([f1, f2], {MOUSE.curie: table}).get(MOUSE)
    assert m["Dup"] == C  # the user's table wins over the files' pairs
    assert m["Xrg4"] == A and "shared" not in m  # synonyms only where they name one gene
    assert m["Other"] == B  # pairs from files fill in what the table lacks
    previous = SymbolMap({MOUSE.curie: {"Dup": A}})
    m = SymbolMap.build([f1, f2], {MOUSE.curie: table}, previous).get(MOUSE)
    assert m["Dup"] == A  # an extended vocabulary keeps its aliases
    # save / load / restrict
    symbols.save(tmp_path / "symbols.tsv")
    again = SymbolMap.load(tmp_path / "symbols.tsv")
    assert again.maps == symbols.maps and again.digest() == symbols.digest()
    part = symbols.restrict("mouse", ["Xkr4", "Nope"])
    assert part.maps == {MOUSE.curie: {"Xkr4": A}}


def test_gene_table_forms(tmp_path):
    path = tmp_path / "human.tsv.gz"
    path.write_bytes(gzip.compress(
        b"gene_id\tsymbol\tsynonyms\nENSG00000141510.16\tTP53\tp53,LFS1\n"
        b"ENSG00000012048\tBRCA1\t\n"))
    table = read_gene_table(path, "human")
    assert table.symbols == {"TP53": {"ENSG00000141510"}, "BRCA1": {"ENSG00000012048"}}
    assert table.synonyms == {"p53": {"ENSG00000141510"}, "LFS1": {"ENSG00000141510"}}


@pytest.mark.parametrize("text, problem", [
    ("", "empty gene table"),
    ("id,symbol\nENSG00000141510,TP53\n", "line 1: gene table header"),
    ("gene_id\tname\nENSG00000141510\tTP53\textra\n", "line 2: 3 fields, the header has 2"),
    ("gene_id\tname\nENSMUSG00000051951\tXkr4\n", "line 2: 'ENSMUSG00000051951' is not a human"),
    ("gene_id\tname\nENSG00000141510\t\n", "has no symbols"),
])
def test_gene_table_errors_name_file_and_line(tmp_path, text, problem):
    path = tmp_path / "table.tsv"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem) as err:
        read_gene_table(path, "human")
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="cannot read"):
        read_gene_table(tmp_path / "missing.tsv", "human")


def test_gene_table_flags():
    assert parse_gene_table_flags(["mouse=m.tsv", "NCBITaxon:9606=h.tsv"]) == {
        "NCBITaxon:10090": "m.tsv", "NCBITaxon:9606": "h.tsv"}
    for bad, problem in [("mouse", "ORGANISM=FILE"), ("martian=x.tsv", "unknown organism"),
                         ("=x.tsv", "ORGANISM=FILE")]:
        with pytest.raises(ValueError, match=problem):
            parse_gene_table_flags([bad])
    with pytest.raises(ValueError, match="two tables"):
        parse_gene_table_flags(["mouse=a.tsv", "Mus musculus=b.tsv"])


def test_plan_identity_for_plain_files():
    fg = describe_var(HUMAN, ["TP53", "BRCA1"], {})
    plan = plan_genes(fg, {})
    assert plan.identity and plan.genes == ["TP53", "BRCA1"]
    np.testing.assert_array_equal(plan.column, [0, 1])
