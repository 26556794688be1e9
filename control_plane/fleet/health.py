"""Health polling: heartbeats are polls of each node's Triton endpoints.

Every interval, every registered node is polled concurrently, each poll bounded by a
timeout: ``/v2/health/ready`` (server ready), ``/v2/repository/index`` (each model's
state) and the Prometheus metrics (load). Nodes push nothing. A node that is live and
answers its index counts as up even when not ready: Triton's strict readiness turns
false for good once any model fails to load, and routing goes by each model's state.
State machine:

    unknown/healthy --N failed polls--> unhealthy --failing for offline_after_s--> offline
    any state --a successful poll--> healthy

Only healthy workers are routed to; every transition is recorded with its reason. A
worker offline and not seen for ``offline_worker_ttl_s`` is removed (a ``removed`` event).
Workers restored at start come back ``unknown`` (see :meth:`WorkerStore.load`).

LLaVA's ``/refresh_all_workers`` (:meth:`HealthPoller.refresh`) probes every worker now.
LLaVA's controller drops every worker that does not answer, and its workers register
again at their next heartbeat; Triton nodes never register themselves, so here a worker
that does not answer is removed only if it was out of routing already (unhealthy or
offline), and a healthy one is taken out of routing at once (back at its next answered
poll): a node that misses one probe while a web UI page loads is not lost for good.

With several control-plane replicas on one database, a replica polls only the
workers whose poll lease it holds (:mod:`control_plane.fleet.leases`), so each node is
polled, and its heartbeats and transitions recorded, by one replica at a time. Every
round first brings the replica's view of the other workers up to date from the
database (registrations, removals, health), then renews its leases, then polls.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from control_plane.background import BackgroundLoop
from control_plane.config import Settings
from control_plane.fleet.breaker import CircuitBreaker
from control_plane.fleet.leases import LeaseManager
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import WorkerInfo, WorkerState
from control_plane.nodes.client import NodeClient, PollResult
from control_plane.storage.schema import utcnow

__all__ = ["HealthPoller"]

log = logging.getLogger(__name__)


class HealthPoller(BackgroundLoop):
    """Polls every worker on an interval and moves workers between states."""

    task_name = "health-poller"

    def __init__(
        self,
        store: WorkerStore,
        settings: Settings,
        nodes: NodeClient,
        breaker: CircuitBreaker,
        leases: LeaseManager | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self.nodes = nodes
        self.breaker = breaker  # a poll may not close an open circuit before its cooldown
        self.leases = leases
        self._semaphore = asyncio.Semaphore(256)
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
        await self._expire(workers)

    async def refresh(self) -> list[WorkerInfo]:
        """Probe every worker now (LLaVA's ``/refresh_all_workers``); remove those that do
        not answer and were offline already (silent for ``offline_after_s``: not a node that
        is merely restarting, which a page load of the web UI would otherwise drop for
        good), take healthy ones that do not answer out of routing. Returns the workers
        removed."""
        workers = await self._round_targets()
        before = {w.id: w.state for w in workers}
        results = await asyncio.gather(*(self._poll_and_apply(w) for w in workers))
        removed = []
        for worker, res in zip(workers, results, strict=True):
            if res is None or res.ok or worker.state is WorkerState.REMOVED:
                continue
            was = before[worker.id]
            if was is WorkerState.OFFLINE:
                await self.remove(
                    worker, f"did not answer /refresh_all_workers while {was.value}: {res.error}"
                )
                removed.append(worker)
            elif worker.state is WorkerState.HEALTHY:
                self.store.set_state(
                    worker, WorkerState.UNHEALTHY, f"did not answer /refresh_all_workers: {res.error}"
                )
        await self._expire(workers)
        return removed

    async def _expire(self, workers: list[WorkerInfo]) -> None:
        ttl = self.settings.offline_worker_ttl_s
        if ttl <= 0:
            return
        now = utcnow()
        for worker in workers:
            if worker.state is WorkerState.OFFLINE:
                gone_s = (now - (worker.last_seen_at or worker.registered_at)).total_seconds()
                if gone_s >= ttl:
                    await self.remove(
                        worker, f"offline, not seen for {gone_s:.0f} s (offline_worker_ttl_s: {ttl:g})"
                    )

    async def remove(self, info: WorkerInfo, reason: str) -> None:
        """Remove a worker from the fleet (recorded, its history kept) and forget it."""
        try:
            removed = await asyncio.to_thread(self.store.remove, info.id, reason)
        except Exception as exc:  # the database is away: tried again next round
            log.warning("could not remove worker %s: %s", info.id, exc)
            return
        if removed is not None:
            log.info("worker %s (%s) removed: %s", info.id, info.name, reason)
            await self.forget(removed)

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
        for info in removed:  # removed through another replica
            await self.forget(info)
        ids = [w.id for w in self.store.all() if w.state is not WorkerState.REMOVED]
        held = await asyncio.to_thread(leases.renew, ids)
        return [w for w in self.store.all() if w.id in held and w.state is not WorkerState.REMOVED]

    async def forget(self, info: WorkerInfo) -> None:
        """Let go of what this replica keeps for a removed worker: its lease, its circuit,
        the node client's channel."""
        if self.leases is not None:
            try:
                await asyncio.to_thread(self.leases.release, [info.id])
            except Exception as exc:  # it lapses on its own
                log.warning("could not release the poll lease of worker %s: %s", info.id, exc)
        self.breaker.forget(info)
        await self.nodes.forget(info.grpc_url)

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
            started = time.monotonic()
            result = await self.nodes.poll(worker.http_url, worker.metrics_url, self.settings.poll_timeout_s)
        if self.leases is not None and not self.leases.holds(worker.id):
            # the lease lapsed while polling: another replica may own it now
            log.warning(
                "the poll lease of worker %s (%s) lapsed before its poll was answered "
                "(lease_period_s %g); the result is dropped",
                worker.id,
                worker.name,
                self.leases.period_s,
            )
            return None
        self._apply(worker, result, started)
        return result

    def _apply(self, worker: WorkerInfo, res: PollResult, started: float) -> None:
        if worker.state is WorkerState.REMOVED:
            return
        s = self.settings
        self.store.record_poll(worker, res, started)
        if res.ok:
            if worker.state is not WorkerState.HEALTHY and self.breaker.may_close(worker):
                self.store.set_state(worker, WorkerState.HEALTHY, "poll succeeded: server ready")
        else:
            failures = worker.consecutive_failures
            failing_s = time.monotonic() - (worker.failing_since or time.monotonic())
            if (
                worker.state in (WorkerState.HEALTHY, WorkerState.UNKNOWN)
                and failures >= s.unhealthy_after_failures
            ):
                self.store.set_state(worker, WorkerState.UNHEALTHY, f"{failures} failed polls: {res.error}")
            elif worker.state is WorkerState.UNHEALTHY and failing_s >= s.offline_after_s:
                self.store.set_state(
                    worker, WorkerState.OFFLINE, f"failing for {failing_s:.0f} s: {res.error}"
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
