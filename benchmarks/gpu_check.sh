#!/usr/bin/env bash
# The GPU path end to end in one command (benchmarks/gpu_check.py says what it runs):
#
#     bash benchmarks/gpu_check.sh [--out DIR] [--cpu] [--budget-s S] [--shards DIR]
#
# writes DIR/gpu_check.json (keys device, kernels, trainer; default DIR out/gpu_check) and
# DIR/gpu_check.md (the figures as markdown tables, also printed); exits 1 unless every check
# passed. --cpu runs the steps that need no GPU.
#
# On a machine with its own torch and triton but without this project's other needs (DeepSpeed,
# webdataset, anndata, ...) and without internet, it installs them from the wheels `make
# gpu-wheels` prepared (folder .whl, or $SCPRETRAIN_WHEELS) into a folder of its own
# (--no-index --no-deps --target), never touching torch or triton.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
NEEDED="import deepspeed, webdataset, anndata, pynndescent, igraph, leidenalg, tensorboard"

if ! "$PY" -c "$NEEDED" 2>/dev/null; then
    WHEELS=${SCPRETRAIN_WHEELS:-.whl}
    if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        echo "gpu_check: $PY lacks packages ($NEEDED) and $WHEELS/ holds no wheels;" \
             "run 'make gpu-wheels' where pip can reach an index and bring $WHEELS/ along" >&2
        exit 2
    fi
    if ls "$WHEELS"/*.whl | grep -Eq '/(torch|triton)-'; then
        echo "gpu_check: $WHEELS/ holds a torch or triton wheel; this machine's own must stay" >&2
        exit 2
    fi
    SITE=${SCPRETRAIN_SITE:-/tmp/scpretrain-site}
    echo "gpu_check: installing $(ls "$WHEELS"/*.whl | wc -l) wheels from $WHEELS/ into $SITE"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PY" -c "$NEEDED"; then
        echo "gpu_check: packages still missing after installing the wheels (see above)" >&2
        exit 2
    fi
fi

exec "$PY" benchmarks/gpu_check.py "$@"
