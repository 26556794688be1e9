"""Benchmark llava_engine on one GPU, through a real tritonserver, beside the baseline.

For each engine (``hf_generate``: transformers' eager ``generate``, what LLaVA's worker
does; ``batching``: this project's engine) the script starts a Triton node serving
``model_repository/`` with a LLaVA-1.5-7B-shaped checkpoint (random bf16 weights,
built here if missing: nothing is downloaded), then streams over gRPC with
tritonclient: a 336-pixel image and ~40 text tokens, 128 new tokens, greedy. It
measures TTFT p50 and decode tok/s for one stream, and aggregate tok/s for 8 and 32
concurrent streams; it writes JSON and prints a table with the ratios.

Optional phases in-process: ``--check`` compares the engine with transformers on the
GPU (first-step logits, greedy tokens); ``--micro`` times the bare decode step.

    python scripts/bench_engine.py --checkpoint /tmp/llava-7b --out bench.json --check --micro
"""

from __future__ import annotations

import argparse
import asyncio
import io
import itertools
import json
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llava_node.launcher import TritonNode, TritonNodeConfig
from llava_wire.messages import build_inputs

QUESTION = (
    "Describe this picture in detail: the objects you can see, their colours and positions, "
    "what is happening in the scene, and anything unusual about it"
)


def bench_image() -> bytes:
    """A 336x336 PNG with structure (a gradient and noise), made with Pillow."""
    from PIL import Image

    rng = np.random.default_rng(0)
    x = np.linspace(0, 255, 336, dtype=np.float32)
    img = np.stack(
        [np.add.outer(x, x) / 2, np.add.outer(x, 255 - x) / 2, rng.uniform(0, 255, (336, 336))], -1
    )
    buf = io.BytesIO()
    Image.fromarray(img.astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def prompt_for(checkpoint: Path) -> tuple[str, int]:
    """The benchmark prompt and its number of text tokens."""
    from transformers import AutoTokenizer

    prompt = f"USER: <image>\n{QUESTION}. ASSISTANT:"
    tok = AutoTokenizer.from_pretrained(checkpoint)
    return prompt, len(tok(prompt.replace("<image>", "")).input_ids)


def engine_inputs(checkpoint: Path, prompt: str, image: bytes) -> dict[str, Any]:
    """``llava_engine``'s inputs for the prompt and image, made here with the checkpoint's
    processor (what ``llava_preprocess`` does on the node)."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(checkpoint)
    enc = processor(images=[Image.open(io.BytesIO(image)).convert("RGB")], text=prompt, return_tensors="np")
    return {
        "input_ids": enc["input_ids"][0].astype(np.int64),
        "pixel_values": enc["pixel_values"].astype(np.float32),
    }


def distinct_image(image: bytes, i: int) -> bytes:
    """The benchmark image with one pixel changed by ``i``: another image's bytes (so
    neither the node's image cache nor its prefix cache knows it) of the same content."""
    from PIL import Image

    img = Image.open(io.BytesIO(image)).convert("RGB")
    img.putpixel((i % 336, (i // 336) % 336), (i % 251, (i // 251) % 251, 7))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def request_inputs(
    grpcclient: Any,
    args: argparse.Namespace,
    prompt: str,
    image: bytes,
    max_tokens: int,
    variant: int | None = None,
) -> tuple[str, list[Any]]:
    """(model, inputs): the ``llava`` ensemble, or ``llava_engine`` directly (numeric
    inputs). ``variant`` (with ``--distinct-images``) makes the image one no earlier
    request had: one pixel value moved by 1e-3, or one pixel of the PNG changed."""
    if args.via == "ensemble":
        if variant is not None:
            image = distinct_image(image, variant)
        return "llava", build_inputs(
            grpcclient, prompt=prompt, images=[image], max_tokens=max_tokens, temperature=0.0
        )
    pixels = args.engine_arrays["pixel_values"]
    if variant is not None:
        pixels = pixels.copy()
        flat = pixels.reshape(-1)
        flat[variant % flat.size] += np.float32(1e-3) * (1 + variant // flat.size)
    arrays = {
        **args.engine_arrays,
        "pixel_values": pixels,
        "gen_max_tokens": np.array([max_tokens], np.int32),
        "gen_temperature": np.array([0.0], np.float32),
        "gen_top_p": np.array([1.0], np.float32),
        "gen_seed": np.array([0], np.int64),
    }
    dtypes = {np.dtype(np.int64): "INT64", np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32"}
    inputs = []
    for name, arr in arrays.items():
        inp = grpcclient.InferInput(name, list(arr.shape), dtypes[arr.dtype])
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return "llava_engine", inputs


def inputs_maker(
    grpcclient: Any, args: argparse.Namespace, prompt: str, image: bytes, max_tokens: int
) -> Any:
    """A function giving each request's (model, inputs): the same for all, or with
    ``--distinct-images`` each with an image of its own."""
    if not args.distinct_images:
        shared = request_inputs(grpcclient, args, prompt, image, max_tokens)
        return lambda: shared
    return lambda: request_inputs(grpcclient, args, prompt, image, max_tokens, next(args.image_variants))


async def cancel_on_node(client: Any, rids: list[str]) -> None:
    """Stop the engine's requests ``rids`` (a window cut them short): so the next phase
    starts on an idle node (Triton 2.51 does not pass a closed stream on to the engine)."""
    import tritonclient.grpc.aio as grpcclient

    from llava_wire.protocol import engine_model

    for rid in rids:
        inp = grpcclient.InferInput("cancel_request_id", [1], "BYTES")
        inp.set_data_from_numpy(np.array([rid.encode()], dtype=np.object_))

        async def cancel_req(inp: Any = inp) -> Any:
            yield {"model_name": engine_model("llava"), "inputs": [inp]}

        async for _ in client.stream_infer(cancel_req()):
            break


async def one_stream(
    client: Any,
    model: str,
    inputs: list[Any],
    rid: str,
    deadline: float,
    events: list[tuple[float, int]] | None = None,
) -> dict[str, Any]:
    """Stream one request; times of the first and last responses; tokens received (and,
    into ``events``, each response's time and its number of new tokens)."""

    async def req() -> Any:
        yield {"model_name": model, "inputs": inputs, "request_id": rid, "enable_empty_final_response": True}

    start = time.perf_counter()
    first = last = None
    tokens = 0
    call = client.stream_infer(req())
    try:
        async for result, error in call:
            if error is not None:
                raise RuntimeError(str(error))
            resp = result.get_response()
            now = time.perf_counter()
            if resp.outputs:
                ids = result.as_numpy("token_ids")
                if ids is not None and ids.size:
                    first = first or now
                    last = now
                    count = int(result.as_numpy("completion_tokens").reshape(-1)[0])
                    if events is not None:
                        events.append((now, count - tokens))
                    tokens = count
            final = resp.parameters.get("triton_final_response")
            if (final is not None and final.bool_param) or now > deadline:
                break
    finally:
        call.cancel()
    return {"start": start, "first": first, "last": last, "tokens": tokens}


async def run_load(
    grpc_url: str,
    args: argparse.Namespace,
    prompt: str,
    image: bytes,
    streams: int,
    max_tokens: int,
    window_s: float,
    tag: str,
) -> dict[str, Any]:
    """``streams`` concurrent requests; aggregate rate over the run (or a time window)."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    await client.is_server_ready()  # connect first: TTFT is the request's, not the TCP handshake's
    make = inputs_maker(grpcclient, args, prompt, image, max_tokens)
    requests = [make() for _ in range(streams)]
    deadline = time.perf_counter() + window_s
    t0 = time.perf_counter()
    results = await asyncio.gather(
        *(
            one_stream(client, model, inputs, f"{tag}-{i}", deadline)
            for i, (model, inputs) in enumerate(requests)
        )
    )
    elapsed = time.perf_counter() - t0
    cut = [f"{tag}-{i}" for i, r in enumerate(results) if r["tokens"] < max_tokens and elapsed >= window_s]
    if args.cancel_cut:
        await cancel_on_node(client, cut)
    await client.close()
    total = sum(r["tokens"] for r in results)
    ttfts = [(r["first"] - r["start"]) * 1000 for r in results if r["first"]]
    per_stream = [
        (r["tokens"] - 1) / (r["last"] - r["first"])
        for r in results
        if r["first"] and r["last"] and r["last"] > r["first"]
    ]
    return {
        "streams": streams,
        "tokens": total,
        "elapsed_s": round(elapsed, 3),
        "aggregate_tok_s": round(total / elapsed, 1),
        "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
        "decode_tok_s_per_stream_p50": round(statistics.median(per_stream), 1) if per_stream else None,
        "cut_by_window": elapsed >= window_s,
    }


async def run_sustained(
    grpc_url: str,
    args: argparse.Namespace,
    prompt: str,
    image: bytes,
    streams: int,
    max_tokens: int,
    tag: str,
) -> dict[str, Any]:
    """``streams`` clients, each sending its next request as soon as its last one ends,
    for ``args.sustained_s`` seconds: the steady state a serving benchmark with a fixed
    concurrency measures (vLLM's ``--max-concurrency``). Tokens are counted as they
    arrive, after a warm-up of ``args.sustained_warmup_s`` (the first requests all start
    together), up to the end of the window."""
    import tritonclient.grpc.aio as grpcclient

    client = grpcclient.InferenceServerClient(grpc_url)
    await client.is_server_ready()
    make = inputs_maker(grpcclient, args, prompt, image, max_tokens)
    t0 = time.perf_counter()
    counted_from = t0 + args.sustained_warmup_s
    end = t0 + args.sustained_s
    events: list[tuple[float, int]] = []
    results: list[dict[str, Any]] = []

    async def client_loop(i: int) -> None:
        n = 0
        while time.perf_counter() < end:
            model, inputs = make()
            rid = f"{tag}-{i}-{n}"
            results.append({"rid": rid, **await one_stream(client, model, inputs, rid, end, events)})
            n += 1

    await asyncio.gather(*(client_loop(i) for i in range(streams)))
    if args.cancel_cut:  # (the last request of each client, cut by the window's end)
        await cancel_on_node(client, [r["rid"] for r in results if r["tokens"] < max_tokens])
    await client.close()
    window = end - counted_from
    counted = sum(k for t, k in events if counted_from <= t <= end)
    steady = [r for r in results if r["start"] >= counted_from and r["first"]]
    ttfts = [(r["first"] - r["start"]) * 1000 for r in steady]
    return {
        "streams": streams,
        "window_s": round(window, 1),
        "tokens_in_window": counted,
        "aggregate_tok_s": round(counted / window, 1),
        "requests_started": len(results),
        "requests_completed": sum(1 for r in results if r["tokens"] >= max_tokens),
        "ttft_ms_p50": round(statistics.median(ttfts), 1) if ttfts else None,
        "ttft_ms_p90": round(sorted(ttfts)[int(0.9 * (len(ttfts) - 1))], 1) if ttfts else None,
    }


ENGINE_COUNTERS = (
    "llava_engine_requests_started_total",
    "llava_engine_time_to_first_token_seconds_total",
    "llava_engine_queue_seconds_total",
    "llava_engine_prefill_seconds_total",
    "llava_engine_decode_wait_seconds_total",
    "llava_engine_token_handling_seconds_total",
    "llava_engine_decode_steps_total",
    "llava_engine_mixed_steps_total",
    "llava_engine_generated_tokens_total",
    "llava_engine_prefix_cache_hit_tokens_total",
    "llava_engine_prefix_cache_miss_tokens_total",
    "llava_engine_image_cache_misses_total",
)


def engine_counters(node: TritonNode, names: tuple[str, ...] = ENGINE_COUNTERS) -> dict[str, float]:
    """The engine's time-breakdown counters (or other ``names``) from the node's metrics."""
    import urllib.request

    with urllib.request.urlopen(node.metrics_url, timeout=10) as r:
        text = r.read().decode()
    out = dict.fromkeys(names, 0.0)
    for line in text.splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in out:
            out[name] += float(line.rsplit(" ", 1)[1])
    return out


def wait_idle(node: TritonNode, timeout_s: float = 120.0) -> None:
    """Wait until the node's engine has nothing running or queued (requests a window cut
    short, and not cancelled, run on), as its once-a-second gauges show twice in a row."""
    gauges = ("llava_engine_active_requests", "llava_engine_queued_requests")
    deadline = time.monotonic() + timeout_s
    idle = 0
    while idle < 2 and time.monotonic() < deadline:
        time.sleep(1.2)
        idle = idle + 1 if not sum(engine_counters(node, gauges).values()) else 0


def measured(node: TritonNode, fn: Any) -> dict[str, Any]:
    """Run ``fn`` (a load); add where the engine's time went meanwhile (metrics are
    published once a second, so wait that long before and after)."""
    wait_idle(node)
    before = engine_counters(node)
    result: dict[str, Any] = fn()
    time.sleep(1.2)
    after = engine_counters(node)
    delta = {
        k.removeprefix("llava_engine_").removesuffix("_total"): round(after[k] - before[k], 3) for k in before
    }
    started = delta.get("requests_started") or 0
    if started:  # the node's own share of TTFT (the rest is gRPC, Triton and the stub's IPC)
        delta["engine_ttft_ms_mean"] = round(delta["time_to_first_token_seconds"] * 1000 / started, 1)
        delta["queue_ms_mean"] = round(delta["queue_seconds"] * 1000 / started, 1)
        delta["prefill_ms_mean"] = round(delta["prefill_seconds"] * 1000 / started, 1)
    steps = delta.get("decode_steps") or 0
    if steps:
        for k in ("decode_wait_seconds", "token_handling_seconds"):
            delta[k.replace("seconds", "ms_per_step")] = round(delta[k] * 1000 / steps, 2)
    result["engine"] = delta
    return result


def bench_engine(
    spec: str, checkpoint: Path, args: argparse.Namespace, prompt: str, image: bytes
) -> dict[str, Any]:
    """Start a node with the engine ``spec`` names (``batching``, or a variant such as
    ``batching@LLAVA_PREFILL_CHUNK=0``: settings after ``@``, joined by ``+``) and measure it."""
    engine, _, variant = spec.partition("@")
    env = {
        "LLAVA_ENGINE": engine,
        "LLAVA_MAX_SEQ_LEN": "2048",
        **dict(kv.split("=", 1) for kv in args.engine_env),
        **dict(kv.split("=", 1) for kv in variant.split("+") if kv),
    }
    node = TritonNode(TritonNodeConfig(checkpoint=checkpoint, env=env, startup_timeout_s=600))
    t0 = time.monotonic()
    node.start()
    out: dict[str, Any] = {"engine": spec, "env": env, "startup_s": round(time.monotonic() - t0, 1)}
    print(f"[{spec}] ready in {out['startup_s']} s", flush=True)
    try:
        window = args.baseline_window_s if engine == "hf_generate" else 120.0
        asyncio.run(run_load(node.grpc_url, args, prompt, image, 1, 8, 60, f"{engine}-warm"))

        def single_runs() -> dict[str, Any]:
            return {
                "runs": [
                    asyncio.run(
                        run_load(
                            node.grpc_url, args, prompt, image, 1, args.new_tokens, 120, f"{engine}-s{i}"
                        )
                    )
                    for i in range(args.single_runs)
                ]
            }

        singles = measured(node, single_runs)  # back to back: the device stays warm
        out["single"] = {
            "ttft_ms_p50": round(statistics.median(r["ttft_ms_p50"] for r in singles["runs"]), 1),
            "decode_tok_s": round(
                statistics.median(r["decode_tok_s_per_stream_p50"] for r in singles["runs"]), 1
            ),
            **singles,
        }
        print(
            f"[{spec}] 1 stream: {out['single']['ttft_ms_p50']} ms TTFT, "
            f"{out['single']['decode_tok_s']} tok/s, engine {singles['engine']}",
            flush=True,
        )
        for streams in args.baseline_streams if engine == "hf_generate" else args.streams:
            # The baseline serves one request at a time: its concurrent runs use fewer tokens
            # per request so that they end (its aggregate rate is its one-stream rate anyway).
            new_tokens = args.baseline_conc_tokens if engine == "hf_generate" else args.new_tokens
            out[f"c{streams}_new_tokens"] = new_tokens
            if not args.sustained_only:  # a burst: all at once, each to its end
                r = measured(
                    node,
                    lambda streams=streams, new_tokens=new_tokens: asyncio.run(
                        run_load(
                            node.grpc_url,
                            args,
                            prompt,
                            image,
                            streams,
                            new_tokens,
                            window,
                            f"{engine}-c{streams}",
                        )
                    ),
                )
                out[f"c{streams}"] = r
                print(
                    f"[{spec}] {streams} streams: {r['aggregate_tok_s']} tok/s aggregate, "
                    f"TTFT p50 {r['ttft_ms_p50']} ms, engine {r['engine']}",
                    flush=True,
                )
            if args.sustained_s:
                r = measured(
                    node,
                    lambda streams=streams, new_tokens=new_tokens: asyncio.run(
                        run_sustained(
                            node.grpc_url, args, prompt, image, streams, new_tokens, f"{engine}-s{streams}"
                        )
                    ),
                )
                out[f"sustained{streams}"] = r
                print(
                    f"[{spec}] {streams} streams sustained: {r['aggregate_tok_s']} tok/s, "
                    f"TTFT p50 {r['ttft_ms_p50']} ms, engine {r['engine']}",
                    flush=True,
                )
    except Exception:
        print(f"[{spec}] failed; node log:\n{node.log_tail(12000)}", flush=True)
        raise
    finally:
        log = node.log_tail(3000)
        node.stop()
    out["log_tail"] = log[-1500:]
    return out


def check_against_transformers(
    checkpoint: Path,
    prompt: str,
    image: bytes,
    steps: int = 16,
    kv_cache_dtype: str = "auto",
    weight_dtype: str = "auto",
) -> dict[str, Any]:
    """The batching engine against transformers on the GPU, bf16: first-step logits,
    teacher-forced per-step logits and argmax, and free-running greedy tokens. With
    ``weight_dtype`` fp8 the engine's linear layers are float8 and transformers' bf16
    model is the reference: the error is fp8's against bf16."""
    import threading

    import torch
    from PIL import Image
    from transformers import AutoProcessor

    from llava_node.engine.base import GenerationRequest
    from llava_node.engine.batching import BatchingEngine
    from llava_node.engine.fp8_weights import weight_dtype as w_dtype
    from llava_node.engine.kv_cache import kv_cache_dtype as kv_dtype
    from llava_node.engine.loading import load_llava
    from llava_node.engine.runner import LlavaRunner, RunnerConfig

    dev = torch.device("cuda")
    processor = AutoProcessor.from_pretrained(checkpoint)
    inputs = processor(
        images=[Image.open(io.BytesIO(image)).convert("RGB")], text=prompt, return_tensors="pt"
    )
    ref = load_llava(checkpoint, dev, torch.bfloat16)
    with torch.inference_mode():
        gpu_inputs = {k: v.to(dev) for k, v in inputs.items()}
        gen = ref.model.generate(
            **gpu_inputs,
            max_new_tokens=steps,
            min_new_tokens=steps,
            do_sample=False,
            output_logits=True,
            return_dict_in_generate=True,
        )
        ref_tokens = gen.sequences[0, inputs["input_ids"].shape[1] :].tolist()
        ref_logits = [g[0].float() for g in gen.logits]  # per step, from transformers' own decode
        # The noise floor: transformers against itself, eager attention instead of SDPA (two
        # correct bf16 computations of the same model). Random weights amplify any rounding
        # difference through the 32 layers, so this is what "close" can mean here.
        floor: float | str
        try:
            ref.model.set_attn_implementation("eager")
            eager = ref.model(**gpu_inputs).logits[0, -1].float()
            floor = round(float((eager - ref_logits[0]).norm() / ref_logits[0].norm()), 5)
        except Exception as exc:  # an older transformers without set_attn_implementation
            floor = f"unavailable: {exc}"
    del ref, gen
    torch.cuda.empty_cache()
    loaded = load_llava(checkpoint, dev, torch.bfloat16)
    runner = LlavaRunner(
        loaded,
        RunnerConfig(
            max_batch=4,
            num_pages=512,
            graph_batch_sizes=(1, 2, 4),
            kv_cache_dtype=kv_dtype(kv_cache_dtype),
            weight_dtype=w_dtype(weight_dtype),
        ),
    )
    runner.warmup()
    ids = inputs["input_ids"][0]
    n = int(ids.shape[0])
    runner.assign(0, list(range(1, 1 + runner.cache.pages_for(n + steps))), 0.0, 1.0, 0)
    per_step = []
    with torch.inference_mode():
        fused, runner.fused = runner.fused, None  # the prefill with torch ops, as transformers runs it
        torch_ops = runner.prefill_logits(0, ids, inputs["pixel_values"])
        runner.fused = fused
        torch_ops_error = round(float((torch_ops - ref_logits[0]).norm() / ref_logits[0].norm()), 5)
        ours = runner.prefill_logits(0, ids, inputs["pixel_values"])
        # A request served from a cached prefix: slot 1 shares slot 0's full pages (all but
        # the prompt's last) and computes only the rows after them, as a next turn would.
        shared = (n - 1) // runner.cache.page_size
        own = runner.cache.pages_for(n + steps)
        runner.assign(1, [*range(1, 1 + shared), *range(1 + own, 1 + 2 * own - shared)], 0.0, 1.0, 0)
        embeds = runner.prompt_embeddings(ids, inputs["pixel_values"])
        from_prefix = runner.prefill_logits_from(1, embeds, shared * runner.cache.page_size)
        prefix_error = round(float((from_prefix - ref_logits[0]).norm() / ref_logits[0].norm()), 5)
        prefix_vs_whole = round(float((from_prefix - ours).norm() / ours.norm()), 5)
        prefix_tokens = shared * runner.cache.page_size
        slot = torch.tensor([0], device=dev)
        for t in range(steps):
            if t > 0:  # teacher forcing: feed transformers' previous token
                runner.last_tokens[0] = ref_tokens[t - 1]
                ours = runner.step_logits(slot, torch.tensor([n + t - 1], device=dev))[0]
            ref_t = ref_logits[t]
            top2 = ref_t.topk(2).values
            per_step.append(
                {
                    "rel_error": round(float((ours - ref_t).norm() / ref_t.norm()), 5),
                    "argmax_equal": int(ours.argmax()) == int(ref_t.argmax()),
                    "ref_top2_margin": round(float(top2[0] - top2[1]), 4),
                    "abs_error_at_top": round(float((ours - ref_t)[ref_t.topk(2).indices].abs().max()), 4),
                }
            )
    engine = BatchingEngine(runner, loaded.tokenizer, loaded.eos_token_ids)
    got: list[int] = []
    done = threading.Event()

    class Sink:
        def send(self, text: str, token_ids: Any, finish: Any, p: int, c: int, cached: int = 0) -> None:
            got.extend(token_ids)
            if finish is not None:
                done.set()

        def fail(self, message: str, client_error: bool = False) -> None:
            print("engine failed:", message)
            done.set()

        def is_cancelled(self) -> bool:
            return False

    engine.submit(GenerationRequest("check", ids, inputs["pixel_values"], steps, 0.0, 1.0, 0, [], Sink()))
    done.wait(120)
    engine.shutdown()
    first_diff = next((i for i, (a, b) in enumerate(zip(got, ref_tokens, strict=False)) if a != b), None)
    runner_fused = runner.fused is not None
    del runner, loaded
    torch.cuda.empty_cache()
    return {
        "fused_kernels": runner_fused,
        "kv_cache_dtype": kv_cache_dtype,
        "weight_dtype": weight_dtype,
        "first_step_logits_rel_error": per_step[0]["rel_error"],
        "first_step_logits_rel_error_torch_ops_prefill": torch_ops_error,
        "first_step_logits_rel_error_cached_prefix": prefix_error,
        "cached_prefix_vs_whole_prefill_rel_error": prefix_vs_whole,
        "cached_prefix_tokens": prefix_tokens,
        "transformers_eager_vs_sdpa_first_step_rel_error": floor,
        "max_step_logits_rel_error": max(p["rel_error"] for p in per_step),
        "mean_step_logits_rel_error": round(sum(p["rel_error"] for p in per_step) / len(per_step), 5),
        "teacher_forced_argmax_equal_steps": sum(p["argmax_equal"] for p in per_step),
        "greedy_tokens_equal": got == ref_tokens,
        "free_running_first_difference_at": first_diff,
        "steps": per_step,
        "ours": got,
        "transformers": ref_tokens,
    }


def step_kernels(runner: Any, slots: list[int]) -> dict[str, Any]:
    """One eager decode step under the profiler: device time per kernel kind, summed."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    idx = torch.tensor(slots, device=runner.device)
    with torch.inference_mode():
        runner.decode_step(idx, True)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            runner.decode_step(idx, True)
            torch.cuda.synchronize()
    rows = [(e.key, e.count, e.device_time_total) for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r[2])
    total_us = sum(r[2] for r in rows)
    return {
        "count": sum(r[1] for r in rows),
        "device_ms": round(total_us / 1000, 3),
        "top": [{"kernel": k[:90], "n": n, "ms": round(t / 1000, 3)} for k, n, t in rows[:12]],
    }


def micro_decode(
    checkpoint: Path,
    batch_sizes: list[int],
    context: int = 616,
    kv_cache_dtype: str = "auto",
    weight_dtype: str = "auto",
) -> dict[str, Any]:
    """The bare decode step (no Triton): ms per step at several batch sizes, CUDA graphs."""
    import torch

    from llava_node.engine.fp8_weights import weight_dtype as w_dtype
    from llava_node.engine.kv_cache import kv_cache_dtype as kv_dtype
    from llava_node.engine.loading import load_llava
    from llava_node.engine.runner import LlavaRunner, RunnerConfig

    loaded = load_llava(checkpoint, torch.device("cuda"), torch.bfloat16)
    runner = LlavaRunner(
        loaded,
        RunnerConfig(
            max_batch=max(batch_sizes),
            graph_batch_sizes=tuple(batch_sizes),
            kv_cache_dtype=kv_dtype(kv_cache_dtype),
            weight_dtype=w_dtype(weight_dtype),
        ),
    )
    runner.warmup()
    out: dict[str, Any] = {
        "kv_cache_dtype": kv_cache_dtype,
        "weight_dtype": weight_dtype,
        "fused_kernels": runner.fused is not None,
        "graph_capture_s": runner.graphs.capture_s,
    }
    per_slot = runner.cache.pages_for(context + 256)
    for b in batch_sizes:
        for slot in range(b):
            runner.assign(slot, list(range(1 + slot * per_slot, 1 + (slot + 1) * per_slot)), 0.0, 1.0, 0)
        runner.seq_lens[:b] = context
        slots = list(range(b))
        for _ in range(3):
            runner.decode_launch(slots, True).tokens()
        torch.cuda.synchronize()
        n = 30
        t = time.perf_counter()
        for _ in range(n):
            runner.graphs.launch(slots, True)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / n * 1000
        runner.seq_lens[:b] = context
        out[f"b{b}"] = {
            "ms_per_step": round(ms, 2),
            "tok_s_per_stream": round(1000 / ms, 1),
            "tok_s_total": round(b * 1000 / ms, 1),
            # the step's kernels, run eagerly once: their device time against the graph's
            "kernels": step_kernels(runner, slots),
        }
        runner.seq_lens[:b] = context
        print(
            f"[micro kv={kv_cache_dtype} weights={weight_dtype}] batch {b}: {ms:.2f} ms/step, "
            f"{b * 1000 / ms:.0f} tok/s",
            flush=True,
        )
    if runner.gemv is not None:  # batch 1 again with cuBLAS instead of the Triton GEMV
        runner.gemv = None
        runner.graphs.capture()
        runner.seq_lens[:1] = context
        for _ in range(3):
            runner.decode_launch([0], True).tokens()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(30):
            runner.graphs.launch([0], True)
        torch.cuda.synchronize()
        ms = (time.perf_counter() - t) / 30 * 1000
        runner.seq_lens[:1] = context
        out["b1_cublas"] = {"ms_per_step": round(ms, 2), "tok_s_per_stream": round(1000 / ms, 1)}
        print(f"[micro] batch 1 with cuBLAS: {ms:.2f} ms/step", flush=True)
    del runner, loaded
    torch.cuda.empty_cache()
    return out


def micro_prefill(checkpoint: Path, prompt: str, image: bytes, reps: int = 10) -> dict[str, Any]:
    """One prompt's first token, piece by piece (no Triton): the vision tower eager and
    from its CUDA graph, the language model's prefill with torch ops and with the fused
    kernels, and the whole of ``prefill``; plus the profile's heaviest kernels."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from llava_node.engine.loading import load_llava
    from llava_node.engine.runner import LlavaRunner, RunnerConfig

    arrays = engine_inputs(checkpoint, prompt, image)
    ids = torch.from_numpy(arrays["input_ids"])
    pixels = torch.from_numpy(arrays["pixel_values"])
    loaded = load_llava(checkpoint, torch.device("cuda"), torch.bfloat16)
    runner = LlavaRunner(loaded, RunnerConfig(max_batch=8, max_seq_len=2048))
    runner.warmup()
    pages = list(range(1, 1 + runner.cache.pages_for(int(ids.shape[0]) + 8)))
    runner.assign(0, pages, 0.0, 1.0, 0)
    fused = runner.fused

    def timed(fn: Any) -> float:
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append((time.perf_counter() - t) * 1000)
        return round(statistics.median(times), 2)

    graphs = runner.prefill_graphs

    def lm_only(use_fused: bool, captured: bool = True) -> Any:
        runner.fused = fused if use_fused else None
        runner.prefill_graphs = graphs if captured else None
        try:
            return runner.prefill_logits(0, ids, pixels)
        finally:
            runner.fused, runner.prefill_graphs = fused, graphs

    out: dict[str, Any] = {
        "prompt_tokens": int(ids.shape[0]),
        "vision_graph": (runner.vision_graph.error or "captured") if runner.vision_graph else "none",
        "ms": {
            "vision_eager": timed(lambda: runner.image_features_eager(pixels)),
            "vision": timed(lambda: runner.image_features(pixels)),
            "prefill_torch_ops": timed(lambda: lm_only(False)),
            "prefill_fused_eager": timed(lambda: lm_only(True, False)) if fused is not None else None,
            "prefill_fused": timed(lambda: lm_only(True)) if fused is not None else None,
            "prefill_and_first_token": timed(lambda: runner.prefill(0, ids, pixels)),
        },
    }
    out["prefill_graphs"] = (graphs.error or sorted(graphs.graphs)) if graphs is not None else "none"
    a, b = lm_only(False).float(), lm_only(True).float()
    out["fused_vs_torch_logits_rel_err"] = float((a - b).norm() / a.norm())
    out["fused_vs_torch_argmax_equal"] = bool(a.argmax() == b.argmax())
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        runner.prefill(0, ids, pixels)
        torch.cuda.synchronize()
    out["profile"] = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    print(f"[prefill] {json.dumps({k: v for k, v in out.items() if k != 'profile'})}", flush=True)
    print(out["profile"], flush=True)
    return out  # a phase runs in its own process: its memory goes when it exits


def micro_mixed(
    checkpoint: Path, prompt: str, image: bytes, batch: int = 64, context: int = 680, reps: int = 10
) -> dict[str, Any]:
    """Mixed steps (no Triton): ``batch`` requests decoding at ``context`` tokens while a
    prompt's rows ride along in chunks of several sizes, against the decode step alone
    (its CUDA graph) and the prompt's prefill alone; plus the host's time to launch
    each (a mixed step runs eagerly). From these, the steady-state rate at a fixed
    concurrency: each request costs its chunks and its decode steps."""
    import torch

    from llava_node.engine.loading import load_llava
    from llava_node.engine.runner import LlavaRunner, PromptChunk, RunnerConfig

    arrays = engine_inputs(checkpoint, prompt, image)
    ids = torch.from_numpy(arrays["input_ids"])
    pixels = torch.from_numpy(arrays["pixel_values"])
    cuda = torch.cuda.is_available()  # on a CPU: a smoke test of this phase, on the tiny model
    loaded = load_llava(
        checkpoint, torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else torch.float32
    )
    runner = LlavaRunner(
        loaded, RunnerConfig(max_batch=batch + 1, max_seq_len=2048, graph_batch_sizes=(batch,))
    )
    runner.warmup()
    per_slot = runner.cache.pages_for(min(2048, runner.max_seq_len))
    for slot in range(batch + 1):
        runner.assign(slot, list(range(1 + slot * per_slot, 1 + (slot + 1) * per_slot)), 0.0, 1.0, 0)
    slots = list(range(batch))
    index = torch.tensor(slots, device=runner.device)
    embeds = runner.prompt_embeddings(ids, pixels)
    n = int(embeds.shape[0])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def timed(fn: Any) -> tuple[float, float]:
        """(ms per step back to back, ms of host time to launch one)."""
        runner.seq_lens[:batch] = context
        for _ in range(3):
            fn()
        sync()
        t = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        step = (time.perf_counter() - t) / reps * 1000
        t = time.perf_counter()
        fn()
        host = (time.perf_counter() - t) * 1000
        sync()
        runner.seq_lens[:batch] = context
        return round(step, 2), round(host, 2)

    decode_ms, decode_host = timed(lambda: runner.decode_launch(slots, True))
    prefill_ms, _ = timed(lambda: runner.prefill_logits(batch, ids, pixels))
    out: dict[str, Any] = {
        "batch": batch,
        "context": context,
        "prompt_tokens": n,
        "decode_ms": decode_ms,
        "decode_host_ms": decode_host,
        "prefill_ms": prefill_ms,
        "chunks": {},
    }
    if cuda:
        runner.mixed_graphs = None
        out["eager_256"] = dict(
            zip(
                ("ms", "host_ms"),
                timed(lambda: runner.mixed_launch(slots, [PromptChunk(batch, embeds, 0, 256)], True)),
                strict=True,
            )
        )
    new_tokens = 128
    # Without chunks: per request, its prefill stalls everyone, then 128 decode steps.
    whole = batch * new_tokens / (batch * prefill_ms + new_tokens * decode_ms) * 1000
    out["steady_tok_s_whole_prefills"] = round(whole, 1)
    for c in (64, 128, 256, 384, 512, n):
        chunk = PromptChunk(batch, embeds, 0, min(c, n))
        if cuda:  # a captured step of this many prompt rows
            from llava_node.engine.cuda_graphs import MixedGraphs

            runner.mixed_graphs = MixedGraphs(runner, c, runner.graphs.batch_sizes)
        ms, host = timed(lambda chunk=chunk: runner.mixed_launch(slots, [chunk], True))
        steps = -(-n // c)  # mixed steps per prompt
        # Steady state: each request's timeline is its `steps` chunk steps and its 128
        # decode steps; one chunk per step, so the `batch` prompts of a cycle need
        # batch * steps mixed steps, and a cycle lasts the longer of the two.
        cycle = max(new_tokens + steps, batch * steps)
        per_cycle_ms = batch * steps * ms + (cycle - batch * steps) * decode_ms
        out["chunks"][str(c)] = {
            "ms": ms,
            "host_ms": host,
            "extra_ms_over_decode": round(ms - decode_ms, 2),
            "prompt_rows_per_extra_ms": round(min(c, n) / max(ms - decode_ms, 1e-3), 1),
            "steady_tok_s_model": round(batch * new_tokens / per_cycle_ms * 1000, 1),
            "captured": bool(runner.mixed_graphs is not None and runner.mixed_graphs.graphs),
        }
    out["check"] = mixed_check(runner, index, batch, ids, pixels, embeds, context)
    if cuda:  # what the engine replays: the smallest of several captured row counts
        from llava_node.engine.cuda_graphs import MixedGraphSet
        from llava_node.engine.runner import mixed_row_sizes

        runner.mixed_graphs = MixedGraphSet(runner, mixed_row_sizes(256, 512), runner.graphs.batch_sizes)
        runner.mixed_graphs.capture()
        out["check_set_512"] = mixed_check(runner, index, batch, ids, pixels, embeds, context, chunk=512)
        out["check_set_512"]["captured"] = sorted(runner.mixed_graphs.graphs)
    print(f"[mixed] {json.dumps(out)}", flush=True)
    return out


def mixed_check(
    runner: Any, index: Any, batch: int, ids: Any, pixels: Any, embeds: Any, context: int, chunk: int = 256
) -> dict[str, Any]:
    """The prompt prefilled in chunks riding on ``batch`` decode rows against the same
    prompt prefilled whole: its first token and its keys; and the decode rows' tokens
    against a decode step alone from the same state."""

    from llava_node.engine.runner import PromptChunk

    n = int(embeds.shape[0])
    slot = batch
    rows = runner.cache.flat_positions(slot, n)
    runner.steps[slot] = 0
    whole = runner.prefill(slot, ids, pixels)
    keys = runner.cache.layer(runner.n_layers - 1)[0][rows].float().clone()
    runner.cache.layer(runner.n_layers - 1)[0][rows] = 0
    runner.seq_lens[:batch] = context
    state = [t.clone() for t in (runner.seq_lens, runner.last_tokens, runner.steps)]
    alone = runner.decode_step(index, True).tolist()
    for t, saved in zip((runner.seq_lens, runner.last_tokens, runner.steps), state, strict=True):
        t.copy_(saved)
    runner.steps[slot] = 0
    first = None
    for start in range(0, n, chunk):
        c = PromptChunk(slot, embeds, start, min(start + chunk, n))
        tokens = runner.mixed_launch(list(range(batch)), [c], True).tokens()
        if start == 0:
            riding = tokens[:batch]
        if c.last:
            first = tokens[-1]
    chunked = runner.cache.layer(runner.n_layers - 1)[0][rows].float()
    runner.seq_lens[:batch] = context
    return {
        "first_token_whole": whole,
        "first_token_chunked": first,
        "last_layer_keys_rel_err": round(float((chunked - keys).norm() / keys.norm()), 5),
        "decode_rows_same_token_as_decode_alone": sum(a == b for a, b in zip(alone, riding, strict=True)),
        "decode_rows": batch,
    }


# The four projections of a LLaVA-1.5-7B layer: (output, input) features
PROJECTIONS_7B = {"qkv": (12288, 4096), "o": (4096, 4096), "gate_up": (22016, 4096), "down": (4096, 11008)}


def timed(fn: Any) -> float:
    """Milliseconds per replay of ``fn`` captured in a CUDA graph (warmed, 20 replays)."""
    from llava_node.engine.gemv import replay_ms

    return replay_ms(fn, 20)


def micro_gemv(layers: int = 32) -> dict[str, Any]:
    """Batch-1 linear layers of the 7B shape (each layer's own weights, so they stream
    from memory as in a decode step): cuBLAS (``F.linear``) against ``kernels.gemv``
    configurations, all four projections of ``layers`` layers per replay, CUDA graphs."""
    import torch
    import torch.nn.functional as F

    from llava_node.engine.kernels import GemvConfig, gemv

    shapes = PROJECTIONS_7B
    dev = torch.device("cuda")
    weights = {
        name: [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        for name, (n, k) in shapes.items()
    }
    xs = {name: torch.randn(1, k, device=dev, dtype=torch.bfloat16) for name, (_n, k) in shapes.items()}
    total_bytes = sum(w.numel() * 2 for ws in weights.values() for w in ws)

    out: dict[str, Any] = {"weights_gb": round(total_bytes / 1e9, 2)}

    def run_all(linear: Any) -> Any:
        def fn() -> None:
            for name, ws in weights.items():
                for w in ws:
                    linear(xs[name], w)

        return fn

    ms = timed(run_all(F.linear))
    out["cublas"] = {"ms": round(ms, 3), "tb_s": round(total_bytes / ms / 1e9, 2)}
    configs = [
        GemvConfig(),
        GemvConfig(block_n=0, block_k=512),
        GemvConfig(block_k=256),
        GemvConfig(block_k=1024, num_warps=8),
        GemvConfig(block_k=512, num_warps=8),
        GemvConfig(block_k=512, num_stages=4),
        GemvConfig(block_n=8),
        GemvConfig(block_n=16, block_k=256, num_warps=8),
        GemvConfig(block_n=4, block_k=1024),
    ]
    for cfg in configs:
        ms = timed(run_all(lambda x, w, cfg=cfg: gemv(x, w, cfg)))
        out[str(cfg)] = {"ms": round(ms, 3), "tb_s": round(total_bytes / ms / 1e9, 2)}
    for name in shapes:
        ref = F.linear(xs[name], weights[name][0]).float()
        got = gemv(xs[name], weights[name][0]).float()
        out[f"rel_err_{name}"] = round(float((got - ref).norm() / ref.norm()), 5)
    print("[gemv]", json.dumps(out, indent=1), flush=True)
    return out


def micro_fp8_linear(layers: int = 8, rows: tuple[int, ...] = (1, 8, 32, 64, 256)) -> dict[str, Any]:
    """The 7B shape's four projections of ``layers`` layers (own weights, streamed from
    memory) at several row counts, CUDA graphs: bf16 through cuBLAS (``F.linear``)
    against float8 weights (``kernels.gemv`` for one row, ``kernels.fp8_matmul`` for
    more; a few other tile shapes too), with each one's error against the float64
    product of the dequantized weights."""
    import torch
    import torch.nn.functional as F

    from llava_node.engine.fp8_weights import quantize_fp8
    from llava_node.engine.kernels import Fp8MatmulConfig, fp8_matmul, fp8_matmul_config, gemv

    shapes = PROJECTIONS_7B
    dev = torch.device("cuda")
    bf16 = {
        n: [torch.randn(*s, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(layers)]
        for n, s in shapes.items()
    }
    fp8 = {n: [quantize_fp8(w) for w in ws] for n, ws in bf16.items()}
    bytes_bf16 = sum(w.numel() * 2 for ws in bf16.values() for w in ws)

    out: dict[str, Any] = {"layers": layers, "weights_gb_bf16": round(bytes_bf16 / 1e9, 2)}
    for m in rows:
        xs = {n: torch.randn(m, k, device=dev, dtype=torch.bfloat16) for n, (_o, k) in shapes.items()}
        row: dict[str, Any] = {}
        ms = timed(lambda xs=xs: [F.linear(xs[n], w) for n, ws in bf16.items() for w in ws])
        row["bf16_cublas_ms"] = round(ms, 3)

        def fp8_lin(x: Any, w: Any, cfg: Any = None, m: int = m) -> Any:
            if m == 1 and cfg is None:
                return gemv(x, w.q, scale=w.scale)
            return fp8_matmul(x, w.q, w.scale, cfg)

        ms = timed(lambda xs=xs: [fp8_lin(xs[n], w) for n, ws in fp8.items() for w in ws])
        row["fp8_ms"] = round(ms, 3)
        row["speedup"] = round(row["bf16_cublas_ms"] / ms, 2)
        if m > 1:
            row["config"] = str(fp8_matmul_config(m, 4096, dev))
        variants = [
            Fp8MatmulConfig(block_m=max(16, min(m, 64)), block_n=128, block_k=128, num_warps=4, num_stages=4),
            Fp8MatmulConfig(block_m=max(16, min(m, 64)), block_n=64, block_k=128, num_warps=4, num_stages=3),
            Fp8MatmulConfig(block_m=max(16, min(m, 64)), block_n=32, block_k=256, num_warps=4, num_stages=4),
        ]
        if m >= 256:
            variants = [
                Fp8MatmulConfig(block_m=128, block_n=256, block_k=64, num_warps=8, num_stages=3),
                Fp8MatmulConfig(block_m=64, block_n=128, block_k=64, num_warps=4, num_stages=4),
            ]
        for cfg in variants:
            try:
                ms = timed(
                    lambda xs=xs, cfg=cfg: [fp8_lin(xs[n], w, cfg) for n, ws in fp8.items() for w in ws]
                )
                row[str(cfg)] = round(ms, 3)
            except Exception as exc:  # a tile shape that does not fit
                row[str(cfg)] = f"failed: {type(exc).__name__}"
        errs = {}
        for n in shapes:
            w = fp8[n][0]
            ref = xs[n].double() @ w.dequantize(torch.float64).T
            got = fp8_lin(xs[n], w).double()
            errs[n] = round(float((got - ref).norm() / ref.norm()), 5)
            errs[n + "_bf16_vs_fp8_weights"] = round(
                float((F.linear(xs[n], bf16[n][0]).double() - got).norm() / got.norm()), 5
            )
        row["rel_err"] = errs
        out[f"m{m}"] = row
        print(f"[fp8_linear] rows {m}:", json.dumps(row), flush=True)
    return out


def main() -> int:
    """Entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=Path("/tmp/llava-1.5-7b-random"))
    parser.add_argument("--out", type=Path, default=Path("bench_engine.json"))
    parser.add_argument("--engines", default="batching,hf_generate")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--streams", default="8,32")
    parser.add_argument(
        "--baseline-streams",
        help="the baseline's concurrencies (default: --streams); it serves one request at a time, "
        "so more streams only queue behind it",
    )
    parser.add_argument("--single-runs", type=int, default=5)
    parser.add_argument("--baseline-window-s", type=float, default=15.0)
    parser.add_argument("--engine-env", action="append", default=[], help="KEY=VALUE for the node (repeat)")
    parser.add_argument(
        "--baseline-conc-tokens",
        type=int,
        default=128,
        help="new tokens per request in the baseline's concurrent runs",
    )
    parser.add_argument(
        "--no-cancel",
        dest="cancel_cut",
        action="store_false",
        help="do not cancel streams a time window cut short",
    )
    parser.add_argument(
        "--via",
        choices=["ensemble", "engine"],
        default="ensemble",
        help="send to the llava ensemble (default) or to llava_engine with numeric inputs",
    )
    parser.add_argument("--check", action="store_true", help="compare with transformers on the GPU")
    parser.add_argument("--micro", action="store_true", help="time the bare decode step")
    parser.add_argument("--prefill", action="store_true", help="time a prompt's prefill, piece by piece")
    parser.add_argument("--gemv", action="store_true", help="time batch-1 linear layers: cuBLAS vs Triton")
    parser.add_argument("--mixed", action="store_true", help="time mixed steps (decode + prompt chunks)")
    parser.add_argument(
        "--sustained-s",
        type=float,
        default=0.0,
        help="also run each concurrency as a sustained load for this many seconds",
    )
    parser.add_argument("--sustained-warmup-s", type=float, default=5.0)
    parser.add_argument(
        "--sustained-only", action="store_true", help="no burst runs: each concurrency sustained only"
    )
    parser.add_argument(
        "--distinct-images",
        action="store_true",
        help="every request its own image (one pixel changed): no prefix or image cache hits",
    )
    parser.add_argument(
        "--kv-cache-dtypes",
        default="auto",
        help="KV-cache dtypes the check and micro phases run with, comma-separated (auto,fp8)",
    )
    parser.add_argument("--kv-cache-dtype", default="auto", help=argparse.SUPPRESS)  # of one phase
    parser.add_argument(
        "--weight-dtypes",
        default="auto",
        help="linear-layer weight dtypes the check and micro phases run with, comma-separated (auto,fp8)",
    )
    parser.add_argument("--weight-dtype", default="auto", help=argparse.SUPPRESS)  # of one phase
    parser.add_argument(
        "--fp8-linear", action="store_true", help="time the 7B projections: bf16 cuBLAS vs float8 weights"
    )
    parser.add_argument(
        "--phase",
        choices=["check", "micro", "prefill", "gemv", "mixed", "fp8_linear"],
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    # SIGTERM as an exception, so that the finally blocks stop the node this run started.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.phase is not None:  # a phase in its own process, so its GPU memory is freed
        prompt = prompt_for(args.checkpoint)[0] if args.phase in ("check", "prefill", "mixed") else ""
        if args.phase == "check":
            out = check_against_transformers(
                args.checkpoint,
                prompt,
                bench_image(),
                kv_cache_dtype=args.kv_cache_dtype,
                weight_dtype=args.weight_dtype,
            )
        elif args.phase == "prefill":
            out = micro_prefill(args.checkpoint, prompt, bench_image())
        elif args.phase == "gemv":
            out = micro_gemv()
        elif args.phase == "fp8_linear":
            out = micro_fp8_linear()
        elif args.phase == "mixed":
            import torch

            with torch.inference_mode():
                out = micro_mixed(args.checkpoint, prompt, bench_image())
        else:
            out = micro_decode(
                args.checkpoint,
                [1, 8, 32],
                kv_cache_dtype=args.kv_cache_dtype,
                weight_dtype=args.weight_dtype,
            )
        args.out.write_text(json.dumps(out, default=str))
        return 0
    args.streams = [int(s) for s in args.streams.split(",") if s]
    args.baseline_streams = [int(s) for s in (args.baseline_streams or "").split(",") if s] or args.streams
    args.image_variants = itertools.count(1)
    started = time.monotonic()
    import torch

    from llava_node.tiny_checkpoint import build_llava_7b_shaped_checkpoint, is_checkpoint

    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d"),
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "none",
        "torch": torch.__version__,
        "command": " ".join(sys.argv),
    }
    if not is_checkpoint(args.checkpoint):
        t = time.monotonic()
        build_llava_7b_shaped_checkpoint(args.checkpoint)
        result["checkpoint_build_s"] = round(time.monotonic() - t, 1)
        print(f"built checkpoint in {result['checkpoint_build_s']} s", flush=True)
    prompt, text_tokens = prompt_for(args.checkpoint)
    image = bench_image()
    result["prompt"] = {"text_tokens": text_tokens, "image_tokens": 576, "new_tokens": args.new_tokens}
    result["via"] = args.via
    result["distinct_images"] = args.distinct_images
    if args.via == "engine":
        args.engine_arrays = engine_inputs(args.checkpoint, prompt, image)

    def save() -> None:
        args.out.write_text(json.dumps(result, indent=1, default=str))

    def variant(kv_cache_dtype: str, weight_dtype: str) -> str:
        """The suffix of a phase's key: '' for the model's dtypes, else e.g. '_fp8_weights-fp8'."""
        kv = "" if kv_cache_dtype == "auto" else f"_{kv_cache_dtype}"
        return kv + ("" if weight_dtype == "auto" else f"_weights-{weight_dtype}")

    def phase(name: str, kv_cache_dtype: str = "auto", weight_dtype: str = "auto") -> Any:
        import subprocess

        path = args.out.with_suffix(f".{name}{variant(kv_cache_dtype, weight_dtype).replace('_', '-')}.json")
        subprocess.run(
            [
                sys.executable,
                __file__,
                "--phase",
                name,
                "--checkpoint",
                str(args.checkpoint),
                "--out",
                str(path),
                "--kv-cache-dtype",
                kv_cache_dtype,
                "--weight-dtype",
                weight_dtype,
            ],
            check=True,
        )
        return json.loads(path.read_text())

    kv_dtypes = [k for k in args.kv_cache_dtypes.split(",") if k]
    w_dtypes = [w for w in args.weight_dtypes.split(",") if w]
    variants = [(kv, wd) for wd in w_dtypes for kv in kv_dtypes]
    for kv, wd in variants if args.check else []:
        key = "check" + variant(kv, wd)
        result[key] = phase("check", kv, wd)
        print(
            f"[{key}]",
            {k: v for k, v in result[key].items() if k not in ("ours", "transformers", "steps")},
            flush=True,
        )
        save()
    for kv, wd in variants if args.micro else []:
        result["micro" + variant(kv, wd)] = phase("micro", kv, wd)
        save()
    if args.fp8_linear:
        result["fp8_linear"] = phase("fp8_linear")
        save()
    if args.prefill:
        result["prefill"] = phase("prefill")
        save()
    if args.gemv:
        result["gemv"] = phase("gemv")
        save()
    if args.mixed:
        result["mixed"] = phase("mixed")
        save()
    for engine in [e for e in args.engines.split(",") if e]:
        result[engine] = bench_engine(engine, args.checkpoint, args, prompt, image)
        save()
    engines = [e for e in args.engines.split(",") if e and e != "hf_generate" and e in result]
    if "hf_generate" in result and engines:
        h = result["hf_generate"]

        def column(key: str, field: str) -> list[Any]:
            return [result[e].get(key, {}).get(field) for e in engines]

        def base(key: str, field: str) -> Any:
            return h.get(key, {}).get(field)  # (None where the baseline did not run)

        rows = [
            ("TTFT p50 (ms)", h["single"]["ttft_ms_p50"], column("single", "ttft_ms_p50")),
            ("decode, 1 stream (tok/s)", h["single"]["decode_tok_s"], column("single", "decode_tok_s")),
        ]
        kinds = [] if args.sustained_only else [("c", "aggregate")]
        kinds += [("sustained", "sustained")] if args.sustained_s else []
        for key, label in kinds:
            for s in args.streams:
                rows.append(
                    (
                        f"{s} streams, {label} (tok/s)",
                        base(f"{key}{s}", "aggregate_tok_s"),
                        column(f"{key}{s}", "aggregate_tok_s"),
                    )
                )
                rows.append(
                    (
                        f"{s} streams, {label}: TTFT p50 (ms)",
                        base(f"{key}{s}", "ttft_ms_p50"),
                        column(f"{key}{s}", "ttft_ms_p50"),
                    )
                )
        # "batching" stays the first engine's column name (the JSON's readers use it)
        result["table"] = [
            {
                "metric": m,
                "baseline": x,
                **{e: y for e, y in zip(engines, ys, strict=True)},
                **{
                    f"ratio {e}": round(y / x, 2) if x and y else None
                    for e, y in zip(engines, ys, strict=True)
                },
            }
            for m, x, ys in rows
        ]
        save()
        print(
            f"\n{'metric':32} {'hf_generate':>12} " + " ".join(f"{e[-24:]:>24} {'ratio':>6}" for e in engines)
        )
        for m, x, ys in rows:
            cells = " ".join(f"{y!s:>24} {round(y / x, 2) if x and y else '-'!s:>6}" for y in ys)
            print(f"{m:32} {x!s:>12} {cells}")
    result["wall_s"] = round(time.monotonic() - started, 1)
    save()
    print(f"wrote {args.out} after {result['wall_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
