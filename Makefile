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

# The main job end to end on the embedded real datasets: shards (with a held-out split), then
# a short `tiny` training run on one CPU process (DeepSpeed ZeRO-2, gloo).
demo: $(VENV)/.installed
	$(PY) -m data_prep.build_shards data --sheet data/demo_sheet.csv --out $(DEMO_OUT)/shards \
		--jobs 2 --eval-fraction 0.05
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(VENV)/bin/torchrun --standalone --nproc_per_node 1 \
		pretrain/train.py --deepspeed_config ds_configs/zero2.json --shards $(DEMO_OUT)/shards \
		--out $(DEMO_OUT)/run --model tiny --max-steps 100 --context 512 --batch-size 8 \
		--lr 1e-3 --warmup-steps 10 --eval-every 50 --ckpt-every 50
	@echo "shard report: $(DEMO_OUT)/shards/report/summary.txt (plots beside it)"
	@echo "training run: $(DEMO_OUT)/run (tensorboard --logdir $(DEMO_OUT)/run/tb)"

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .numba_cache
