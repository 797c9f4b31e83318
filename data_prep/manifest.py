"""``OUT/manifest.json``: the index a trainer reads (shards, vocabularies, configuration, cell
accounting). Deterministic: sorted keys, no timestamps, host names or absolute work paths, so the
same inputs and seed give the same bytes."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from data_prep.config import BuildConfig
from data_prep.pack import SHARD_KEYS
from data_prep.shard_format import FORMAT_NAME, FORMAT_VERSION, MANIFEST
from utils import atomic


def build(*, cfg: BuildConfig, records, loaded, vocab: dict, labels: dict, train: list[dict],
          eval_: list[dict], held_per_dataset: list[int], epochs: list[dict],
          stream: dict) -> dict:
    """Assemble the manifest; checks input = packed + held_out + dropped for every dataset.

    ``records`` are all datasets in build order (rejected ones included); ``loaded`` the accepted
    ones as (record, ingest meta, graph meta); ``train`` the shard records of every epoch in
    epoch order (each with its ``"epoch"``), ``epochs`` one entry per epoch.
    """
    datasets, accounting = [], {}
    for i, ((rec, meta, graph_meta), held) in enumerate(zip(loaded, held_per_dataset)):
        datasets.append({
            "id": i, "name": rec.name, "path": rec.path, "organism": meta["organism"],
            "taxon": meta["taxon"], "n_input": meta["n_input"], "n_kept": meta["n_kept"],
            "n_genes": meta["n_genes"], "genes": meta["genes"], "multiplier": rec.multiplier,
            "counts_source": meta["counts_source"], "label_columns": meta["label_columns"],
            "split": "eval" if rec.name in cfg.pack.eval_datasets else "train",
            "n_clusters": int(graph_meta.get("n_clusters", 0)),
            "graph_rule": graph_meta.get("tiny_rule", ""),
        })
        accounting[rec.name] = {
            "input": meta["n_input"], "packed": meta["n_kept"] - held, "held_out": held,
            "dropped": {k: int(v) for k, v in meta["dropped"].items() if v},
        }
    for rec in records:
        if rec.status != "ok":
            accounting[rec.name] = {"input": rec.n_input, "packed": 0, "held_out": 0,
                                    "dropped": {f"rejected: {rec.problem}": rec.n_input}}
    total = {"input": 0, "packed": 0, "held_out": 0, "dropped": Counter()}
    for name, acc in accounting.items():
        if acc["input"] != acc["packed"] + acc["held_out"] + sum(acc["dropped"].values()):
            raise AssertionError(f"cell accounting of dataset {name} does not add up: {acc}")
        for key in ("input", "packed", "held_out"):
            total[key] += acc[key]
        total["dropped"].update(acc["dropped"])
    total["dropped"] = dict(total["dropped"])
    config = cfg.to_dict()
    config["datasets"] = [r.public() for r in records]
    for d in config["datasets"]:
        for key in ("index", "status", "problem", "n_input"):
            d.pop(key)
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "shards": [{k: s[k] for k in (*SHARD_KEYS, "epoch")} for s in train],
        "eval_shards": [{k: s[k] for k in SHARD_KEYS} for s in eval_],
        "n_samples": sum(s["n_samples"] for s in train),
        "n_eval_samples": sum(s["n_samples"] for s in eval_),
        "epochs": epochs,
        "vocab": vocab,
        "labels": labels,
        "datasets": datasets,
        "config": config,
        "accounting": {"datasets": accounting, "total": total},
        "stream": stream,
        "rejected": [{"name": r.name, "path": r.path, "problem": r.problem}
                     for r in records if r.status != "ok"],
    }


def dumps(manifest: dict) -> str:
    return json.dumps(manifest, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def write(out: Path, manifest: dict) -> None:
    """Written last by a build: its presence means the output is complete."""
    atomic.write_text(Path(out) / MANIFEST, dumps(manifest))
