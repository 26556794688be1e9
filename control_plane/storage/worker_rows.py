"""The ``workers`` rows that registration and removal write at once (not through the batch
writer: a worker the API confirmed must survive a crash), and the reads of them."""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select, update

from control_plane.storage.db import Database
from control_plane.storage.schema import PollLease, Worker, WorkerEvent, utcnow

__all__ = ["all_rows", "live_rows", "mark_removed", "mark_restored", "upsert_registration"]


def live_rows(db: Database) -> list[Worker]:
    """The registered (not removed) workers (blocking: call from a thread)."""
    with db.session() as s:
        return list(s.scalars(select(Worker).where(Worker.removed_at.is_(None))).all())


def mark_restored(db: Database, replica: str) -> int:
    """At start: every worker last known healthy or unhealthy that no other live replica
    polls (no unexpired lease of another holder) becomes ``unknown`` until its first poll
    answers, the change recorded; returns how many. Offline workers stay offline."""
    with db.session() as s:
        # the database's clock on PostgreSQL, as the leases are judged
        now = (
            s.execute(select(func.timezone("UTC", func.now()))).scalar_one()
            if db.dialect == "postgresql"
            else utcnow()
        )
        polled = select(PollLease.worker_id).where(PollLease.holder != replica, PollLease.expires_at > now)
        rows = s.scalars(
            select(Worker).where(
                Worker.removed_at.is_(None),
                Worker.state.in_(("healthy", "unhealthy")),
                Worker.id.not_in(polled),
            )
        ).all()
        at = utcnow()
        for row in rows:
            seen = f"last seen {row.last_seen_at.isoformat()}Z" if row.last_seen_at else "never seen"
            s.add(
                WorkerEvent(
                    worker_id=row.id,
                    at=at,
                    from_state=row.state,
                    to_state="unknown",
                    reason=f"control plane started ({seen}): unknown until a poll answers",
                    replica=replica or None,
                )
            )
            row.state = "unknown"
        return len(rows)


def all_rows(db: Database) -> list[Worker]:
    """Every ``workers`` row, removed ones included (blocking: call from a thread)."""
    with db.session() as s:
        return list(s.scalars(select(Worker)).all())


def upsert_registration(
    db: Database, name: str, fields: dict[str, Any], labels: dict[str, Any] | None, source: str, replica: str
) -> tuple[Worker, bool]:
    """Register ``name`` (grpc_url, metrics_url, speed in ``fields``); returns its row and
    whether it is new. A worker registered already (through another replica) is updated
    and taken as it is; a removed one comes back as a new incarnation."""
    now = utcnow()
    with db.session() as s:
        row = s.scalars(select(Worker).where(Worker.name == name)).one_or_none()
        if row is not None and row.removed_at is None:
            for key, value in fields.items():
                setattr(row, key, value)
            if labels is not None:
                row.labels = dict(labels)
            s.flush()
            return row, False
        if row is None:
            row = Worker(name=name, registered_at=now)
            s.add(row)
        row.http_url = name
        row.grpc_url = fields["grpc_url"]
        row.metrics_url = fields["metrics_url"]
        row.labels = dict(labels or {})
        row.speed = fields["speed"]
        row.source = source
        row.state = "unknown"
        row.models = {}
        row.queue_length = 0
        row.removed_at = None
        row.registered_at = now
        s.flush()
        s.add(
            WorkerEvent(
                worker_id=row.id,
                at=now,
                from_state="",
                to_state="unknown",
                reason=f"registered ({source})",
                replica=replica or None,
            )
        )
        return row, True


def mark_removed(db: Database, worker_id: int, from_state: str, reason: str, replica: str) -> None:
    """Mark a worker removed, and record it once even if replicas remove it at once."""
    now = utcnow()
    with db.session() as s:
        result = s.execute(
            update(Worker)
            .where(Worker.id == worker_id, Worker.removed_at.is_(None))
            .values(removed_at=now, state="removed")
            .execution_options(synchronize_session=False)
        )
        if getattr(result, "rowcount", 0):
            s.add(
                WorkerEvent(
                    worker_id=worker_id,
                    at=now,
                    from_state=from_state,
                    to_state="removed",
                    reason=reason,
                    replica=replica or None,
                )
            )
