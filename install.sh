#!/usr/bin/env bash
# Sets up this checkout on a fresh machine: torch first only when it is missing (a CPU machine takes the
# CPU wheel instead of the multi-GB CUDA build), then the package in editable mode with the test extras.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1; then $PY -m pip install -q "torch>=2.11"
  else $PY -m pip install -q "torch==2.13.0"; fi
fi
$PY -m pip install -q -e ".[test]"
