"""Organism names and the dataset sheet: parsing, schema fallback rules, input discovery."""

import pytest

from data_prep.organisms import known_organisms, resolve_organism
from data_prep.sheet import NO_LABEL, SheetError, discover_inputs, read_sheet

NAMES = {
    "human": 9606, "Homo sapiens": 9606, "mouse": 10090, "Mus musculus": 10090,
    "macaque": 9544, "rhesus": 9544, "Macaca mulatta": 9544, "marmoset": 9483,
    "Callithrix jacchus": 9483, "chimpanzee": 9598, "Pan troglodytes": 9598, "cow": 9913,
    "Bos taurus": 9913, "pig": 9823, "Sus scrofa": 9823, "sheep": 9940, "Ovis aries": 9940,
    "rabbit": 9986, "Oryctolagus cuniculus": 9986, "naked mole-rat": 10181,
    "Heterocephalus glaber": 10181, "chicken": 9031, "Gallus gallus": 9031, "zebrafish": 7955,
    "Danio rerio": 7955, "fruit fly": 7227, "Drosophila melanogaster": 7227, "fly": 7227,
    "worm": 6239, "C. elegans": 6239, "Caenorhabditis elegans": 6239, "Arabidopsis": 3702,
    "arabidopsis thaliana": 3702, "maize": 4577, "Zea mays": 4577, "  HUMAN ": 9606,
    "mus_musculus": 10090,
}


@pytest.mark.parametrize("name, taxon", sorted(NAMES.items()))
def test_resolve_organism_names(name, taxon):
    o = resolve_organism(name)
    assert (o.taxon, o.curie) == (taxon, f"NCBITaxon:{taxon}")


def test_resolve_organism_ids_and_errors():
    assert len({o.taxon for o in known_organisms()}) == 16
    assert resolve_organism("NCBITaxon:7955").name == "zebrafish"
    other = resolve_organism("NCBITaxon:9685")  # cat: not in the table, still accepted
    assert (other.taxon, other.curie) == (9685, "NCBITaxon:9685")
    assert resolve_organism(10090).name == "mouse"
    for bad in ("martian", "NCBITaxon:abc", "NCBITaxon:0", ""):
        with pytest.raises(ValueError, match="unknown organism"):
            resolve_organism(bad)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for p in ("a/x.h5ad", "a/y.h5ad", "b/x.h5ad", "a/readme.txt"):
        (tmp_path / p).write_bytes(b"")
    return tmp_path


def write_sheet(path, text):
    path.write_text(text)
    return path


def test_read_sheet(files):
    sheet = write_sheet(files / "sheet.csv",
                        "path,organism,cell_type,sex,name,multiplier,gene_column,"
                        "min_dataset_genes\n"
                        "a/x.h5ad,fruit fly,annotation,-,flies,2.5,symbol,33\n"
                        f"{files / 'a/y.h5ad'},,,,,,,\n")
    first, second = read_sheet(sheet)
    assert first.path == (files / "a/x.h5ad").resolve() and first.name == "flies"
    assert first.organism.taxon == 7227 and first.multiplier == 2.5
    assert first.label_columns == {"cell_type": "annotation", "sex": NO_LABEL}
    assert first.gene_column == "symbol" and first.min_dataset_genes == 33
    assert second.organism is None and second.label_columns == {} and second.multiplier == 1.0
    assert second.name == "y" and second.gene_column is None
    assert second.min_dataset_genes is None  # the build's --min-dataset-genes
    assert first.to_config()["min_dataset_genes"] == 33


@pytest.mark.parametrize(
    "text, problem",
    [
        ("file,organism\na/x.h5ad,human\n", "row 1: unknown column"),
        ("organism\nhuman\n", "row 1: no 'path' column"),
        ("path,organism\na/x.h5ad,human\na/missing.h5ad,human\n", "row 3: file not found"),
        ("path,organism\na/x.h5ad,martian\n", "row 2: unknown organism 'martian'"),
        ("path,celltype\na/x.h5ad,annotation\n", "unknown column.*celltype"),
        ("path,multiplier\na/x.h5ad,-1\n", "row 2: multiplier"),
        ("path,min_genes\na/x.h5ad,1.5\n", "row 2: min_genes must be a non-negative integer"),
        ("path,min_dataset_genes\na/x.h5ad,-5\n",
         "row 2: min_dataset_genes must be a non-negative integer"),
        ("path\n\n", "no dataset rows"),
    ],
)
def test_sheet_errors_name_sheet_row_and_problem(files, text, problem):
    sheet = write_sheet(files / "bad.csv", text)
    with pytest.raises(SheetError, match=problem) as err:
        discover_inputs([], sheet)
    assert str(sheet) in str(err.value)


def test_discover_inputs(files):
    sheet = write_sheet(files / "s.csv", "path,organism\nb/x.h5ad,mouse\n")
    specs = discover_inputs([files / "a", files / "a/x.h5ad", files / "b"], sheet)
    # sheet row first; dirs expand sorted; duplicates dropped; name collisions suffixed
    assert [(s.path.relative_to(files).as_posix(), s.name) for s in specs] == [
        ("b/x.h5ad", "x"), ("a/x.h5ad", "x-2"), ("a/y.h5ad", "y"),
    ]
    assert specs[0].organism.taxon == 10090 and specs[1].organism is None
    assert discover_inputs([files / "b", files / "a"]) != specs  # order follows the inputs
    assert [s.name for s in discover_inputs([files / "b", files / "a"])] == ["x", "x-2", "y"]
    with pytest.raises(FileNotFoundError, match="nowhere"):
        discover_inputs([files / "nowhere"])
    with pytest.raises(SheetError, match="more than one row"):
        discover_inputs([], write_sheet(files / "d.csv", "path\na/x.h5ad\na/../a/x.h5ad\n"))


def test_demo_sheet_parses(real_data):
    specs = discover_inputs([], real_data / "demo_sheet.csv")
    assert [s.organism.taxon for s in specs] == [9606, 9606, 10090]
    assert specs[0].label_columns == {"cell_type": "cell_type", "sex": NO_LABEL}
    # the schema fixture and the 1000-gene mouse slice get a QC threshold of their own
    assert [s.min_genes for s in specs] == [None, 20, 20]
    # the 136-gene schema fixture is accepted as a panel; the others are whole transcriptomes
    assert [s.min_dataset_genes for s in specs] == [None, 100, None]
