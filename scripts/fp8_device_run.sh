#!/usr/bin/env bash
# Issue 18's float8-weight measurement on one lent H200, in one device call (~9 minutes):
# the GPU kernel tests, the projections' micro-benchmark (bf16 cuBLAS against float8
# weights), the logits check (bf16 and fp8 weights against transformers' bf16: first
# step and 16 teacher-forced steps), the bare decode step at batch 1/8/32 for both, and
# one node per weight dtype (1 stream and 32 streams sustained) through tritonserver.
#
#   PART=1 bash scripts/fp8_device_run.sh   # tests, fp8_linear, check, micro  (~6 min)
#   PART=2 bash scripts/fp8_device_run.sh   # the two nodes                    (~5 min)
#
# Needs the pytriton/tritonclient wheels in .whl/ (see the device README) and writes
# under $OUT (the device tool's output folder) or ./out.
. scripts/device_setup.sh
test -f llava_node/engine/fp8_weights.py || { echo "not the fp8 tree"; exit 3; }
if [ "${PART:-1}" = 1 ]; then
    KERNELS_TEST_DEVICE=cuda timeout 150 python3 -m pytest -q -p no:cacheprovider \
        tests/node/test_fp8_weights.py -k "gemv or matmul or gpu" 2>&1 | tail -15 | tee "$OUT/gputests.txt"
    timeout 120 python3 scripts/bench_engine.py --phase fp8_linear --out "$OUT/fp8_linear.json" 2>&1 | tail -8
    timeout 360 python3 scripts/bench_engine.py --via engine --checkpoint /tmp/llava7b --check --micro \
        --weight-dtypes auto,fp8 --engines "" --out "$OUT/fp8.json" 2>&1 | grep -v "Loading\|it/s\]" \
        | tee "$OUT/log.txt" | tail -40
else
    timeout 540 python3 scripts/bench_engine.py --via engine --no-cancel --checkpoint /tmp/llava7b \
        --engines "batching,batching@LLAVA_WEIGHT_DTYPE=fp8" --streams 32 --sustained-s 20 --single-runs 3 \
        --out "$OUT/fp8-engines.json" 2>&1 | grep -v "Loading\|it/s\]" | tee "$OUT/log2.txt" | tail -30
fi
