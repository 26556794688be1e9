"""Time the paged decode-attention kernels over launch configurations, on one GPU.

Each configuration runs over ``--layers`` separate caches (so that L2 holds none of them,
as in a decode step), ``--batch`` rows of ``--context`` tokens with the 7B model's heads,
for the bf16 cache and the float8 one; prints a table and writes JSON. The engine's
defaults (``GROUPS_CONFIG``, ``GROUPS_CONFIG_FP8`` in ``llava_node/engine/kernels.py``)
were chosen with it.

    python3 scripts/tune_decode_attention.py --out tune.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch

from llava_node.engine import kernels
from llava_node.engine.kernels import DecodeConfig


def time_config(
    caches: list[tuple[torch.Tensor, torch.Tensor]],
    q: torch.Tensor,
    tables: torch.Tensor,
    lens: torch.Tensor,
    *,
    group_kernel: bool,
    cfg: DecodeConfig,
    num_splits: int | None,
    reps: int = 10,
) -> float:
    """Milliseconds per kernel call (averaged over every layer's cache and ``reps``)."""
    fp8 = caches[0][0].element_size() == 1
    attr = "HEADS_CONFIG" if not group_kernel else "GROUPS_CONFIG_FP8" if fp8 else "GROUPS_CONFIG"
    saved = getattr(kernels, attr)
    setattr(kernels, attr, cfg)
    try:
        scale = 1.0 / math.sqrt(q.shape[-1])

        def run() -> None:
            for k, v in caches:
                kernels.paged_decode_attention(
                    q, k, v, tables, lens, scale, 16, num_splits=num_splits, group_kernel=group_kernel
                )

        run()  # compile
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(reps):
            run()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / (reps * len(caches))
    finally:
        setattr(kernels, attr, saved)


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--context", type=int, default=680)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=32)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("tune_decode_attention.json"))
    args = parser.parse_args()
    dev = torch.device("cuda")
    b, n, page = args.batch, args.context, 16
    per_seq = -(-n // page)
    tables = (torch.arange(b * per_seq, device=dev) + 1).reshape(b, per_seq)
    lens = torch.full((b,), n, dtype=torch.int64, device=dev)
    rows = (b * per_seq + 1) * page
    q = torch.randn(b, args.heads, args.head_dim, device=dev, dtype=torch.bfloat16)
    results: list[dict[str, Any]] = []
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        caches = [
            (
                torch.randn(rows, args.kv_heads, args.head_dim, device=dev).to(dtype),
                torch.randn(rows, args.kv_heads, args.head_dim, device=dev).to(dtype),
            )
            for _ in range(args.layers)
        ]
        kv_bytes = 2 * b * n * args.kv_heads * args.head_dim * caches[0][0].element_size()
        grid = [
            *((True, *c) for c in itertools.product([64, 128], [4, 8], [2, 3, 4], [None, 2])),
            *((False, bn, 4, st, None) for bn, st in itertools.product([32, 64], [2, 3])),
        ]
        for group_kernel, block_n, warps, stages, splits in grid:
            cfg = DecodeConfig(block_n=block_n, num_warps=warps, num_stages=stages)
            try:
                ms = time_config(
                    caches, q, tables, lens, group_kernel=group_kernel, cfg=cfg, num_splits=splits
                )
            except Exception as exc:  # out of shared memory, registers, ...
                print(f"skip {dtype} {cfg} splits={splits}: {type(exc).__name__}", flush=True)
                continue
            row = {
                "cache": str(dtype).removeprefix("torch."),
                "kernel": "groups" if group_kernel else "heads",
                "block_n": block_n,
                "num_warps": warps,
                "num_stages": stages,
                "num_splits": splits or "auto",
                "us": round(ms * 1000, 1),
                "tb_s": round(kv_bytes / (ms / 1000) / 1e12, 2),
            }
            results.append(row)
        del caches
        torch.cuda.empty_cache()
    results.sort(key=lambda r: (r["cache"], r["us"]))
    for cache in ("bfloat16", "float8_e4m3fn"):
        print(f"\n{cache}: fastest 6")
        for r in [r for r in results if r["cache"] == cache][:6]:
            print(r)
    shapes = {k: getattr(args, k) for k in ("batch", "context", "heads", "kv_heads", "head_dim", "layers")}
    args.out.write_text(
        json.dumps({"gpu": torch.cuda.get_device_name(), "shapes": shapes, "results": results}, indent=1)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
