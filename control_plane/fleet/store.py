"""Worker records: the live in-memory view used for routing, written through to the database.

Routing reads only memory. Every change (state, models, load, last seen) is written
to the database through the batched writer, off the request path; registration and
removal are written at once, so that a worker the API confirmed survives a crash.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.exc import IntegrityError

from control_plane.errors import BadRequest
from control_plane.fleet.addresses import normalize_worker_url
from control_plane.fleet.rows import apply_row, info_from_row, models_json
from control_plane.fleet.workers import ModelStatus, WorkerInfo, WorkerState, is_served_model
from control_plane.nodes.client import PollResult
from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, Worker, WorkerEvent, utcnow
from control_plane.storage.worker_rows import (
    all_rows,
    live_rows,
    mark_removed,
    mark_restored,
    upsert_registration,
)
from control_plane.storage.writer import BatchWriter

__all__ = ["SyncResult", "WorkerStore"]

log = logging.getLogger(__name__)


@dataclass
class SyncResult:
    """What :meth:`WorkerStore.sync` changed in memory."""

    added: list[WorkerInfo] = field(default_factory=list)
    removed: list[WorkerInfo] = field(default_factory=list)
    updated: int = 0


class WorkerStore:
    """All workers, in memory, with their rows kept up to date in the database.

    With several control-plane replicas on one database, each worker's live state is
    written by the replica that polls it (see :mod:`control_plane.fleet.leases`); the others
    take it from the ``workers`` rows with :meth:`sync`, which also brings in workers
    registered and removed through other replicas: :meth:`read_rows`, then :meth:`apply_rows`.
    """

    def __init__(self, db: Database, writer: BatchWriter, replica: str = "") -> None:
        self.db = db
        self.writer = writer
        self.replica = replica
        self._workers: dict[int, WorkerInfo] = {}
        self._by_name: dict[str, int] = {}
        # worker id -> registered_at of the incarnation this replica removed, so that a
        # sync that read the row just before the removal does not bring it back
        self._removed: dict[int, datetime] = {}
        self._lock = threading.Lock()

    # -- loading and registration (blocking: call from a thread) ----------------------------
    def load(self) -> list[WorkerInfo]:
        """Read the registered (not removed) workers from the database. Those no other live
        replica polls come back ``unknown`` (not routed to) until their first poll answers,
        the change recorded; offline ones stay offline."""
        restored = mark_restored(self.db, self.replica)
        if restored:
            log.info("%d workers restored as unknown until their first poll answers", restored)
        loaded = []
        for row in live_rows(self.db):
            info = info_from_row(row)
            self._add(info)
            loaded.append(info)
        return loaded

    def read_rows(self) -> list[Worker]:
        """Every ``workers`` row, removed ones included (blocking: call from a thread)."""
        return all_rows(self.db)

    def apply_rows(
        self, rows: Iterable[Worker], skip: Callable[[int], bool] = lambda _id: False
    ) -> SyncResult:
        """Bring the in-memory view up to date with ``workers`` rows (memory only).

        Adds workers registered elsewhere, drops workers removed elsewhere, and takes
        the live state (health, models, queue) of every worker for which ``skip`` is
        false; ``skip`` says which ones this replica polls itself (it knows their state
        first-hand, and its own writes of it may not have reached the rows yet). Call
        it where the poller applies its polls (the event loop), so the two never race.
        """
        result = SyncResult()
        for row in rows:
            with self._lock:
                local = self._workers.get(row.id)
                if row.removed_at is not None:
                    if local is not None:
                        self._workers.pop(row.id, None)
                        self._by_name.pop(local.name, None)
                        local.set_state(WorkerState.REMOVED)
                        result.removed.append(local)
                    continue
                if local is None:
                    if self._removed.get(row.id) == row.registered_at:
                        continue  # removed here after the row was read
                    info = info_from_row(row)
                    self._workers[info.id] = info
                    self._by_name[info.name] = info.id
                    result.added.append(info)
                    continue
            if not skip(row.id):
                apply_row(local, row)
                result.updated += 1
        for info in result.added:
            log.info("worker %s (%s) registered through another replica", info.id, info.name)
        for info in result.removed:
            log.info("worker %s (%s) removed through another replica", info.id, info.name)
        return result

    def register(
        self,
        name: str,
        *,
        grpc_url: str,
        metrics_url: str,
        labels: dict[str, Any] | None = None,
        speed: int = 1,
        source: str = "admin",
    ) -> tuple[WorkerInfo, bool]:
        """Add a worker (or update one with the same URL); returns it and whether it is new."""
        name = normalize_worker_url(name)
        with self._lock:
            existing_id = self._by_name.get(name)
        if existing_id is not None:
            info = self._workers[existing_id]
            changed = (info.grpc_url, info.metrics_url, info.speed) != (grpc_url, metrics_url, speed)
            info.grpc_url, info.metrics_url, info.speed = grpc_url, metrics_url, speed
            if labels is not None:
                info.labels = dict(labels)
            if changed or labels is not None:
                self._persist(info)
            return info, False
        fields = {"grpc_url": grpc_url, "metrics_url": metrics_url, "speed": speed}
        try:
            info, created = self._register_row(name, fields, labels, source)
        except IntegrityError:  # another replica inserted the same URL a moment ago
            info, created = self._register_row(name, fields, labels, source)
        with self._lock:
            self._removed.pop(info.id, None)
            # a sync running meanwhile may have brought the new row in already: keep that one
            known = self._workers.get(info.id)
            if known is not None:
                return known, created
        self._add(info)
        return info, created

    def _register_row(
        self, name: str, fields: dict[str, Any], labels: dict[str, Any] | None, source: str
    ) -> tuple[WorkerInfo, bool]:
        row, created = upsert_registration(self.db, name, fields, labels, source, self.replica)
        return (info_from_row(row, WorkerState.UNKNOWN), True) if created else (info_from_row(row), False)

    def remove(self, worker_id: int, reason: str = "removed by admin") -> WorkerInfo | None:
        """Take a worker out of the fleet (its history stays). Blocking: call it off the
        event loop."""
        with self._lock:
            info = self._workers.pop(worker_id, None)
            if info is not None:
                self._by_name.pop(info.name, None)
                self._removed[worker_id] = info.registered_at
        if info is None:
            return None
        # (in a worker thread) the transitions still queued in the writer first, so that
        # the removal's event, written directly, comes after them
        self.writer.flush(5.0)
        mark_removed(self.db, worker_id, info.state.value, reason, self.replica)
        info.set_state(WorkerState.REMOVED)
        self._persist(info)  # after any update of the row still queued in the writer
        return info

    def _add(self, info: WorkerInfo) -> None:
        with self._lock:
            self._workers[info.id] = info
            self._by_name[info.name] = info.id

    # -- reads (memory only) ----------------------------------------------------------------
    def get(self, worker_id: int) -> WorkerInfo | None:
        """A worker by id."""
        return self._workers.get(worker_id)

    def by_name(self, name: str) -> WorkerInfo | None:
        """A worker by base URL (normalized)."""
        try:
            key = normalize_worker_url(name)
        except BadRequest:
            return None
        wid = self._by_name.get(key)
        return self._workers.get(wid) if wid is not None else None

    def all(self) -> list[WorkerInfo]:
        """Every registered worker."""
        return list(self._workers.values())

    def candidates(self, model: str) -> list[WorkerInfo]:
        """Workers that can take a request for ``model`` now."""
        return [w for w in self._workers.values() if w.can_serve(model)]

    def listed_models(self) -> list[str]:
        """Models ready on at least one healthy worker."""
        names: set[str] = set()
        for w in self._workers.values():
            if w.state is WorkerState.HEALTHY:
                names.update(w.ready_models())
        return sorted(names)

    def servable_models(self) -> list[str]:
        """Models a healthy worker can serve, loaded or not: those in its repository index."""
        names: set[str] = set()
        for w in self._workers.values():
            if w.state is WorkerState.HEALTHY:
                names.update(n for n in w.models if is_served_model(n))
        return sorted(names)

    def known_models(self) -> list[str]:
        """Every model any worker has reported, ready or not."""
        names: set[str] = set()
        for w in self._workers.values():
            names.update(n for n in w.models if is_served_model(n))
        return sorted(names)

    # -- updates (non-blocking: written through the batch writer) ---------------------------
    def set_state(self, info: WorkerInfo, state: WorkerState, reason: str) -> None:
        """Move a worker to ``state``, recording the transition and its reason."""
        if info.state is state or info.state is WorkerState.REMOVED:
            return
        log.info("worker %s (%s): %s -> %s: %s", info.id, info.name, info.state.value, state.value, reason)
        self.writer.insert(
            WorkerEvent,
            {
                "worker_id": info.id,
                "at": utcnow(),
                "from_state": info.state.value,
                "to_state": state.value,
                "reason": reason[:2000],
                "replica": self.replica or None,
            },
        )
        info.set_state(state)
        self._persist(info)

    def record_heartbeat(
        self,
        info: WorkerInfo,
        *,
        ok: bool,
        latency_ms: float | None,
        server_ready: bool,
        error: str | None,
        source: str = "poll",
    ) -> None:
        """Store one heartbeat and the worker's current load and models."""
        now = utcnow()
        if ok:
            info.last_seen_at = now
        self.writer.insert(
            Heartbeat,
            {
                "worker_id": info.id,
                "at": now,
                "ok": ok,
                "latency_ms": latency_ms,
                "server_ready": server_ready,
                "models": {n: m.ready for n, m in info.models.items()},
                "queue_length": info.queue_length,
                "active": info.active,
                "inflight": info.inflight,
                "source": source,
                "error": (error or None) and error[:2000],
                "replica": self.replica or None,
            },
        )
        self._persist(info)

    def _persist(self, info: WorkerInfo) -> None:
        self.writer.update(
            Worker,
            {
                "id": info.id,
                "state": info.state.value,
                "models": models_json(info.models),
                "queue_length": info.queue_length,
                "inflight": info.inflight,
                "grpc_url": info.grpc_url,
                "metrics_url": info.metrics_url,
                "labels": info.labels,
                "speed": info.speed,
                "last_seen_at": info.last_seen_at,
            },
        )

    def record_poll(self, info: WorkerInfo, res: PollResult, started_at: float | None = None) -> None:
        """Take what a poll found into the live view (the poller then decides the state:
        :meth:`set_state`, and records the heartbeat: :meth:`record_heartbeat`).

        A poll that could not read the index marks every model unreachable: no request
        is sent to a node that did not answer, even before it counts as unhealthy. A
        model whose status this control plane set (:meth:`mark_models`) after the poll
        started (``started_at``, monotonic) keeps that status: the poll read the index
        before the load or unload."""
        info.last_poll_latency_ms = res.latency_ms
        if res.models is not None:
            models = dict(res.models)
            # a model's served name is reported while it is loaded, and kept while it is not
            for name, m in models.items():
                known = info.models.get(name)
                m.served_name = (res.served_names or {}).get(name) or (known.served_name if known else "")
            if started_at is not None:
                for name, at in list(info.models_marked_at.items()):
                    if at < started_at:
                        del info.models_marked_at[name]  # polled since: the node's word again
                    elif name in info.models:
                        models[name] = info.models[name]
            info.set_models(models)
        if res.queued is not None and res.active is not None:
            info.queue_length, info.active = res.queued, res.active
        if res.ok:
            info.consecutive_failures = 0
            info.failing_since = None
            info.last_error = ""
            return
        info.consecutive_failures += 1
        info.failing_since = info.failing_since or time.monotonic()
        info.last_error = res.error
        if res.models is None:
            info.set_models({n: ModelStatus(ready=False, state="UNREACHABLE") for n in info.models})

    def record_push(self, info: WorkerInfo, queue_length: int) -> None:
        """A heartbeat a worker pushed (LLaVA's protocol): its queue length, clamped by the caller."""
        info.queue_length = queue_length
        self.record_heartbeat(
            info,
            ok=True,
            latency_ms=None,
            server_ready=info.state is WorkerState.HEALTHY,
            error=None,
            source="push",
        )

    def mark_models(self, info: WorkerInfo, names: Iterable[str], status: ModelStatus) -> None:
        """Set models' states ahead of the next poll (a load or unload this control plane made)."""
        served = {n: m.served_name for n, m in info.models.items()}
        marked = {n: ModelStatus(status.ready, status.state, status.reason, served.get(n, "")) for n in names}
        now = time.monotonic()
        info.models_marked_at.update(dict.fromkeys(marked, now))
        info.set_models({**info.models, **marked})

    def adjust_inflight(self, info: WorkerInfo, delta: int, model: str | None = None) -> None:
        """Count a stream opened (+1) or ended (-1) to this worker (and ``model`` on it:
        the model lifecycle reads these counts and last-use times)."""
        with self._lock:
            info.inflight = max(0, info.inflight + delta)
            if model is not None:
                info.model_inflight[model] = max(0, info.model_inflight.get(model, 0) + delta)
                info.model_last_used[model] = time.monotonic()
