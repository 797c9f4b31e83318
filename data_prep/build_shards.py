"""Build weighted, neighbour-augmented WebDataset shards from .h5ad datasets.

    python -m data_prep.build_shards [INPUT.h5ad|DIR ...] [--sheet SHEET.csv] --out OUT

Stages: gene names of every dataset (its var only: ids, symbols, spike-ins), joined with the
``--gene-table`` files into one symbol -> Ensembl id map per organism -> ingest each dataset
(validate, genes as canonical ids, drop non-primary cells and gene panels, QC, CSR) -> cell graph
per dataset (PCA, kNN, Leiden, pseudo-labels) -> gene and label vocabularies -> sampling weights
-> each epoch's weighted stream -> tar shards -> OUT/manifest.json -> OUT/report/. The
per-dataset stages run in ``--jobs`` processes. Every stage resumes: rerun the same command
after a crash or ``kill -9`` and it finishes with byte-identical output. A bad dataset is
logged, counted as "rejected: <problem>" in the manifest's accounting and skipped, unless
``--strict``.

On a cluster, split the datasets over W machines (a job array): machine I runs the same command
with ``--num-machines W --machine-index I --out PART_I``; it does the per-dataset stages of its
share (every machine reads the gene names of all datasets, so all use the same symbol map) and
writes PART_I/part.json. Then ``python -m data_prep.merge PART_0 ... PART_{W-1} --out
OUT`` builds the vocabularies, stream, shards, manifest and report from the parts; the result is
identical to a single run over all datasets. The merge's packing can be split over machines too
(``--stage plan``, ``pack``, ``manifest``; ``scripts/slurm_build.sh`` runs the whole build).
"""

from __future__ import annotations

import argparse
import functools
import gzip
import itertools
import json
import logging
import multiprocessing
import os
import sys
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import h5py
from tqdm import tqdm

from data_prep.assemble import DatasetRecord, assemble
from data_prep.config import BuildConfig, add_config_flags, config_from_args
from data_prep.genes import FileGenes, SymbolMap, read_gene_table
from data_prep.graph import build_graph
from data_prep.ingest import DatasetError, ingest_dataset, scan_genes
from data_prep.pack import check_pack_config, held_out_cells
from data_prep.sheet import DatasetSpec, SheetError, discover_inputs
from data_prep.vocab import GeneVocab
from utils import atomic

log = logging.getLogger("data_prep")
PART_FILE = "part.json"
SYMBOLS_FILE = "symbols.tsv"  # the build's symbol map, in OUT/work/genes/
SCAN_VERSION = 1


def mp_context():
    """Fresh interpreters for worker processes (no forked copies of the parent's state)."""
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def progress_factory(enabled: bool):
    def progress(total: int, desc: str) -> tqdm:
        return tqdm(total=total, desc=desc, disable=not enabled, unit="item", dynamic_ncols=True)

    return progress


def given_paths(specs: list[DatasetSpec], inputs: list[str], sheet: str | None) -> list[str]:
    """Each dataset's path as the user gave it (a directory input joined with the file name, a
    sheet row relative to the sheet as given), so outputs hold no machine-specific paths."""
    out = []
    for spec in specs:
        path = str(spec.path)
        for item in inputs:
            p = Path(item)
            if p.is_dir() and p.resolve() == spec.path.parent:
                path = os.path.join(item, spec.path.name)
                break
            if p.is_file() and p.resolve() == spec.path:
                path = item
                break
        else:
            if sheet is not None:
                rel = os.path.relpath(spec.path, Path(sheet).resolve().parent)
                path = os.path.normpath(os.path.join(os.path.dirname(sheet), rel))
        out.append(path)
    return out


def scan_dataset(spec: DatasetSpec, genes_dir: Path, cfg: BuildConfig) -> dict | None:
    """A dataset's ``FileGenes`` (as JSON), cached in ``genes_dir`` (gzip: a name, id and
    symbol per column) and reused while the file, its sheet row and the ingest settings are the
    same. None for a file that cannot be read: the ingest stage rejects it with the reason."""
    path = genes_dir / f"{spec.name}.json.gz"
    try:
        size = spec.path.stat().st_size
    except OSError:
        return None
    key = {"version": SCAN_VERSION, "spec": spec.to_config(), "file_bytes": size,
           "config": cfg.ingest.fingerprint()}
    key["spec"].pop("multiplier")
    done = _read_scan(path)
    if done is not None and done["key"] == key:
        return done["genes"]
    try:
        found = scan_genes(spec, cfg.ingest).to_json()
    except DatasetError:
        return None
    doc = json.dumps({"key": key, "genes": found}, sort_keys=True).encode()
    atomic.write_bytes(path, gzip.compress(doc, mtime=0))
    return found


def _read_scan(path: Path) -> dict | None:
    try:
        doc = json.loads(gzip.decompress(path.read_bytes()))
        return doc if {"key", "genes"} <= set(doc) else None
    except (OSError, EOFError, ValueError):
        return None


def symbol_map(specs: list[DatasetSpec], work: Path, cfg: BuildConfig, jobs: int,
               progress) -> tuple[Path, list[bool]]:
    """The build's symbol -> id map from every dataset's var (not only this machine's share),
    the gene tables and the vocabulary being extended, saved to ``work/genes/symbols.tsv``;
    returns that path and which datasets' gene names could be read.

    The datasets' genes stream through (each file's scan is folded into the map and dropped):
    the build holds the map, O(distinct genes), never every dataset's gene names, which at
    tens of thousands of datasets would be tens of GB."""
    tables = {curie: read_gene_table(path, curie) for curie, path in cfg.gene_tables.items()}
    genes_dir = work / "genes"
    genes_dir.mkdir(parents=True, exist_ok=True)
    readable: list[bool] = []

    def scans():
        for d in _imap(scan_dataset, [(s, genes_dir, cfg) for s in specs], jobs,
                       progress(len(specs), "gene names")):
            readable.append(d is not None)
            if d is not None:
                yield FileGenes.from_json(d)

    previous = SymbolMap(GeneVocab.load(cfg.vocab).aliases()) if cfg.vocab else None
    symbols = SymbolMap.build(scans(), tables, previous)
    path = genes_dir / SYMBOLS_FILE
    symbols.save(path)
    return path, readable


def _map(fn, arg_tuples: list[tuple], jobs: int, bar) -> list:
    """``[fn(*a) for a in arg_tuples]``, in ``jobs`` processes when > 1, in order."""
    return list(_imap(fn, arg_tuples, jobs, bar))


def _imap(fn, arg_tuples: list[tuple], jobs: int, bar) -> Iterator:
    """``fn(*a) for a in arg_tuples``, in ``jobs`` processes when > 1, yielded in order and
    not kept: at most ``2 * jobs`` calls are in flight, so results that finish ahead of a slow
    one do not pile up."""
    if jobs <= 1:
        for args in arg_tuples:
            yield fn(*args)
            bar.update(1)
    else:
        with ProcessPoolExecutor(jobs, mp_context=mp_context()) as pool:
            todo = iter(arg_tuples)
            pending = deque(pool.submit(fn, *a) for a in itertools.islice(todo, 2 * jobs))
            while pending:
                result = pending.popleft().result()
                for a in itertools.islice(todo, 1):
                    pending.append(pool.submit(fn, *a))
                yield result
                bar.update(1)
    bar.close()


def process_dataset(spec: DatasetSpec, work: Path, cfg: BuildConfig,
                    symbols_file: Path | None) -> dict:
    """Ingest + graph of one dataset (in a worker process). Returns the record's outcome fields;
    a bad dataset becomes ``status="rejected"`` unless ``cfg.strict``. ``symbols_file``: the
    build's symbol map (None when the file's gene names could not be read); the dataset gets the
    part of it its genes use, so its artifact is rebuilt only when that part changes."""
    d = work / spec.name
    try:
        used = SymbolMap()
        if symbols_file is not None:
            scan = _read_scan(symbols_file.parent / f"{spec.name}.json.gz")
            genes = FileGenes.from_json(scan["genes"])
            used = _load_symbols(symbols_file).restrict(genes.organism, genes.symbols_to_map())
        ds = ingest_dataset(spec, d / "ingest", cfg.ingest, used)
        if ds.n_cells:
            held = held_out_cells(spec.name, ds.n_cells, cfg.pack, cfg.seed)
            build_graph(ds, d / "graph", cfg.graph, seed=cfg.seed, held=held)
    except Exception as e:
        if cfg.strict:
            raise
        problem = e.problem if isinstance(e, DatasetError) else f"{type(e).__name__}: {e}"
        return {"status": "rejected", "problem": problem, "n_input": count_cells(spec.path)}
    return {"status": "ok", "ingest_dir": str((d / "ingest").resolve()),
            "graph_dir": str((d / "graph").resolve())}


def count_cells(path: Path) -> int:
    """Best-effort cell count of a file that could not be ingested (0 if unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            obs = f["obs"]
            return int(obs[obs.attrs.get("_index", "_index")].shape[0])
    except Exception:
        return 0


def run_datasets(specs: list[DatasetSpec], given: list[str], indices: list[int], work: Path,
                 cfg: BuildConfig, jobs: int, progress,
                 symbols_file: Path, readable: list[bool]) -> list[DatasetRecord]:
    """The per-dataset stages for ``specs[i] for i in indices``, in ``jobs`` processes."""
    records = {i: DatasetRecord(index=i, name=specs[i].name, path=given[i],
                                multiplier=specs[i].multiplier) for i in indices}
    tasks = [(specs[i], work / "datasets", cfg, symbols_file if readable[i] else None)
             for i in indices]
    outcomes = _map(process_dataset, tasks, jobs, progress(len(indices), "ingest + graph"))
    for i, outcome in zip(indices, outcomes):
        _apply(records[i], outcome)
    return [records[i] for i in indices]


def _load_symbols(path: Path) -> SymbolMap:
    """The build's symbol map, read once per process (again when the file is replaced)."""
    st = path.stat()
    return _symbols_at(path, st.st_ino, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=1)
def _symbols_at(path: Path, inode: int, mtime_ns: int, size: int) -> SymbolMap:
    return SymbolMap.load(path)


def _apply(rec: DatasetRecord, outcome: dict) -> None:
    for key, value in outcome.items():
        setattr(rec, key, value)
    if rec.status != "ok":
        log.warning("rejected dataset %s (%s): %s", rec.name, rec.path, rec.problem)


def write_part(out: Path, records: list[DatasetRecord], cfg: BuildConfig, n_datasets: int,
               num_machines: int, machine_index: int, symbols: SymbolMap) -> None:
    doc = {"config": cfg.to_dict(), "n_datasets": n_datasets, "num_machines": num_machines,
           "machine_index": machine_index, "symbols": symbols.digest(),
           "datasets": [{**r.public(), "ingest_dir": os.path.relpath(r.ingest_dir, out) if
                         r.ingest_dir else "", "graph_dir": os.path.relpath(r.graph_dir, out)
                         if r.graph_dir else ""} for r in records]}
    atomic.write_text(out / PART_FILE, json.dumps(doc, sort_keys=True, indent=1) + "\n")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m data_prep.build_shards", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("inputs", nargs="*", help=".h5ad files or directories of them")
    p.add_argument("--sheet", help="dataset sheet (CSV: path, organism, label columns...)")
    p.add_argument("--out", required=True, help="output folder (or this machine's part folder)")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes (default: 1)")
    p.add_argument("--num-machines", "--num-workers", dest="num_machines", type=int, default=1,
                   help="split the datasets over this many machines (then run data_prep.merge); "
                        "--num-workers is its former, deprecated name")
    p.add_argument("--machine-index", "--worker-index", dest="machine_index", type=int, default=0,
                   help="this machine's share, 0-based (--worker-index: deprecated name)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not 0 <= args.machine_index < args.num_machines:
        log.error("--machine-index must be in [0, --num-machines)")
        return 2
    out = Path(args.out)
    progress = progress_factory(not args.quiet)
    try:
        cfg = config_from_args(args)
        specs = discover_inputs(args.inputs, args.sheet)
        given = given_paths(specs, args.inputs, args.sheet)
        check_pack_config(cfg.pack, [s.name for s in specs])
        indices = list(range(args.machine_index, len(specs), args.num_machines))
        symbols_file, readable = symbol_map(specs, out / "work", cfg, args.jobs, progress)
        records = run_datasets(specs, given, indices, out / "work", cfg, args.jobs, progress,
                               symbols_file, readable)
        symbols = _load_symbols(symbols_file)
        if args.num_machines > 1:
            write_part(out, records, cfg, len(specs), args.num_machines, args.machine_index,
                       symbols)
            log.info("part %d/%d written to %s; join the parts with python -m data_prep.merge",
                     args.machine_index, args.num_machines, out)
            return 0
        man = assemble(out, records, cfg, args.jobs, mp_context(), progress, symbols)
    except (DatasetError, SheetError, FileNotFoundError, ValueError, KeyError) as e:
        log.error("%s", e)
        return 1
    total = man["accounting"]["total"]
    log.info("%d train samples in %d shards, %d eval samples; %d of %d input cells packed; "
             "report in %s", man["n_samples"], len(man["shards"]), man["n_eval_samples"],
             total["packed"], total["input"], out / "report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
