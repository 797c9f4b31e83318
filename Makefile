# `make demo` and `make test` set everything up on first use: a .venv in the repository root
# with torch (CPU wheel) installed first, then this project and its pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: demo test lint clean gpu-wheels

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# The main job end to end on the embedded real datasets: shards from the PBMC control cells and
# the other demo datasets, a short `tiny` training run on two CPU processes (DeepSpeed ZeRO-2,
# gloo), export, then the stimulated PBMC cells (never trained on) embedded and scored against
# baselines (benchmarks/bench_quality.py; its full-size run is in docs/benchmarks/quality.md).
# Single-cell shards (no meta-cells): a run this short learns single cells more slowly from
# summed profiles (docs/benchmarks/quality.md, "Meta-cells in short runs").
demo: $(VENV)/.installed
	DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 $(PY) benchmarks/bench_quality.py --out $(DEMO_OUT) \
		--train-sheet data/demo_sheet.csv --build-args '--metacell-fraction 0' \
		--ranks 2 --steps 450 --context 512 --batch-size 16
	@echo "shard report: $(DEMO_OUT)/shards/report/summary.txt (plots beside it)"
	@echo "training run: $(DEMO_OUT)/seed0/run (tensorboard --logdir $(DEMO_OUT)/seed0/run/tb)"

# One pytest worker per usable CPU; a test file stays on one worker, so its module fixtures
# (shard builds, trained runs) are made once. Most tests run one thread (OMP_NUM_THREADS=1).
TEST_WORKERS ?= $(shell nproc 2>/dev/null || sysctl -n hw.ncpu 2>/dev/null || echo 1)

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

# Wheels for a GPU machine without internet that has its own torch and triton (Python 3.12,
# manylinux x86_64): what benchmarks/gpu_check.sh installs there with --no-index --no-deps.
# The packages this project needs beyond such an image, at the versions of this venv, and the
# project itself; never torch or triton. DeepSpeed ships only a source archive: its wheel is
# built here (pure Python, no pre-compiled ops).
GPU_WHEELS ?= .whl
GPU_WHEEL_PACKAGES := webdataset braceexpand anndata array-api-compat legacy-api-wrap natsort \
	scverse-misc session-info2 zarr donfig google-crc32c numcodecs pynndescent igraph texttable \
	leidenalg hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions \
	packaging zstandard
GPU_PLATFORMS := $(foreach p,manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 \
	manylinux2014_x86_64 manylinux1_x86_64,--platform $(p))

gpu-wheels: $(VENV)/.installed
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(PY) -c "import importlib.metadata as m, sys; \
		print('\n'.join(f'{n}=={m.version(n)}' for n in sys.argv[1:]))" \
		$(GPU_WHEEL_PACKAGES) > $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
		--implementation cp $(GPU_PLATFORMS) -d $(GPU_WHEELS) -r $(GPU_WHEELS)/requirements.txt
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) \
		deepspeed==$$($(PY) -c "import importlib.metadata as m; print(m.version('deepspeed'))")
	$(PY) -m pip wheel -q --no-deps --no-build-isolation -w $(GPU_WHEELS) .
	@ls $(GPU_WHEELS)/*.whl | grep -E '/(torch|triton)-' && exit 1 || true
	@du -sh $(GPU_WHEELS)

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .numba_cache
