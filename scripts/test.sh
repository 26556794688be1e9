#!/usr/bin/env bash
# Install the project with its test tools, then lint, type-check and run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --dev
# A PostgreSQL server for the multi-replica tests, which start their own on loopback:
# install the binaries where missing, without Debian's default cluster and service.
if ! command -v postgres >/dev/null 2>&1 && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  echo "== installing PostgreSQL (binaries only: no cluster is created, no service started)"
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  if [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    $SUDO mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | $SUDO tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends \
    -o Dpkg::Options::=--force-confold postgresql
fi
# Chromium and its driver for the dashboard's browser test (Debian's packages; Selenium is
# pointed at /usr/bin/chromedriver, so it never downloads a driver).
if [ ! -x /usr/bin/chromedriver ] || { ! command -v chromium >/dev/null 2>&1 && [ ! -x /usr/bin/chromium ]; }; then
  echo "== installing chromium and chromium-driver (the dashboard's browser test)"
  SUDO=""; if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends chromium chromium-driver
fi
PY=.venv/bin/python
echo "== ruff"
"$PY" -m ruff check .
"$PY" -m ruff format --check .
echo "== mypy"
"$PY" -m mypy llava_wire llava_node control_plane llava_stack tests
for model in model_repository/*/1/model.py; do  # each is a module named "model"
  "$PY" -m mypy "$model"
done
echo "== pytest"
"$PY" -m pytest -q -p no:cacheprovider "$@"
