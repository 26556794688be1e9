#!/usr/bin/env bash
# Issue 18's batch-1 decode measurement on one lent H200, in one device call (<= 10 min).
#
#   bash scripts/batch1_device_run.sh            # GPU kernel tests + bench_batch1 (all parts)
#   PARTS=step,step_fp8 CHECK=1 NODE=1 bash scripts/batch1_device_run.sh
#   KTESTS=gemv PARTS=step NODE=1 bash scripts/batch1_device_run.sh   # only the GEMV's kernel tests
#
# GPU kernel tests (PDL against plain launches in a CUDA graph, the fused GEMVs);
# scripts/bench_batch1.py (PARTS: ceiling, sweep, chain, step, step_fp8); CHECK=1: the
# logits check against transformers (bench_engine --check); NODE=1: the engine through a
# real tritonserver at 1, 8, 32 and 64 streams sustained (one image, the workload).
# Needs the pytriton/tritonclient wheels in .whl/ (see the device README) and writes
# under $OUT (the device tool's output folder) or ./out.
. scripts/device_setup.sh
python3 -c "import triton, torch; print('triton', triton.__version__, 'torch', torch.__version__)"
python3 -c "from llava_node.tiny_checkpoint import build_llava_7b_shaped_checkpoint as b; b('/tmp/llava7b')" &
build=$!
KERNELS_TEST_DEVICE=cuda timeout 180 python3 -m pytest -q -p no:cacheprovider tests/node/test_kernels.py -k "${KTESTS:-}" \
    2>&1 | tail -3 | tee "$OUT/gputests.txt"
KERNELS_TEST_DEVICE=cuda timeout 60 python3 -m pytest -q -p no:cacheprovider tests/node/test_fp8_weights.py \
    -k "gemv or matmul or gpu" 2>&1 | tail -3 | tee -a "$OUT/gputests.txt"
wait $build
timeout "${BENCH_S:-330}" python3 scripts/bench_batch1.py --checkpoint /tmp/llava7b --out "$OUT/batch1.json" \
    --parts "${PARTS:-ceiling,sweep,chain,step,step_fp8}" 2>&1 | grep -v "Loading\|it/s\]\|profiler\|_warn_once" \
    | tee "$OUT/log.txt" | tail -60
if [ "${CHECK:-0}" = 1 ]; then
    timeout 150 python3 scripts/bench_engine.py --via engine --checkpoint /tmp/llava7b --check --engines "" \
        --out "$OUT/check.json" 2>&1 | grep -v "Loading\|it/s\]" | tail -3
fi
if [ "${NODE:-0}" = 1 ]; then
    timeout 240 python3 scripts/bench_engine.py --via engine --checkpoint /tmp/llava7b --engines batching \
        --streams 1,8,32,64 --no-cancel --sustained-only --sustained-s 10 --sustained-warmup-s 3 --single-runs 3 \
        --out "$OUT/node.json" 2>&1 | grep -v "Loading\|it/s\]" | tail -25
fi
