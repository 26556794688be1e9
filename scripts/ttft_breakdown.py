"""Where the time to first token goes: direct to a node against through the control plane.

A companion to ``scripts/bench_control_plane.py`` (same node, control plane and load
generator, pinned the same way: the node on the first CPU, the rest on the second). For
each path it reads, before and after a run, the node's own counters (time from a
request's arrival at the engine to its first token sent, and the part of it spent
waiting for the engine loop) and the control plane's TTFT histogram, so the client's
TTFT splits into node, control plane and transport.

Two kinds of load: closed loops of ``--streams`` streams (each sends its next request
when one ends, as the benchmark does), or ``--rate`` requests a second arriving as a
Poisson process (open loop, as independent users do). Closed loops tie arrivals to the
engine's step cycle; open-loop arrivals are not.

    python scripts/ttft_breakdown.py --streams 64
    python scripts/ttft_breakdown.py --rate 80
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench_control_plane as bench


def counter_sum(text: str, name: str) -> float:
    """The sum over label sets of a Prometheus counter (or a histogram's _sum/_count);
    ``name`` may go on into its labels (``name{model="x"``) to sum only those sets."""
    if "{" not in name:
        name += "{"
    return sum(float(v) for v in re.findall(re.escape(name) + r"[^}]*\} ([0-9.e+-]+)", text))


def scrape(url: str) -> str:
    """A metrics page."""
    with urllib.request.urlopen(url, timeout=10) as r:
        return str(r.read().decode())


def snapshot(node_metrics: str, cp_url: str) -> dict[str, float]:
    """The counters this script compares, now."""
    node, cp = scrape(node_metrics), scrape(f"{cp_url}/metrics")
    return {
        "node_ttft_s": counter_sum(node, "llava_engine_time_to_first_token_seconds_total"),
        "node_queue_s": counter_sum(node, "llava_engine_queue_seconds_total"),
        "node_requests": counter_sum(node, "llava_engine_requests_started_total"),
        "cp_ttft_s": counter_sum(cp, "cp_time_to_first_token_seconds_sum"),
        "cp_requests": counter_sum(cp, "cp_time_to_first_token_seconds_count"),
        "pre_s": counter_sum(node, 'nv_inference_request_duration_us{model="llava_preprocess"') / 1e6,
        "pre_queue_s": counter_sum(node, 'nv_inference_queue_duration_us{model="llava_preprocess"') / 1e6,
        "pre_requests": counter_sum(node, 'nv_inference_request_success{model="llava_preprocess"'),
    }


async def closed_loops(client: Any, kind: str, url: str, streams: int, duration_s: float) -> list[Any]:
    """``streams`` streams started over a second, each sending its next request when one ends."""
    out: list[Any] = []
    end = time.perf_counter() + duration_s

    async def one() -> None:
        await asyncio.sleep(random.uniform(0, 1.0))
        while time.perf_counter() < end:
            out.append(await getattr(client, kind)(url))

    await asyncio.gather(*(one() for _ in range(streams)))
    return out


async def open_loop(client: Any, kind: str, url: str, rate: float, duration_s: float) -> list[Any]:
    """Requests arriving as a Poisson process of ``rate`` a second for ``duration_s``."""
    out: list[Any] = []
    tasks: list[asyncio.Future[None]] = []
    end = time.perf_counter() + duration_s

    async def one() -> None:
        out.append(await getattr(client, kind)(url))

    while time.perf_counter() < end:
        tasks.append(asyncio.ensure_future(one()))
        await asyncio.sleep(random.expovariate(rate))
    await asyncio.gather(*tasks)
    return out


async def measure(args: argparse.Namespace, node: Any, cp: Any) -> None:
    """Each path in turn: client TTFT, and the node's and the control plane's shares."""
    client = bench.Client([node.grpc_url], args.max_tokens)
    try:
        await closed_loops(client, "llava", cp.url, 8, 3.0)  # warm-up
        for kind in ("direct", "llava", "openai"):
            await asyncio.sleep(1.2)  # the node publishes its counters once a second
            before = snapshot(node.metrics_url, cp.url)
            if args.rate:
                samples = await open_loop(client, kind, cp.url, args.rate, args.duration_s)
            else:
                samples = await closed_loops(client, kind, cp.url, args.streams, args.duration_s)
            await asyncio.sleep(1.2)
            after = snapshot(node.metrics_url, cp.url)
            d = {k: after[k] - before[k] for k in after}
            ttft = sorted((s.first - s.start) * 1000 for s in samples if s.first is not None)
            concurrency = sum(s.end - s.start for s in samples) / args.duration_s
            line = (
                f"{kind:7} client TTFT p50 {statistics.median(ttft):6.1f} ms  p99 "
                f"{ttft[int(0.99 * (len(ttft) - 1))]:6.1f} ms  (n {len(ttft)}, mean concurrency {concurrency:.0f})"
                f"  node: TTFT {d['node_ttft_s'] * 1000 / d['node_requests']:5.1f} ms of which queue "
                f"{d['node_queue_s'] * 1000 / d['node_requests']:5.1f} ms"
            )
            if d["pre_requests"]:
                line += (
                    f"  preprocess: {d['pre_s'] * 1000 / d['pre_requests']:4.1f} ms of which queue "
                    f"{d['pre_queue_s'] * 1000 / d['pre_requests']:4.1f} ms"
                )
            if kind != "direct" and d["cp_requests"]:
                line += f"  control plane: TTFT {d['cp_ttft_s'] * 1000 / d['cp_requests']:5.1f} ms"
            print(line, flush=True)
    finally:
        await client.close()


def main(argv: list[str] | None = None) -> int:
    """Entry point."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", type=Path, default=bench.REPO / "var" / "checkpoints" / "tiny-llava")
    p.add_argument("--streams", type=int, default=64, help="closed loops (ignored with --rate)")
    p.add_argument("--rate", type=float, default=0.0, help="open loop: requests a second")
    p.add_argument("--duration-s", type=float, default=8.0)
    p.add_argument("--max-tokens", type=int, default=64)
    args = p.parse_args(argv)
    import uvloop

    from llava_node.tiny_checkpoint import build_tiny_checkpoint, is_checkpoint

    if not is_checkpoint(args.checkpoint):
        build_tiny_checkpoint(args.checkpoint)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:
        os.sched_setaffinity(0, {cpus[0]})  # the node inherits the first CPU
    with bench.running_nodes(args.checkpoint, 1, 256) as nodes:
        if len(cpus) >= 2:
            os.sched_setaffinity(0, set(cpus[1:]))
        env = {
            "LLAVA_CP_MAX_INFLIGHT_PER_WORKER": "512",
            "LLAVA_CP_MAX_WAITING": "2048",
            "LLAVA_CP_QUEUE_TIMEOUT_S": "600",
        }
        data = Path(os.environ.get("TMPDIR", "/tmp")) / f"ttft-breakdown-{os.getpid()}"
        cp = bench.ControlPlaneProc(bench.REPO, data, [n.http_url for n in nodes], env, "this").start()
        try:
            cp.wait_healthy(1)
            uvloop.run(measure(args, nodes[0], cp))
        finally:
            cp.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
