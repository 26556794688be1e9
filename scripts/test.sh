#!/usr/bin/env bash
# Install the project with its test tools, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
PY=.venv/bin/python
echo "== ruff"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
echo "== mypy"
"$PY" -m mypy llava_node control_plane tests
for model in model_repository/*/1/model.py; do  # each is a module named "model"
  "$PY" -m mypy "$model"
done
echo "== pytest"
"$PY" -m pytest -q -p no:cacheprovider "$@"
