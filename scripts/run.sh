#!/usr/bin/env bash
# Install, then run the local stack: two Triton nodes (tiny model unless LLAVA_CHECKPOINT
# names a llava-hf directory) and the control plane on http://127.0.0.1:21001.
# Ctrl-C stops everything it started. Options: python -m llava_stack --help
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec .venv/bin/python -m llava_stack "$@"
