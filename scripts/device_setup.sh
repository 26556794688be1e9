# Sourced by the scripts/*_device_run.sh scripts, on a lent GPU machine: the output
# folder ($OUT, the device tool's, or ./out), the pytriton/tritonclient wheels carried in
# .whl/ installed under /tmp/site (the machine reaches no registry; see the device
# README), the project on PYTHONPATH, and the card's state printed.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
