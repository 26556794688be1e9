# Sourced by the scripts/*_device_run.sh scripts, on a lent GPU machine: the output
# folder ($OUT, the device tool's, or ./out), the pytriton/tritonclient wheels carried in
# .whl/ installed under /tmp/site (the machine reaches no registry; see the device
# README), the project on PYTHONPATH, and the card's state printed.
#
# The wheels that work there (2026-12-03: its image has grpcio 1.84 and protobuf 7, no
# rapidjson; tritonclient 2.73's generated code wants protobuf 6): download them here with
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 \
#     --platform manylinux1_x86_64 -d .whl nvidia-pytriton==0.7.0 tritonclient==2.61.0 \
#     python-rapidjson==1.25
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
python3 -c "import tritonclient.grpc.aio" 2>/dev/null \
    || echo "warning: tritonclient.grpc does not import here: the node parts will fail (see above)"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
