# `make demo` and `make test` set everything up on first use: a .venv in the repository root
# with torch (CPU wheel) installed first, then this project and its pinned dependencies.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= out/demo
export NUMBA_CACHE_DIR ?= $(CURDIR)/.numba_cache

.PHONY: demo test lint bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(PY) -m data_prep.build_shards data --sheet data/demo_sheet.csv --out $(DEMO_OUT)/shards --jobs 2
	@echo "report: $(DEMO_OUT)/shards/report/summary.txt (plots beside it)"

test: $(VENV)/.installed
	$(PY) -m ruff check .
	$(PY) -m pytest -q tests

lint: $(VENV)/.installed
	$(PY) -m ruff check .

clean:
	rm -rf $(VENV) out .numba_cache
