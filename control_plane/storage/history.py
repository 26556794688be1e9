"""Reads and repairs of the worker history that are not the batch writer's: what the
admin API shows of one worker, and the requests a replica left running when it died."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select, update

from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, RequestRecord, WorkerEvent, utcnow

__all__ = ["fail_abandoned_requests", "worker_history"]


def fail_abandoned_requests(db: Database, replica: str) -> int:
    """Requests this replica left 'running' when it died are failed, not left forever
    (blocking: call from a thread). Returns how many."""
    with db.session() as s:
        result = s.execute(
            update(RequestRecord)
            .where(RequestRecord.status == "running", RequestRecord.replica == replica)
            .values(
                status="error", error="the control plane stopped before the request ended", ended_at=utcnow()
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)


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
