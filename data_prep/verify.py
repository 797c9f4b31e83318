"""Re-check a build's shards against its manifest.

    python -m data_prep.verify OUT

Each shard listed in OUT/manifest.json must exist with the recorded size and sha256, hold exactly
the recorded number of ``.cell`` members, all with keys unique within their stream (an epoch, or
the eval shards), and every sample must decode; each epoch's shards add up to its sample count.
Prints one line per problem; exit status 1 if there is any, 0 when all is well.
"""

from __future__ import annotations

import argparse
import sys
import tarfile
from pathlib import Path

from data_prep.pack import file_sha256
from data_prep.shard_format import SAMPLE_EXT, decode_sample, load_manifest


def check_shard(out: Path, entry: dict, keys: set[str]) -> list[str]:
    """Problems of one shard (empty when it matches its manifest entry)."""
    path = out / entry["path"]
    where = entry["path"]
    if not path.is_file():
        return [f"{where}: missing"]
    problems = []
    size = path.stat().st_size
    if size != entry["bytes"]:
        problems.append(f"{where}: {size} bytes, manifest says {entry['bytes']}")
    if file_sha256(path) != entry["sha256"]:
        problems.append(f"{where}: sha256 differs from the manifest")
    n = 0
    try:
        with tarfile.open(path, "r:") as tar:
            for member in tar:
                key, _, ext = member.name.partition(".")
                if not member.isfile() or ext != SAMPLE_EXT:
                    problems.append(f"{where}: unexpected member {member.name!r}")
                    continue
                if key in keys:
                    problems.append(f"{where}: duplicated sample key {key}")
                keys.add(key)
                try:
                    decode_sample(tar.extractfile(member).read())
                except ValueError as e:
                    problems.append(f"{where}: sample {key} does not decode ({e})")
                n += 1
    except (tarfile.TarError, OSError, EOFError) as e:
        problems.append(f"{where}: unreadable tar ({e})")
    if n != entry["n_samples"]:
        problems.append(f"{where}: {n} samples, manifest says {entry['n_samples']}")
    return problems


def verify(out: str | Path) -> list[str]:
    out = Path(out)
    manifest = load_manifest(out)
    problems = []
    streams: dict[str, list[dict]] = {}
    for entry in manifest["shards"]:
        streams.setdefault(f"epoch {entry['epoch']}", []).append(entry)
    streams["eval"] = manifest["eval_shards"]
    for entries in streams.values():
        keys: set[str] = set()  # keys are positions within one stream
        for entry in entries:
            problems += check_shard(out, entry, keys)
    for epoch in manifest["epochs"]:
        listed = sum(e["n_samples"] for e in streams.get(f"epoch {epoch['epoch']}", []))
        if listed != epoch["n_samples"]:
            problems.append(f"manifest: epoch {epoch['epoch']} shards hold {listed} samples, "
                            f"its entry says {epoch['n_samples']}")
    for kind, total in (("shards", "n_samples"), ("eval_shards", "n_eval_samples")):
        listed = sum(e["n_samples"] for e in manifest[kind])
        if listed != manifest[total]:
            problems.append(f"manifest: {kind} hold {listed} samples, {total} says "
                            f"{manifest[total]}")
    for rel in (manifest["vocab"]["genes"], manifest["labels"]["file"]):
        if not (out / rel).is_file():
            problems.append(f"{rel}: missing")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_prep.verify", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="a build_shards output folder (holding manifest.json)")
    args = p.parse_args(argv)
    try:
        problems = verify(args.out)
    except (FileNotFoundError, ValueError, KeyError) as e:
        print(f"verify: {e}", file=sys.stderr)
        return 1
    for line in problems:
        print(line)
    if problems:
        print(f"verify: {len(problems)} problem(s) in {args.out}", file=sys.stderr)
        return 1
    print(f"verify: {args.out} OK")
    return 0


if __name__ == "__main__":
    sys.exit(main())
