"""Exposure check (issue 15, "Safe to expose"): every attack of the security review, tried
against a real stack, with what happened and whether that is the fixed behaviour.

What it starts, and stops again on exit, SIGINT and SIGTERM (by process group):

* three Triton nodes (``tritonserver`` from the nvidia-pytriton wheel) serving
  ``model_repository/`` with the tiny random-weight checkpoint, in explicit
  model-control mode with ``llava`` loaded;
* one control plane at a time (``python -m control_plane serve`` on 127.0.0.1, a SQLite
  file in a temporary directory, an admin token and a worker token), with the settings
  its checks need: ``main`` (findings 1-6, 9, 11-13, 15), ``tight`` (8, 10: two streams
  per node, 3 s client timeouts, 64 KiB bodies), ``sql`` (7: a 2 s statement timeout, a
  256 KiB result cap) and ``frozen`` (14: a node stays in routing after failed polls).

Then it runs the attacks and prints a Markdown table (finding, attack, what happened,
expected, PASS/FAIL). A check that would cost the machine gigabytes of memory when its
fix is missing is guarded: the 1x2000 image is sent first, under an RSS guard that kills
the node past ``--rss-guard-mb``; the 1x30000 one only if the node refused the first.
A node that no longer serves after a check is restarted (said in the check's numbers).

Run it from the repository root (about 5-8 minutes on a 2-core machine)::

    .venv/bin/python scripts/exposure_check.py
    .venv/bin/python scripts/exposure_check.py --only 3,7 --json /tmp/exposure.json

Exit code: 0 when every check passed, 1 when one failed, 2 when the stack did not start,
128 + the signal's number when stopped by a signal.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import datetime
import io
import json
import os
import platform
import queue
import secrets
import selectors
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import traceback
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a file: the project's packages come from the checkout
    sys.path.insert(0, str(REPO))

import httpx  # noqa: E402

from llava_node.client import stream_generate  # noqa: E402
from llava_node.launcher import (  # noqa: E402  # noqa: E402
    TritonNode,
    TritonNodeConfig,
    free_port,
    free_port_block,
    resolve_checkpoint,
    stop_all,
)
from llava_stack.processes import ControlPlaneProcess, StartedGroups  # noqa: E402
from llava_wire.protocol import CLIENT_ERROR_PREFIX  # noqa: E402

MODEL = "llava"
ENGINE_STEPS = ("llava", "llava_preprocess", "llava_engine")
MAX_REPORTED_LOAD = 1_000_000  # control_plane.health.MAX_REPORTED_LOAD, the documented clamp
POLL_S = 0.5
SEND_TIMEOUT_S = 3.0
HEADER_TIMEOUT_S = 3.0
SQL_TIMEOUT_S = 2.0
TIGHT_BODY_BYTES = 65536

TITLES = {
    1: "registration and heartbeats need a credential; addresses are allow-listed and fixed",
    2: "numbers a worker reports are range-checked and clamped; the writer loses nothing",
    3: "a lone surrogate is the client's error, not the node's",
    4: "degenerate images are refused from their header, without a memory spike",
    5: "clients that leave free the engine: unload is prompt, reload leaves one engine",
    6: "a malformed direct llava_engine request fails alone",
    7: "admin SQL is bounded in time and bytes and never stalls the control plane",
    8: "clients that read nothing or send half a request lose their slot / connection",
    9: "a 10 MB prompt is refused at the edge and on the node, without slowing others",
    10: "numbers, text, host names and chunked bodies are checked at the edge (never 5xx)",
    11: "a client that leaves a non-streamed request cancels it on the node",
    12: "an IPv6 worker gets well-formed gRPC and metrics addresses",
    13: "heartbeat retention runs",
    14: "a node whose last poll failed gets no model load",
    15: "512 streams, half the clients leave mid-stream: every gauge drains to 0",
}

COMMON_ENV = {
    "LLAVA_CP_WORKER_ALLOWED_HOSTS": "loopback",
    "LLAVA_CP_POLL_TIMEOUT_S": "1.0",
    "LLAVA_CP_DB_FLUSH_INTERVAL_S": "0.05",
    "LLAVA_CP_IDLE_TTL_S": "0",  # nothing unloaded behind the checks' backs
    "LLAVA_CP_SCALE_OUT_INFLIGHT": "0",  # nor loaded
    "LLAVA_CP_MAX_NEW_TOKENS_CAP": "1400",
}
GROUPS: dict[str, tuple[list[int], dict[str, str]]] = {
    "main": (
        [1, 2, 3, 12, 11, 15, 5, 4, 9, 6, 13],
        {
            "LLAVA_CP_HEARTBEAT_RETENTION_DAYS": "0.0002",  # 17.3 s, so that a pass deletes rows
            "LLAVA_CP_RETENTION_INTERVAL_S": "5",
        },
    ),
    "tight": (
        [8, 10],
        {
            "LLAVA_CP_MAX_INFLIGHT_PER_WORKER": "2",
            "LLAVA_CP_CLIENT_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
            "LLAVA_CP_CLIENT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "LLAVA_CP_MAX_BODY_BYTES": str(TIGHT_BODY_BYTES),
            "LLAVA_CP_QUEUE_TIMEOUT_S": "30",
        },
    ),
    "sql": ([7], {"LLAVA_CP_SQL_TIMEOUT_S": str(SQL_TIMEOUT_S), "LLAVA_CP_SQL_MAX_RESULT_BYTES": "262144"}),
    "frozen": ([14], {"LLAVA_CP_UNHEALTHY_AFTER_FAILURES": "1000"}),
}


# -- processes ----------------------------------------------------------------------------

STARTED = StartedGroups()  # every process group this run starts, for its stop signals
track = STARTED.track


def start_nodes(checkpoint: Path, count: int) -> list[TritonNode]:
    """``count`` nodes on consecutive port triples (HTTP, gRPC, metrics), started in parallel
    from this (the main) thread: a node gets SIGTERM when the thread that started it ends."""
    nodes: list[TritonNode] = []
    used: set[int] = set()
    start = 24000 + (os.getpid() % 300) * 12
    try:
        for _ in range(count):
            base = free_port_block("127.0.0.1", start, avoid=used)
            used.update(range(base, base + 3))
            node = TritonNode(
                TritonNodeConfig(
                    checkpoint=checkpoint,
                    http_port=base,
                    grpc_port=base + 1,
                    metrics_port=base + 2,
                    model_control="explicit",
                    load_models=[MODEL],
                )
            )
            node.start(wait=False)
            track(node.process)
            nodes.append(node)
        for node in nodes:
            node.wait_ready(node.config.startup_timeout_s)
    except BaseException:
        stop_all(nodes)
        raise
    return nodes


def proc_children(pid: int) -> list[int]:
    """Direct children of ``pid`` (the Python-backend stubs of a tritonserver)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            out.append(int(entry))
    return out


def vmrss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def engine_stubs(node: TritonNode) -> list[int]:
    """The stub processes of the node that run ``llava_engine``."""
    return sorted(p for p in proc_children(node.pid) if "/llava_engine/1/model.py" in cmdline(p))


def node_tree_rss_mb(node: TritonNode) -> float:
    return sum(vmrss_kb(p) for p in [node.pid, *proc_children(node.pid)]) / 1024


class RssSampler:
    """Samples a node's RSS (server and stubs) every 10 ms; kills the node's process group
    if it grows more than ``guard_mb`` above where it started (the machine is shared)."""

    def __init__(self, node: TritonNode, guard_mb: float) -> None:
        self.node = node
        self.guard_mb = guard_mb
        self.pids = [node.pid, *proc_children(node.pid)]
        self.base_mb = self.now_mb()
        self.peak_mb = self.base_mb
        self.killed = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss", daemon=True)

    def now_mb(self) -> float:
        return sum(vmrss_kb(p) for p in self.pids) / 1024

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            mb = self.now_mb()
            self.peak_mb = max(self.peak_mb, mb)
            if mb - self.base_mb > self.guard_mb:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.node.pid, signal.SIGKILL)
                self.killed = True
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)


# -- talking to nodes -------------------------------------------------------------------


def node_metric(node: TritonNode, name: str, model: str | None = None) -> float:
    """A metric of a node, summed over its label sets (those of ``model`` only, if given)."""
    with urllib.request.urlopen(node.metrics_url, timeout=5) as r:
        text = r.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if (line.startswith(name + "{") or line.startswith(name + " "))
        and (model is None or f'model="{model}"' in line)
    )


def node_states(node: TritonNode) -> dict[str, str]:
    """Model name -> state in the node's repository index ("" when never loaded)."""
    return {m["name"]: m.get("state", "") for m in node.repository_index(timeout_s=5)}


def direct_generate(
    node: TritonNode, timeout_s: float = 30.0, **kwargs: Any
) -> tuple[float | None, str | None]:
    """One direct ``llava`` stream (tritonclient gRPC): (time to first token, error text)."""
    started = time.monotonic()
    first: float | None = None
    try:
        for chunk in stream_generate(node.grpc_url, MODEL, timeout_s=timeout_s, **kwargs):
            if first is None and (chunk.token_ids or chunk.text):
                first = time.monotonic() - started
    except queue.Empty:
        return first, f"no response within {timeout_s:g} s"
    except Exception as exc:
        return first, str(exc)
    return first, None


def engine_load(node: TritonNode) -> dict[str, float]:
    """The engine's gauges on a node (published once a second)."""
    return {
        "active": node_metric(node, "llava_engine_active_requests"),
        "queued": node_metric(node, "llava_engine_queued_requests"),
    }


def unloaded_on(node: TritonNode) -> bool:
    """Whether the ensemble and both its steps are unloaded on the node (its own index)."""
    states = node_states(node)
    return all(states.get(m) not in ("READY", "LOADING", "UNLOADING") for m in ENGINE_STEPS)


def log_tail_lines(node: TritonNode, count: int) -> list[str]:
    try:
        lines = node.log_path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    return [one_line(line, 220) for line in lines if line.strip()][-count:]


def node_serves(node: TritonNode) -> bool:
    if not node.is_running():
        return False
    _, error = direct_generate(
        node, timeout_s=20, prompt="USER: hi ASSISTANT:", max_tokens=2, temperature=0.0
    )
    return error is None


def engine_call(grpc_url: str, input_ids: list[int], timeout_s: float = 30.0) -> str | None:
    """A direct ``llava_engine`` request with the numeric inputs llava_preprocess sends;
    returns the error text (None when it streamed to its end)."""
    import numpy as np
    import tritonclient.grpc as grpcclient

    def tensor(name: str, dtype: str, arr: Any) -> Any:
        t = grpcclient.InferInput(name, list(arr.shape), dtype)
        t.set_data_from_numpy(arr)
        return t

    inputs = [
        tensor("input_ids", "INT64", np.array(input_ids, dtype=np.int64)),
        tensor("pixel_values", "FP32", np.zeros((0, 3, 336, 336), dtype=np.float32)),
        tensor("gen_max_tokens", "INT32", np.array([8], dtype=np.int32)),
        tensor("gen_temperature", "FP32", np.array([0.0], dtype=np.float32)),
        tensor("gen_top_p", "FP32", np.array([1.0], dtype=np.float32)),
        tensor("gen_seed", "INT64", np.array([0], dtype=np.int64)),
        tensor("gen_stop", "BYTES", np.array([b"</s>"], dtype=np.object_)),
    ]
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(
            "llava_engine",
            inputs,
            request_id=f"f6-bad-{secrets.token_hex(4)}",
            enable_empty_final_response=True,
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                result, error = responses.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                return f"(no answer within {timeout_s:g} s)"
            if error is not None:
                return str(error)
            final = result.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return None
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def load_on_node(node: TritonNode, model: str = MODEL, timeout_s: float = 300.0) -> None:
    """Load a model on a node through Triton's own API (no control plane running)."""
    req = urllib.request.Request(
        f"{node.http_url}/v2/repository/models/{model}/load", data=b"{}", method="POST"
    )
    with urllib.request.urlopen(req, timeout=timeout_s) as r:
        r.read()


# -- images ---------------------------------------------------------------------------------


def png(width: int, height: int, color: tuple[int, int, int] | None = None) -> bytes:
    """A PNG made with Pillow: a degenerate strip (1-bit, tiny) or a small colour test image."""
    from PIL import Image

    buf = io.BytesIO()
    if color is None:
        Image.new("1", (width, height)).save(buf, "PNG", optimize=True)
    else:
        img = Image.new("RGB", (width, height), color)
        for i in range(min(width, height)):
            img.putpixel((i, i), (255 - color[0], 255 - color[1], 255 - color[2]))
        img.save(buf, "PNG")
    return buf.getvalue()


def photo_b64() -> str:
    return base64.b64encode(png(64, 48, (200, 30, 30))).decode()


# -- results --------------------------------------------------------------------------------


@dataclass
class Step:
    """One attack of a finding and what came of it."""

    attack: str
    observed: str
    expected: str
    ok: bool


@dataclass
class Finding:
    """A finding of the review: its attacks, measured numbers, time taken."""

    number: int
    title: str
    steps: list[Step] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def step(self, attack: str, observed: str, expected: str, ok: bool) -> None:
        self.steps.append(Step(attack, observed, expected, bool(ok)))
        print(f"  [{'PASS' if ok else 'FAIL'}] {attack}: {observed}", flush=True)

    def to_json(self) -> dict[str, Any]:
        return {
            "finding": self.number,
            "title": self.title,
            "passed": self.passed,
            "seconds": round(self.seconds, 1),
            "steps": [s.__dict__ for s in self.steps],
            "numbers": self.numbers,
        }


def one_line(text: str, limit: int = 110) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_text(r: httpx.Response) -> str:
    """The message of an error answer in any API family's shape."""
    try:
        body = r.json()
    except ValueError:
        return one_line(r.text.strip("\0"))
    if isinstance(body, dict):
        if isinstance(body.get("error"), dict):
            return one_line(str(body["error"].get("message", "")))
        if "detail" in body:
            return one_line(str(body["detail"]))
        if "text" in body:
            return one_line(str(body["text"]))
    return one_line(json.dumps(body))


def prefixed(message: str) -> str:
    """The part of a node's error from the client-error prefix on (Triton wraps it)."""
    i = message.find(CLIENT_ERROR_PREFIX)
    return one_line(message[i:] if i >= 0 else message, 120)


@dataclass
class Call:
    """A LLaVA-protocol stream as its client saw it."""

    status: int
    frames: list[dict[str, Any]]
    seconds: float
    ttft: float | None

    @property
    def last(self) -> dict[str, Any]:
        return self.frames[-1] if self.frames else {}

    @property
    def completed(self) -> bool:
        return self.status == 200 and self.last.get("error_code") == 0 and "finish_reason" in self.last

    def describe(self) -> str:
        last = self.last
        if last.get("error_code"):
            return f"{self.status}, error_code {last['error_code']}: {one_line(last.get('text', ''), 90)}"
        return f"{self.status}, {len(self.frames)} frames, finish {last.get('finish_reason')}"


# -- the context the checks share ------------------------------------------------------------


class Ctx:
    """Nodes, the running control plane and helpers for its APIs."""

    def __init__(self, args: argparse.Namespace, nodes: list[TritonNode], work: Path) -> None:
        self.args = args
        self.nodes = nodes
        self.work = work
        self.admin_token = secrets.token_urlsafe(18)
        self.worker_token = secrets.token_urlsafe(18)
        self.cp: ControlPlaneProcess | None = None
        self.http = httpx.Client(timeout=60)
        self.run_tag = secrets.token_hex(3)

    # -- control plane ---------------------------------------------------------------
    def start_cp(self, group: str, env: dict[str, str]) -> ControlPlaneProcess:
        full_env = {**COMMON_ENV, "LLAVA_CP_WORKER_TOKEN": self.worker_token, **env}
        cp = ControlPlaneProcess(
            self.work / f"cp-{group}",
            [n.http_url for n in self.nodes],
            name=f"control plane {group}",
            poll_interval_s=POLL_S,
            admin_token=self.admin_token,
            env=full_env,
            src=REPO,
            groups=STARTED,
        )
        cp.start()
        self.cp = cp
        self.http.close()
        self.http = httpx.Client(base_url=cp.url, timeout=60)
        self.wait_fleet()
        return cp

    @property
    def url(self) -> str:
        assert self.cp is not None
        return self.cp.url

    @property
    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    @property
    def worker_auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.worker_token}"}

    def admin_get(self, path: str) -> Any:
        r = self.http.get(path, headers=self.admin, timeout=15)
        r.raise_for_status()
        return r.json()

    def admin_post(self, path: str, body: Any = None, timeout: float = 60.0) -> httpx.Response:
        return self.http.post(path, json=body, headers=self.admin, timeout=timeout)

    def workers(self) -> list[dict[str, Any]]:
        return list(self.admin_get("/admin/workers")["workers"])

    def worker(self, node: TritonNode) -> dict[str, Any]:
        return next(w for w in self.workers() if w["name"] == node.http_url)

    def wid(self, node: TritonNode) -> int:
        return int(self.worker(node)["id"])

    def status(self) -> dict[str, Any]:
        return dict(self.admin_get("/admin/status"))

    def sql(self, query: str, max_rows: int = 1000) -> list[dict[str, Any]]:
        r = self.admin_post("/admin/sql", {"query": query, "max_rows": max_rows}, timeout=30)
        r.raise_for_status()
        body = r.json()
        return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]

    def wait_for(self, predicate: Callable[[], bool], timeout_s: float, poll_s: float = 0.1) -> float | None:
        """Seconds until ``predicate`` held, or None at the timeout."""
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            with contextlib.suppress(Exception):
                if predicate():
                    return time.monotonic() - started
            time.sleep(poll_s)
        return None

    def fleet_ready(self, nodes: list[TritonNode] | None = None) -> bool:
        """Whether ``nodes`` (default: all) are healthy with llava ready, as the control plane sees them."""
        names = {n.http_url for n in (self.nodes if nodes is None else nodes)}
        ws = [w for w in self.workers() if w["name"] in names]
        return len(ws) == len(names) and all(
            w["state"] == "healthy" and w["models"].get(MODEL, {}).get("ready") for w in ws
        )

    def wait_fleet(self, timeout_s: float = 90.0, nodes: list[TritonNode] | None = None) -> None:
        if self.wait_for(lambda: self.fleet_ready(nodes), timeout_s, 0.2) is None:
            raise RuntimeError(f"the nodes are not healthy with {MODEL} ready after {timeout_s:g} s")

    def recover(self, f: Finding) -> None:
        """Restart any node that stopped serving (so that one check's damage is not the next one's)."""
        restarted = []
        for i, node in enumerate(self.nodes):
            if node_serves(node):
                continue
            print(
                f"  node {i} ({node.http_url}) does not serve after finding {f.number}: restarting it",
                flush=True,
            )
            restarted.append(node.http_url)
            node.restart(wait=True)
            track(node.process)
        if restarted:
            f.numbers["nodes_restarted_after"] = restarted
            if self.cp is not None and self.cp.running():
                self.wait_fleet()

    # -- requests --------------------------------------------------------------------
    def llava(
        self, body: dict[str, Any], path: str = "/worker_generate_stream", rid: str | None = None,
        timeout: float = 60.0,
    ) -> Call:  # fmt: skip
        """A LLaVA-protocol stream, its frames split on NUL bytes."""
        headers = {"Content-Type": "application/json"}
        if rid:
            headers["X-Request-Id"] = rid
        frames: list[dict[str, Any]] = []
        started = time.monotonic()
        ttft = None
        prompt = str(body.get("prompt", ""))
        with httpx.stream(
            "POST", self.url + path, content=json.dumps(body), headers=headers, timeout=timeout
        ) as r:
            buf = b""
            for data in r.iter_bytes():
                buf += data
                *done, buf = buf.split(b"\0")
                for raw in done:
                    if raw:
                        frame = json.loads(raw)
                        frames.append(frame)
                        if ttft is None and len(frame.get("text", "")) > len(prompt):
                            ttft = time.monotonic() - started
            status = r.status_code
        return Call(status, frames, time.monotonic() - started, ttft)

    def chat(self, payload: dict[str, Any], timeout: float = 60.0) -> httpx.Response:
        """An OpenAI chat request sent as JSON text (a lone surrogate stays the escape \\ud800)."""
        return self.http.post(
            "/v1/chat/completions",
            content=json.dumps(payload),
            headers={"Content-Type": "application/json"},
            timeout=timeout,
        )

    def short_body(self, tag: str, tokens: int = 4) -> dict[str, Any]:
        return {
            "model": MODEL,
            "prompt": f"USER: hi {tag} ASSISTANT:",
            "max_new_tokens": tokens,
            "temperature": 0,
        }

    def rid(self, finding: int, i: int | str) -> str:
        return f"f{finding}-{self.run_tag}-{i}"


# -- async streams (aiohttp) -------------------------------------------------------------------


@dataclass
class Outcome:
    """One async LLaVA stream."""

    rid: str
    status: int | None = None
    frames: int = 0
    first_s: float | None = None
    finish: str | None = None
    error: str | None = None
    left: bool = False
    seconds: float = 0.0


async def astream(session: Any, url: str, body: dict[str, Any], rid: str, leave_after_first: bool) -> Outcome:
    """Stream from the control plane; with ``leave_after_first``, close the connection as
    soon as the first generated text arrives."""
    import aiohttp

    out = Outcome(rid)
    started = time.monotonic()
    prompt = str(body["prompt"])
    try:
        async with session.post(
            url, data=json.dumps(body), headers={"X-Request-Id": rid, "Content-Type": "application/json"}
        ) as resp:
            out.status = resp.status
            buf = b""
            async for data in resp.content.iter_any():
                buf += data
                *done, buf = buf.split(b"\0")
                for raw in done:
                    if not raw:
                        continue
                    frame = json.loads(raw)
                    out.frames += 1
                    if frame.get("error_code"):
                        out.error = one_line(frame.get("text", ""), 120)
                    elif frame.get("finish_reason"):
                        out.finish = frame["finish_reason"]
                    if out.first_s is None and len(frame.get("text", "")) > len(prompt):
                        out.first_s = time.monotonic() - started
                        if (
                            leave_after_first
                            and frame.get("error_code") == 0
                            and not frame.get("finish_reason")
                        ):
                            out.left = True
                            resp.close()  # drop the connection: the client is gone
                            break
                if out.left:
                    break
    except (TimeoutError, aiohttp.ClientError) as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.seconds = time.monotonic() - started
    return out


async def many_streams(url: str, bodies: list[tuple[str, dict[str, Any], bool]]) -> list[Outcome]:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=240, sock_read=120)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
        return list(await asyncio.gather(*(astream(session, url, b, rid, leave) for rid, b, leave in bodies)))


# -- the checks ----------------------------------------------------------------------------------


def check_1(ctx: Ctx, f: Finding) -> None:
    real = {w["id"]: w for w in ctx.workers()}
    fake = f"http://127.0.0.1:{free_port()}"
    r = ctx.http.post(
        "/register_worker",
        json={"worker_name": fake, "check_heart_beat": True, "worker_status": {"speed": 1000000}},
    )
    after = ctx.workers()
    f.step(
        "fake worker, no credential, speed 1000000",
        f"{r.status_code} '{error_text(r)}'; workers {len(real)} -> {len(after)}",
        "401/403, worker list unchanged",
        r.status_code in (401, 403) and len(after) == len(real),
    )
    for host in ("http://8.8.8.8:8000", "http://169.254.169.254:80"):
        r = ctx.http.post("/register_worker", json={"worker_name": host}, headers=ctx.worker_auth)
        f.step(
            f"worker token, host {host}",
            f"{r.status_code} '{error_text(r)}'",
            "403",
            r.status_code == 403 and len(ctx.workers()) == len(real),
        )
    victim = ctx.worker(ctx.nodes[0])
    r = ctx.http.post(
        "/register_worker",
        json={"worker_name": victim["name"], "grpc_url": f"127.0.0.1:{free_port()}"},
        headers=ctx.worker_auth,
    )
    stored = ctx.worker(ctx.nodes[0])["grpc_url"]
    f.step(
        "worker token: a real node's URL with another grpc_url",
        f"{r.status_code} '{error_text(r)}'; stored gRPC {stored}",
        f"409, stored gRPC address unchanged ({victim['grpc_url']})",
        r.status_code == 409 and stored == victim["grpc_url"],
    )
    with ThreadPoolExecutor(6) as pool:
        calls = list(pool.map(lambda i: ctx.llava(ctx.short_body(f"f1 {i}"), rid=ctx.rid(1, i)), range(30)))
    rows = ctx.sql(f"SELECT worker_id, status FROM requests WHERE request_id LIKE 'f1-{ctx.run_tag}-%'")
    by_worker = Counter(r["worker_id"] for r in rows)
    grpc_ok = all(w["grpc_url"] == n.grpc_url for w, n in ((ctx.worker(n), n) for n in ctx.nodes))
    done = sum(c.completed for c in calls)
    f.numbers["f1_requests_by_worker"] = {str(k): v for k, v in by_worker.items()}
    f.step(
        "30 user requests afterwards",
        f"{done}/30 completed; rows per worker id {dict(by_worker)}; gRPC addresses "
        + ("unchanged" if grpc_ok else "CHANGED"),
        "30/30 on the three real nodes",
        done == 30 and len(rows) == 30 and set(by_worker) <= set(real) and grpc_ok,
    )
    r = ctx.http.post(
        "/register_worker",
        json={
            "worker_name": f"http://127.0.0.1:{free_port()}",
            "metrics_url": "http://127.0.0.1:11/admin/delete?all=1",
        },
        headers=ctx.worker_auth,
    )
    f.step(
        "metrics_url with a path and query", f"{r.status_code} '{error_text(r)}'", "400", r.status_code == 400
    )
    r = ctx.http.post("/receive_heart_beat", json={"worker_name": victim["name"], "queue_length": 0})
    f.step(
        "/receive_heart_beat without credential",
        f"{r.status_code} '{error_text(r)}'",
        "401/403",
        r.status_code in (401, 403),
    )
    for w in ctx.workers():  # whatever an attack managed to add goes again
        if w["id"] not in real:
            ctx.http.delete(f"/admin/workers/{w['id']}", headers=ctx.admin)


def check_2(ctx: Ctx, f: Finding) -> None:
    r = ctx.http.post(
        "/register_worker",
        content=json.dumps(
            {"worker_name": f"http://127.0.0.1:{free_port()}", "worker_status": {"speed": 1e30}}
        ),
        headers={**ctx.worker_auth, "Content-Type": "application/json"},
    )
    f.step(
        "register with speed 1e30 (worker token)",
        f"{r.status_code} '{error_text(r)}'",
        "400",
        r.status_code == 400,
    )
    victim = ctx.worker(ctx.nodes[1])
    writer_before = ctx.status()["writer"]
    r = ctx.http.post(
        "/receive_heart_beat",
        json={"worker_name": victim["name"], "queue_length": 10**30},
        headers=ctx.worker_auth,
    )
    seen = ctx.worker(ctx.nodes[1])["queue_length"]
    f.numbers["queue_length_after_heartbeat"] = seen
    f.step(
        "heartbeat with queue_length 10**30 (worker token)",
        f"{r.status_code} {r.text.strip()}; /admin/workers queue_length {seen}",
        f"accepted, clamped (<= {MAX_REPORTED_LOAD})",
        r.status_code == 200
        and r.json() == {"exist": True}
        and isinstance(seen, int)
        and 0 <= seen <= MAX_REPORTED_LOAD,
    )
    started = time.monotonic()
    calls = [ctx.llava(ctx.short_body(f"f2 {i}"), rid=ctx.rid(2, i)) for i in range(6)]
    query = f"SELECT COUNT(*) AS n FROM requests WHERE request_id LIKE 'f2-{ctx.run_tag}-%' AND status <> 'running'"
    took = ctx.wait_for(lambda: ctx.sql(query)[0]["n"] == 6, 15, 0.2)
    rows = ctx.sql(query)[0]["n"]
    f.numbers["rows_written_s"] = None if took is None else round(time.monotonic() - started, 2)
    f.step(
        "then 6 requests",
        f"{sum(c.completed for c in calls)}/6 completed; {rows} finished rows in /admin/sql"
        + (f" within {time.monotonic() - started:.1f} s" if took is not None else " after 15 s"),
        "6 new requests rows within a few seconds",
        rows == 6 and took is not None,
    )
    writer = ctx.status()["writer"]
    f.numbers["writer"] = writer
    lost = writer["dropped"] - writer_before["dropped"]
    f.step(
        "/admin/status writer counters",
        f"dropped {writer['dropped']} (+{lost}), lost {writer['lost']}, failed_batches {writer.get('failed_batches')}",
        "nothing lost (dropped 0)",
        writer["dropped"] == 0,
    )


def check_3(ctx: Ctx, f: Finding) -> None:
    bad = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "x \ud800 y"}]}
    opened_before = ctx.status()["admission"]["circuits_opened"]
    started = time.monotonic()
    answers = [ctx.chat(bad) for _ in range(12)]
    took = time.monotonic() - started
    codes = Counter(r.status_code for r in answers)
    f.step(
        f"12 OpenAI requests with a lone surrogate in {took:.2f} s",
        f"{dict(codes)} '{error_text(answers[0])}'",
        "400 each",
        codes == Counter({400: 12}),
    )
    time.sleep(2 * POLL_S)
    states = Counter(w["state"] for w in ctx.workers())
    opened = ctx.status()["admission"]["circuits_opened"] - opened_before
    f.step(
        "node states afterwards",
        f"{dict(states)}; circuits opened +{opened}",
        "every node healthy, no circuit opened",
        states == Counter({"healthy": len(ctx.nodes)}) and opened == 0,
    )
    good = ctx.chat({"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
    f.step("a good request then", f"{good.status_code}", "200", good.status_code == 200)
    node = ctx.nodes[0]
    messages = json.dumps([{"role": "user", "content": "x \ud800 y"}])  # JSON text with the escape
    started = time.monotonic()
    _, error = direct_generate(node, timeout_s=30, messages=messages, max_tokens=4)
    took = time.monotonic() - started
    f.step(
        "straight to a node (tritonclient): messages with \\ud800",
        f"after {took:.2f} s: '{prefixed(error or 'no error')}'",
        f"an error with the prefix '{CLIENT_ERROR_PREFIX}'",
        error is not None and CLIENT_ERROR_PREFIX in error,
    )
    serves = node_serves(node)
    f.step(
        "the node afterwards",
        "serves a good request" if serves else "does NOT serve",
        "keeps serving",
        serves,
    )


def check_4(ctx: Ctx, f: Finding) -> None:
    node = ctx.nodes[0]
    wid = ctx.wid(node)
    path = f"/workers/{wid}/worker_generate_stream"
    refused_first = False
    for width, height in ((1, 2000), (1, 30000)):
        data = png(width, height)
        label = f"{width}x{height} PNG ({len(data)} bytes) through the control plane"
        expected = "400 in < 2 s; node RSS peak and after within +256 MB"
        if height == 30000 and not refused_first:
            f.step(
                label,
                "not sent: the node did not refuse the 1x2000 one (it could cost ~10 GB here)",
                expected,
                False,
            )
            continue
        body = {
            "model": MODEL,
            "prompt": "USER: <image>\nWhat is this? ASSISTANT:",
            "images": [base64.b64encode(data).decode()],
            "max_new_tokens": 4,
            "temperature": 0,
        }
        with RssSampler(node, ctx.args.rss_guard_mb) as rss:
            call = ctx.llava(body, path=path, timeout=120)
            time.sleep(0.5)
        after = node_tree_rss_mb(node) if node.is_running() else 0.0
        numbers = {
            "png_bytes": len(data),
            "rss_before_mb": round(rss.base_mb),
            "rss_peak_mb": round(rss.peak_mb),
            "rss_after_mb": round(after),
            "seconds": round(call.seconds, 3),
            "guard_killed_node": rss.killed,
        }
        f.numbers[f"{width}x{height}"] = numbers
        peak, grown = rss.peak_mb - rss.base_mb, after - rss.base_mb
        ok = call.status == 400 and call.seconds < 2 and peak < 256 and grown < 256 and not rss.killed
        guard = f"; RSS guard ({ctx.args.rss_guard_mb:g} MB) killed the node" if rss.killed else ""
        f.step(
            label,
            f"{call.describe()} in {call.seconds:.2f} s; RSS {rss.base_mb:.0f} MB, peak +{peak:.0f}, "
            f"after +{grown:.0f}{guard}",
            expected,
            ok,
        )
        refused_first = refused_first or (height == 2000 and ok)


def check_5(ctx: Ctx, f: Finding) -> None:
    node = ctx.nodes[2]
    wid = ctx.wid(node)
    old = engine_stubs(node)
    url = f"{ctx.url}/workers/{wid}/worker_generate_stream"
    bodies = [
        (
            ctx.rid(5, i),
            {
                "model": MODEL,
                "prompt": f"USER: story {i} ASSISTANT:",
                "max_new_tokens": 1000,
                "temperature": 0,
            },
            True,
        )
        for i in range(24)
    ]
    outcomes = asyncio.run(many_streams(url, bodies))
    left = sum(o.left for o in outcomes)
    f.numbers["streams_left_after_first_token"] = left
    f.numbers["engine_at_unload"] = engine_load(node)
    started = time.monotonic()
    r = ctx.admin_post("/admin/models/llava/unload", {"worker_id": wid}, timeout=120)
    call_s = time.monotonic() - started
    unloaded = ctx.wait_for(lambda: unloaded_on(node), 30, 0.1)
    unloaded_s = None if unloaded is None else time.monotonic() - started
    gone = ctx.wait_for(
        lambda: not set(old) & set(engine_stubs(node)), 30 if unloaded is not None else 1, 0.1
    )
    gone_s = None if gone is None else time.monotonic() - started
    if unloaded is None:  # what the node was doing: for the report
        with contextlib.suppress(Exception):
            f.numbers["engine_after_30s"] = engine_load(node)
        f.numbers["node_log_tail"] = log_tail_lines(node, 12)
    f.numbers.update(unload_call_s=round(call_s, 2), index_unloaded_s=unloaded_s and round(unloaded_s, 2))
    f.numbers["old_engine_stub_exited_s"] = gone_s and round(gone_s, 2)
    states = node_states(node)
    f.step(
        f"{left}/24 streams on node {wid} left after their first token; unload llava there",
        f"{r.status_code} '{error_text(r) if r.status_code != 200 else 'ok'}' in {call_s:.1f} s; index "
        + (f"unloaded after {unloaded_s:.1f} s" if unloaded_s is not None else f"still {states}")
        + (
            f"; old engine stub exited after {gone_s:.1f} s"
            if gone_s is not None
            else "; old engine stub still running"
        ),
        "200; llava, llava_preprocess, llava_engine unloaded within a few seconds (<= 10 s)",
        r.status_code == 200 and unloaded_s is not None and unloaded_s <= 10 and left == 24,
    )
    # the control plane refuses a load beside a model it still sees unloading (409): wait
    # for its next poll of the node, and ask again while it says so
    seen = ctx.wait_for(
        lambda: all(
            ctx.worker(node)["models"].get(m, {}).get("state") not in ("READY", "UNLOADING")
            for m in ENGINE_STEPS
        ),
        15,
        0.1,
    )
    f.numbers["cp_saw_unloaded_s"] = seen and round(seen, 2)
    started = time.monotonic()
    refusals = 0
    while True:
        r = ctx.admin_post("/admin/models/llava/load", {"worker_id": wid}, timeout=300)
        if r.status_code != 409 or time.monotonic() - started > 15:
            break
        refusals += 1
        time.sleep(0.5)
    load_s = time.monotonic() - started
    f.numbers["load_refused_409"] = refusals
    time.sleep(1.0)
    stubs = engine_stubs(node)
    f.numbers.update(load_s=round(load_s, 1), engine_stubs_after_load=len(stubs))
    loaded = r.status_code == 200
    f.step(
        "load it again",
        f"{r.status_code if r.status_code == 200 else f'{r.status_code} {error_text(r)!r}'} in {load_s:.1f} s"
        + (f" (after {refusals} 409 'still unloading')" if refusals else "")
        + f"; llava_engine stubs of the node: {len(stubs)} "
        f"(old pid{'s' if len(old) != 1 else ''} {old} {'gone' if not set(old) & set(stubs) else 'STILL THERE'})",
        "200; exactly one llava_engine stub",
        r.status_code == 200 and len(stubs) == 1 and not set(old) & set(stubs),
    )
    if loaded:  # else the node is restarted after the check (it does not serve)
        ctx.wait_fleet()


def check_6(ctx: Ctx, f: Finding) -> None:
    node = ctx.nodes[1]
    wid = ctx.wid(node)
    opened_before = ctx.status()["admission"]["circuits_opened"]
    path = f"/workers/{wid}/worker_generate_stream"
    with ThreadPoolExecutor(4) as pool:
        futures = [
            pool.submit(
                ctx.llava,
                {
                    "model": MODEL,
                    "prompt": f"USER: story s{i} ASSISTANT:",
                    "max_new_tokens": 600,
                    "temperature": 0,
                },
                path,
                ctx.rid(6, i),
                120,
            )
            for i in range(4)
        ]
        ctx.wait_for(lambda: ctx.worker(node)["inflight"] >= 4, 20, 0.05)
        time.sleep(0.3)
        started = time.monotonic()
        error = engine_call(node.grpc_url, [1, 5000, 123456, 2**40])
        took = time.monotonic() - started
        calls = [fu.result(180) for fu in futures]
    f.step(
        "direct llava_engine request, input_ids beyond the vocabulary (1025), 4 streams running",
        f"after {took:.2f} s: '{prefixed(error or 'no error')}'",
        f"fails with '{CLIENT_ERROR_PREFIX}...'",
        error is not None and CLIENT_ERROR_PREFIX in error,
    )
    done = sum(c.completed for c in calls)
    f.step(
        "the 4 streams on that node",
        f"{done}/4 completed; " + "; ".join(sorted({c.describe() for c in calls})),
        "4/4 complete normally",
        done == 4,
    )
    time.sleep(2 * POLL_S)
    w = ctx.worker(node)
    opened = ctx.status()["admission"]["circuits_opened"] - opened_before
    f.step(
        "the control plane's view of the node",
        f"state {w['state']}, circuits opened +{opened}, consecutive poll failures {w['consecutive_failures']}",
        "healthy, no circuit opened",
        w["state"] == "healthy" and opened == 0,
    )


def check_7(ctx: Ctx, f: Finding) -> None:
    cte = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"
    assert ctx.cp is not None
    rounds0 = ctx.status()["poller"]["rounds"]
    health_ms: list[float] = []
    stop = threading.Event()

    def watch_health() -> None:
        with httpx.Client(base_url=ctx.url, timeout=10) as c:
            while not stop.is_set():
                t = time.monotonic()
                with contextlib.suppress(httpx.HTTPError):
                    c.get("/health").raise_for_status()
                    health_ms.append((time.monotonic() - t) * 1000)
                stop.wait(0.1)

    def runaway(_: int) -> tuple[int, float, str]:
        t = time.monotonic()
        with httpx.Client(base_url=ctx.url, timeout=60) as c:
            r = c.post("/admin/sql", json={"query": cte}, headers=ctx.admin)
        return r.status_code, time.monotonic() - t, error_text(r)

    watcher = threading.Thread(target=watch_health, daemon=True)
    watcher.start()
    started = time.monotonic()
    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(runaway, range(6)))
    span = time.monotonic() - started
    time.sleep(1.0)
    stop.set()
    watcher.join(5)
    rounds = ctx.status()["poller"]["rounds"] - rounds0
    codes = Counter(code for code, _, _ in results)
    slowest = max(s for _, s, _ in results)
    messages = sorted({f"{code}: {msg}" for code, _, msg in results})
    f.numbers.update(
        cte_codes=dict(codes), cte_slowest_s=round(slowest, 2), poller_rounds=rounds,
        health_max_ms=round(max(health_ms), 1) if health_ms else None, health_answers=len(health_ms),
    )  # fmt: skip
    f.step(
        "6 runaway recursive CTEs at once",
        f"{dict(codes)}, slowest {slowest:.2f} s; " + " / ".join(one_line(m, 80) for m in messages),
        f"each a clear error (400 timeout, or 429 busy) within the {SQL_TIMEOUT_S:g} s limit (+1.5 s)",
        set(codes) <= {400, 429} and slowest <= SQL_TIMEOUT_S + 1.5,
    )
    elapsed = span + 1.0
    f.step(
        "meanwhile: poll rounds and /health",
        f"poller rounds +{rounds} in {elapsed:.1f} s; /health {len(health_ms)} answers, max "
        f"{max(health_ms) if health_ms else float('nan'):.0f} ms",
        f"rounds keep coming (>= 1 per {2 * POLL_S + 1:g} s); /health answers within 1 s",
        rounds >= elapsed / (2 * POLL_S + 1) and bool(health_ms) and max(health_ms) < 1000,
    )
    big = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x < 100000) "
        "SELECT x, hex(zeroblob(64)) AS pad FROM c"
    )
    r = ctx.admin_post("/admin/sql", {"query": big, "max_rows": 100000})
    body = r.json() if r.status_code == 200 else {}
    f.numbers["large_result"] = {"bytes": len(r.content), "rows": len(body.get("rows", []))}
    f.step(
        "a large result (100,000 rows of 140 bytes, max_rows 100000)",
        f"{r.status_code}, {len(body.get('rows', []))} rows, {len(r.content)} bytes, truncated "
        f"{body.get('truncated')} ({body.get('truncated_reason')})",
        "200, cut at the byte cap (256 KiB here) with truncated: true",
        r.status_code == 200 and body.get("truncated") is True and len(r.content) < 400_000,
    )
    r = ctx.admin_post("/admin/sql", {"query": "SELECT x'00ff' AS b"})
    f.step("SELECT x'00ff' (a BLOB)", f"{r.status_code} {one_line(r.text, 90)}", "200", r.status_code == 200)
    r = ctx.admin_post("/admin/sql", {"query": "SELECT fts3_tokenizer('simple')"})
    f.step(
        "SELECT fts3_tokenizer('simple')",
        f"{r.status_code} '{error_text(r)}'",
        "refused (400)",
        r.status_code == 400 and "refused" in r.text,
    )
    # SIGTERM while two runaway queries run
    with ThreadPoolExecutor(2) as pool:
        pending = [pool.submit(runaway, i) for i in range(2)]
        time.sleep(0.5)
        proc = ctx.cp.process
        assert proc is not None
        t = time.monotonic()
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
            exit_s: float | None = time.monotonic() - t
        except subprocess.TimeoutExpired:
            exit_s = None
        for fu in pending:
            with contextlib.suppress(Exception):
                fu.result(30)
    f.numbers["sigterm_exit_s"] = exit_s and round(exit_s, 2)
    f.step(
        "SIGTERM to the control plane while 2 runaway queries run",
        f"exited after {exit_s:.2f} s (code {proc.returncode})"
        if exit_s is not None
        else "still running after 30 s",
        "stops within a few seconds (<= 5 s)",
        exit_s is not None and exit_s <= 5,
    )
    ctx.cp.stop()


def silent_reader(port: int, body: dict[str, Any], rid: str) -> socket.socket:
    """A client that sends a stream request and then reads nothing (4 KiB receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", port))
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /worker_generate_stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"x-request-id: %s\r\ncontent-length: %d\r\n\r\n%s" % (rid.encode(), len(data), data)
    )
    return s


def check_8(ctx: Ctx, f: Finding) -> None:
    assert ctx.cp is not None
    long_body = {
        "model": MODEL,
        "prompt": "USER: <image>\ngo on and on ASSISTANT:",
        "images": [photo_b64()],
        "max_new_tokens": 1400,
        "temperature": 0,  # greedy: the tiny model runs all 1400 tokens on this prompt
    }
    readers = [silent_reader(ctx.cp.port, long_body, ctx.rid(8, i)) for i in range(6)]
    try:
        held = ctx.wait_for(lambda: sum(w["inflight"] for w in ctx.workers()) == 6, 30, 0.05)
        started = time.monotonic()
        call = ctx.llava(ctx.short_body("f8 new"), rid=ctx.rid(8, "new"), timeout=90)
        waited = time.monotonic() - started
        freed = ctx.wait_for(lambda: sum(w["inflight"] for w in ctx.workers()) == 0, 30, 0.1)
    finally:
        for s in readers:
            s.close()
    rows = ctx.sql(
        f"SELECT status FROM requests WHERE request_id LIKE 'f8-{ctx.run_tag}-%' AND request_id NOT LIKE '%-new'"
    )
    statuses = Counter(r["status"] for r in rows)
    f.numbers.update(new_request_waited_s=round(waited, 2), silent_rows=dict(statuses))
    f.step(
        "6 clients that read nothing (2 slots per node, all 6 taken"
        + ("" if held is not None else ": NOT reached")
        + "); then a new request",
        f"{call.describe()} after {waited:.1f} s; slots freed: {'yes' if freed is not None else 'no'}; "
        f"silent clients' rows {dict(statuses)}",
        f"served (not 429) after about the send timeout ({SEND_TIMEOUT_S:g} s; < {SEND_TIMEOUT_S + 15:g} s)",
        held is not None and call.completed and waited < SEND_TIMEOUT_S + 15,
    )
    socks: list[socket.socket] = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", ctx.cp.port), timeout=5)
            s.setblocking(False)
            s.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nhost: x\r\n")  # never the rest
            socks.append(s)
            sel.register(s, selectors.EVENT_READ, data=bytearray())
        started = time.monotonic()
        closed_at: list[float] = []
        got_408 = 0
        deadline = started + HEADER_TIMEOUT_S + 15
        while len(closed_at) < len(socks) and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                sock: socket.socket = key.fileobj  # type: ignore[assignment]
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    key.data.extend(chunk)
                    continue
                sel.unregister(sock)
                closed_at.append(time.monotonic() - started)
                got_408 += bytes(key.data).startswith(b"HTTP/1.1 408")
    finally:
        sel.close()
        for s in socks:
            s.close()
    latest = max(closed_at) if closed_at else float("nan")
    f.numbers.update(
        half_sent_closed=len(closed_at), half_sent_408=got_408, half_sent_last_closed_s=round(latest, 2)
    )
    f.step(
        "200 half-sent requests (headers never finished)",
        f"{len(closed_at)}/200 closed by the server, the last after {latest:.1f} s ({got_408} answered 408)",
        f"all closed within the header timeout ({HEADER_TIMEOUT_S:g} s, +2 s)",
        len(closed_at) == 200 and latest <= HEADER_TIMEOUT_S + 2,
    )


def check_9(ctx: Ctx, f: Finding) -> None:
    node = ctx.nodes[0]
    wid = ctx.wid(node)
    big = "USER: " + "hello world " * (10 * 1024 * 1024 // 12) + "ASSISTANT:"
    call = ctx.llava(
        {"model": MODEL, "prompt": big, "max_new_tokens": 4}, path=f"/workers/{wid}/worker_generate_stream"
    )
    f.numbers["cp_seconds"] = round(call.seconds, 3)
    f.step(
        f"a {len(big) / 2**20:.0f} MiB prompt through the control plane",
        f"{call.describe()} in {call.seconds:.2f} s",
        "400 in well under a second",
        call.status == 400 and call.seconds < 1,
    )
    short: dict[str, Any] = {"prompt": "USER: hi ASSISTANT:", "max_tokens": 2, "temperature": 0.0}
    baseline = [
        t for t, e in (direct_generate(node, **short) for _ in range(5)) if t is not None and e is None
    ]
    during: list[float] = []
    stop = threading.Event()

    def other_user() -> None:
        while not stop.is_set():
            t, e = direct_generate(node, timeout_s=120, **short)
            during.append(t if t is not None and e is None else float("inf"))

    user = threading.Thread(target=other_user, daemon=True)
    user.start()
    time.sleep(0.2)
    started = time.monotonic()
    _, error = direct_generate(node, timeout_s=120, prompt=big, max_tokens=4)
    took = time.monotonic() - started
    time.sleep(0.3)
    stop.set()
    user.join(130)
    f.numbers["node_seconds"] = round(took, 3)
    f.step(
        f"the same prompt straight to the node's {MODEL} ensemble (tritonclient)",
        f"after {took:.2f} s: '{prefixed(error or 'no error')}'",
        f"an '{CLIENT_ERROR_PREFIX}' error, fast (< 2 s)",
        error is not None and CLIENT_ERROR_PREFIX in error and took < 2,
    )
    base = statistics.median(baseline) if baseline else float("nan")
    worst = max(during) if during else float("nan")
    limit = max(0.5, 5 * base)
    f.numbers.update(
        ttft_baseline_ms=round(base * 1000, 1),
        ttft_during_max_ms=round(worst * 1000, 1),
        ttft_during_n=len(during),
    )
    f.step(
        "another user's TTFT on that node meanwhile (direct, 2-token requests)",
        f"baseline median {base * 1000:.0f} ms; during: {len(during)} requests, max {worst * 1000:.0f} ms",
        f"stays normal (max <= {limit * 1000:.0f} ms: 5x the baseline, at least 500 ms)",
        bool(during) and worst <= limit,
    )


def check_10(ctx: Ctx, f: Finding) -> None:
    cases: list[tuple[str, dict[str, Any]]] = [
        ("max_tokens 1e30", {"max_tokens": 1e30}),
        ("max_tokens 2**32+5", {"max_tokens": 2**32 + 5}),
        ("seed 2**64", {"seed": 2**64}),
        ("a lone surrogate in stop", {"stop": "\ud800"}),
    ]
    for label, extra in cases:
        r = ctx.chat(
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **extra}
        )
        f.step(f"OpenAI {label}", f"{r.status_code} '{error_text(r)}'", "400", r.status_code == 400)
    url = "http://" + "a" * 64 + ".example:8000"
    r = ctx.admin_post("/admin/workers", {"url": url})
    f.step(
        "admin: a worker URL with a 64-character host label",
        f"{r.status_code} '{error_text(r)}'",
        "400",
        r.status_code == 400,
    )

    def chunks() -> Iterator[bytes]:
        yield b'{"query": "'
        for _ in range(100):
            yield b"x" * 1000
        yield b'"}'

    for path in ("/v1/chat/completions", "/admin/sql"):
        r = ctx.http.post(path, content=chunks(), headers={**ctx.admin, "Content-Type": "application/json"})
        f.step(
            f"a 100 kB chunked body on {path} (limit {TIGHT_BODY_BYTES} bytes)",
            f"{r.status_code} '{error_text(r)}'",
            "413",
            r.status_code == 413,
        )


def check_11(ctx: Ctx, f: Finding) -> None:
    before = sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in ctx.nodes)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + photo_b64()}}
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "go on and on"}]}],
        "max_tokens": 1400,
        "temperature": 0,
    }
    left = False
    started = time.monotonic()
    try:
        httpx.post(f"{ctx.url}/v1/chat/completions", json=body, timeout=0.5)
    except httpx.TimeoutException:
        left = True  # the client gives up and closes its connection
    cancelled = ctx.wait_for(
        lambda: sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in ctx.nodes) > before,
        15,
        0.1,
    )
    idle = ctx.wait_for(
        lambda: sum(node_metric(n, "llava_engine_active_requests") for n in ctx.nodes) == 0, 15, 0.1
    )
    now = time.monotonic() - started
    after = sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in ctx.nodes)
    f.numbers.update(cancelled_delta=after - before, cancelled_seen_s=cancelled and round(cancelled + 0.5, 2))
    f.step(
        "non-streamed chat (image, 1400 greedy tokens); the client leaves after 0.5 s",
        ("client left" if left else "answered before 0.5 s")
        + f"; cancelled_total +{after - before:g}"
        + (f" (seen {cancelled + 0.5:.1f} s after the request)" if cancelled is not None else "")
        + f"; active requests {'0' if idle is not None else 'NOT 0'} after {now:.1f} s",
        "llava_engine_requests_cancelled_total increases; llava_engine_active_requests back to 0",
        left and cancelled is not None and idle is not None,
    )


def check_12(ctx: Ctx, f: Finding) -> None:
    port = free_port()
    r = ctx.admin_post("/admin/workers", {"url": f"http://[::1]:{port}"})
    body = r.json() if r.status_code in (200, 201) else {}
    f.step(
        f"admin: register http://[::1]:{port} (nothing listens there)",
        f"{r.status_code}; grpc {body.get('grpc_url')}, metrics {body.get('metrics_url')}"
        if body
        else f"{r.status_code} '{error_text(r)}'",
        f"metrics http://[::1]:{port + 2}/metrics, gRPC [::1]:{port + 1}",
        body.get("metrics_url") == f"http://[::1]:{port + 2}/metrics"
        and body.get("grpc_url") == f"[::1]:{port + 1}",
    )
    if body.get("id") is not None:
        ctx.http.delete(f"/admin/workers/{body['id']}", headers=ctx.admin)
    f.numbers["node_on_ipv6"] = (
        "not started: TritonNodeConfig(host='::1') passes --grpc-address=::1, and tritonserver exits with "
        "\"failed to start GRPC service: Unavailable - Socket '::1:PORT' already in use\""
    )


def check_13(ctx: Ctx, f: Finding) -> None:
    def pruned() -> bool:
        r = ctx.status().get("retention")
        return r is None or (r.get("passes", 0) >= 1 and r.get("deleted", {}).get("heartbeats", 0) > 0)

    # the first pass comes 5 s after start; heartbeats are old enough to go 17 s after start
    ctx.wait_for(pruned, 45, 0.5)
    retention = ctx.status().get("retention")
    if retention is None:
        f.step("/admin/status retention", "absent", "settings and counts", False)
        return
    f.numbers["retention"] = retention
    deleted = retention.get("deleted", {})
    f.step(
        "/admin/status retention (heartbeats kept 0.0002 days = 17 s, a pass every 5 s)",
        f"days {retention.get('retention_days')}, interval {retention.get('interval_s')} s, passes "
        f"{retention.get('passes')}, deleted {deleted}, last error {retention.get('last_error')}",
        "the loop ran (passes >= 1) and deleted old heartbeats",
        (retention.get("passes") or 0) >= 1
        and deleted.get("heartbeats", 0) > 0
        and not retention.get("last_error"),
    )
    rows = ctx.sql(
        "SELECT COUNT(*) AS n, (julianday('now') - julianday(MIN(at))) * 86400.0 AS oldest_s FROM heartbeats"
    )
    oldest = rows[0]["oldest_s"] or 0.0
    f.numbers["heartbeats_left"] = rows[0]["n"]
    f.step(
        "the heartbeats table afterwards",
        f"{rows[0]['n']} rows, the oldest {oldest:.0f} s old",
        "nothing much older than the period plus a pass (<= 17 + 5 + 5 s)",
        oldest <= 17.3 + 10,
    )


def check_14(ctx: Ctx, f: Finding) -> None:
    _, b, c = ctx.nodes
    ids = {n.http_url: ctx.wid(n) for n in ctx.nodes}

    def cp_sees_unloaded(n: TritonNode) -> bool:
        models = ctx.worker(n)["models"]
        return all(models.get(m, {}).get("state") not in ("READY", "UNLOADING") for m in ENGINE_STEPS)

    def unload(targets: tuple[TritonNode, ...]) -> float | None:
        for n in targets:
            r = ctx.admin_post("/admin/models/llava/unload", {"worker_id": ids[n.http_url]}, timeout=120)
            if r.status_code != 200:
                raise RuntimeError(f"unload from worker {ids[n.http_url]}: {r.status_code} {error_text(r)}")
        return ctx.wait_for(lambda: all(unloaded_on(n) and cp_sees_unloaded(n) for n in targets), 30, 0.1)

    settled = unload((b, c))
    if settled is None:
        # An unload the node never finishes (seen after clients left their streams): say so,
        # then restart those nodes (fresh, llava loaded) so that the check itself can run.
        stuck = tuple(n for n in (b, c) if not unloaded_on(n))
        for n in stuck:
            f.numbers[f"stuck_worker_{ids[n.http_url]}"] = {
                "index": node_states(n),
                "pending": {m: node_metric(n, "nv_inference_pending_request_count", m) for m in ENGINE_STEPS},
                "engine": engine_load(n),
                "engine_stubs": engine_stubs(n),
                "log_tail": log_tail_lines(n, 12),
            }
        f.step(
            f"set-up: unload llava from workers {ids[b.http_url]} and {ids[c.http_url]} (the nodes served "
            "the earlier checks' clients)",
            "; ".join(f"worker {ids[n.http_url]} still {node_states(n)} after 30 s" for n in stuck),
            "unloaded within 30 s",
            False,
        )
        for n in stuck:
            print(f"  restarting {n.http_url}, whose unload does not finish", flush=True)
            n.restart(wait=True)
            track(n.process)
        ctx.wait_fleet(nodes=list(stuck))
        settled = unload(stuck)
        if settled is None:
            f.step("set-up after restarting them", "still not unloaded after 30 s", "unloaded", False)
            return
    f.numbers["setup_unloaded_s"] = round(settled, 2)
    # best_node ranks equal candidates by id: stop the one it would otherwise choose
    frozen, other = sorted((b, c), key=lambda n: ids[n.http_url])
    fid, oid = ids[frozen.http_url], ids[other.http_url]
    frozen.signal(signal.SIGSTOP)
    try:
        failed = ctx.wait_for(lambda: ctx.worker(frozen)["consecutive_failures"] >= 1, 15, 0.05)
        w = ctx.worker(frozen)
        started = time.monotonic()
        try:
            r = ctx.admin_post("/admin/models/llava/load", None, timeout=90)
            answer = (
                f"{r.status_code} '{error_text(r)}'"
                if r.status_code != 200
                else f"200, on worker {r.json().get('worker_id')}"
            )
            where = r.json().get("worker_id") if r.status_code == 200 else None
        except httpx.TimeoutException:
            answer, where = "no answer within 90 s (hung)", None
        took = time.monotonic() - started
    finally:
        frozen.signal(signal.SIGCONT)
    f.numbers.update(load_s=round(took, 1), frozen_worker=fid, loaded_on=where)
    f.step(
        f"SIGSTOP worker {fid} (llava unloaded there and on {oid}); after "
        + (
            f"{w['consecutive_failures']} failed poll(s) (state {w['state']})"
            if failed is not None
            else "NO failed poll"
        )
        + ", POST /admin/models/llava/load without worker id",
        f"{answer} after {took:.1f} s",
        f"loaded on worker {oid}, not on the stopped {fid}; no hang",
        failed is not None and where == oid,
    )
    back = ctx.wait_for(lambda: ctx.worker(frozen)["consecutive_failures"] == 0, 30, 0.2)
    f.numbers["frozen_back_s"] = back and round(back, 1)


def check_15(ctx: Ctx, f: Finding) -> None:
    n = ctx.args.streams
    url = f"{ctx.url}/worker_generate_stream"
    bodies = [
        (
            ctx.rid(15, i),
            {"model": MODEL, "prompt": f"USER: story {i} ASSISTANT:", "max_new_tokens": 24, "temperature": 0},
            i % 2 == 0,
        )
        for i in range(n)
    ]
    started = time.monotonic()
    outcomes = asyncio.run(many_streams(url, bodies))
    ended = time.monotonic()
    ok = sum(o.error is None and o.finish is not None and not o.left for o in outcomes)
    left = sum(o.left for o in outcomes)
    errors = [
        o
        for o in outcomes
        if o.error is not None or (o.status not in (None, 200)) or (not o.left and o.finish is None)
    ]
    kinds = Counter((o.status, one_line(o.error or "no final frame", 60)) for o in errors)

    def gauges() -> dict[str, float]:
        metrics = ctx.http.get("/metrics", timeout=10).text
        cp_inflight = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("cp_inflight_requests")
        )
        running = ctx.sql("SELECT COUNT(*) AS n FROM requests WHERE status = 'running'")[0]["n"]
        return {
            "workers_inflight": float(sum(w["inflight"] for w in ctx.workers())),
            "engine_active": sum(node_metric(x, "llava_engine_active_requests") for x in ctx.nodes),
            "engine_queued": sum(node_metric(x, "llava_engine_queued_requests") for x in ctx.nodes),
            "cp_inflight_requests": cp_inflight,
            "running_rows": float(running),
        }

    last: dict[str, float] = {}

    def drained() -> bool:
        nonlocal last
        last = gauges()
        return not any(last.values())

    drain = ctx.wait_for(drained, 60, 0.2)
    rows = ctx.sql(
        f"SELECT status, COUNT(*) AS n FROM requests WHERE request_id LIKE 'f15-{ctx.run_tag}-%' GROUP BY status"
    )
    by_status = {r["status"]: r["n"] for r in rows}
    f.numbers.update(
        streams=n, ok=ok, cancelled_by_client=left, errors=len(errors), clients_s=round(ended - started, 1),
        drain_s=drain and round(drain, 2), gauges_at_end=last, rows_by_status=by_status,
        error_kinds={f"{k[0]} {k[1]}": v for k, v in kinds.items()},
    )  # fmt: skip
    f.step(
        f"{n} concurrent LLaVA streams (24 tokens), every other client leaves after its first token",
        f"{ok} ok, {left} left, {len(errors)} errors {dict(kinds) if kinds else ''} in {ended - started:.1f} s",
        f"{n // 2} ok, {n // 2} left, 0 errors",
        ok == n - n // 2 and left == n // 2 and not errors,
    )
    f.step(
        "afterwards: /admin/workers inflight, engine active and queued, cp_inflight_requests, running rows",
        (f"all 0 after {drain:.1f} s" if drain is not None else f"not drained after 60 s: {last}")
        + f"; rows {by_status}",
        "every gauge 0 within seconds (<= 15 s); no row left 'running'",
        drain is not None and drain <= 15 and "running" not in by_status,
    )


CHECKS: dict[int, Callable[[Ctx, Finding], None]] = {
    1: check_1,
    2: check_2,
    3: check_3,
    4: check_4,
    5: check_5,
    6: check_6,
    7: check_7,
    8: check_8,
    9: check_9,
    10: check_10,
    11: check_11,
    12: check_12,
    13: check_13,
    14: check_14,
    15: check_15,
}


# -- running ----------------------------------------------------------------------------------


def ensure_llava_everywhere(nodes: list[TritonNode]) -> None:
    """Before a control plane starts: ``llava`` loaded on every node (a check may have
    unloaded it)."""
    for node in nodes:
        if node_states(node).get(MODEL) != "READY":
            print(f"loading {MODEL} on {node.http_url} again ...", flush=True)
            load_on_node(node)


def run_check(ctx: Ctx, number: int, group: str) -> Finding:
    f = Finding(number, TITLES[number])
    print(f"\n[finding {number}] {f.title}", flush=True)
    started = time.monotonic()
    try:
        CHECKS[number](ctx, f)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:
        traceback.print_exc()
        f.step(
            "(the check itself)",
            f"raised {type(exc).__name__}: {one_line(str(exc), 200)}",
            "no exception",
            False,
        )
    f.seconds = time.monotonic() - started
    if group == "main":
        try:
            ctx.recover(f)
        except Exception as exc:  # the next checks will say what is broken
            f.numbers["recovery_error"] = f"{type(exc).__name__}: {exc}"
    print(f"[finding {number}] {'PASS' if f.passed else 'FAIL'} ({f.seconds:.1f} s)", flush=True)
    return f


def machine() -> dict[str, Any]:
    mem_gb = None
    with contextlib.suppress(OSError, ValueError, IndexError), open("/proc/meminfo") as fh:
        mem_gb = round(int(fh.readline().split()[1]) / 2**20, 1)
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True
    )
    return {
        "nproc": os.cpu_count(),
        "memory_gb": mem_gb,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "commit": commit,
        "working_tree_modified_files": len(dirty.stdout.splitlines()),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def print_table(findings: list[Finding]) -> None:
    print("\n| finding | attack | what happened | expected | result |\n|---|---|---|---|---|")
    for f in sorted(findings, key=lambda x: x.number):
        for s in f.steps:
            print(
                f"| {f.number} | {cell(s.attack)} | {cell(s.observed)} | {cell(s.expected)} | {'PASS' if s.ok else 'FAIL'} |"
            )
    passed = [f.number for f in findings if f.passed]
    failed = sorted(f.number for f in findings if not f.passed)
    print(
        f"\n{len(passed)}/{len(findings)} findings pass"
        + (f"; failing: {', '.join(map(str, failed))}" if failed else "")
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--only", help="comma-separated finding numbers (1-15); default: all")
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument(
        "--checkpoint", type=Path, help="llava-hf checkpoint (default: the tiny one, built on first use)"
    )
    p.add_argument("--streams", type=int, default=512, help="streams of finding 15 (default 512)")
    p.add_argument(
        "--rss-guard-mb", type=float, default=3000.0,
        help="finding 4: kill the node if its RSS grows more than this (default 3000)",
    )  # fmt: skip
    args = p.parse_args(argv)
    wanted = set(range(1, 16))
    if args.only:
        try:
            wanted = {int(x) for x in args.only.split(",") if x.strip()}
        except ValueError:
            p.error("--only takes comma-separated numbers, e.g. --only 3,7")
        if not wanted <= set(range(1, 16)):
            p.error("findings are numbered 1 to 15")
    args.wanted = wanted
    return args


def main(argv: list[str] | None = None) -> int:
    import tempfile

    args = parse_args(argv)
    STARTED.install()
    started = time.monotonic()
    findings: list[Finding] = []
    result: dict[str, Any] = {
        "machine": machine(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    nodes: list[TritonNode] = []
    ctx: Ctx | None = None
    code = 0
    with tempfile.TemporaryDirectory(prefix="exposure-check-") as tmp:
        try:
            checkpoint = resolve_checkpoint(args.checkpoint)
            print("starting 3 Triton nodes (explicit model control, llava loaded) ...", flush=True)
            t = time.monotonic()
            try:
                nodes = start_nodes(checkpoint, 3)
            except Exception as exc:
                print(f"error: the nodes did not start: {exc}", file=sys.stderr)
                return 2
            result["nodes_ready_s"] = round(time.monotonic() - t, 1)
            print(
                f"nodes ready in {result['nodes_ready_s']} s: " + ", ".join(n.http_url for n in nodes),
                flush=True,
            )
            ctx = Ctx(args, nodes, Path(tmp))
            result["settings"] = {"common": COMMON_ENV, **{g: env for g, (_, env) in GROUPS.items()}}
            for group, (numbers, env) in GROUPS.items():
                todo = [n for n in numbers if n in args.wanted]
                if not todo:
                    continue
                ensure_llava_everywhere(nodes)
                print(
                    f"\n=== control plane '{group}' for findings {', '.join(map(str, todo))} ===", flush=True
                )
                try:
                    cp = ctx.start_cp(group, env)
                except Exception as exc:
                    print(f"error: control plane '{group}' did not start: {exc}", file=sys.stderr)
                    for n in todo:
                        f = Finding(n, TITLES[n])
                        f.step(
                            "(set-up)",
                            f"control plane did not start: {one_line(str(exc), 200)}",
                            "it starts",
                            False,
                        )
                        findings.append(f)
                    continue
                try:
                    for n in todo:
                        findings.append(run_check(ctx, n, group))
                finally:
                    cp.stop()
        except KeyboardInterrupt:
            print("\ninterrupted: stopping what this run started ...", file=sys.stderr, flush=True)
            code = 128 + signal.SIGINT
        except SystemExit as exc:
            print("\nterminated: stopping what this run started ...", file=sys.stderr, flush=True)
            code = int(exc.code) if isinstance(exc.code, int) else 1
        finally:
            if ctx is not None:
                if ctx.cp is not None:
                    ctx.cp.stop()
                ctx.http.close()
            if nodes:
                print(f"stopping {len(nodes)} Triton node(s) ...", flush=True)
                with ThreadPoolExecutor(len(nodes)) as pool:  # SIGTERM, SIGKILL of the group after 10 s
                    list(pool.map(lambda n: n.stop(timeout_s=10.0), nodes))
    result["duration_s"] = round(time.monotonic() - started, 1)
    result["findings"] = [f.to_json() for f in sorted(findings, key=lambda x: x.number)]
    result["passed"] = bool(findings) and all(f.passed for f in findings)
    if findings:
        print_table(findings)
    print(f"\ntotal {result['duration_s']} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {args.json}")
    if code:
        return code
    return 0 if result["passed"] and len(findings) == len(args.wanted) else 1


if __name__ == "__main__":
    sys.exit(main())
