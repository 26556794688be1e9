"""Reads and repairs of the worker history that are not the batch writer's: what the
admin API shows of one worker, and the requests a replica left running when it died."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update

from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, RequestRecord, RoutingDecision, WorkerEvent, utcnow

__all__ = ["MAX_ORPHANS", "Orphan", "take_abandoned_requests", "worker_history"]

# Requests left running whose nodes are told to stop, at most (the newest): a replica
# runs no more at once than its admission limits let in.
MAX_ORPHANS = 10_000


@dataclass(frozen=True)
class Orphan:
    """A request a previous run of this replica left running: where it may still run."""

    key: str  # requests.id
    request_id: str  # requests.request_id (its nodes saw serving.records.node_request_id of both)
    model: str
    worker_ids: tuple[int, ...]  # every node an attempt of it was sent to


def take_abandoned_requests(db: Database, replica: str) -> list[Orphan]:
    """The requests this replica left 'running' when it stopped (it died, or was killed),
    marked failed rather than left running forever; returned, so that their nodes can be
    told to stop generating for nobody (blocking: call from a thread)."""
    with db.session() as s:
        rows = s.execute(
            select(RequestRecord.id, RequestRecord.request_id, RequestRecord.model)
            .where(RequestRecord.status == "running", RequestRecord.replica == replica)
            .order_by(RequestRecord.started_at.desc())
            .limit(MAX_ORPHANS)
        ).all()
        # a running request's node is in its routing decisions (its row gets it at the end)
        sent: dict[str, set[int]] = {}
        ids = [r.id for r in rows]
        for chunk in range(0, len(ids), 500):
            for rid, wid in s.execute(
                select(RoutingDecision.request_id, RoutingDecision.worker_id).where(
                    RoutingDecision.request_id.in_(ids[chunk : chunk + 500])
                )
            ):
                if wid is not None:
                    sent.setdefault(rid, set()).add(wid)
        s.execute(
            update(RequestRecord)
            .where(RequestRecord.status == "running", RequestRecord.replica == replica)
            .values(
                status="error",
                error="the control plane stopped before the request ended (cancelled on its node at restart)",
                ended_at=utcnow(),
            )
        )
        return [Orphan(r.id, r.request_id, r.model, tuple(sorted(sent.get(r.id, ())))) for r in rows]


def worker_history(db: Database, worker_id: int, events: int = 20, heartbeats: int = 10) -> dict[str, Any]:
    """A worker's latest state changes and heartbeats, newest first (blocking: call from a thread)."""
    with db.session() as s:
        rows = s.scalars(
            select(WorkerEvent)
            .where(WorkerEvent.worker_id == worker_id)
            .order_by(WorkerEvent.id.desc())
            .limit(events)
        ).all()
        beats = s.scalars(
            select(Heartbeat)
            .where(Heartbeat.worker_id == worker_id)
            .order_by(Heartbeat.id.desc())
            .limit(heartbeats)
        ).all()
        return {
            "events": [
                {"at": e.at.isoformat() + "Z", "from": e.from_state, "to": e.to_state, "reason": e.reason}
                for e in rows
            ],
            "heartbeats": [
                {"at": h.at.isoformat() + "Z", "ok": h.ok, "latency_ms": h.latency_ms, "error": h.error}
                for h in beats
            ],
        }
