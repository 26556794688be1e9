"""Batch-1 decode on one GPU: the weights' stream, piece by piece, in one run.

1. ``ceiling``: what the card reads and copies (a 4 GB sum and a 2 GB copy, torch).
2. ``sweep``: each projection of the 7B shape (32 layers' own weights, so that they stream
   from memory) through ``gemv`` at each launch configuration, with programmatic
   dependent launch (PDL) and without, and cuBLAS; the best configuration per shape.
3. ``chain``: the four projections of 32 layers in a layer's order, as the decode step
   runs them: the kernels of before (add + RMSNorm, GEMV, SiLU*up as kernels of their
   own) against the norms and SiLU inside the GEMVs, each with PDL and without.
4. ``step``: the bare decode step of the 7B-shaped checkpoint at batch 1 (CUDA graph)
   for each combination (cuBLAS; the GEMV as before; PDL; the launch parameters tuned
   at start-up; RoPE + store inside the decode attention and its partitions merged there;
   norms inside the GEMVs; the decode attention's programs per multiprocessor),
   its kernels (count, device time) run eagerly, and the logits and 32 greedy tokens of
   each against the first (cuBLAS); ``step_fp8`` the same with float8 weights.
5. ``batched``: decode steps of 8, 32 and 64 rows (CUDA graphs) with the slot
   bookkeeping as two kernels against torch ops, alternating on one runner.

    python3 scripts/bench_batch1.py --checkpoint /tmp/llava7b --out batch1.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_engine import PROJECTIONS_7B, step_kernels

from llava_node.engine import gemv as gemv_mod
from llava_node.engine import kernels
from llava_node.engine.gemv import GemvConfig, replay_ms
from llava_node.engine.launch import pdl_available

CANDIDATES = (
    GemvConfig(),  # the default: 4 rows, 1024 columns, 4 warps, 3 stages
    GemvConfig(evict_first=True),
    GemvConfig(block_n=2),
    GemvConfig(block_n=8),
    GemvConfig(block_n=8, block_k=512),
    GemvConfig(block_n=4, block_k=512, num_stages=4),
    GemvConfig(block_n=4, block_k=2048, num_warps=8),
    GemvConfig(block_n=8, block_k=1024, num_warps=8),
    GemvConfig(block_n=16, block_k=512, num_warps=8),
    GemvConfig(block_n=2, block_k=2048, num_stages=2),
    GemvConfig(block_n=4, block_k=1024, num_stages=2),
    GemvConfig(block_n=4, block_k=1024, num_stages=4),
)


def ceiling() -> dict[str, Any]:
    """The card's read and copy rates (torch's sum and copy), TB/s."""
    a = torch.randn(2 * 1024**3, device="cuda", dtype=torch.bfloat16)  # 4 GiB
    read_ms = replay_ms(lambda: a.sum(dtype=torch.float32), 10)
    src = a[: 1024**3]
    dst = torch.empty_like(src)
    copy_ms = replay_ms(lambda: dst.copy_(src), 10)
    res = {
        "read_tb_s": round(a.numel() * 2 / read_ms / 1e9, 3),
        "copy_tb_s_read_plus_write": round(2 * src.numel() * 2 / copy_ms / 1e9, 3),
    }
    print("[ceiling]", res, flush=True)
    return res


def sweep(layers: int, pdl_modes: list[bool]) -> dict[str, Any]:
    """Each projection's 32 layers through each configuration (PDL on and off) and cuBLAS."""
    dev = torch.device("cuda")
    out: dict[str, Any] = {}
    for name, (n, k) in PROJECTIONS_7B.items():
        ws = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        nbytes = layers * n * k * 2
        row: dict[str, Any] = {}
        ms = replay_ms(lambda ws=ws, x=x: [F.linear(x, w) for w in ws], 20)
        row["cublas"] = {"ms": round(ms, 4), "tb_s": round(nbytes / ms / 1e9, 3)}
        for cfg in CANDIDATES:
            for pdl in pdl_modes:
                key = f"{cfg.block_n}x{cfg.block_k} w{cfg.num_warps} s{cfg.num_stages}" + (
                    " evict" if cfg.evict_first else ""
                )
                ms = replay_ms(
                    lambda ws=ws, x=x, cfg=cfg, pdl=pdl: [kernels.gemv(x, w, cfg, pdl=pdl) for w in ws], 20
                )
                row[key + (" pdl" if pdl else "")] = {
                    "ms": round(ms, 4),
                    "tb_s": round(nbytes / ms / 1e9, 3),
                    "cfg": cfg,
                }
        best = min((v for key, v in row.items() if "cfg" in v), key=lambda v: v["ms"])
        row["best"] = best
        ref = F.linear(x, ws[0]).float()
        row["rel_err_default"] = round(float((kernels.gemv(x, ws[0]).float() - ref).norm() / ref.norm()), 6)
        out[name] = row
        print(
            f"[sweep] {name}: cuBLAS {row['cublas']}, default {row['4x1024 w4 s3']}, best {best}", flush=True
        )
        del ws
        torch.cuda.empty_cache()
    return out


def chain(layers: int, pdl_modes: list[bool]) -> dict[str, Any]:
    """32 layers' projections in order: separate norm/SiLU kernels against fused prologues."""
    dev = torch.device("cuda")
    hidden, inter = 4096, 11008
    w = [
        {
            name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
            for name, (n, k) in PROJECTIONS_7B.items()
        }
        for _ in range(layers)
    ]
    g = torch.ones(hidden, device=dev, dtype=torch.bfloat16)
    x0 = torch.randn(1, hidden, device=dev, dtype=torch.bfloat16)
    nbytes = sum(t.numel() * 2 for layer in w for t in layer.values())

    def before(pdl: bool) -> None:
        res, h = x0, kernels.rms_norm(x0, g, 1e-5, pdl=pdl)
        for lw in w:
            qkv = kernels.gemv(h, lw["qkv"], pdl=pdl)
            o = kernels.gemv(qkv[:, :hidden], lw["o"], pdl=pdl)
            h, res = kernels.add_rms_norm(o, res, g, 1e-5, pdl=pdl)
            down = kernels.gemv(
                kernels.silu_mul(kernels.gemv(h, lw["gate_up"], pdl=pdl), pdl=pdl), lw["down"], pdl=pdl
            )
            h, res = kernels.add_rms_norm(down, res, g, 1e-5, pdl=pdl)

    def fused(pdl: bool) -> None:
        x, res = x0, None
        for lw in w:
            qkv, res = kernels.gemv_norm(x, res, g, 1e-5, lw["qkv"], pdl=pdl)
            o = kernels.gemv(qkv[:, :hidden], lw["o"], pdl=pdl)
            gu, res = kernels.gemv_norm(o, res, g, 1e-5, lw["gate_up"], pdl=pdl)
            x = kernels.gemv(gu, lw["down"], silu=True, pdl=pdl)

    out: dict[str, Any] = {"weights_gb": round(nbytes / 1e9, 2), "inter": inter}
    for label, fn in (("before", before), ("fused", fused)):
        for pdl in pdl_modes:
            ms = replay_ms(lambda fn=fn, pdl=pdl: fn(pdl), 20)
            out[label + (" pdl" if pdl else "")] = {"ms": round(ms, 4), "tb_s": round(nbytes / ms / 1e9, 3)}
    print("[chain]", json.dumps(out), flush=True)
    return out


def step(checkpoint: Path, weight_dtype: str = "auto", context: int = 616) -> dict[str, Any]:
    """The bare batch-1 decode step of the checkpoint for each combination of the options."""
    from llava_node.engine.fp8_weights import weight_dtype as w_dtype
    from llava_node.engine.loading import load_llava
    from llava_node.engine.runner import LlavaRunner, RunnerConfig

    loaded = load_llava(checkpoint, torch.device("cuda"), torch.bfloat16)
    runner = LlavaRunner(
        loaded,
        RunnerConfig(
            max_batch=1,
            graph_batch_sizes=(1,),
            mixed_rows=0,
            prefill_graphs=False,
            weight_dtype=w_dtype(weight_dtype),
        ),
    )
    t = time.monotonic()
    runner.warmup()  # tunes the GEMV per shape (gemv.tune), then captures
    out: dict[str, Any] = {
        "weight_dtype": weight_dtype,
        "pdl_available": pdl_available(runner.device),
        "context": context,
        "warmup_s": round(time.monotonic() - t, 2),
        "tuned": {str(k): str(v) for k, v in gemv_mod.SHAPE_CONFIGS.items()},
        "tuning_ms": {str(k): v for k, v in runner.gemv_timings.items()},
    }
    tuned = dict(gemv_mod.SHAPE_CONFIGS)
    pages = list(range(1, 1 + runner.cache.pages_for(context + 256)))
    runner.assign(0, pages, 0.0, 1.0, 0)
    for i in range(runner.n_layers):  # a context of random keys and values
        kc, vc = runner.cache.layer(i)
        kc.normal_(0, 1)
        vc.normal_(0, 1)
    gemv_fn, attention = runner.gemv, runner.paged_attention
    sems = kernels.decode_semaphores(1, runner.n_kv_heads, runner.device)
    base = {
        "gemv": gemv_fn,
        "fused": False,
        "pdl": True,
        "tuned": True,
        "attention": attention,
        "sms": 2,
        "rope": True,
        "merge": False,
        "o_first_k": 0,
        "glu": True,
        "step_state": True,
    }
    glu = {**base, "step_state": False}  # the slot bookkeeping as torch ops
    rope = {**glu, "glu": False}  # SiLU*up as a kernel of its own
    before = {**rope, "rope": False}  # ... and the attention as three launches
    variants: dict[str, dict[str, Any]] = {
        "cublas": {**before, "gemv": None, "pdl": False, "tuned": False},
        "gemv (before)": {**before, "pdl": False, "tuned": False},
        "gemv + pdl + tuned": before,
        "... + rope + store inside the attention (the default before)": rope,
        "... + SiLU*up inside the gate/up GEMV": glu,
        "... + the slot bookkeeping in two kernels (default)": base,
        "default + partitions merged in the kernel": {**base, "merge": True},
        "default, attention at 1 program/SM": {**base, "sms": 1},
        "default, attention at 3 programs/SM": {**base, "sms": 3},
    }
    if weight_dtype != "auto":
        keep = (
            "gemv + pdl + tuned",
            "... + rope + store inside the attention (the default before)",
            "... + SiLU*up inside the gate/up GEMV",
            "... + the slot bookkeeping in two kernels (default)",
        )
        variants = {k: v for k, v in variants.items() if k in keep}
    ref_logits: torch.Tensor | None = None
    ref_tokens: list[int] | None = None
    slots = torch.tensor([0], device=runner.device)
    for label, v in variants.items():
        if v["pdl"] and not out["pdl_available"]:
            continue
        runner.gemv, runner.batch1_fused, runner.pdl = v["gemv"], v["fused"], v["pdl"]
        runner.paged_attention = v["attention"]
        runner.decode_rope = v["rope"]
        runner.o_first_k = v["o_first_k"]
        runner.glu_gemv = v["glu"]
        runner.step_state_kernels = v["step_state"]
        runner.decode_semaphores = sems if v["merge"] else None
        kernels.PROGRAMS_PER_SM_ONE_ROW = v["sms"]  # (read at capture: shapes only)
        gemv_mod.SHAPE_CONFIGS.clear()
        if v["tuned"]:
            gemv_mod.SHAPE_CONFIGS.update(tuned)
        runner.graphs.capture()
        runner.seq_lens[:1] = context
        runner.last_tokens[:1] = 1000
        with torch.inference_mode():
            logits = runner.step_logits(slots, runner.seq_lens[slots]).float()
        for _ in range(3):
            runner.decode_launch([0], True).tokens()
        torch.cuda.synchronize()
        runner.seq_lens[:1] = context
        n = 200
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            runner.graphs.launch([0], True)
        end.record()
        torch.cuda.synchronize()
        ms = start.elapsed_time(end) / n
        # 32 greedy tokens from the same state
        runner.seq_lens[:1] = context
        runner.last_tokens[:1] = 1000
        runner.steps[:1] = 0
        tokens = [runner.decode_launch([0], True).tokens()[0] for _ in range(32)]
        runner.seq_lens[:1] = context
        runner.last_tokens[:1] = 1000
        row: dict[str, Any] = {"ms_per_step": round(ms, 4), "tok_s": round(1000 / ms, 1)}
        row["kernels"] = step_kernels(runner, [0])
        if ref_logits is None:
            ref_logits, ref_tokens = logits, tokens
        else:
            row["logits_rel_err_vs_first"] = round(float((logits - ref_logits).norm() / ref_logits.norm()), 5)
            row["argmax_equal"] = bool(logits.argmax() == ref_logits.argmax())
            row["greedy_tokens_equal_first"] = next(
                (i for i, (a, b) in enumerate(zip(tokens, ref_tokens or [], strict=True)) if a != b), 32
            )
        out[label] = row
        brief = {k: v for k, v in row.items() if k != "kernels"}
        print(f"[step {weight_dtype}] {label}: {json.dumps(brief)}", flush=True)
        print(
            f"       kernels: {row['kernels']['count']} launches, {row['kernels']['device_ms']} ms",
            flush=True,
        )
    gemv_mod.SHAPE_CONFIGS.clear()
    kernels.PROGRAMS_PER_SM_ONE_ROW = 2
    return out


def batched(checkpoint: Path, sizes: tuple[int, ...] = (8, 32, 64), context: int = 616) -> dict[str, Any]:
    """Decode steps of several rows (CUDA graphs), with the slot bookkeeping as two
    kernels against torch ops, alternating (A, B, A, B) on one runner."""
    from llava_node.engine.loading import load_llava
    from llava_node.engine.runner import LlavaRunner, RunnerConfig

    loaded = load_llava(checkpoint, torch.device("cuda"), torch.bfloat16)
    runner = LlavaRunner(
        loaded,
        RunnerConfig(max_batch=max(sizes), graph_batch_sizes=sizes, mixed_rows=0, prefill_graphs=False),
    )
    runner.warmup()
    per_slot = runner.cache.pages_for(context + 256)
    for slot in range(max(sizes)):
        runner.assign(slot, list(range(1 + slot * per_slot, 1 + (slot + 1) * per_slot)), 0.0, 1.0, slot)
    out: dict[str, Any] = {"context": context}
    for b in sizes:
        slots = list(range(b))
        row: dict[str, list[float]] = {"kernels": [], "torch ops": []}
        for label in ("kernels", "torch ops", "kernels", "torch ops"):
            runner.step_state_kernels = label == "kernels"
            runner.graphs.capture()
            runner.seq_lens[:b] = context
            for _ in range(3):
                runner.graphs.launch(slots, True)
            torch.cuda.synchronize()
            runner.seq_lens[:b] = context
            n = 100
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(n):
                runner.graphs.launch(slots, True)
            end.record()
            torch.cuda.synchronize()
            row[label].append(round(start.elapsed_time(end) / n, 4))
        out[str(b)] = row
        print(f"[batched] {b} rows, ms a step: {json.dumps(row)}", flush=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llava-1.5-7b-random"))
    parser.add_argument("--out", type=Path, default=Path("batch1.json"))
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--parts", default="ceiling,sweep,chain,step,step_fp8")
    args = parser.parse_args()
    parts = args.parts.split(",")
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": __import__("triton").__version__,
        "command": " ".join(sys.argv),
    }
    pdl_modes = [False, True] if pdl_available(torch.device("cuda")) else [False]
    result["pdl_available"] = len(pdl_modes) == 2

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    if "ceiling" in parts:
        result["ceiling"] = ceiling()
        save()
    if "sweep" in parts:
        result["sweep"] = sweep(args.layers, pdl_modes)
        save()
    if "chain" in parts:
        result["chain"] = chain(args.layers, pdl_modes)
        save()
    if "step" in parts:
        from llava_node.tiny_checkpoint import build_llava_7b_shaped_checkpoint, is_checkpoint

        if not is_checkpoint(args.checkpoint):
            build_llava_7b_shaped_checkpoint(args.checkpoint)
        result["step"] = step(args.checkpoint)
        save()
    if "step_fp8" in parts:
        result["step_fp8"] = step(args.checkpoint, "fp8")
        save()
    if "batched" in parts:
        result["batched"] = batched(args.checkpoint)
        save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
