#!/usr/bin/env bash
# Issue 18's sustained-load measurement on one lent H200, in one device call (~9 min):
# the mixed-step micro-benchmark at 64 decode rows with its correctness check (chunked
# against whole prefill, the graph set at 512 rows), then 1, 8, 32 and 64 streams
# sustained through tritonserver for the engine, the engine with one chunk size
# (LLAVA_PREFILL_CHUNK_MAX=256: what it did before), and transformers' generate (1 and 8
# streams: it serves one at a time). --no-cancel: the stub's BYTES inputs break under the
# device's NumPy 2, and the engine's cancel call is one. MIXED=1 adds the micro-benchmark.
#
#   bash scripts/sustained_device_run.sh                 # every request its own image
#   IMAGES=same bash scripts/sustained_device_run.sh     # one image: the prefix cache serves it
#
# Needs the pytriton/tritonclient wheels in .whl/ (see the device README) and writes
# under $OUT (the device tool's output folder) or ./out.
. scripts/device_setup.sh
if [ "${IMAGES:-distinct}" = distinct ]; then
    extra=(--distinct-images)
    [ -n "${MIXED:-}" ] && extra+=(--mixed)
    engines="batching,batching@LLAVA_PREFILL_CHUNK_MAX=256,hf_generate"
else
    extra=()
    engines="batching,hf_generate"
fi
timeout 560 python3 scripts/bench_engine.py --via engine --checkpoint /tmp/llava7b "${extra[@]}" \
    --engines "$engines" --streams 1,8,32,64 --baseline-streams 1,8 --no-cancel --sustained-only --sustained-s 10 --sustained-warmup-s 3 \
    --single-runs 3 --out "$OUT/sustained-${IMAGES:-distinct}.json" 2>&1 | grep -v "Loading\|it/s\]" \
    | tee "$OUT/log-${IMAGES:-distinct}.txt" | tail -40
