#!/usr/bin/env bash
# Create .venv at the repository root with everything headrace needs to run and test.
# Idempotent: re-running only installs what changed (pyproject.toml is the stamp's key).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.headrace-setup
key=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# The pinned CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[worker,dev,compress,tf]"
# onnx2tf pins exact versions of numpy/onnx/onnxruntime/tensorflow; its run-time needs are in
# the tf extra, so it goes in without its own pins.
.venv/bin/python -m pip install -q --no-deps "onnx2tf==1.29.24"
echo "$key" > "$stamp"
echo "headrace: environment ready in .venv/"
