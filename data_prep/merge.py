"""Join the parts of a build split across machines into one output.

    # on machine I of W (e.g. a job-array task), the same inputs and flags everywhere:
    python -m data_prep.build_shards INPUTS... --num-machines W --machine-index I --out parts/I
    # then once, when all parts are done:
    python -m data_prep.merge parts/0 parts/1 ... --out OUT [--jobs N]

The machines run the per-dataset stages (ingest, cell graph) of their share of the datasets. The
vocabularies, weights and stream need every dataset, so the merge builds them, packs the shards
and writes the manifest and report, reading the parts' artifacts in place (keep the parts until
the merge is done). The result is byte-identical to a single run over all datasets; like a build,
a merge resumes where it stopped when rerun.

Packing is most of the merge's work; it can be spread over P machines of a job array too, with
the same arguments at each step and OUT on storage they all see:

    python -m data_prep.merge PARTS... --out OUT --stage plan          # once: the draw
    python -m data_prep.merge PARTS... --out OUT --stage pack \
        --num-machines P --machine-index J --jobs N                     # machine J of P
    python -m data_prep.merge PARTS... --out OUT --stage manifest --num-machines P   # once

Machine J packs a contiguous range of the plan's shards; the shards of all P machines are
byte-identical to those of a one-machine merge. The manifest stage checks that every shard is
there (naming the missing ones and the machines that pack them) before it writes the manifest
and report.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from data_prep.assemble import (
    DatasetRecord,
    assemble,
    check_plan,
    finish,
    plan,
    plan_dir,
    stream_names,
)
from data_prep.build_shards import PART_FILE, SYMBOLS_FILE, mp_context, progress_factory
from data_prep.config import BuildConfig
from data_prep.genes import SymbolMap
from data_prep.pack import pack_all

log = logging.getLogger("data_prep")
STAGES = ("all", "plan", "pack", "manifest")


def load_parts(parts: list[str | Path]) -> tuple[list[DatasetRecord], BuildConfig, SymbolMap]:
    """Records of all datasets from the parts, the build configuration and symbol map; checks
    the parts belong to one build."""
    records: dict[int, DatasetRecord] = {}
    first = None
    for part in parts:
        part = Path(part)
        try:
            doc = json.loads((part / PART_FILE).read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"{part}: no {PART_FILE}; has its machine finished?") from None
        # "num_workers": the name in parts written before --num-machines
        n_machines = doc["num_machines"] if "num_machines" in doc else doc["num_workers"]
        key = (doc["config"], doc["n_datasets"], n_machines, doc["symbols"])
        if first is None:
            first = key
        elif key != first:
            raise ValueError(f"{part}: built with other inputs or settings than {parts[0]}")
        for d in doc["datasets"]:
            if d["index"] in records:
                raise ValueError(f"{part}: dataset {d['name']} is in two parts")
            for k in ("ingest_dir", "graph_dir"):
                d[k] = str((part / d[k]).resolve()) if d[k] else ""
            records[d["index"]] = DatasetRecord(**d)
    assert first is not None
    missing = sorted(set(range(first[1])) - set(records))
    if missing:
        raise ValueError(f"{len(missing)} of {first[1]} datasets are in no part (parts of "
                         f"machines {sorted({i % first[2] for i in missing})} missing?)")
    symbols = SymbolMap.load(Path(parts[0]) / "work" / "genes" / SYMBOLS_FILE)
    if symbols.digest() != first[3]:
        raise ValueError(f"{parts[0]}: work/genes/{SYMBOLS_FILE} is not the one of its part.json")
    return [records[i] for i in sorted(records)], BuildConfig.from_dict(first[0]), symbols


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("parts", nargs="+", help="the machines' --out folders")
    p.add_argument("--out", required=True, help="output folder of the joined build")
    p.add_argument("--jobs", type=int, default=1, help="parallel packing processes")
    p.add_argument("--stage", choices=STAGES, default="all",
                   help="all (default): plan, pack and manifest here; plan: vocabularies, "
                        "groups and the streams' draw only; pack: this machine's shards; "
                        "manifest: manifest and report once every shard is packed")
    p.add_argument("--num-machines", type=int, default=1,
                   help="machines that pack the shards (with --stage pack and manifest)")
    p.add_argument("--machine-index", type=int, default=0,
                   help="this machine's range of shards, 0-based (with --stage pack)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    if not 0 <= args.machine_index < args.num_machines:
        log.error("--machine-index must be in [0, --num-machines)")
        return 2
    if args.num_machines > 1 and args.stage == "all":
        log.error("--num-machines needs --stage pack (then --stage manifest)")
        return 2
    out = Path(args.out)
    progress = progress_factory(not args.quiet)
    try:
        records, cfg, symbols = load_parts(args.parts)
        if args.stage == "all":
            man = assemble(out, records, cfg, args.jobs, mp_context(), progress, symbols)
        elif args.stage == "plan":
            plan(out, records, cfg, symbols)
            log.info("plan written to %s; now pack its shards (--stage pack)", plan_dir(out))
            return 0
        elif args.stage == "pack":
            check_plan(out, records, cfg)
            done = pack_all(plan_dir(out), out, stream_names(cfg), args.jobs, mp_context(),
                            progress, args.num_machines, args.machine_index)
            log.info("machine %d/%d: %d shards packed", args.machine_index, args.num_machines,
                     sum(len(v) for v in done.values()))
            return 0
        else:
            man = finish(out, records, cfg, args.num_machines)
    except (FileNotFoundError, ValueError, KeyError) as e:
        log.error("%s", e)
        return 1
    log.info("%d train samples in %d shards; report in %s", man["n_samples"], len(man["shards"]),
             Path(args.out) / "report")
    return 0


if __name__ == "__main__":
    sys.exit(main())
