"""Health polling: heartbeats are polls of each node's Triton endpoints.

Every interval, every registered node is polled concurrently, each poll bounded by a
timeout: ``/v2/health/ready`` (server ready), ``/v2/repository/index`` (each model's
state) and the Prometheus metrics (load). Nodes push nothing. A node that is live and
answers its index counts as up even when not ready: Triton's strict readiness turns
false for good once any model fails to load, and routing goes by each model's state.
State machine:

    unknown/healthy --N failed polls--> unhealthy --failing for offline_after_s--> offline
    any state --a successful poll--> healthy

Only healthy workers are routed to; every transition is recorded with its reason.

With several control-plane replicas on one database, a replica polls only the
workers whose poll lease it holds (:mod:`control_plane.leases`), so each node is
polled, and its heartbeats and transitions recorded, by one replica at a time. Every
round first brings the replica's view of the other workers up to date from the
database (registrations, removals, health), then renews its leases, then polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from control_plane.admission import CircuitBreaker
from control_plane.background import BackgroundLoop
from control_plane.config import Settings
from control_plane.leases import LeaseManager
from control_plane.store import ModelStatus, WorkerInfo, WorkerState, WorkerStore

__all__ = [
    "MAX_REPORTED_LOAD",
    "HealthPoller",
    "PollResult",
    "clamp_load",
    "discover_endpoints",
    "parse_index",
    "parse_load",
]

log = logging.getLogger(__name__)

QUEUE_METRIC = "llava_engine_queued_requests"
ACTIVE_METRIC = "llava_engine_active_requests"


# What a node reports is clamped to this (a broken or hostile node must not overflow the
# store's integers or skew routing without bound).
MAX_REPORTED_LOAD = 1_000_000
# Bounds on what one poll reads from a node: a repository index and a metrics page are
# a few kB; a node that sends more is broken.
MAX_INDEX_BYTES = 4 << 20
MAX_METRICS_BYTES = 4 << 20


def clamp_load(value: float) -> int:
    """A reported queue length or request count as an int in [0, MAX_REPORTED_LOAD]."""
    if not math.isfinite(value):
        return MAX_REPORTED_LOAD if value > 0 else 0
    return int(min(max(value, 0.0), MAX_REPORTED_LOAD))


def parse_load(metrics_text: str) -> tuple[int, int]:
    """(queued, active) summed over a node's engine models, from its metrics page;
    malformed values count as 0, and each sum is clamped (:func:`clamp_load`)."""
    queued = active = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(QUEUE_METRIC):
            queued += _sample_value(line)
        elif line.startswith(ACTIVE_METRIC):
            active += _sample_value(line)
    return clamp_load(queued), clamp_load(active)


def _sample_value(line: str) -> float:
    try:
        value = float(line.rsplit(" ", 1)[-1])
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def parse_index(body: bytes) -> dict[str, ModelStatus]:
    """Each model's state from a node's ``/v2/repository/index`` answer; raises ValueError
    when it is not the list of objects Triton sends."""
    entries = json.loads(body)
    if not isinstance(entries, list):
        raise ValueError("the repository index is not a JSON list")
    models: dict[str, ModelStatus] = {}
    for m in entries:
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or not name or len(name) > 256:
            raise ValueError("the repository index has an entry without a valid model name")
        state, reason = m.get("state", ""), m.get("reason", "")
        state = state if isinstance(state, str) else ""
        reason = reason if isinstance(reason, str) else ""
        models[name] = ModelStatus(ready=state == "READY", state=state[:64], reason=reason[:2000])
    return models


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = await response.content.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the node sent more than {limit} bytes")
    return data


class PollResult:
    """What one poll found."""

    __slots__ = ("active", "error", "latency_ms", "models", "ok", "queued", "server_ready")

    def __init__(self) -> None:
        self.ok = False
        self.server_ready = False
        self.models: dict[str, ModelStatus] | None = None
        self.queued: int | None = None
        self.active: int | None = None
        self.latency_ms: float | None = None
        self.error = ""


async def discover_endpoints(
    session: aiohttp.ClientSession, http_url: str, timeout_s: float = 2.0
) -> tuple[str, str]:
    """Guess a node's gRPC address and metrics URL from its HTTP base URL.

    Triton's defaults put gRPC and metrics on the two ports after HTTP (8000, 8001,
    8002); the metrics URL is checked, the gRPC port is taken by that convention.
    """
    from urllib.parse import urlsplit

    parts = urlsplit(http_url)
    host = parts.hostname or "127.0.0.1"
    host = f"[{host}]" if ":" in host else host  # an IPv6 address
    port = parts.port or (443 if parts.scheme == "https" else 80)
    candidates = [port + 2, 8002] if port != 8000 else [8002]
    metrics_url = f"{parts.scheme}://{host}:{candidates[0]}/metrics"
    for p in candidates:
        url = f"{parts.scheme}://{host}:{p}/metrics"
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
            async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                # read a bounded prefix: a metrics page is a few kB; this is only a sniff
                if r.status == 200 and b"nv_" in await r.content.read(1 << 20):
                    metrics_url = url
                    break
    return f"{host}:{port + 1}", metrics_url


class HealthPoller(BackgroundLoop):
    """Polls every worker on an interval and moves workers between states."""

    task_name = "health-poller"

    def __init__(
        self,
        store: WorkerStore,
        settings: Settings,
        session: aiohttp.ClientSession,
        leases: LeaseManager | None = None,
        on_removed: Callable[[WorkerInfo], Awaitable[None]] | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.session = session
        self.leases = leases
        self.on_removed = on_removed
        self._semaphore = asyncio.Semaphore(256)
        self.breaker: CircuitBreaker | None = None  # set by the app: polls may not close an open circuit
        self.rounds = 0
        self.last_round_s = 0.0

    async def _run(self) -> None:
        interval = self.settings.poll_interval_s
        while True:
            started = time.monotonic()
            try:
                await self.poll_all()
            except Exception:  # never let one bad round stop the heartbeats
                log.exception("poll round failed")
            self.last_round_s = time.monotonic() - started
            self.rounds += 1
            await asyncio.sleep(max(0.0, interval - self.last_round_s))

    async def poll_all(self) -> None:
        """Poll every worker this replica holds the lease of (every worker, without
        leases) once, concurrently; first bring the view of the others up to date."""
        workers = await self._round_targets()
        if workers:
            await asyncio.gather(*(self._poll_and_apply(w) for w in workers))

    async def _round_targets(self) -> list[WorkerInfo]:
        if self.leases is None:
            return [w for w in self.store.all() if w.state is not WorkerState.REMOVED]
        leases = self.leases
        removed: list[WorkerInfo] = []
        try:
            rows = await asyncio.to_thread(self.store.read_rows)
        except Exception as exc:  # the database is away: the leases lapse, polling stops
            log.warning("could not read the workers from the database: %s", exc)
        else:
            # applied here, on the loop that applies polls: a lease taken meanwhile is seen
            removed = self.store.apply_rows(rows, skip=leases.holds).removed
        if self.on_removed is not None:
            for info in removed:  # its lease and channel
                await self.on_removed(info)
        ids = [w.id for w in self.store.all() if w.state is not WorkerState.REMOVED]
        held = await asyncio.to_thread(leases.renew, ids)
        return [w for w in self.store.all() if w.id in held and w.state is not WorkerState.REMOVED]

    async def poll_worker(self, worker: WorkerInfo) -> PollResult | None:
        """Poll one worker now, update its state and record the heartbeat.

        With leases, the worker's lease is taken first; a worker that another replica
        polls is not polled here (None).
        """
        leases = self.leases
        if leases is not None and not leases.holds(worker.id):
            claimed = await asyncio.to_thread(leases.claim, worker.id)
            if not claimed:
                return None
        return await self._poll_and_apply(worker)

    async def _poll_and_apply(self, worker: WorkerInfo) -> PollResult | None:
        async with self._semaphore:
            result = await self._poll(worker)
        if self.leases is not None and not self.leases.holds(worker.id):
            return None  # the lease lapsed while polling: another replica may own it now
        self._apply(worker, result)
        return result

    async def _poll(self, worker: WorkerInfo) -> PollResult:
        res = PollResult()
        timeout = aiohttp.ClientTimeout(total=self.settings.poll_timeout_s)
        started = time.perf_counter()
        try:
            # One after the other, each request made only when it is entered: a request
            # made and never entered (its node refused the first) is a coroutine never awaited.
            async with self.session.get(f"{worker.http_url}/v2/health/ready", timeout=timeout) as ready:
                res.server_ready = ready.status == 200
            index_url = f"{worker.http_url}/v2/repository/index"
            async with self.session.post(index_url, json={}, timeout=timeout) as index:
                if index.status == 200:
                    res.models = parse_index(await _read_bounded(index, MAX_INDEX_BYTES))
            res.latency_ms = (time.perf_counter() - started) * 1000.0
            res.ok = res.server_ready
            if not res.server_ready and res.models is not None:
                # Strict readiness stays false after any failed model load (explicit
                # model control): a live node still serves the models its index has ready.
                async with self.session.get(f"{worker.http_url}/v2/health/live", timeout=timeout) as live:
                    res.ok = live.status == 200
            if not res.ok:
                res.error = "server not ready (/v2/health/ready did not answer 200)"
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError) as exc:
            res.error = _describe(exc, self.settings.poll_timeout_s)
            return res
        if worker.metrics_url:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                async with self.session.get(worker.metrics_url, timeout=timeout) as m:
                    if m.status == 200:
                        page = await _read_bounded(m, MAX_METRICS_BYTES)
                        res.queued, res.active = parse_load(page.decode("utf-8", "replace"))
        return res

    def _apply(self, worker: WorkerInfo, res: PollResult) -> None:
        if worker.state is WorkerState.REMOVED:
            return
        s = self.settings
        worker.last_poll_latency_ms = res.latency_ms
        if res.models is not None:
            worker.models = res.models
        if res.queued is not None and res.active is not None:
            worker.queue_length, worker.active = res.queued, res.active
        if res.ok:
            worker.consecutive_failures = 0
            worker.failing_since = None
            worker.last_error = ""
            if worker.state is not WorkerState.HEALTHY and (
                self.breaker is None or self.breaker.may_close(worker)
            ):
                self.store.set_state(worker, WorkerState.HEALTHY, "poll succeeded: server ready")
        else:
            now = time.monotonic()
            worker.consecutive_failures += 1
            worker.failing_since = worker.failing_since or now
            worker.last_error = res.error
            if res.models is None:
                worker.models = {n: ModelStatus(ready=False, state="UNREACHABLE") for n in worker.models}
            failures = worker.consecutive_failures
            if (
                worker.state in (WorkerState.HEALTHY, WorkerState.UNKNOWN)
                and failures >= s.unhealthy_after_failures
            ):
                self.store.set_state(worker, WorkerState.UNHEALTHY, f"{failures} failed polls: {res.error}")
            elif worker.state is WorkerState.UNHEALTHY and now - worker.failing_since >= s.offline_after_s:
                self.store.set_state(
                    worker,
                    WorkerState.OFFLINE,
                    f"failing for {now - worker.failing_since:.0f} s: {res.error}",
                )
        self.store.record_heartbeat(
            worker, ok=res.ok, latency_ms=res.latency_ms, server_ready=res.server_ready, error=res.error
        )

    def describe(self) -> dict[str, Any]:
        """Poller statistics, for the admin API."""
        out: dict[str, Any] = {"rounds": self.rounds, "last_round_s": round(self.last_round_s, 4)}
        if self.leases is not None:
            out["leases"] = self.leases.describe()
        return out


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error or exc}"
    return f"{type(exc).__name__}: {exc}"
