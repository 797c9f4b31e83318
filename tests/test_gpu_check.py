"""benchmarks/gpu_check.sh: its --cpu steps end to end (so the GPU check cannot rot), and its
installation guard on a machine that lacks packages."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def _env(repo: Path) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=str(repo / ".numba_cache"))
    env.pop("TRITON_INTERPRET", None)  # the script sets what each step needs
    return env


def test_cpu_steps_pass_and_write_the_report(repo_root, tmp_path):
    """Interpreter kernels against float64, repeated backward, DeepSet correctness, a
    one-process trainer (gloo) with evaluation, checkpoint, kill and resume (the resumed losses
    equal the uninterrupted run's), and its model embedding real cells in fp32 and bf16."""
    out = tmp_path / "check"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(out)],
                         cwd=repo_root, env=_env(repo_root), capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert {"device", "kernels", "trainer"} <= set(result)
    assert result["verdict"] == "PASS"
    assert list(result["part_seconds"]) == ["kernels", "trainer", "speed", "deepset", "embed"]
    assert all(sec >= 0 for sec in result["part_seconds"].values())
    assert sum(result["part_seconds"].values()) <= result["elapsed_s"]
    kernels = result["kernels"]
    assert {r["dtype"] for r in kernels["correctness"]} == {"float32", "bfloat16"}
    for row in kernels["correctness"]:
        assert row["ok"] and 0 < row["max_rel_err"] <= row["tol"], row
        assert {"dq_x", "dk_x", "dv_x", "dq_z", "dk_z", "dv_z"} <= set(row)
    assert kernels["determinism"]["deterministic_bitwise_equal"] is True
    assert kernels["deepset"][0]["rel_err_out"] < 1e-5
    trainer = result["trainer"]
    assert trainer["backend"] == "gloo"
    runs = trainer["runs"]
    assert runs["criss_cross_killed"]["stopped"] is True
    assert runs["criss_cross_killed"]["checkpoints_left"] == ["step00000002"]
    assert runs["criss_cross"]["cells_per_s"] > 0 and runs["full"]["tokens_per_s"] > 0
    assert 0 < runs["criss_cross"]["data_wait_frac"] < 1  # the CPU rank loads in-process
    assert len(runs["criss_cross"]["eval_loss"]) == 2
    assert set(runs) == {"criss_cross", "criss_cross_killed", "criss_cross_resumed", "full"}
    assert runs["criss_cross"]["precision"] == runs["full"]["precision"] == "fp32"
    resume = trainer["resume"]
    assert resume["resumed_from_step"] == 2 and resume["steps_compared"] == 4
    assert resume["losses_match_bitwise"] and resume["eval_losses_match"]
    assert "### Trainer: tiny" in run.stdout and "Verdict: PASS" in run.stdout
    embed = result["embed"]  # the trained model, exported, embeds real cells in both precisions
    assert embed["cells"] == 300 and embed["context"] == 256
    assert embed["fp32_cells_per_s"] > 0 and embed["bf16_cells_per_s"] > 0
    assert embed["workers"] == 0 and embed["samples_workers_s"] == embed["samples_s"]  # a CPU
    assert embed["cos_min"] > 0.999 and embed["same_type"] > 0.9
    # the same figures as markdown beside the JSON, and again from the JSON alone (a run stopped
    # by a time limit keeps its JSON but never reaches its report)
    md = (out / "gpu_check.md").read_text()
    assert "| run | precision | seconds | cells_per_s |" in md and "|---|---|" in md
    (out / "gpu_check.md").unlink()
    again = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--report-from",
                            str(out / "gpu_check.json")], cwd=repo_root, env=_env(repo_root),
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-2000:]
    assert (out / "gpu_check.md").read_text() == md


@pytest.fixture
def bare_python(tmp_path) -> str:
    """A Python without this project's packages (a fresh venv without site packages)."""
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    return str(venv / "bin" / "python")


def test_missing_packages_without_wheels_is_a_clear_error(repo_root, tmp_path, bare_python):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    env = _env(repo_root) | {"PYTHON": bare_python, "SCPRETRAIN_WHEELS": str(wheels)}
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    assert "holds no wheels" in run.stderr and "make gpu-wheels" in run.stderr
    (wheels / "torch-2.11.0-cp312-cp312-manylinux_2_28_x86_64.whl").write_bytes(b"")
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu"], cwd=repo_root, env=env,
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 2 and "torch or triton wheel" in run.stderr


def test_parts_alone_and_the_verdict_on_them(repo_root, tmp_path):
    """--parts kernels runs the kernel checks alone (no shards, no trainer) and passes on them;
    the verdict fails a part that was asked for and skipped or failed, and names it."""
    out = tmp_path / "kernels"
    run = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--cpu", "--out", str(out),
                          "--parts", "kernels"], cwd=repo_root, env=_env(repo_root),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    result = json.loads((out / "gpu_check.json").read_text())
    assert result["parts"] == ["kernels"] and result["trainer"] is None
    assert list(result["part_seconds"]) == ["kernels"]
    assert "embed" not in result and not (out / "shards").exists()
    determinism = result["kernels"]["determinism"]
    assert determinism["deterministic_bitwise_equal"] and determinism["default_bitwise_equal"]
    assert result["verdict"] == "PASS"

    sys.path.insert(0, str(repo_root / "benchmarks"))
    from gpu_check import verdict

    kernels = result["kernels"]
    trainer = {"runs": {"criss_cross": {"cells_per_s": 1.0},
                        "full": {"skipped": "time budget spent"}}}
    asked = {"parts": ["kernels", "trainer"], "kernels": kernels, "trainer": trainer}
    assert verdict(asked) == "FAIL: trainer run full skipped (time budget spent)"
    trainer["runs"]["full"] = {"error": "RuntimeError: rc 1"}
    assert verdict(asked) == "FAIL: trainer run full failed"
    bad = [dict(kernels["correctness"][0], ok=False)]
    assert verdict({"parts": ["kernels"], "kernels": {**kernels, "correctness": bad}}) == (
        f"FAIL: kernel {bad[0]['shapes']} {bad[0]['dtype']}")
