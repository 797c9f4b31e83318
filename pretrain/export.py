"""Turn a run's sharded DeepSpeed checkpoint into one self-contained fp32 model file.

    python -m pretrain.export RUN --out model.pt [--tag step00001000] [--shards OUT]

ZeRO checkpoints are split across ranks (and hold bf16 weights with fp32 masters); DeepSpeed's
``zero_to_fp32`` reassembles the fp32 masters. The file holds everything needed to apply the
model to new data, with no run or shards folder: the weights, the model config, the gene
vocabulary (per organism: its id range, gene names in id order and their symbol aliases), the
label names of the 9 classes, the context the model was trained with and the cell-graph settings
of the shards. It is plain dicts, lists, strings, numbers and tensors, so
``torch.load(path, weights_only=True)`` reads it and ``load_exported`` / ``load_model_file`` need
no DeepSpeed, no process group and any number of devices. The vocabularies are read with
``data_prep.shard_format``'s readers, the one module of data_prep this imports; the graph
settings stay the manifest's plain dict (``pretrain.embed`` makes them a ``GraphConfig``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from data_prep.shard_format import (
    CLASSES,
    GeneRanges,
    Organism,
    OrganismRange,
    load_manifest,
    read_gene_vocab,
    read_labels,
)
from pretrain.config import CKPT_DIR
from pretrain.model import ModelConfig, ScPrintModel, saved_model_settings
from utils import atomic

FORMAT = "scpretrain-model"
FORMAT_VERSION = 1


@dataclass
class ExportedModel:
    """A model file loaded for inference: the model (eval mode, fp32, CPU) and its vocabularies."""

    path: Path
    model: ScPrintModel
    config: ModelConfig
    vocab: GeneRanges  # the training gene vocabulary (global ids = the model's gene ids)
    labels: dict[str, list[str]]  # class -> label names in id order (empty: class not trained)
    train_context: int  # genes per cell the model was trained with
    # how the shards' cell graphs (neighbours) were computed: the build's graph settings as its
    # manifest records them ({}: the build's defaults)
    graph_config: dict
    tag: str  # the checkpoint it was exported from
    # the file's SHA-256: what pretrain.embed records as the model of an embedding, so that a
    # stored embedding is reused only by the file that made it
    sha256: str

    @property
    def genes(self) -> dict[str, OrganismRange]:
        """Per organism curie: taxon/name (``.organism``), id range and ``.index`` (gene -> id)."""
        return self.vocab.ranges


def export(run: str | Path, out: str | Path, tag: str | None = None,
           shards: str | Path | None = None) -> Path:
    """Write the model file of ``run``'s checkpoint ``tag`` (default: the latest) to ``out``.

    The vocabularies come from the run's shards (``train.shards`` of its config.json, or
    ``shards`` when they moved) and must be the ones the run was trained with.
    """
    run, out = Path(run), Path(out)
    config_path, ckpt_dir = run / "config.json", run / CKPT_DIR
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not a training run (no config.json)")
    if tag is None:
        latest = ckpt_dir / "latest"
        if not latest.is_file():
            raise FileNotFoundError(f"{latest}: the run has no checkpoint to export")
        tag = latest.read_text().strip()
    if not (ckpt_dir / tag).is_dir():
        raise FileNotFoundError(f"{ckpt_dir / tag}: no such checkpoint")
    resolved = json.loads(config_path.read_text())
    shards = Path(shards if shards is not None else resolved["train"]["shards"])
    try:
        manifest = load_manifest(shards)
    except (FileNotFoundError, ValueError) as e:
        raise FileNotFoundError(f"{e} (the vocabularies of run {run} come from its shards; give "
                                "their folder with --shards if they moved)") from None
    vocab = GeneRanges(read_gene_vocab(shards / Path(manifest["vocab"]["genes"]).parent)[0])
    labels = read_labels(shards / manifest["labels"]["file"])["classes"]
    n_labels = {c: len(names) for c, names in labels.items()}
    if vocab.n_ids != resolved["n_genes"] or n_labels != resolved["n_labels"]:
        raise ValueError(
            f"{shards}: its vocabularies ({vocab.n_ids} gene ids, labels {n_labels}) "
            f"are not the ones run {run} was trained with ({resolved['n_genes']} gene ids, "
            f"labels {resolved['n_labels']}); were the shards rebuilt after training?")

    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return write_model_file(
        out, state, ModelConfig(**saved_model_settings(resolved["model"])), vocab, labels,
        resolved["data"]["context"],
        label_hierarchy=resolved.get("label_hierarchy"), tag=tag,
        graph_config=manifest["config"]["graph"])


def write_model_file(
    out: str | Path,
    state_dict: dict[str, torch.Tensor],
    model_config: ModelConfig,
    vocab: GeneRanges,
    labels: dict[str, list[str]],
    train_context: int,
    *,
    label_hierarchy: dict | None = None,
    tag: str = "",
    graph_config: dict | None = None,
) -> Path:
    """Write a model file (atomically) from weights, config and the training vocabularies:
    ``labels`` maps each class to its label names in id order, ``graph_config`` holds the
    build's graph settings as its manifest records them (None: the build's defaults).

    ``export`` uses it for a run's checkpoint; it also saves a model built in memory (e.g. an
    untrained ``ScPrintModel(cfg, vocab.n_ids, label_vocab.n_labels())``).
    """
    out = Path(out)
    payload = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "state_dict": {k: v.float().contiguous() for k, v in state_dict.items()},
        "model_config": asdict(model_config),
        "n_genes": vocab.n_ids,
        "n_labels": {c: len(labels.get(c, [])) for c in CLASSES},
        "label_hierarchy": label_hierarchy,
        "tag": tag,
        "train_context": int(train_context),
        "graph_config": dict(graph_config or {}),
        "genes": {curie: {"taxon": r.organism.taxon, "name": r.organism.name, "start": r.start,
                          "size": r.size, "genes": list(r.genes), "aliases": dict(r.aliases)}
                  for curie, r in vocab.ranges.items()},
        "labels": {c: list(labels.get(c, [])) for c in CLASSES},
    }
    with atomic.atomic_path(out) as tmp:
        torch.save(payload, tmp)
    return out


def load_exported(path: str | Path) -> ScPrintModel:
    """A plain ``ScPrintModel`` (eval mode, fp32, CPU) with the exported weights."""
    path = Path(path)
    return _build_model(path, _read_payload(path))


def load_model_file(path: str | Path) -> ExportedModel:
    """The model and the vocabularies of a model file written by this module."""
    path = Path(path)
    payload = _read_payload(path)
    if payload.get("format") != FORMAT or payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: exported without its vocabularies (format "
                         f"{payload.get('format')!r} v{payload.get('format_version')}, expected "
                         f"{FORMAT!r} v{FORMAT_VERSION}); export the run again")
    labels = {cls: list(payload["labels"][cls]) for cls in CLASSES}
    vocab = _gene_vocab(payload["genes"])
    if vocab.n_ids != payload["n_genes"] or {c: len(v) for c, v in labels.items()} != dict(
            payload["n_labels"]):
        raise ValueError(f"{path}: the vocabularies do not match the model's sizes")
    model = _build_model(path, payload)
    return ExportedModel(
        path=path, model=model, config=model.cfg, vocab=vocab, labels=labels,
        train_context=int(payload["train_context"]),
        graph_config=dict(payload["graph_config"]), tag=payload["tag"],
        sha256=_file_sha256(path))


def _file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _read_payload(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a foreign file fails in torch.load with any of many exceptions
        raise ValueError(f"{path}: not an exported model file (torch.load failed with "
                         f"{type(e).__name__}; expected the output of pretrain.export)") from None
    required = ("state_dict", "model_config", "n_genes", "n_labels")
    if not isinstance(payload, dict) or any(k not in payload for k in required):
        raise ValueError(f"{path}: not an exported model file (no {', '.join(required)})")
    return payload


def _build_model(path: Path, payload: dict) -> ScPrintModel:
    try:
        config = ModelConfig(**saved_model_settings(payload["model_config"]))
        model = ScPrintModel(config, payload["n_genes"],
                             payload["n_labels"], payload.get("label_hierarchy"))
        model.load_state_dict(payload["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path}: cannot build the exported model ({e})") from None
    return model.eval()


def _gene_vocab(genes: dict) -> GeneRanges:
    """The gene vocabulary of a model file's ``genes`` entry (ids exactly as in training)."""
    vocab = GeneRanges()
    for curie, o in sorted(genes.items(), key=lambda kv: kv[1]["start"]):
        start, names = int(o["start"]), list(o["genes"])
        vocab.ranges[curie] = OrganismRange(
            Organism(int(o["taxon"]), curie, o["name"]), start, int(o["size"]), names,
            {g: start + i for i, g in enumerate(names)}, dict(o.get("aliases", {})))
    return vocab


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training run directory (holds config.json, checkpoints/)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.pt")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    parser.add_argument("--shards", default=None,
                        help="the run's build_shards output (default: train.shards of its "
                             "config.json)")
    args = parser.parse_args(argv)
    path = export(args.run, args.out, args.tag, args.shards)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
