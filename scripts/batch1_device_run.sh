#!/usr/bin/env bash
# Issue 18's batch-1 decode measurement on one lent H200, in one device call (~8 minutes):
# the GPU kernel tests (PDL against plain launches in a CUDA graph, the fused GEMVs),
# scripts/bench_batch1.py (the card's read rate, the GEMV sweep with PDL and without,
# the projections' chain before and with the norms inside the GEMVs, the bare batch-1
# step for each combination) and, with CHECK=1, the logits check against transformers.
#
#   bash scripts/batch1_device_run.sh            # tests + bench_batch1
#   CHECK=1 bash scripts/batch1_device_run.sh    # ... + bench_engine --check
#
# Needs the pytriton/tritonclient wheels in .whl/ (see the device README) and writes
# under $OUT (the device tool's output folder) or ./out.
set -o pipefail
OUT=${OUT:-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 9
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,power.draw --format=csv
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
python3 -c "from llava_node.tiny_checkpoint import build_llava_7b_shaped_checkpoint as b; b('/tmp/llava7b')" &
build=$!
KERNELS_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider tests/node/test_kernels.py \
    2>&1 | tail -15 | tee "$OUT/gputests.txt"
wait $build
timeout "${BENCH_S:-330}" python3 scripts/bench_batch1.py --checkpoint /tmp/llava7b --out "$OUT/batch1.json" \
    2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/log.txt" | tail -60
if [ "${CHECK:-0}" = 1 ]; then
    timeout 150 python3 scripts/bench_engine.py --via engine --checkpoint /tmp/llava7b --check --engines "" \
        --out "$OUT/check.json" 2>&1 | grep -v "Loading\|it/s\]" | tail -8
fi
