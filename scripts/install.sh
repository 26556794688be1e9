#!/usr/bin/env bash
# Create .venv and install the project into it. Idempotent: a second run is quick.
#   scripts/install.sh          runtime dependencies and the README examples' (openai)
#   scripts/install.sh --dev    plus the test and lint tools
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

# torch first, so that nothing below pulls a multi-GB CUDA build onto a CPU host:
# a host without an NVIDIA GPU gets the CPU build; a GPU host gets the default build.
if ! "$PY" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "$PY" -m pip install -q torch
  else
    "$PY" -m pip install -q "torch==2.13.0" || "$PY" -m pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi

# the README's client examples (the openai SDK) work in this venv; --dev adds the tests' tools
extras="[examples]"
if [ "${1:-}" = "--dev" ]; then extras="[dev,examples]"; fi
# (without setuptools' "Editable installation" notice box, printed at every install)
PYTHONWARNINGS="ignore:Editable installation" "$PY" -m pip install -q -e ".${extras}"
echo "installed into $VENV ($("$PY" -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'))"
