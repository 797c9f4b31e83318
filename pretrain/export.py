"""Turn a run's sharded DeepSpeed checkpoint into one fp32 file that a plain model loads.

    python -m pretrain.export RUN --out model.pt [--tag step00001000]

ZeRO checkpoints are split across ranks (and hold bf16 weights with fp32 masters); DeepSpeed's
``zero_to_fp32`` reassembles the fp32 masters. The file holds ``state_dict``, the model config,
the vocabulary and label sizes and the step, so ``load_exported`` needs nothing else: no
DeepSpeed, no process group, any number of devices.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from pretrain.model import ModelConfig, ScPrintModel
from pretrain.train import CKPT_DIR


def export(run: str | Path, out: str | Path, tag: str | None = None) -> Path:
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

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
    state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    payload = {
        "state_dict": {k: v.float().contiguous() for k, v in state.items()},
        "model_config": resolved["model"],
        "n_genes": resolved["n_genes"],
        "n_labels": resolved["n_labels"],
        "label_hierarchy": resolved.get("label_hierarchy"),
        "tag": tag,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def load_exported(path: str | Path) -> ScPrintModel:
    """A plain ``ScPrintModel`` (eval mode, fp32, CPU) with the exported weights."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = ScPrintModel(ModelConfig(**payload["model_config"]), payload["n_genes"],
                         payload["n_labels"], payload.get("label_hierarchy"))
    model.load_state_dict(payload["state_dict"])
    return model.eval()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", help="training run directory (holds config.json, checkpoints/)")
    parser.add_argument("--out", required=True, help="output file, e.g. model.pt")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: the latest)")
    args = parser.parse_args(argv)
    path = export(args.run, args.out, args.tag)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
