"""Benchmark the control plane's overhead: direct tritonclient streaming against the same
streams through the control plane (LLaVA's protocol and the OpenAI API), on this machine.

Streams phase. The script starts real Triton nodes (``--nodes``, default 1) serving
``model_repository/`` with the tiny checkpoint (built if missing), and a control plane
(``python -m control_plane serve``, real uvicorn and SQLite) with those nodes as its
workers. One asyncio load generator (uvloop) then runs closed loops of identical
requests (a text-only prompt, ``--max-tokens`` new tokens, temperature 0: every
request generates the same tokens) at each concurrency in ``--streams``:

* ``direct``: ``tritonclient.grpc.aio`` bidirectional streaming to the node, the
  prompt already in the chat template's form (what the node makes of the OpenAI
  request's messages);
* ``llava``: ``POST /worker_generate_stream`` (NUL-delimited JSON frames), aiohttp;
* ``openai``: ``POST /v1/chat/completions`` with ``stream: true`` (SSE), aiohttp.

Paths are interleaved: every repeat runs each concurrency on every path, in an order
that rotates between repeats. Per run it records each request's time to first token
(TTFT: until the first chunk of generated text), the tokens streamed while all
streams were running (steady state: the ramp and the drain are left out), errors,
and the CPU seconds used by the control plane, the node(s) and the load generator
(``/proc/<pid>/stat``, process trees). TTFT percentiles pool every repeat; tokens per
second are the median over repeats. The overhead is the control plane's figure minus
the direct one.

Closed loops tie arrivals to the node's step cycle: a stream's next request leaves when
its last token arrives, so the control plane's extra hop moves every arrival by the
same few milliseconds against the engine's admission point. ``--open-loop LOAD`` also
runs each concurrency with independent (Poisson) arrivals at ``LOAD`` times the rate
that would keep that many requests running (paths ``direct@poisson``, ``llava@poisson``,
``openai@poisson``, compared with ``direct@poisson``); LOAD below 1 keeps the queue
bounded.

Poller phase. A simulator of ``--poller-nodes`` Triton nodes (aiohttp, one loopback
port each, serving ``/v2/health/ready``, ``/v2/health/live``, ``/v2/repository/index``,
``/metrics`` with the metrics page of a real node, and the unload call the lifecycle
uses to learn a node's mode) runs in its own process; a fresh control plane gets the
nodes through ``POST /admin/workers`` (explicit ``grpc_url`` and ``metrics_url``, so
nothing is discovered), polls them every ``--poll-interval`` seconds, and its CPU is
measured over ``--poller-window-s``, with the database writer's batches and rows.

    python scripts/bench_control_plane.py                 # everything (~15 min)
    python scripts/bench_control_plane.py --quick         # a few minutes
    python scripts/bench_control_plane.py --baseline-src /tmp/main-src   # + an older control plane

``--baseline-src`` runs a second control plane from another source tree (e.g.
``git archive main | tar -x -C /tmp/main-src``) beside this one, on the same node and in
the same interleaved rounds (paths ``llava@base`` and ``openai@base``): before/after
figures from one run. ``--profile DIR`` finishes with py-spy profiles of the control
plane (collapsed stacks) under 64 LLaVA, 64 OpenAI streams and the poller load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from llava_node.launcher import (  # noqa: E402
    TritonNode,
    TritonNodeConfig,
    free_port_block,
)
from llava_stack.processes import ControlPlaneProcess, StartedGroups  # noqa: E402

QUESTION = (
    "Tell me a long story about a lighthouse keeper who finds a message in a bottle, "
    "and describe the sea, the weather and the people of the village"
)
PROMPT = f"USER: {QUESTION} ASSISTANT:"  # the tiny checkpoint's chat template, applied
MODEL = "llava"
CLK_TCK = os.sysconf("SC_CLK_TCK")

# -- processes and their CPU time ----------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()  # fields from 3 (state) on


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (by parent id)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat_fields(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User plus system CPU seconds of the processes ``pids`` (threads included)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLK_TCK


class CpuMeter:
    """CPU seconds of a process tree, children found once (they live as long as it)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pids = descendants(pid)

    def read(self) -> float:
        """CPU seconds so far."""
        return cpu_seconds(self.pids)


def _get_json(url: str, timeout_s: float = 10.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return json.loads(r.read())


def _post_json(url: str, body: Any, timeout_s: float = 30.0) -> Any:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method="POST", headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        return json.loads(r.read())


def control_plane(
    src: Path, data_dir: Path, workers: Sequence[str], env: dict[str, str], name: str
) -> ControlPlaneProcess:
    """``python -m control_plane serve`` from the source tree ``src`` (this one, or a baseline's)."""
    return ControlPlaneProcess(
        data_dir,
        workers,
        name=f"control plane {name}",
        poll_interval_s=None,
        env=env,
        src=src,
        groups=STARTED,
    )


def wait_healthy(cp: ControlPlaneProcess, count: int, timeout_s: float = 60.0) -> None:
    """Wait until ``count`` workers are healthy and a model is listed."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = _get_json(f"{cp.url}/admin/status")
        if status["workers"].get("healthy", 0) >= count and status["models"]:
            return
        time.sleep(0.2)
    raise RuntimeError(f"{cp.name}: {count} workers not healthy in {timeout_s:g} s")


def terminate(proc: subprocess.Popen[bytes], grace_s: float) -> None:
    """End a child by its PID: SIGTERM, then SIGKILL if it is still there after ``grace_s``."""
    if proc.poll() is not None:
        return
    os.kill(proc.pid, signal.SIGTERM)
    try:
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)


# Every process group this run starts (all are started in a new session), for the last
# resort of its stop signals; a group is killed only while its leader is still our child.
STARTED = StartedGroups()


def started(proc: subprocess.Popen[bytes]) -> subprocess.Popen[bytes]:
    """Record ``proc`` (the leader of a new session) for the stop signals."""
    STARTED.track(proc)
    return proc


# -- requests ------------------------------------------------------------------------------


@dataclass
class Sample:
    """One request as the client saw it (perf_counter times)."""

    start: float
    first: float | None = None
    end: float = 0.0
    tokens: int = 0
    error: str | None = None


class Client:
    """The load generator's connections: one tritonclient per node, one aiohttp session."""

    def __init__(self, grpc_urls: Sequence[str], max_tokens: int) -> None:
        import aiohttp
        import tritonclient.grpc.aio as grpcclient

        from llava_wire.messages import build_inputs

        self.grpc = grpcclient
        self.max_tokens = max_tokens
        self.tritons = [grpcclient.InferenceServerClient(u) for u in grpc_urls]
        self._next = 0
        self.inputs = build_inputs(grpcclient, prompt=PROMPT, max_tokens=max_tokens, temperature=0.0)
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, force_close=False),
            timeout=aiohttp.ClientTimeout(total=600, sock_read=300),
        )
        self.llava_body = json.dumps(
            {"model": MODEL, "prompt": PROMPT, "temperature": 0, "max_new_tokens": max_tokens}
        ).encode()
        self.openai_body = json.dumps(
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": max_tokens,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            }
        ).encode()
        self._ids = 0

    async def close(self) -> None:
        """Close every connection."""
        await self.session.close()
        for t in self.tritons:
            await t.close()

    def _request_id(self) -> str:
        self._ids += 1
        return f"bench-{os.getpid()}-{self._ids}"

    async def direct(self, _base_url: str) -> Sample:
        """One stream straight from a node (round robin over the nodes)."""
        from time import perf_counter

        client = self.tritons[self._next % len(self.tritons)]
        self._next += 1
        request = {
            "model_name": MODEL,
            "inputs": self.inputs,
            "request_id": self._request_id(),
            "enable_empty_final_response": True,
        }

        async def one() -> Any:
            yield request

        s = Sample(start=perf_counter())
        last = None
        try:
            async for result, error in client.stream_infer(one()):
                if error is not None:
                    s.error = str(error)
                    break
                response = result.get_response()
                if response.outputs:
                    result.as_numpy("text_output")  # what a client does with each response
                    if s.first is None:
                        s.first = perf_counter()
                    last = result
                if response.parameters["triton_final_response"].bool_param:
                    break
        except Exception as exc:
            s.error = f"{type(exc).__name__}: {exc}"
        s.end = perf_counter()
        if last is not None:
            s.tokens = int(last.as_numpy("completion_tokens").reshape(-1)[0])
        return s

    async def llava(self, base_url: str) -> Sample:
        """One stream through LLaVA's ``/worker_generate_stream``."""
        from time import perf_counter

        import orjson

        s = Sample(start=perf_counter())
        last_frame = b""
        pending = b""
        try:
            async with self.session.post(f"{base_url}/worker_generate_stream", data=self.llava_body) as r:
                async for data in r.content.iter_any():
                    if s.first is None:
                        s.first = perf_counter()
                    pending += data
                    if pending.endswith(b"\0"):
                        j = pending.rfind(b"\0", 0, len(pending) - 1)
                        last_frame, pending = pending[j + 1 : -1], b""
                status = r.status
            frame = orjson.loads(last_frame) if last_frame else {}
            if status != 200 or frame.get("error_code"):
                s.error = f"HTTP {status}: {frame.get('text', '')[:200]}"
            else:
                s.tokens = int(frame.get("usage", {}).get("completion_tokens", 0))
        except Exception as exc:
            s.error = f"{type(exc).__name__}: {exc}"
        s.end = perf_counter()
        return s

    async def openai(self, base_url: str) -> Sample:
        """One stream through ``/v1/chat/completions`` (SSE)."""
        from time import perf_counter

        import orjson

        s = Sample(start=perf_counter())
        headers = {"Content-Type": "application/json"}
        try:
            async with self.session.post(
                f"{base_url}/v1/chat/completions", data=self.openai_body, headers=headers
            ) as r:
                if r.status != 200:
                    s.error = f"HTTP {r.status}: {(await r.text())[:200]}"
                else:
                    async for payload in sse_events(r.content):
                        obj = orjson.loads(payload)
                        if "error" in obj:
                            s.error = str(obj["error"].get("message"))[:200]
                        elif obj.get("usage"):
                            s.tokens = int(obj["usage"]["completion_tokens"])
                        elif s.first is None and obj["choices"] and obj["choices"][0]["delta"].get("content"):
                            s.first = perf_counter()
        except Exception as exc:
            s.error = f"{type(exc).__name__}: {exc}"
        s.end = perf_counter()
        return s


async def sse_events(content: Any) -> AsyncIterator[bytes]:
    """The data of each server-sent event in an aiohttp response body (``[DONE]`` left out)."""
    buf = b""
    async for data in content.iter_any():
        buf += data
        *events, buf = buf.split(b"\n\n")
        for ev in events:
            if ev.startswith(b"data: ") and ev != b"data: [DONE]":
                yield ev[6:]


# -- closed-loop runs ----------------------------------------------------------------------


@dataclass
class Run:
    """One closed-loop run of one path at one concurrency."""

    path: str
    streams: int
    repeat: int
    duration_s: float
    window_s: float
    requests: int = 0
    ttft_ms: list[float] = field(default_factory=list)
    tokens: int = 0
    window_tokens: float = 0.0
    tok_s: float = 0.0
    errors: int = 0
    error_examples: list[str] = field(default_factory=list)
    unfinished: int = 0  # requests that ended for another reason than max tokens
    cp_cpu_s: float | None = None
    node_cpu_s: float = 0.0
    loadgen_cpu_s: float = 0.0
    wall_s: float = 0.0
    mean_request_s: float = 0.0  # first byte sent to last token, over finished requests
    arrival_rate: float | None = None  # open loop: requests per second (Poisson)

    def summary(self) -> dict[str, Any]:
        """JSON form (TTFT as percentiles, not every sample)."""
        d = asdict(self)
        d.pop("ttft_ms")
        d["ttft_p50_ms"] = percentile(self.ttft_ms, 50)
        d["ttft_p99_ms"] = percentile(self.ttft_ms, 99)
        d["ttft_n"] = len(self.ttft_ms)
        if self.cp_cpu_s is not None and self.tokens:
            d["cp_cpu_s_per_1k_tokens"] = self.cp_cpu_s * 1000.0 / self.tokens
        return d


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (linear interpolation), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


async def closed_loop(
    request: Callable[[], Awaitable[Sample]],
    streams: int,
    duration_s: float,
    stagger_s: float,
    settle_s: float,
) -> tuple[list[Sample], float, float]:
    """``streams`` loops issuing requests back to back until ``duration_s`` has passed.

    Stream ``i`` starts ``i * stagger_s / streams`` in, so that requests do not arrive
    in lockstep. Returns the samples and the measurement window (from when every
    stream has started plus ``settle_s``, to the end of the duration).
    """
    from time import perf_counter

    t0 = perf_counter()
    deadline = t0 + duration_s
    samples: list[Sample] = []

    async def loop(i: int) -> None:
        await asyncio.sleep(i * stagger_s / streams)
        while perf_counter() < deadline:
            samples.append(await request())

    await asyncio.gather(*(loop(i) for i in range(streams)))
    return samples, t0 + stagger_s + settle_s, deadline


async def open_loop(
    request: Callable[[], Awaitable[Sample]], rate: float, duration_s: float, settle_s: float, seed: int
) -> tuple[list[Sample], float, float]:
    """Requests arriving as a Poisson process of ``rate`` per second for ``duration_s``,
    each on its own (none waits for another to end): independent clients, as a service's
    users are, so that arrivals are not tied to the node's step cycle the way closed
    loops tie them. Waits for the requests up to ``duration_s`` after the last arrival
    (those still running then are cancelled and count as errors: more load than the node
    keeps up with); returns the samples and the window (from ``settle_s`` in to the end
    of the arrivals)."""
    from time import perf_counter

    rng = random.Random(seed)
    t0 = perf_counter()
    deadline = t0 + duration_s
    tasks: list[asyncio.Task[Sample]] = []
    at = t0
    while True:
        at += rng.expovariate(rate)
        if at >= deadline:
            break
        delay = at - perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(request()))
    finished, pending = await asyncio.wait(tasks, timeout=duration_s) if tasks else (set(), set())
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    late = Sample(start=deadline, end=perf_counter(), error="still running after the drain")
    return [t.result() if t in finished else late for t in tasks], t0 + settle_s, deadline


def tokens_in_window(samples: Sequence[Sample], w0: float, w1: float) -> float:
    """Tokens streamed inside [w0, w1], each request's spread evenly from its first
    chunk to its end."""
    total = 0.0
    for s in samples:
        if s.first is None or not s.tokens:
            continue
        span = s.end - s.first
        if span <= 0:
            total += s.tokens if w0 <= s.end <= w1 else 0
            continue
        overlap = min(s.end, w1) - max(s.first, w0)
        if overlap > 0:
            total += s.tokens * overlap / span
    return total


@dataclass
class Target:
    """Where a path's requests go and whose CPU counts."""

    name: str
    kind: str  # direct | llava | openai
    base_url: str = ""
    cp: CpuMeter | None = None


async def measure(
    client: Client,
    target: Target,
    streams: int,
    repeat: int,
    args: argparse.Namespace,
    nodes: Sequence[CpuMeter],
    duration_s: float | None = None,
    stagger_s: float | None = None,
    rate: float | None = None,
) -> Run:
    """One run of ``target`` at ``streams``: closed loops, or with ``rate``, Poisson
    arrivals at that rate (``streams`` is then the concurrency the rate aims at)."""
    fn = getattr(client, target.kind)

    def request() -> Awaitable[Sample]:
        return fn(target.base_url)  # type: ignore[no-any-return]

    duration = duration_s if duration_s is not None else args.duration_s
    stagger = stagger_s if stagger_s is not None else min(args.stagger_s, duration / 4)
    settle = min(args.settle_s, duration / 4)
    if streams == 1:
        stagger = settle = 0.0
    cp0 = target.cp.read() if target.cp is not None else 0.0
    node0 = sum(n.read() for n in nodes)
    lg0 = time.process_time()
    wall0 = time.perf_counter()
    if rate is None:
        samples, w0, w1 = await closed_loop(request, streams, duration, stagger, settle)
        run = Run(target.name, streams, repeat, duration, max(0.0, w1 - w0))
    else:
        samples, w0, w1 = await open_loop(
            request, rate, duration, stagger + settle, seed=streams * 1000 + repeat
        )
        run = Run(f"{target.name}@poisson", streams, repeat, duration, max(0.0, w1 - w0), arrival_rate=rate)
    run.wall_s = time.perf_counter() - wall0
    run.loadgen_cpu_s = time.process_time() - lg0
    run.node_cpu_s = sum(n.read() for n in nodes) - node0
    if target.cp is not None:
        run.cp_cpu_s = target.cp.read() - cp0
    run.requests = len(samples)
    for s in samples:
        if s.error is not None:
            run.errors += 1
            if len(run.error_examples) < 5:
                run.error_examples.append(s.error)
            continue
        run.tokens += s.tokens
        if s.tokens != args.max_tokens:
            run.unfinished += 1
        if s.first is not None and s.start >= w0:
            run.ttft_ms.append((s.first - s.start) * 1000.0)
    done = [s.end - s.start for s in samples if s.error is None and s.tokens]
    run.mean_request_s = statistics.fmean(done) if done else 0.0
    run.window_tokens = tokens_in_window(samples, w0, w1)
    run.tok_s = run.window_tokens / run.window_s if run.window_s > 0 else 0.0
    return run


# -- the streams phase -------------------------------------------------------------------


def build_checkpoint(path: Path) -> Path:
    """The tiny checkpoint at ``path``, built if missing."""
    from llava_node.tiny_checkpoint import build_tiny_checkpoint, is_checkpoint

    if not is_checkpoint(path):
        build_tiny_checkpoint(path, seed=0)
    return path


@contextlib.contextmanager
def running_nodes(checkpoint: Path, count: int, max_batch: int) -> Iterator[list[TritonNode]]:
    """``count`` Triton nodes (HTTP, gRPC and metrics on consecutive ports), stopped at exit."""
    nodes: list[TritonNode] = []
    used: set[int] = set()
    try:
        for _ in range(count):
            base = free_port_block("127.0.0.1", 23000 + (os.getpid() % 400) * 20, avoid=used)
            used.update(range(base, base + 3))
            node = TritonNode(
                TritonNodeConfig(
                    checkpoint=checkpoint,
                    http_port=base,
                    grpc_port=base + 1,
                    metrics_port=base + 2,
                    env={"LLAVA_MAX_BATCH": str(max_batch)},
                )
            )
            node.start(wait=False)
            nodes.append(node)
            if node.process is not None:
                started(node.process)
        for node in nodes:
            node.wait_ready(300)
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def cp_env(args: argparse.Namespace) -> dict[str, str]:
    """The benchmark's control-plane settings: no stream waits in the control plane at
    the highest concurrency, and a queue behind it rather than errors if one does."""
    per_worker = max(args.streams) if args.nodes == 1 else max(128, max(args.streams))
    return {
        "LLAVA_CP_MAX_INFLIGHT_PER_WORKER": str(per_worker),
        "LLAVA_CP_MAX_WAITING": str(4 * max(args.streams)),
        "LLAVA_CP_QUEUE_TIMEOUT_S": "600",
        "LLAVA_CP_POLL_INTERVAL_S": "2",
    }


async def streams_phase(
    args: argparse.Namespace, nodes: Sequence[TritonNode], cps: dict[str, ControlPlaneProcess]
) -> list[Run]:
    """Every repeat: every concurrency on every path, in a rotating order."""
    client = Client([n.grpc_url for n in nodes], args.max_tokens)
    node_meters = [CpuMeter(n.pid) for n in nodes]
    targets = [Target("direct", "direct")]
    for label, cp in cps.items():
        meter = CpuMeter(cp.pid)
        for kind in ("llava", "openai"):
            if kind in args.paths:
                targets.append(Target(kind + label, kind, cp.url, meter))
    runs: list[Run] = []
    try:
        print("warming up ...", flush=True)
        rate = 0.0
        for t in targets:
            warm = await measure(client, t, 16, -1, args, node_meters, duration_s=args.warmup_s)
            rate = rate or warm.tok_s
        for rep in range(args.repeats):
            for streams in args.streams:
                duration, stagger = level_timing(args, streams, rate)
                shift = rep % len(targets)
                order = targets[shift:] + targets[:shift]
                plan: list[tuple[Target, bool]] = [(t, False) for t in order]
                if args.open_loop > 0 and streams > 1:
                    plan += [(t, True) for t in order]
                arrival_rate: float | None = None
                for t, poisson in plan:
                    if poisson and arrival_rate is None:
                        direct = next(
                            r for r in reversed(runs) if r.path == "direct" and r.streams == streams
                        )
                        # LOAD times the rate at which `streams` requests run at once on average
                        # (Little's law, with the direct path's request time at this
                        # concurrency); at 1 the node is saturated and the queue has no bound
                        arrival_rate = args.open_loop * streams / max(direct.mean_request_s, 1e-3)
                    run = await measure(
                        client,
                        t,
                        streams,
                        rep,
                        args,
                        node_meters,
                        duration,
                        stagger,
                        arrival_rate if poisson else None,
                    )
                    runs.append(run)
                    cpu = f"{run.cp_cpu_s:.2f}" if run.cp_cpu_s is not None else "-"
                    arrivals = f"  {run.arrival_rate:.0f} arrivals/s" if run.arrival_rate else ""
                    print(
                        f"  repeat {rep} streams {streams:>3} {run.path:<15} "
                        f"ttft p50 {percentile(run.ttft_ms, 50) or 0:7.1f} ms "
                        f"p99 {percentile(run.ttft_ms, 99) or 0:7.1f} ms  {run.tok_s:7.0f} tok/s  "
                        f"cp cpu {cpu} s  node cpu {run.node_cpu_s:.2f} s  "
                        f"loadgen cpu {run.loadgen_cpu_s:.2f} s  errors {run.errors}{arrivals}",
                        flush=True,
                    )
    finally:
        await client.close()
    return runs


def level_timing(args: argparse.Namespace, streams: int, rate_tok_s: float) -> tuple[float, float]:
    """Duration and stagger of the runs at ``streams``: a "wave" is how long every stream
    takes for one request at ``rate_tok_s`` (the direct rate at 16 streams, from the
    warm-up). Streams start spread over half a wave (at least ``--stagger-s``), so that
    requests do not arrive in lockstep, and the window after them lasts at least
    ``--min-waves`` waves (each stream then starts requests inside it)."""
    wave = streams * args.max_tokens / max(rate_tok_s, 1.0)
    stagger = max(args.stagger_s, 0.5 * wave)
    return max(args.duration_s, stagger + args.settle_s + args.min_waves * wave), stagger


def aggregate(runs: Sequence[Run]) -> list[dict[str, Any]]:
    """One row per (streams, path): pooled TTFT percentiles, median tok/s over repeats,
    overheads and ratios against ``direct``."""
    rows: list[dict[str, Any]] = []
    keys = sorted(
        {(r.streams, r.path) for r in runs},
        key=lambda k: (k[0], k[1].endswith("@poisson"), not k[1].startswith("direct"), k[1]),
    )
    pooled: dict[tuple[int, str], dict[str, Any]] = {}
    for streams, path in keys:
        group = [r for r in runs if r.streams == streams and r.path == path]
        ttft = [x for r in group for x in r.ttft_ms]
        tokens = sum(r.tokens for r in group)
        cp_cpu = [r.cp_cpu_s for r in group if r.cp_cpu_s is not None]
        row: dict[str, Any] = {
            "streams": streams,
            "path": path,
            "runs": len(group),
            "requests": sum(r.requests for r in group),
            "errors": sum(r.errors for r in group),
            "unfinished": sum(r.unfinished for r in group),
            "ttft_n": len(ttft),
            "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p99_ms": percentile(ttft, 99),
            "tok_s": statistics.median(r.tok_s for r in group),
            "tok_s_runs": [round(r.tok_s, 1) for r in group],
            "cp_cpu_s_per_1k_tokens": (sum(cp_cpu) * 1000.0 / tokens) if cp_cpu and tokens else None,
            "node_cpu_s_per_1k_tokens": sum(r.node_cpu_s for r in group) * 1000.0 / tokens
            if tokens
            else None,
            "loadgen_cpu_s_per_1k_tokens": sum(r.loadgen_cpu_s for r in group) * 1000.0 / tokens
            if tokens
            else None,
        }
        rates = [r.arrival_rate for r in group if r.arrival_rate is not None]
        if rates:
            row["arrival_rate_per_s"] = statistics.median(rates)
        row["mean_concurrency"] = (
            statistics.median(r.requests / r.duration_s * r.mean_request_s for r in group)
            if rates
            else streams
        )
        pooled[(streams, path)] = row
        base = "direct@poisson" if path.endswith("@poisson") else "direct"  # the same arrivals
        direct = pooled.get((streams, base))
        if direct is not None and path != base:
            for q in ("p50", "p99"):
                a, b = row[f"ttft_{q}_ms"], direct[f"ttft_{q}_ms"]
                row[f"ttft_overhead_{q}_ms"] = a - b if a is not None and b is not None else None
            # per repeat, the path against the direct run of the same round
            ratios = []
            for r in group:
                d = next(
                    (x for x in runs if x.path == base and x.streams == streams and x.repeat == r.repeat),
                    None,
                )
                if d is not None and d.tok_s > 0:
                    ratios.append(r.tok_s / d.tok_s)
            row["tok_s_vs_direct"] = statistics.median(ratios) if ratios else None
        rows.append(row)
    return rows


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def print_table(rows: Sequence[dict[str, Any]]) -> None:
    """The streams table."""
    head = (
        f"{'streams':>7} {'path':<15} {'TTFT p50':>9} {'p99':>8} {'+p50':>7} {'+p99':>7} "
        f"{'tok/s':>7} {'vs dir':>6} {'CP s/1k':>8} {'node s/1k':>9} {'errors':>6}"
    )
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['streams']:>7} {r['path']:<15} {_fmt(r['ttft_p50_ms'], '8.1f')}m {_fmt(r['ttft_p99_ms'], '7.1f')}m "
            f"{_fmt(r.get('ttft_overhead_p50_ms'), '+7.1f')} {_fmt(r.get('ttft_overhead_p99_ms'), '+7.1f')} "
            f"{_fmt(r['tok_s'], '7.0f')} {_fmt(r.get('tok_s_vs_direct'), '6.1%')} "
            f"{_fmt(r['cp_cpu_s_per_1k_tokens'], '8.3f')} {_fmt(r['node_cpu_s_per_1k_tokens'], '9.3f')} "
            f"{r['errors']:>6}"
        )
    print("TTFT in ms; +p50/+p99: the path's TTFT minus direct's; vs dir: median over repeats of")
    print("tok/s against the direct run of the same round; s/1k: CPU seconds per 1,000 tokens.")
    print("@poisson: Poisson arrivals at --open-loop times the rate that keeps `streams` requests")
    print("running (from the direct closed loops' request time), compared with direct@poisson.")


# -- the poller phase ----------------------------------------------------------------------


SAMPLE_METRICS = """# HELP nv_inference_request_success Number of successful inference requests
# TYPE nv_inference_request_success counter
nv_inference_request_success{model="llava",version="1"} 0
# HELP llava_engine_queued_requests Requests waiting for a slot
# TYPE llava_engine_queued_requests gauge
llava_engine_queued_requests{model="llava_engine",version="1"} 0
# HELP llava_engine_active_requests Requests decoding
# TYPE llava_engine_active_requests gauge
llava_engine_active_requests{model="llava_engine",version="1"} 0
"""


def simulate(ports_file: Path, count: int, metrics_file: Path | None) -> int:
    """Serve ``count`` fake Triton nodes on loopback ports (written to ``ports_file``)
    until SIGTERM. Not part of the product: a load for the poller."""
    import uvloop
    from aiohttp import web

    metrics = metrics_file.read_text() if metrics_file is not None else SAMPLE_METRICS
    index = json.dumps(
        [
            {"name": name, "version": "1", "state": "READY"}
            for name in (MODEL, f"{MODEL}_engine", f"{MODEL}_preprocess")
        ]
    )

    async def ready(_request: web.Request) -> web.Response:
        return web.Response(text="")

    async def repository_index(_request: web.Request) -> web.Response:
        return web.Response(text=index, content_type="application/json")

    async def metrics_page(_request: web.Request) -> web.Response:
        return web.Response(text=metrics, content_type="text/plain")

    async def unload(_request: web.Request) -> web.Response:
        return web.Response(text="{}", content_type="application/json")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/v2/health/ready", ready)
        app.router.add_get("/v2/health/live", ready)
        app.router.add_post("/v2/repository/index", repository_index)
        app.router.add_get("/metrics", metrics_page)
        app.router.add_post("/v2/repository/models/{model}/unload", unload)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        ports = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", 0))
            ports.append(sock.getsockname()[1])
            await web.SockSite(runner, sock, backlog=64).start()
        tmp = ports_file.with_suffix(".tmp")
        await asyncio.to_thread(tmp.write_text, json.dumps(ports))
        await asyncio.to_thread(tmp.rename, ports_file)  # whole, or not there
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        await runner.cleanup()

    uvloop.run(main())
    return 0


def poller_phase(args: argparse.Namespace, work: Path, metrics_text: str | None) -> dict[str, Any]:
    """Serve ``--poller-nodes`` simulated nodes; for each control plane (this one, and the
    baseline's if given, alternating over ``--poller-repeats``), register them all in a
    fresh control plane and measure its CPU over the window."""
    count = args.poller_nodes
    ports_file = work / "sim-ports.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--simulate", str(ports_file)]
    cmd += ["--poller-nodes", str(count)]
    if metrics_text is not None:
        (work / "node-metrics.txt").write_text(metrics_text)
        cmd += ["--simulate-metrics", str(work / "node-metrics.txt")]
    with open(work / "sim.log", "wb") as sim_log:
        sim = started(
            subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=sim_log, start_new_session=True)
        )
    try:
        deadline = time.monotonic() + 120
        while not ports_file.exists() and time.monotonic() < deadline:
            if sim.poll() is not None:
                raise RuntimeError(f"simulator exited:\n{(work / 'sim.log').read_text()[-3000:]}")
            time.sleep(0.2)
        ports = json.loads(ports_file.read_text())
        sources = [("", REPO)]
        if args.baseline_src is not None:
            sources.append(("@base", args.baseline_src.resolve()))
        runs = []
        for rep in range(args.poller_repeats):
            for label, src in sources if rep % 2 == 0 else sources[::-1]:
                print(f"poller{label}, repeat {rep}: registering {count} simulated nodes ...", flush=True)
                run = poller_run(args, work / f"cp-poller{label}-{rep}", src, ports, sim.pid)
                run.update(
                    {"control_plane": f"this{label}" if not label else label.lstrip("@"), "repeat": rep}
                )
                runs.append(run)
                print("  " + poller_line(run), flush=True)
        if args.profile:
            cp = control_plane(REPO, work / "cp-poller-profile", [], _poller_env(args), "poller")
            try:
                _register_all(cp.start(), ports)
                wait_healthy(cp, count, 120)
                time.sleep(2 * args.poll_interval + 1)
                profile_pid(cp.pid, Path(args.profile) / "poller.txt", args.profile_s)
            finally:
                cp.stop()
        return {"nodes": count, "poll_interval_s": args.poll_interval, "runs": runs}
    finally:
        terminate(sim, 10.0)


def _poller_env(args: argparse.Namespace) -> dict[str, str]:
    return {"LLAVA_CP_POLL_INTERVAL_S": str(args.poll_interval)}


def _register_all(cp: ControlPlaneProcess, ports: Sequence[int]) -> None:
    """Every simulated node through the admin API, with explicit endpoints (no discovery)."""
    from concurrent.futures import ThreadPoolExecutor

    def register(port: int) -> None:
        body = {
            "url": f"http://127.0.0.1:{port}",
            "grpc_url": f"127.0.0.1:{port}",
            "metrics_url": f"http://127.0.0.1:{port}/metrics",
        }
        _post_json(f"{cp.url}/admin/workers", body)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(register, ports))


def poller_run(
    args: argparse.Namespace, data_dir: Path, src: Path, ports: Sequence[int], sim_pid: int
) -> dict[str, Any]:
    """One control plane polling every simulated node: its CPU over the window."""
    count = len(ports)
    cp = control_plane(src, data_dir, [], _poller_env(args), "poller")
    try:
        cp.start()
        t = time.monotonic()
        _register_all(cp, ports)
        registered_s = time.monotonic() - t
        wait_healthy(cp, count, 120)
        time.sleep(2 * args.poll_interval + 1)  # settle: a few whole rounds
        meter = CpuMeter(cp.pid)
        sim_meter = CpuMeter(sim_pid)
        s0 = _get_json(f"{cp.url}/admin/status")
        beats0 = _count_heartbeats(cp.url)
        c0, sim0, w0 = meter.read(), sim_meter.read(), time.monotonic()
        time.sleep(args.poller_window_s)
        c1, sim1, w1 = meter.read(), sim_meter.read(), time.monotonic()
        s1 = _get_json(f"{cp.url}/admin/status")
        time.sleep(1.0)  # let the writer write the window's last batch
        beats1 = _count_heartbeats(cp.url)
        batches = s1["writer"]["batches"] - s0["writer"]["batches"]
        rows = s1["writer"]["rows"] - s0["writer"]["rows"]
        return {
            "nodes": count,
            "healthy": s1["workers"].get("healthy", 0),
            "poll_interval_s": args.poll_interval,
            "registered_in_s": registered_s,
            "window_s": w1 - w0,
            "cp_cpu_s": c1 - c0,
            "cp_cpu_percent_of_one_core": 100.0 * (c1 - c0) / (w1 - w0),
            "simulator_cpu_percent_of_one_core": 100.0 * (sim1 - sim0) / (w1 - w0),
            "poll_rounds": s1["poller"]["rounds"] - s0["poller"]["rounds"],
            "last_round_s": s1["poller"]["last_round_s"],
            "heartbeats_written": beats1 - beats0,
            "writer_batches": batches,
            "writer_rows": rows,
            "rows_per_batch": rows / batches if batches else None,
            "writer_dropped": s1["writer"]["dropped"],
        }
    finally:
        cp.stop()


def _count_heartbeats(url: str) -> int:
    out = _post_json(f"{url}/admin/sql", {"query": "SELECT COUNT(*) FROM heartbeats"})
    return int(out["rows"][0][0])


def poller_line(p: dict[str, Any]) -> str:
    """One poller run, in words."""
    return (
        f"{p['nodes']} nodes ({p['healthy']} healthy) every {p['poll_interval_s']:g} s: "
        f"control plane {p['cp_cpu_percent_of_one_core']:.1f}% of one core over {p['window_s']:.0f} s "
        f"({p['poll_rounds']} rounds, last {p['last_round_s'] * 1000:.0f} ms); "
        f"{p['heartbeats_written']} heartbeats, {p['writer_rows']} rows in {p['writer_batches']} writer "
        f"batches ({_fmt(p['rows_per_batch'], '.0f')} rows per batch); simulator "
        f"{p['simulator_cpu_percent_of_one_core']:.0f}% of one core"
    )


def print_poller(p: dict[str, Any]) -> None:
    """The poller runs."""
    for run in p["runs"]:
        print(f"poller [{run['control_plane']}, repeat {run['repeat']}]: {poller_line(run)}")


# -- profiling -------------------------------------------------------------------------------


def profile_pid(pid: int, out: Path, seconds: float) -> str:
    """py-spy over ``pid`` for ``seconds``: collapsed stacks in ``out``, and the top
    functions by own and total time in ``out``.top.txt. Returns the top file."""
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    out.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--duration",
            str(int(seconds)),
            "--rate",
            "200",
            "--format",
            "raw",
            "--output",
            str(out),
            "--nonblocking",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    top = out.with_suffix(".top.txt")
    top.write_text(summarize_collapsed(out.read_text()))
    return str(top)


def summarize_collapsed(text: str, limit: int = 60) -> str:
    """Own and inclusive sample shares per function, from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in text.splitlines():
        stack, _, n_text = line.rpartition(" ")
        if not stack or not n_text.isdigit():
            continue
        n = int(n_text)
        total += n
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    lines = [f"{total} samples", "", "own time:"]
    for f, n in sorted(own.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{100.0 * n / total:6.2f}%  {f}")
    lines += ["", "inclusive time:"]
    for f, n in sorted(incl.items(), key=lambda kv: -kv[1])[:limit]:
        lines.append(f"{100.0 * n / total:6.2f}%  {f}")
    return "\n".join(lines) + "\n"


async def profile_streams(
    args: argparse.Namespace, nodes: Sequence[TritonNode], cp: ControlPlaneProcess
) -> dict[str, str]:
    """py-spy over the control plane while it serves 64 LLaVA, then 64 OpenAI streams."""
    client = Client([n.grpc_url for n in nodes], args.max_tokens)
    out: dict[str, str] = {}
    try:
        for kind in ("llava", "openai"):
            target = Target(kind, kind, cp.url, None)
            task = asyncio.create_task(
                measure(client, target, 64, -1, args, [], duration_s=args.profile_s + 4)
            )
            await asyncio.sleep(2)
            out[kind] = await asyncio.to_thread(
                profile_pid, cp.pid, Path(args.profile) / f"{kind}-64.txt", args.profile_s
            )
            await task
    finally:
        await client.close()
    return out


# -- main ------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False
    ).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "loadavg_at_start": os.getloadavg(),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--checkpoint", type=Path, default=REPO / "var" / "checkpoints" / "tiny-llava")
    p.add_argument("--nodes", type=int, default=1, help="Triton nodes (default 1: see docs/performance.md)")
    p.add_argument("--max-batch", type=int, default=256, help="each node's LLAVA_MAX_BATCH")
    p.add_argument("--streams", default="1,16,64,256", help="concurrencies, comma-separated")
    p.add_argument("--paths", default="direct,llava,openai", help="paths: direct, llava, openai")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--duration-s", type=float, default=12.0, help="closed-loop time per run")
    p.add_argument("--stagger-s", type=float, default=1.0, help="streams start spread over this")
    p.add_argument("--settle-s", type=float, default=1.0, help="left out after the stagger")
    p.add_argument("--warmup-s", type=float, default=3.0)
    p.add_argument("--min-waves", type=float, default=2.0, help="a run's window, in requests per stream")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--baseline-src", type=Path, help="a second control plane from this source tree")
    p.add_argument(
        "--pin",
        action="store_true",
        help="nodes on CPU 0, control plane(s) and load generator on CPU 1 (streams phase)",
    )
    p.add_argument(
        "--loadgen-nice",
        type=int,
        default=0,
        help="niceness of the load generator (streams phase), so that on a machine without a "
        "core to spare the control plane sharing a CPU with it is served first",
    )
    p.add_argument("--poller-nodes", type=int, default=500)
    p.add_argument("--poll-interval", type=float, default=2.0)
    p.add_argument("--poller-window-s", type=float, default=30.0)
    p.add_argument("--poller-repeats", type=int, default=2, help="runs per control plane, alternating")
    p.add_argument(
        "--open-loop",
        type=float,
        default=0.0,
        metavar="LOAD",
        help="also run each concurrency (but 1) with Poisson arrivals at LOAD (0-1) times the rate "
        "that keeps that many requests running; below 1, so that the queue stays bounded",
    )
    p.add_argument("--skip-streams", action="store_true")
    p.add_argument("--skip-poller", action="store_true")
    p.add_argument("--quick", action="store_true", help="one repeat of 6 s runs, a 12 s poller window")
    p.add_argument("--profile", help="directory for py-spy profiles of the control plane")
    p.add_argument("--profile-s", type=float, default=15.0)
    p.add_argument("--out", type=Path, help="JSON results (default docs/bench/<date>-control-plane.json)")
    p.add_argument("--simulate", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--simulate-metrics", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.streams = [int(x) for x in str(args.streams).split(",") if x]
    args.paths = [x.strip() for x in str(args.paths).split(",") if x.strip()]
    cpus = sorted(os.sched_getaffinity(0))
    if args.pin and len(cpus) < 2:
        p.error("--pin needs two CPUs")
    args.pin_nodes, args.pin_rest = {cpus[0]}, set(cpus[1:])
    if args.quick:
        args.repeats, args.duration_s, args.poller_window_s, args.warmup_s = 1, 6.0, 12.0, 2.0
        args.poller_repeats = 1
    return args


def node_metrics_text(url: str, timeout_s: float = 20.0) -> str:
    """The node's metrics page; Triton serves it a moment after the node reports ready
    (once, the first fetch was refused)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                return str(r.read().decode())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    """Run the phases, print the tables, write the JSON."""
    import uvloop

    args = parse_args(argv)
    STARTED.install()
    if args.simulate is not None:
        return simulate(args.simulate, args.poller_nodes, args.simulate_metrics)
    random.seed(0)
    result: dict[str, Any] = {"machine": machine(), "settings": {}}
    out = args.out or REPO / "docs" / "bench" / f"{datetime.date.today().isoformat()}-control-plane.json"
    with tempfile.TemporaryDirectory(prefix="bench-cp-") as tmp:
        work = Path(tmp)
        metrics_text: str | None = None
        if not args.skip_streams:
            checkpoint = build_checkpoint(args.checkpoint)
            env = cp_env(args)
            result["settings"] = {
                "nodes": args.nodes,
                "node_env": {"LLAVA_MAX_BATCH": args.max_batch},
                "control_plane_env": env,
                "max_tokens": args.max_tokens,
                "prompt": PROMPT,
                "streams": args.streams,
                "duration_s": args.duration_s,
                "repeats": args.repeats,
                "stagger_s": args.stagger_s,
                "settle_s": args.settle_s,
            }
            print(f"starting {args.nodes} node(s) ...", flush=True)
            all_cpus = os.sched_getaffinity(0)
            if args.pin:  # processes inherit the CPUs of the thread that starts them
                result["settings"]["pin"] = {"nodes": sorted(args.pin_nodes), "rest": sorted(args.pin_rest)}
                os.sched_setaffinity(0, args.pin_nodes)
            with running_nodes(checkpoint, args.nodes, args.max_batch) as nodes:
                metrics_text = node_metrics_text(nodes[0].metrics_url)
                if args.pin:
                    os.sched_setaffinity(0, args.pin_rest)
                cps: dict[str, ControlPlaneProcess] = {}
                try:
                    workers = [n.http_url for n in nodes]
                    cps[""] = control_plane(REPO, work / "cp", workers, env, "this").start()
                    if args.baseline_src is not None:
                        src = args.baseline_src.resolve()
                        cps["@base"] = control_plane(src, work / "cp-base", workers, env, "base").start()
                    for cp in cps.values():
                        wait_healthy(cp, len(nodes))
                    if args.loadgen_nice:  # the load generator only: the servers are started
                        os.setpriority(os.PRIO_PROCESS, 0, args.loadgen_nice)
                        result["settings"]["loadgen_nice"] = args.loadgen_nice
                    runs = uvloop.run(streams_phase(args, nodes, cps))
                    rows = aggregate(runs)
                    result["streams"] = rows
                    result["runs"] = [r.summary() for r in runs]
                    if args.profile:
                        result["profiles"] = uvloop.run(profile_streams(args, nodes, cps[""]))
                finally:
                    for cp in cps.values():
                        cp.stop()
                    os.sched_setaffinity(0, all_cpus)
        if not args.skip_poller:
            result["poller"] = poller_phase(args, work, metrics_text)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print()
    if "streams" in result:
        print_table(result["streams"])
    if "poller" in result:
        print_poller(result["poller"])
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
