"""Multi-turn chat benchmark: N concurrent conversations, each ``--turns`` turns on its own image.

The workload is what LLaVA's web UI sends: every turn resends the whole history, the
model's own answer to turn t inside turn t+1's prompt, ``--max-tokens`` new tokens per
turn, greedy. A conversation's turns run one after another; the conversations of a
phase start together and run concurrently. Each conversation has its own image (made
here with Pillow, seeded): no image is used twice on one node, and the same phase on
the other node (cache off, or the other policy) gets the same images.

``--via engine`` (one node, a GPU benchmark): requests go straight to the node's
``llava_engine`` with numeric inputs (``input_ids`` and ``pixel_values`` made here with
the checkpoint's ``AutoProcessor`` from the llava_v1 prompt, as ``llava_preprocess``
would; ``scripts/bench_engine.py`` builds the tensors), so no BYTES tensor is sent.
The generated ``token_ids`` are decoded here into the next turn's text. The workload
runs on a node with the prefix cache on (``LLAVA_PREFIX_CACHE=true``), then on a fresh
one with it off (``false``): start, warm up, measure every ``--conversations``, stop.
The prompt is LLaVA's ``conv_llava_v1``::

    A chat between ... questions. USER: <image>\\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT:

``--via control-plane`` (the tiny model on a CPU is enough): ``--nodes`` nodes and a
control plane, for each policy of ``--policies`` (default ``cache_aware`` then
``shortest_queue``; ``LLAVA_CP_DISPATCH_POLICY``; a policy the control plane refuses is
reported as skipped, with its error). Conversations go through the OpenAI API
(``/v1/chat/completions``, streamed, ``stream_options.include_usage``): a system
message, the image as a data URL in the first user message, the whole history each
turn; the node's chat template makes the prompt. Then the same number of requests
"without repeats": each one a fresh single-turn conversation with its own image, to
show what the policy costs where there is nothing to reuse. Nodes and control plane
are started fresh per policy, so both policies see the same images and caches.

Recorded per turn: time to first token (first generated token, or first non-empty
text delta), prompt tokens, completion tokens and ``cached_tokens`` (the node's output
of that name, or ``usage.prompt_tokens_details.cached_tokens``; absent, it counts as 0
and ``cached_tokens_reported`` is false). Per phase: TTFT p50/p99 of first turns and of
later turns, aggregate tok/s (completion tokens / the phase's wall time), hit rates
(cached / prompt tokens, later turns and all turns; and the same from the nodes'
``llava_engine_prefix_cache_{hit,miss}_tokens_total``), prompt tokens by turn; and the
ratios cache on / off, cache_aware / shortest_queue. A table on stdout; JSON with every
turn, the engine's time breakdown and each node's counters in ``--out``.

    # GPU: a 7B-shaped random checkpoint (built at /tmp/llava-1.5-7b-random if missing), 128 tokens
    python scripts/bench_multiturn.py --via engine --conversations 1,32
    # CPU, tiny model, both modes
    python scripts/bench_multiturn.py --via engine --conversations 2 --max-tokens 8
    python scripts/bench_multiturn.py --via control-plane --conversations 2 --max-tokens 8
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import json
import os
import random
import shlex
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import bench_control_plane as bcp  # noqa: E402
import bench_engine  # noqa: E402

from llava_node.launcher import TritonNode, TritonNodeConfig, free_port_block, stop_all  # noqa: E402

MODEL = "llava"
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)
QUESTIONS = (
    "What is shown in this image? Describe it in detail.",
    "Which colours stand out the most, and where are they in the picture?",
    "Is there anything unusual about the shapes you see?",
    "Summarize what we have discussed about this picture in two sentences.",
)
IMAGE_SIDE = 336
DEFAULT_7B_CHECKPOINT = Path("/tmp/llava-1.5-7b-random")  # bench_engine.py's default
# For warming the prefill lengths: a first turn's prompt (image included) and the text a
# later turn adds besides the answer, in tokens, with room to spare
FIRST_TURN_TOKENS = 700
TURN_TEXT_TOKENS = 64
DEFAULT_TINY_CHECKPOINT = REPO / "var" / "checkpoints" / "tiny-llava"
DRAIN_TIMEOUT_S = 5.0
WARMUP_TOKENS = 8

# -- the workload's pure parts -----------------------------------------------------------------


def question(turn: int) -> str:
    """The question of ``turn`` (0-based); past the list, the list again, marked."""
    q = QUESTIONS[turn % len(QUESTIONS)]
    return q if turn < len(QUESTIONS) else f"{q} (follow-up {turn // len(QUESTIONS)})"


def image_seed(*parts: object) -> int:
    """A stable seed for an image of one phase's conversation (the same in every run)."""
    return zlib.crc32("/".join(map(str, parts)).encode())


def conversation_image(seed: int, side: int = IMAGE_SIDE) -> bytes:
    """A PNG of ``side`` pixels: a two-colour gradient, noise and random shapes, from ``seed``."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    noise = np.random.default_rng(seed).integers(0, 48, (side, side, 3))
    a, b = (np.array([rng.randrange(256) for _ in range(3)], np.float32) for _ in range(2))
    ramp = np.linspace(0.0, 1.0, side, dtype=np.float32)[:, None, None]
    pixels = (a * (1 - ramp) + b * ramp).repeat(side, axis=1) * 0.8 + noise
    img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(rng.randint(5, 12)):
        x0, y0 = rng.randrange(side), rng.randrange(side)
        x1, y1 = (
            min(side - 1, x0 + rng.randint(10, side // 2)),
            min(side - 1, y0 + rng.randint(10, side // 2)),
        )
        colour = tuple(rng.randrange(256) for _ in range(3))
        shape = rng.choice(("rectangle", "ellipse", "line"))
        if shape == "line":
            draw.line((x0, y0, x1, y1), fill=colour, width=rng.randint(2, 9))
        else:
            getattr(draw, shape)((x0, y0, x1, y1), fill=colour)
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def llava_v1_prompt(questions: Sequence[str], answers: Sequence[str]) -> str:
    """LLaVA's ``conv_llava_v1`` prompt (separators " " and "</s>") of a conversation that
    asked ``questions`` and got ``answers``, one fewer: the last question is being asked.
    The image goes before the first question, as the web UI puts it."""
    if len(answers) != len(questions) - 1:
        raise ValueError(f"{len(questions)} questions need {len(questions) - 1} answers, not {len(answers)}")
    text = SYSTEM + " "
    for i, q in enumerate(questions):
        text += "USER: " + ("<image>\n" if i == 0 else "") + q + " ASSISTANT:"
        if i < len(answers):
            text += " " + answers[i] + "</s>"
    return text


def openai_messages(image_url: str, questions: Sequence[str], answers: Sequence[str]) -> list[dict[str, Any]]:
    """The same conversation as OpenAI chat messages: a system message, the image in the
    first user message, each answer as an assistant message."""
    if len(answers) != len(questions) - 1:
        raise ValueError(f"{len(questions)} questions need {len(questions) - 1} answers, not {len(answers)}")
    messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM}]
    for i, q in enumerate(questions):
        content: str | list[dict[str, Any]] = q
        if i == 0:
            content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": q}]
        messages.append({"role": "user", "content": content})
        if i < len(answers):
            messages.append({"role": "assistant", "content": answers[i]})
    return messages


def clean_answer(text: str) -> str:
    """An answer as the web UI keeps it in the history (stripped), without an image
    placeholder: random weights may write one, and it would ask for a second image."""
    return text.replace("<image>", "").strip()


@dataclass
class Turn:
    """One request as the client saw it (``perf_counter`` times)."""

    conversation: int
    turn: int  # 1-based; a request without repeats is always turn 1
    request_id: str
    start: float = 0.0
    first: float | None = None
    end: float = 0.0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int | None = None  # None: the response did not carry it
    error: str | None = None
    answer: str = ""

    @property
    def ttft_ms(self) -> float | None:
        """Time to first token, ms."""
        return None if self.first is None else (self.first - self.start) * 1000

    def as_json(self, t0: float) -> dict[str, Any]:
        """The record, times relative to ``t0`` (ms), the answer shortened."""
        out = asdict(self)
        for k in ("start", "first", "end"):
            out[k] = None if out[k] is None else round((out[k] - t0) * 1000, 1)
        out["ttft_ms"] = None if self.ttft_ms is None else round(self.ttft_ms, 1)
        out["answer"] = self.answer[:80]
        return out


def _r(v: float | None, digits: int = 1) -> float | None:
    return None if v is None else round(v, digits)


def hit_rate(turns: Sequence[Turn]) -> float | None:
    """Cached prompt tokens over prompt tokens (a turn without ``cached_tokens``: 0)."""
    prompt = sum(t.prompt_tokens for t in turns)
    return round(sum(t.cached_tokens or 0 for t in turns) / prompt, 4) if prompt else None


def summarize(turns: Sequence[Turn], wall_s: float) -> dict[str, Any]:
    """A phase's figures: TTFT of first and later turns, tok/s, hit rates, tokens by turn."""
    ok = [t for t in turns if t.error is None]
    first = [t.ttft_ms for t in ok if t.turn == 1 and t.ttft_ms is not None]
    later = [t.ttft_ms for t in ok if t.turn > 1 and t.ttft_ms is not None]
    completion = sum(t.completion_tokens for t in ok)
    by_turn: dict[str, Any] = {}
    for n in sorted({t.turn for t in ok}):
        these = [t for t in ok if t.turn == n]
        prompts = [t.prompt_tokens for t in these]
        by_turn[str(n)] = {
            "requests": len(these),
            "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1),
            "prompt_tokens_min": min(prompts),
            "prompt_tokens_max": max(prompts),
            "cached_tokens_mean": round(sum(t.cached_tokens or 0 for t in these) / len(these), 1),
            "completion_tokens_mean": round(sum(t.completion_tokens for t in these) / len(these), 1),
            "ttft_ms_p50": _r(bcp.percentile([t.ttft_ms for t in these if t.ttft_ms is not None], 50)),
            "hit_rate": hit_rate(these),
        }
    return {
        "requests": len(turns),
        "errors": len(turns) - len(ok),
        "error_examples": sorted({str(t.error)[:300] for t in turns if t.error is not None})[:3],
        "wall_s": round(wall_s, 3),
        "completion_tokens": completion,
        "tok_s": round(completion / wall_s, 1) if wall_s > 0 else None,
        "ttft_ms_first_turn_p50": _r(bcp.percentile(first, 50)),
        "ttft_ms_first_turn_p99": _r(bcp.percentile(first, 99)),
        "ttft_ms_later_turns_p50": _r(bcp.percentile(later, 50)),
        "ttft_ms_later_turns_p99": _r(bcp.percentile(later, 99)),
        "hit_rate_later_turns": hit_rate([t for t in ok if t.turn > 1]),
        "hit_rate_all_turns": hit_rate(ok),
        "cached_tokens_reported": any(t.cached_tokens is not None for t in ok),
        "by_turn": by_turn,
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b``, rounded; None if either is missing or ``b`` is 0."""
    return round(a / b, 3) if a is not None and b else None


def compare(phases: dict[str, Any], a: str, b: str) -> dict[str, float | None] | None:
    """Ratios of phase ``a`` to phase ``b`` (both measured), or None."""
    pa, pb = phases.get(a), phases.get(b)
    if not pa or not pb or "summary" not in pa or "summary" not in pb:
        return None
    sa, sb = pa["summary"], pb["summary"]
    return {
        "tok_s": ratio(sa["tok_s"], sb["tok_s"]),
        "ttft_first_turn_p50": ratio(sa["ttft_ms_first_turn_p50"], sb["ttft_ms_first_turn_p50"]),
        "ttft_later_turns_p50": ratio(sa["ttft_ms_later_turns_p50"], sb["ttft_ms_later_turns_p50"]),
    }


# -- straight to llava_engine ------------------------------------------------------------------


class EngineCodec:
    """The checkpoint's processor: prompt and image to ``llava_engine``'s numeric inputs (as
    ``bench_engine.engine_inputs`` makes them, with the processor loaded once), token ids
    back to text. One worker thread: a fast tokenizer must not be used by two at once."""

    def __init__(self, checkpoint: Path) -> None:
        from transformers import AutoProcessor

        self.processor = AutoProcessor.from_pretrained(checkpoint)
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="codec")
        # per image (a conversation's, the same every turn): its pixels and image tokens, so
        # that a later turn only tokenizes its text (the image's ~15 ms of resizing and
        # normalizing per turn, in one thread, held the 32-conversation runs back)
        self._images: dict[int, tuple[Any, Any, int]] = {}

    def _encode(self, prompt: str, image: Any) -> dict[str, Any]:
        import numpy as np

        known = self._images.get(id(image))
        if known is None:
            enc = self.processor(images=[image], text=prompt, return_tensors="np")
            ids = enc["input_ids"][0].astype(np.int64)
            pixels = enc["pixel_values"].astype(np.float32)
            per_image = int((ids == self.image_token_id).sum()) // max(1, prompt.count("<image>"))
            self._images[id(image)] = (image, pixels, per_image)  # the image kept: its id stays its own
            return {"input_ids": ids, "pixel_values": pixels}
        _, pixels, per_image = known
        # what the processor does with the text: each <image> expanded to the image's tokens
        text = prompt.replace("<image>", "<image>" * per_image)
        ids = self.processor.tokenizer(text, return_tensors="np")["input_ids"][0].astype(np.int64)
        return {"input_ids": ids, "pixel_values": pixels}

    @property
    def image_token_id(self) -> int:
        """The id of the image placeholder token."""
        return int(self.processor.tokenizer.convert_tokens_to_ids("<image>"))

    async def encode(self, prompt: str, image: Any) -> dict[str, Any]:
        """Inputs for ``prompt`` and the PIL ``image``, off the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._encode, prompt, image)

    async def decode(self, ids: list[int]) -> str:
        """Text of generated ids (special tokens left out, as the node's text does)."""
        tok = self.processor.tokenizer
        return await asyncio.get_running_loop().run_in_executor(
            self.pool, lambda: str(tok.decode(ids, skip_special_tokens=True))
        )

    def close(self) -> None:
        """Stop the worker thread."""
        self.pool.shutdown()


class Drains:
    """Streams whose final response came are read to their end in the background, never
    cancelled (Triton 2.51 leaks a request cancelled right after its final response; see
    ``control_plane/nodes/triton.py``)."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[None]] = set()

    def add(self, call: Any) -> None:
        """Drain ``call``."""

        async def drain() -> None:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    while True:
                        await call.__anext__()
            except StopAsyncIteration:
                return
            except BaseException:
                with contextlib.suppress(Exception):
                    call.cancel()

        task = asyncio.get_running_loop().create_task(drain())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self) -> None:
        """Wait for every drain."""
        if self.tasks:
            await asyncio.gather(*self.tasks, return_exceptions=True)


async def engine_turn(
    client: Any, arrays: dict[str, Any], max_tokens: int, rec: Turn, timeout_s: float, drains: Drains
) -> list[int]:
    """Stream one request to ``llava_engine``; fill ``rec``; the generated ids."""
    import tritonclient.grpc.aio as grpcclient

    model, inputs = bench_engine.request_inputs(
        grpcclient, SimpleNamespace(via="engine", engine_arrays=arrays), "", b"", max_tokens
    )

    async def req() -> Any:
        yield {
            "model_name": model,
            "inputs": inputs,
            "request_id": rec.request_id,
            "enable_empty_final_response": True,
        }

    ids: list[int] = []
    finished = False
    rec.prompt_tokens = int(arrays["input_ids"].size)
    rec.start = time.perf_counter()
    call = client.stream_infer(req())
    try:
        async with asyncio.timeout(timeout_s):
            while True:
                try:
                    result, error = await call.__anext__()
                except StopAsyncIteration:
                    rec.error = "the node closed the stream before its final response"
                    break
                if error is not None:
                    rec.error = str(error)
                    finished = True
                    break
                resp = result.get_response()
                now = time.perf_counter()
                if resp.outputs:
                    new = result.as_numpy("token_ids")
                    if new is not None and new.size:
                        rec.first = rec.first or now
                        ids.extend(int(x) for x in new.reshape(-1))
                    for name in ("prompt_tokens", "completion_tokens", "cached_tokens"):
                        value = result.as_numpy(name)  # None where the node does not send it
                        if value is not None and value.size:
                            setattr(rec, name, int(value.reshape(-1)[0]))
                final = resp.parameters.get("triton_final_response")
                if final is not None and final.bool_param:
                    finished = True
                    break
    except TimeoutError:
        rec.error = f"no final response in {timeout_s:g} s"
    except Exception as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = time.perf_counter()
    rec.completion_tokens = rec.completion_tokens or len(ids)
    if finished:
        drains.add(call)
    else:
        with contextlib.suppress(Exception):
            call.cancel()
    return ids


async def engine_conversation(
    client: Any,
    codec: EngineCodec,
    image: Any,
    index: int,
    args: argparse.Namespace,
    tag: str,
    drains: Drains,
    turns: int,
    max_tokens: int,
) -> list[Turn]:
    """One conversation's turns, one after another, each with the whole history."""
    answers: list[str] = []
    out: list[Turn] = []
    for t in range(turns):
        prompt = llava_v1_prompt([question(i) for i in range(t + 1)], answers)
        arrays = await codec.encode(prompt, image)
        rec = Turn(index, t + 1, f"{tag}-{os.getpid()}-{index}-{t + 1}")
        ids = await engine_turn(client, arrays, max_tokens, rec, args.turn_timeout_s, drains)
        out.append(rec)
        if rec.error is not None:
            break
        rec.answer = clean_answer(await codec.decode(ids))
        answers.append(rec.answer)
    return out


def pil_images(tag: str, count: int) -> list[Any]:
    """``count`` distinct conversation images of the phase ``tag``, decoded."""
    from PIL import Image

    return [
        Image.open(io.BytesIO(conversation_image(image_seed(tag, i)))).convert("RGB") for i in range(count)
    ]


async def engine_phase(
    node: TritonNode,
    codec: EngineCodec,
    args: argparse.Namespace,
    conversations: int,
    tag: str,
    turns: int,
    max_tokens: int,
) -> dict[str, Any]:
    """``conversations`` concurrent conversations against one node's ``llava_engine``."""
    import tritonclient.grpc.aio as grpcclient

    images = pil_images(f"engine/{tag}", conversations)
    client = grpcclient.InferenceServerClient(node.grpc_url)
    await client.is_server_ready()  # connected before the clock starts
    drains = Drains()
    t0 = time.perf_counter()
    try:
        convs = await asyncio.gather(
            *(
                engine_conversation(client, codec, images[i], i, args, tag, drains, turns, max_tokens)
                for i in range(conversations)
            )
        )
        wall = time.perf_counter() - t0
        await drains.wait()
    finally:
        await client.close()
    turns_done = [t for c in convs for t in c]
    return {
        "summary": summarize(turns_done, wall),
        "turns": [t.as_json(t0) for t in turns_done],
    }


async def warm_prefill_lengths(node: TritonNode, longest: int, multiple: int = 16) -> int:
    """One text-only prompt of every captured prefill length up to ``longest`` (random
    token ids, one new token each), so that both nodes of a comparison have captured the
    prefill graph of each prompt length the workload will need (the engine captures one
    per 16 tokens the first time it sees that length: ~0.3 s that would land inside the
    measurement, far more often on a node without the cache). Returns the prompts sent."""
    import numpy as np
    import tritonclient.grpc.aio as grpcclient

    rng = np.random.default_rng(0)
    client = grpcclient.InferenceServerClient(node.grpc_url)
    drains = Drains()
    sent = 0
    try:
        for n in range(multiple, longest + 1, multiple):
            arrays = {"input_ids": rng.integers(100, 20000, n).astype(np.int64)}
            rec = Turn(conversation=-1, turn=1, request_id=f"warm-{n}")
            await engine_turn(client, arrays, 1, rec, 120.0, drains)
            sent += 1
        await drains.wait()
    finally:
        await client.close()
    return sent


def metric_sums(url: str, keep: Callable[[str], bool]) -> dict[str, float]:
    """Sums (over labels) of the node's metrics whose names ``keep`` keeps."""
    import urllib.request

    with urllib.request.urlopen(url, timeout=10) as r:
        text = r.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if keep(name):
            with contextlib.suppress(ValueError):
                out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[1])
    return out


def _prefix_metric(name: str) -> bool:
    return name.startswith("llava_engine_") and "prefix" in name


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Counters (``*_total``) as ``after - before``; gauges as they are ``after``."""
    return {k: round(v - before.get(k, 0.0) if k.endswith("_total") else v, 3) for k, v in after.items()}


def node_hit_rate(deltas: Sequence[dict[str, float]]) -> float | None:
    """Prompt tokens the nodes' prefix caches served over those they looked up, from their
    metrics (``llava_engine_prefix_cache_{hit,miss}_tokens_total``), None without them."""
    hit = sum(v for d in deltas for k, v in d.items() if k.endswith("prefix_cache_hit_tokens_total"))
    miss = sum(v for d in deltas for k, v in d.items() if k.endswith("prefix_cache_miss_tokens_total"))
    return round(hit / (hit + miss), 4) if hit + miss else None


def run_engine(
    args: argparse.Namespace, checkpoint: Path, result: dict[str, Any], save: Callable[[], None]
) -> None:
    """Every ``--prefix-cache`` setting on a fresh node: warm up, every concurrency, stop."""
    codec = EngineCodec(checkpoint)
    phases: dict[str, Any] = result["phases"]
    try:
        for setting in args.prefix_cache:
            env = {
                **({"LLAVA_MAX_SEQ_LEN": "4096"} if args.gpu else {}),
                "LLAVA_PREFIX_CACHE": "true" if setting == "on" else "false",
                **args.node_env,
            }
            result["settings"].setdefault("node_env", {})[setting] = env
            node = TritonNode(TritonNodeConfig(checkpoint=checkpoint, env=env, startup_timeout_s=600))
            t = time.monotonic()
            node.start(wait=False)
            bcp.started(node.process)  # type: ignore[arg-type]
            try:
                node.wait_ready(600)
                startup = round(time.monotonic() - t, 1)
                print(f"[cache {setting}] node ready in {startup} s", flush=True)
                t = time.monotonic()
                asyncio.run(engine_phase(node, codec, args, 1, f"warmup-{setting}", 2, WARMUP_TOKENS))
                if args.gpu:  # captured prefills of every length the turns will have
                    longest = FIRST_TURN_TOKENS + args.turns * (args.max_tokens + TURN_TEXT_TOKENS)
                    sent = asyncio.run(warm_prefill_lengths(node, min(longest, 4000)))
                    print(f"[cache {setting}] {sent} prompts warmed the prefill lengths up to {longest}")
                print(f"[cache {setting}] warm-up: {time.monotonic() - t:.1f} s", flush=True)
                for n in args.conversations:
                    name = f"cache_{setting}/c{n}"

                    def load(n: int = n, node: TritonNode = node) -> dict[str, Any]:
                        before = metric_sums(node.metrics_url, _prefix_metric)
                        out = asyncio.run(
                            engine_phase(node, codec, args, n, f"c{n}", args.turns, args.max_tokens)
                        )
                        out["_prefix_before"] = before
                        return out

                    r = bench_engine.measured(node, load)  # + the engine's time breakdown
                    r["prefix_metrics"] = delta(
                        r.pop("_prefix_before"), metric_sums(node.metrics_url, _prefix_metric)
                    )
                    r["node_hit_rate"] = node_hit_rate([r["prefix_metrics"]])
                    r["startup_s"] = startup
                    phases[name] = r
                    print(f"[{name}] {phase_line(r)}", flush=True)
                    save()
            except Exception:
                print(f"[cache {setting}] failed; node log:\n{node.log_tail(8000)}", flush=True)
                raise
            finally:
                node.stop()
    finally:
        codec.close()
    for n in args.conversations:
        result["ratios"][f"cache_on/cache_off c{n}"] = compare(phases, f"cache_on/c{n}", f"cache_off/c{n}")


# -- through the control plane -----------------------------------------------------------------


def data_url(png: bytes) -> str:
    """A PNG as a data URL."""
    return "data:image/png;base64," + base64.b64encode(png).decode()


async def openai_turn(
    session: Any, url: str, messages: list[dict[str, Any]], max_tokens: int, rec: Turn, timeout_s: float
) -> None:
    """One streamed ``/v1/chat/completions``; fills ``rec`` (answer, usage, times)."""
    import aiohttp

    body = json.dumps(
        {
            "model": MODEL,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    headers = {"Content-Type": "application/json", "X-Request-Id": rec.request_id}
    parts: list[str] = []
    rec.start = time.perf_counter()
    try:
        async with session.post(
            f"{url}/v1/chat/completions",
            data=body,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as r:
            if r.status != 200:
                rec.error = f"HTTP {r.status}: {(await r.text())[:300]}"
            else:
                async for payload in bcp.sse_events(r.content):
                    obj = json.loads(payload)
                    if "error" in obj:
                        rec.error = str(obj["error"].get("message"))[:300]
                    elif obj.get("usage"):
                        usage = obj["usage"]
                        rec.prompt_tokens = int(usage.get("prompt_tokens", 0))
                        rec.completion_tokens = int(usage.get("completion_tokens", 0))
                        details = usage.get("prompt_tokens_details") or {}
                        if details.get("cached_tokens") is not None:
                            rec.cached_tokens = int(details["cached_tokens"])
                    elif obj.get("choices"):
                        text = obj["choices"][0].get("delta", {}).get("content")
                        if text:
                            rec.first = rec.first or time.perf_counter()
                            parts.append(text)
    except TimeoutError:
        rec.error = f"not done in {timeout_s:g} s"
    except Exception as exc:
        rec.error = f"{type(exc).__name__}: {exc}"
    rec.end = time.perf_counter()
    rec.answer = "".join(parts)


async def openai_conversation(
    session: Any,
    url: str,
    image_urls: list[str],
    index: int,
    args: argparse.Namespace,
    tag: str,
    repeats: bool,
) -> list[Turn]:
    """``--turns`` requests one after another: one conversation's turns (``repeats``), or
    each a fresh single-turn conversation on an image of its own."""
    answers: list[str] = []
    out: list[Turn] = []
    for t in range(args.turns):
        if repeats:
            messages = openai_messages(image_urls[0], [question(i) for i in range(t + 1)], answers)
        else:
            messages = openai_messages(image_urls[t], [question(0)], [])
        rec = Turn(index, t + 1 if repeats else 1, f"{tag}-{os.getpid()}-{index}-{t + 1}")
        await openai_turn(session, url, messages, args.max_tokens, rec, args.turn_timeout_s)
        out.append(rec)
        if rec.error is not None:
            break
        rec.answer = clean_answer(rec.answer)
        answers.append(rec.answer)
    return out


async def openai_phase(
    url: str, args: argparse.Namespace, conversations: int, tag: str, repeats: bool
) -> dict[str, Any]:
    """``conversations`` concurrent clients through the control plane's OpenAI API."""
    import aiohttp

    per_conv = 1 if repeats else args.turns
    urls = [
        [data_url(conversation_image(image_seed(tag, i, k))) for k in range(per_conv)]
        for i in range(conversations)
    ]
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = time.perf_counter()
        convs = await asyncio.gather(
            *(openai_conversation(session, url, urls[i], i, args, tag, repeats) for i in range(conversations))
        )
        wall = time.perf_counter() - t0
    turns = [t for c in convs for t in c]
    return {"summary": summarize(turns, wall), "turns": [t.as_json(t0) for t in turns]}


def node_counts(nodes: Sequence[TritonNode]) -> list[dict[str, float]]:
    """Per node: requests started, prefill seconds and prefix-cache metrics, so far."""

    def keep(name: str) -> bool:
        return name in (
            "llava_engine_requests_started_total",
            "llava_engine_prefill_seconds_total",
        ) or _prefix_metric(name)

    return [metric_sums(n.metrics_url, keep) for n in nodes]


@contextlib.contextmanager
def fleet(checkpoint: Path, count: int, env: dict[str, str]) -> Iterator[list[TritonNode]]:
    """``count`` nodes (HTTP, gRPC and metrics on consecutive ports, as the control plane
    expects), not started yet; stopped, by their process groups, at exit."""
    nodes: list[TritonNode] = []
    used: set[int] = set()
    for _ in range(count):
        base = free_port_block("127.0.0.1", 23000 + (os.getpid() % 400) * 20, avoid=used)
        used.update(range(base, base + 3))
        cfg = TritonNodeConfig(
            checkpoint=checkpoint,
            http_port=base,
            grpc_port=base + 1,
            metrics_port=base + 2,
            env=env,
            startup_timeout_s=600,
        )
        nodes.append(TritonNode(cfg))
    try:
        yield nodes
    finally:
        stop_all(nodes)


def run_control_plane(
    args: argparse.Namespace, checkpoint: Path, result: dict[str, Any], save: Callable[[], None]
) -> None:
    """Per policy: a control plane (refused: skipped), fresh nodes, a warm-up, the
    multi-turn workload at every concurrency, then the one without repeats."""
    phases: dict[str, Any] = result["phases"]
    node_env = {"LLAVA_MAX_BATCH": str(max(8, *args.conversations)), **args.node_env}
    cp_env = {
        "LLAVA_CP_MAX_INFLIGHT_PER_WORKER": str(max(64, *args.conversations)),
        "LLAVA_CP_MAX_WAITING": str(4 * max(64, *args.conversations)),
        "LLAVA_CP_QUEUE_TIMEOUT_S": "600",
        "LLAVA_CP_POLL_INTERVAL_S": "1",
    }
    result["settings"].update({"nodes": args.nodes, "node_env": node_env, "control_plane_env": cp_env})
    with tempfile.TemporaryDirectory(prefix="bench-multiturn-") as tmp:
        for policy in args.policies:
            env = {**cp_env, "LLAVA_CP_DISPATCH_POLICY": policy}
            with fleet(checkpoint, args.nodes, node_env) as nodes:
                cp = bcp.control_plane(REPO, Path(tmp) / policy, [n.http_url for n in nodes], env, policy)
                try:
                    try:
                        cp.start()
                    except RuntimeError as exc:  # e.g. a policy this control plane does not know
                        result["skipped"][policy] = str(exc)[-1500:]
                        print(f"[{policy}] skipped: the control plane did not start:\n{str(exc)[-800:]}")
                        save()
                        continue
                    t = time.monotonic()
                    for n in nodes:
                        n.start(wait=False)
                        bcp.started(n.process)  # type: ignore[arg-type]
                    for n in nodes:
                        n.wait_ready(600)
                    bcp.wait_healthy(cp, len(nodes), 120)
                    print(
                        f"[{policy}] {len(nodes)} nodes and the control plane ready in "
                        f"{time.monotonic() - t:.1f} s",
                        flush=True,
                    )
                    t = time.monotonic()
                    warm = argparse.Namespace(
                        turns=2, max_tokens=WARMUP_TOKENS, turn_timeout_s=args.turn_timeout_s
                    )
                    asyncio.run(openai_phase(cp.url, warm, 2 * len(nodes), f"warmup-{policy}", True))
                    print(f"[{policy}] warm-up: {time.monotonic() - t:.1f} s", flush=True)
                    workloads = [("multiturn", True)] + (
                        [] if args.skip_no_repeats else [("norepeat", False)]
                    )
                    for workload, repeats in workloads:
                        for n in args.conversations:
                            name = f"{policy}/{workload}/c{n}"
                            time.sleep(1.2)  # node metrics are published once a second
                            before = node_counts(nodes)
                            r = asyncio.run(openai_phase(cp.url, args, n, f"{workload}/c{n}", repeats))
                            time.sleep(1.2)  # node metrics are published once a second
                            r["nodes"] = [
                                delta(b, a) for b, a in zip(before, node_counts(nodes), strict=True)
                            ]
                            r["node_hit_rate"] = node_hit_rate(r["nodes"])
                            phases[name] = r
                            print(f"[{name}] {phase_line(r)}", flush=True)
                            save()
                except Exception:
                    for n in nodes:
                        print(f"[{policy}] node log:\n{n.log_tail(3000)}", flush=True)
                    print(f"[{policy}] control plane log:\n{cp.log_tail(3000)}", flush=True)
                    raise
                finally:
                    cp.stop()
    base = "shortest_queue"
    for policy in (p for p in args.policies if p != base):
        for workload in ("multiturn", *(() if args.skip_no_repeats else ("norepeat",))):
            for n in args.conversations:
                result["ratios"][f"{policy}/{base} {workload} c{n}"] = compare(
                    phases, f"{policy}/{workload}/c{n}", f"{base}/{workload}/c{n}"
                )


# -- output ------------------------------------------------------------------------------------


def _f(v: Any, spec: str = ".0f") -> str:
    return "-" if v is None else format(v, spec)


def phase_line(phase: dict[str, Any]) -> str:
    """A phase's summary in one line."""
    s = phase["summary"]
    return (
        f"{s['requests']} requests ({s['errors']} errors) in {s['wall_s']:.1f} s: "
        f"{_f(s['tok_s'], '.1f')} tok/s; TTFT p50 first turns {_f(s['ttft_ms_first_turn_p50'], '.1f')} ms, "
        f"later turns {_f(s['ttft_ms_later_turns_p50'], '.1f')} ms; hit rate later turns "
        f"{_f(s['hit_rate_later_turns'], '.3f')}, all {_f(s['hit_rate_all_turns'], '.3f')}, "
        f"node metrics {_f(phase.get('node_hit_rate'), '.3f')}"
        + (
            "; requests per node "
            + "/".join(_f(d.get("llava_engine_requests_started_total")) for d in phase["nodes"])
            if phase.get("nodes")
            else ""
        )
        + (f"; e.g. {s['error_examples'][0][:200]}" if s["error_examples"] else "")
    )


def print_table(result: dict[str, Any]) -> None:
    """Every phase, then the ratios and what was skipped."""
    head = (
        f"{'phase':30} {'req':>4} {'err':>3} {'tok/s':>8} {'TTFT t1 p50/p99':>16} "
        f"{'TTFT t2+ p50/p99':>16} {'hit t2+':>7} {'hit all':>7} {'node':>6}  prompt tokens by turn"
    )
    print("\n" + head + "\n" + "-" * len(head))
    for name, p in result["phases"].items():
        s = p["summary"]
        t1 = f"{_f(s['ttft_ms_first_turn_p50'])}/{_f(s['ttft_ms_first_turn_p99'])}"
        t2 = f"{_f(s['ttft_ms_later_turns_p50'])}/{_f(s['ttft_ms_later_turns_p99'])}"
        prompts = " ".join(_f(v["prompt_tokens_mean"]) for v in s["by_turn"].values())
        print(
            f"{name:30} {s['requests']:>4} {s['errors']:>3} {_f(s['tok_s'], '.1f'):>8} {t1:>16} {t2:>16} "
            f"{_f(s['hit_rate_later_turns'], '.3f'):>7} {_f(s['hit_rate_all_turns'], '.3f'):>7} "
            f"{_f(p.get('node_hit_rate'), '.3f'):>6}  {prompts}"
            + ("" if s["cached_tokens_reported"] else "  (no cached_tokens in the responses)")
        )
    print(
        "TTFT in ms; t1: first turns, t2+: later turns; hit: cached / prompt tokens from the "
        "responses; node: the same from the nodes' prefix-cache metrics"
    )
    if result["ratios"]:
        print("\nratios (tok/s; TTFT p50 of first turns; of later turns):")
        for name, r in result["ratios"].items():
            if r is None:
                print(f"  {name:44} -")
            else:
                print(
                    f"  {name:44} tok/s {_f(r['tok_s'], '.3f')}, "
                    f"TTFT t1 {_f(r['ttft_first_turn_p50'], '.3f')}, "
                    f"TTFT t2+ {_f(r['ttft_later_turns_p50'], '.3f')}"
                )
    for name, why in result["skipped"].items():
        lines = [line for line in why.splitlines() if line.strip()]
        print(f"skipped {name}: " + " | ".join(lines[-3:])[:400])


def machine_info(gpu: bool) -> dict[str, Any]:
    """What ran the benchmark, and the exact command."""
    info = bcp.machine()
    info["command"] = shlex.join([sys.executable, *sys.argv])
    info["gpu"] = "none"
    with contextlib.suppress(Exception):
        import torch

        info["torch"] = torch.__version__
        if gpu:
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_count"] = torch.cuda.device_count()
    return info


def has_gpu() -> bool:
    """Whether torch sees a GPU."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def resolve_checkpoint(args: argparse.Namespace) -> tuple[Path, float | None]:
    """The checkpoint to serve (built if missing) and how long building took."""
    from llava_node.tiny_checkpoint import build_tiny_checkpoint, is_checkpoint

    seven_b = args.via == "engine" and args.gpu
    path = args.checkpoint or (DEFAULT_7B_CHECKPOINT if seven_b else DEFAULT_TINY_CHECKPOINT)
    if is_checkpoint(path):
        return path, None
    t = time.monotonic()
    if seven_b:
        # in a process of its own, so that this one holds no GPU memory the nodes could use
        print(f"building a LLaVA-1.5-7B-shaped random checkpoint at {path} ...", flush=True)
        cmd = [sys.executable, "-m", "llava_node.tiny_checkpoint", str(path), "--shape", "llava-1.5-7b"]
        subprocess.run(cmd, check=True, cwd=REPO)
    else:
        build_tiny_checkpoint(path, seed=0)
    return path, round(time.monotonic() - t, 1)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--via", choices=["engine", "control-plane"], default="engine")
    p.add_argument(
        "--checkpoint",
        type=Path,
        help="llava-hf directory, built if missing: with --via engine on a GPU a 7B-shaped random one "
        f"(default {DEFAULT_7B_CHECKPOINT}), else the tiny one (default {DEFAULT_TINY_CHECKPOINT})",
    )
    p.add_argument("--conversations", default="1,32", help="concurrent conversations, comma-separated")
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--max-tokens", type=int, help="new tokens per turn (default: 128 on a GPU, 8 on a CPU)")
    p.add_argument("--out", type=Path, help="JSON results (default /tmp/bench_multiturn-<via>-<time>.json)")
    p.add_argument(
        "--node-env", action="append", default=[], metavar="KEY=VALUE", help="for the nodes (repeat)"
    )
    p.add_argument("--prefix-cache", default="on,off", help="--via engine: node settings to run, in order")
    p.add_argument(
        "--policies", default="cache_aware,shortest_queue", help="--via control-plane: dispatch policies"
    )
    p.add_argument("--nodes", type=int, default=2, help="--via control-plane: nodes")
    p.add_argument(
        "--skip-no-repeats", action="store_true", help="--via control-plane: no single-turn workload"
    )
    p.add_argument("--turn-timeout-s", type=float, default=300.0)
    args = p.parse_args(argv)
    args.conversations = [int(x) for x in str(args.conversations).split(",") if x.strip()]
    args.prefix_cache = [x.strip() for x in str(args.prefix_cache).split(",") if x.strip()]
    args.policies = [x.strip() for x in str(args.policies).split(",") if x.strip()]
    if not args.conversations or min(args.conversations) < 1 or args.turns < 1:
        p.error("--conversations and --turns must be at least 1")
    if any(x not in ("on", "off") for x in args.prefix_cache):
        p.error("--prefix-cache takes on and off")
    bad = [kv for kv in args.node_env if "=" not in kv]
    if bad:
        p.error(f"--node-env takes KEY=VALUE, not {bad[0]!r}")
    args.node_env = dict(kv.split("=", 1) for kv in args.node_env)
    args.gpu = has_gpu()
    args.max_tokens = args.max_tokens or (128 if args.gpu else 8)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the phases, print the table, write the JSON."""
    args = parse_args(argv)
    bcp.STARTED.install()  # SIGTERM/SIGINT unwind the run; the finally blocks stop what it started
    out = args.out or Path(f"/tmp/bench_multiturn-{args.via}-{time.strftime('%Y%m%d-%H%M%S')}.json")
    checkpoint, build_s = resolve_checkpoint(args)
    result: dict[str, Any] = {
        "machine": machine_info(args.gpu),
        "settings": {
            "via": args.via,
            "checkpoint": str(checkpoint),
            "checkpoint_build_s": build_s,
            "conversations": args.conversations,
            "turns": args.turns,
            "max_tokens": args.max_tokens,
            "temperature": 0,
            "system": SYSTEM,
            "questions": [question(t) for t in range(args.turns)],
            "image_side": IMAGE_SIDE,
            "prompt_form": "llava_v1 (built here)"
            if args.via == "engine"
            else "the checkpoint's chat template",
        },
        "phases": {},
        "ratios": {},
        "skipped": {},
    }

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str) + "\n")

    if args.via == "engine":
        run_engine(args, checkpoint, result, save)
    else:
        run_control_plane(args, checkpoint, result, save)
    save()
    print_table(result)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
