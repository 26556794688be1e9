#!/usr/bin/env bash
# Install, then run the local stack (tiny model unless LLAVA_CHECKPOINT is set).
# Ctrl-C stops everything it started.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m llava_node.launcher "$@"
