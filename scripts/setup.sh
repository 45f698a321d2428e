#!/usr/bin/env bash
# Create .venv at the repository root with everything headrace needs to run and test:
# every role's extra that runs without a GPU, and dev.
# Idempotent: re-running only installs what changed. The stamp's key covers every file
# this script reads (itself, pyproject.toml, the constraints).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
EXTRAS="worker-cpu,torch,ray,plot,compress,tf,litert,demo,dev"
CONSTRAINTS=constraints/cpu.txt
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.headrace-setup
key=$( (cat pyproject.toml scripts/setup.sh "$CONSTRAINTS"; echo "$EXTRAS") | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$key" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade pip
# The constraints pin the CPU build of torch: an unpinned torch would pull a multi-GB CUDA
# build (the package metadata only bounds torch from below, by design).
.venv/bin/python -m pip install -q -c "$CONSTRAINTS" -e ".[$EXTRAS]"
# onnx2tf (ONNX -> TFLite) pins exact old versions of numpy, onnx, onnxruntime, protobuf and
# tensorflow; its run-time needs are in the tf extra, so it goes in without its own pins.
.venv/bin/python -m pip install -q --no-deps "onnx2tf==1.29.24"
echo "$key" > "$stamp"
echo "headrace: environment ready in .venv/"
