# `make demo` and `make test` set everything up on first use: a .venv in the repository root
# with torch (CPU wheel) installed first, then this project and its pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: demo test lint clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job end to end on the embedded real datasets: shards from the PBMC control cells and
# the other demo datasets, a short `tiny` training run on one CPU process (DeepSpeed ZeRO-2,
# gloo), export, then the stimulated PBMC cells (never trained on) embedded and scored against
# baselines (benchmarks/bench_quality.py; its full-size run is in docs/benchmarks/quality.md).
demo: $(VENV)/.installed
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) benchmarks/bench_quality.py --out $(DEMO_OUT) \
		--train-sheet data/demo_sheet.csv --ranks 1 --steps 300 --context 512 --batch-size 16
	@echo "shard report: $(DEMO_OUT)/shards/report/summary.txt (plots beside it)"
	@echo "training run: $(DEMO_OUT)/run (tensorboard --logdir $(DEMO_OUT)/run/tb)"

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .numba_cache
