"""The command lines generated from the configuration dataclasses (utils.flags)."""

import argparse
import json
from dataclasses import asdict

import pytest

from data_prep.build_shards import parser as build_parser
from data_prep.config import SKIP as BUILD_SKIP
from data_prep.config import BuildConfig, config_from_args
from pretrain.config import SKIP as TRAIN_SKIP
from pretrain.config import RunConfig, parse_train_config, resolve, resumed_settings
from pretrain.config import parser as train_parser
from utils import flags


def _flag_paths(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in p._actions if a.option_strings and a.dest != "help"}


@pytest.mark.parametrize("cls, make, skip", [(RunConfig, train_parser, TRAIN_SKIP),
                                             (BuildConfig, build_parser, BUILD_SKIP)])
def test_every_setting_is_a_flag_with_its_help(cls, make, skip):
    actions = _flag_paths(make())
    for path in flags.paths(cls):
        if path in skip:  # set by other means (e.g. --gene-table, --shards)
            continue
        assert path in actions, f"{path} has no flag"
        assert actions[path].help and not actions[path].help.startswith("(default"), path


def test_trainer_flags_old_and_nested():
    base = ["--shards", "S", "--out", "R"]
    cfg = parse_train_config([*base, "--max-steps", "7", "--context", "512", "--batch-size", "4",
                              "--deepspeed_config", "ds_configs/zero1.json", "--attention",
                              "full", "--activation-checkpointing", "--workers", "0", "--views",
                              "1", "--lr", "1e-3", "--warmup_steps", "3", "--deterministic",
                              "--model.w-zinb", "2.5", "--model.w_contrastive", "0.5",
                              "--data.mask-max", "0.4", "--data.n-neighbours", "3",
                              "--model.d-model", "128"])
    assert (cfg.train.max_steps, cfg.train.deepspeed_config, cfg.train.deterministic) == (
        7, "ds_configs/zero1.json", True)
    assert (cfg.data.context, cfg.data.batch_size, cfg.data.num_workers, cfg.data.views) == (
        512, 4, 0, 1)
    assert (cfg.data.mask_max, cfg.data.n_neighbours, cfg.data.shards) == (0.4, 3, "S")
    assert (cfg.model.attention, cfg.model.checkpointing, cfg.model.d_model) == ("full", True, 128)
    assert (cfg.model.w_zinb, cfg.model.w_contrastive, cfg.model.n_layers) == (2.5, 0.5, 2)
    assert (cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.grad_clip) == (1e-3, 3, 40.0)


def test_trainer_defaults_come_from_the_preset():
    tiny = resolve({"train.shards": "S"})
    assert (tiny.optim.lr, tiny.data.batch_size, tiny.model.d_model) == (2e-3, 16, 64)
    assert (tiny.data.views, tiny.data.num_workers, tiny.data.short_context_min) == (2, -1, 800)
    large = resolve({"train.model": "large", "train.seed": 3, "data.context": 512})
    assert (large.optim.lr, large.optim.warmup_steps, large.model.d_model) == (5e-5, 4000, 1280)
    assert (large.data.seed, large.data.short_context_min) == (3, 512)
    with pytest.raises(ValueError, match="unknown model preset"):
        resolve({"train.model": "huge"})
    with pytest.raises(SystemExit):  # a section's own check, reported by the parser
        parse_train_config(["--shards", "S", "--out", "R", "--data.views", "3"])


def test_build_flags_short_and_nested():
    args = build_parser().parse_args([
        "in.h5ad", "--out", "O", "--min-genes", "5", "--graph.k", "7", "--no-pool-cell-types",
        "--vocab-block", "64", "--neighbours", "4", "--eval-datasets", "a", "b", "--keep-going",
        "--pack.epochs", "3", "--gene-table", "human=t.tsv"])
    cfg = config_from_args(args)
    assert (cfg.ingest.min_genes, cfg.graph.k, cfg.weights.pool_cell_types) == (5, 7, False)
    assert (cfg.vocab_sizing.block, cfg.graph.n_neighbours_kept, cfg.pack.neighbours) == (64, 4, 4)
    assert (cfg.pack.eval_datasets, cfg.pack.epochs, cfg.strict) == (["a", "b"], 3, False)
    assert cfg.gene_tables == {"NCBITaxon:9606": "t.tsv"}
    assert config_from_args(build_parser().parse_args(["--out", "O"])) == BuildConfig()
    assert config_from_args(build_parser().parse_args(["--out", "O", "--strict"])).strict


def test_build_machine_split_flags_and_their_deprecated_names():
    new = build_parser().parse_args(["--out", "O", "--num-machines", "3", "--machine-index", "2"])
    old = build_parser().parse_args(["--out", "O", "--num-workers", "3", "--worker-index", "2"])
    assert (new.num_machines, new.machine_index) == (old.num_machines, old.machine_index) == (3, 2)


def test_trainer_options_are_no_prefix_of_torchrun_options():
    """torchrun's parser abbreviates: a script option that begins one of its options would be
    taken for it (two: an 'ambiguous option' error). Only --local-rank, which the deepspeed
    launcher passes, begins one (--local-ranks-filter), and torchrun never sees it."""
    from torch.distributed.run import get_args_parser

    theirs = [o for a in get_args_parser()._actions for o in a.option_strings]
    ours = [o for a in train_parser()._actions for o in a.option_strings if o not in ("-h",
                                                                                   "--help")]
    clashes = {o for o in ours for t in theirs if t.startswith(o)}
    assert clashes == {"--local-rank", "--local_rank"}


@pytest.mark.parametrize("precision, native, bf16, autocast", [
    ("auto", True, False, True), ("auto", False, False, False), ("bf16", False, True, False),
    ("fp32", True, False, False), ("bf16-mixed", True, False, True)])
def test_precision_auto_is_bf16_where_native(repo_root, precision, native, bf16, autocast):
    """``auto`` (the flag's default and the JSON's) picks bf16-mixed where the device multiplies
    bf16 natively and fp32 where it would emulate it (several times slower on an AVX2 CPU); an
    explicit choice wins on both; bf16-mixed is DeepSpeed's torch autocast without its bf16
    mode, and the two together are refused."""
    from pretrain.train import bf16_matmuls, resolve_ds_config

    cfg = parse_train_config(["--shards", "S", "--out", "R", "--precision", precision])
    ds = resolve_ds_config(cfg, repo_root / "ds_configs" / "zero2.json", native_bf16=native)
    assert ds["bf16"]["enabled"] is bf16
    assert ds.get("torch_autocast", {}).get("enabled", False) is autocast
    assert bf16_matmuls(ds) is (bf16 or autocast)


def test_bf16_and_autocast_together_are_refused(repo_root, tmp_path):
    from pretrain.train import resolve_ds_config

    both = json.loads((repo_root / "ds_configs" / "zero2.json").read_text())
    both.update(bf16={"enabled": True}, torch_autocast={"enabled": True, "dtype": "bfloat16"})
    (tmp_path / "both.json").write_text(json.dumps(both))
    cfg = parse_train_config(["--shards", "S", "--out", "R"])
    with pytest.raises(ValueError, match="bf16 and torch_autocast are both enabled"):
        resolve_ds_config(cfg, tmp_path / "both.json", native_bf16=True)
    with pytest.raises(SystemExit):
        parse_train_config(["--shards", "S", "--out", "R", "--precision", "fp16"])
    own = json.loads((repo_root / "ds_configs" / "zero2.json").read_text())  # under auto, a
    own["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}  # JSON's autocast is kept
    (tmp_path / "own.json").write_text(json.dumps(own))
    ds = resolve_ds_config(cfg, tmp_path / "own.json", native_bf16=False)
    assert ds["torch_autocast"]["enabled"] is True and ds["bf16"]["enabled"] is False


def test_a_resumed_run_keeps_its_saved_model(tmp_path):
    """With a checkpoint in --out, unset model settings are the saved run's (a setting the saved
    configuration predates at the value it had), explicit ones must match them, the way the
    model is computed may change, and --no-resume ignores the saved run."""
    base = ["--shards", "S", "--out", str(tmp_path)]
    saved = asdict(resolve({"train.model": "tiny", "model.d_model": 32, "model.n_heads": 2}))
    del saved["model"]["pooled_weights"]  # saved before the setting existed
    saved["deepspeed"] = {"bf16": {"enabled": True}}  # trained in bf16 mode, auto's old meaning
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert parse_train_config(base).model.d_model == 64  # no checkpoint yet: a new run
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "latest").write_text("step00000010")
    cfg = parse_train_config(base)
    assert (cfg.model.d_model, cfg.model.pooled_weights, cfg.train.model) == (32, "uniform", "tiny")
    assert cfg.train.precision == "bf16"  # kept; a given one wins
    assert parse_train_config([*base, "--precision", "bf16-mixed"]).train.precision == "bf16-mixed"
    cfg = parse_train_config([*base, "--model.d-model", "32", "--model.kernels", "reference",
                              "--max-steps", "50"])
    assert (cfg.model.d_model, cfg.model.kernels, cfg.train.max_steps) == (32, "reference", 50)
    for conflict in (["--model.d-model", "64"], ["--model.pooled-weights", "attention"],
                     ["--model", "small"]):
        with pytest.raises(SystemExit):
            parse_train_config([*base, *conflict])
    with pytest.raises(ValueError, match=r"model.d_model is 32 there, 64 here"):
        resumed_settings({"train.out": str(tmp_path), "model.d_model": 64})
    fresh = parse_train_config([*base, "--no-resume", "--model.d-model", "128"])
    assert (fresh.model.d_model, fresh.model.pooled_weights) == (128, "attention")
