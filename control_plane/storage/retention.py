"""Retention: heartbeats and requests older than their retention period are deleted.

500 nodes polled every 2 s write 21.6 M heartbeat rows a day, so the history must be
pruned. :class:`RetentionLoop` does it in the background every ``retention_interval_s``:
in a thread of its own (never the event loop, never the default executor that polling
uses), in statements of at most ``retention_batch_rows`` rows, each its own short
transaction, with a pause between them, so that the batch writer (and on SQLite, the
only writer at a time) is never held up for long. On PostgreSQL the rows of a batch are
picked with ``FOR UPDATE SKIP LOCKED``: replicas pruning at once split the rows between
them instead of waiting on (or deadlocking over) each other's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import Delete, Table, bindparam, delete, select

from control_plane.background import BackgroundLoop
from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, RequestRecord, utcnow

__all__ = ["RetentionLoop", "RetentionPolicy"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetentionPolicy:
    """Which table keeps rows how long, by which timestamp column (indexed)."""

    table: Table
    column: str
    days: float

    @property
    def name(self) -> str:
        """The table's name."""
        return str(self.table.name)


class RetentionLoop(BackgroundLoop):
    """Deletes rows past their retention period, every ``interval_s`` (the first pass
    ``min(interval_s, 10)`` s after start), ``batch_rows`` rows a statement with
    ``pause_s`` between statements. A period of 0 days keeps a table's rows forever.

    :meth:`run_once` is one pass (what the loop runs in its thread; tests call it too).
    """

    task_name = "retention"

    def __init__(
        self,
        db: Database,
        policies: list[RetentionPolicy],
        *,
        interval_s: float = 600.0,
        batch_rows: int = 5000,
        pause_s: float = 0.05,
        on_deleted: Callable[[str, int], None] | None = None,
    ) -> None:
        self.db = db
        self.policies = [p for p in policies if p.days > 0]
        self.interval_s = interval_s
        self.batch_rows = max(1, batch_rows)
        self.pause_s = pause_s
        self.on_deleted = on_deleted
        self.deleted: dict[str, int] = {p.name: 0 for p in policies}
        self.statements = 0
        self.passes = 0
        self.last_pass_at: datetime | None = None
        self.last_pass_s: float | None = None
        self.last_error: str | None = None
        self._stopping = threading.Event()
        # One thread, so that passes never overlap and never take a default-executor thread.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="retention")
        self._pass: concurrent.futures.Future[dict[str, int]] | None = None
        self._statements = {p.name: self._statement(p) for p in self.policies}

    @classmethod
    def from_settings(
        cls, db: Database, settings: Any, on_deleted: Callable[[str, int], None] | None = None
    ) -> RetentionLoop:
        """The loop the app runs: heartbeats by ``at``, requests by ``started_at``."""
        return cls(
            db,
            [
                RetentionPolicy(Heartbeat.__table__, "at", settings.heartbeat_retention_days),  # type: ignore[arg-type]
                RetentionPolicy(RequestRecord.__table__, "started_at", settings.request_retention_days),  # type: ignore[arg-type]
            ],
            interval_s=settings.retention_interval_s,
            batch_rows=settings.retention_batch_rows,
            pause_s=settings.retention_pause_s,
            on_deleted=on_deleted,
        )

    def _statement(self, policy: RetentionPolicy) -> Delete:
        t = policy.table
        pk = next(iter(t.primary_key.columns))
        # Through the timestamp's index, at most batch_rows rows a statement; a subquery,
        # because neither SQLite (as built by default) nor PostgreSQL has DELETE ... LIMIT.
        picked = select(pk).where(t.c[policy.column] < bindparam("cutoff")).limit(self.batch_rows)
        if self.db.dialect == "postgresql":
            picked = picked.with_for_update(skip_locked=True)
        return delete(t).where(pk.in_(picked.scalar_subquery()))

    def describe(self) -> dict[str, Any]:
        """Counts for ``/admin/status``: rows deleted per table since start, passes, the last one."""
        return {
            "retention_days": {p.name: p.days for p in self.policies},
            "interval_s": self.interval_s,
            "batch_rows": self.batch_rows,
            "deleted": dict(self.deleted),
            "statements": self.statements,
            "passes": self.passes,
            "last_pass_at": self.last_pass_at.isoformat() + "Z" if self.last_pass_at else None,
            "last_pass_s": self.last_pass_s,
            "last_error": self.last_error,
        }

    def run_once(self, now: datetime | None = None) -> dict[str, int]:
        """One pass: every table's rows older than its period, in batches; rows deleted per
        table. Stops between batches once the loop is stopping."""
        started = time.monotonic()
        now = now or utcnow()
        done: dict[str, int] = {}
        try:
            for policy in self.policies:
                done[policy.name] = self._prune(policy, now - timedelta(days=policy.days))
            self.last_error = None
        except Exception as exc:  # the database is away, say: the next pass tries again
            self.last_error = f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"
            log.warning("retention pass failed (next in %g s): %s", self.interval_s, self.last_error)
        self.passes += 1
        self.last_pass_at = now
        self.last_pass_s = round(time.monotonic() - started, 3)
        if any(done.values()):
            log.info("retention: deleted %s", ", ".join(f"{n} {t}" for t, n in done.items() if n))
        return done

    def _prune(self, policy: RetentionPolicy, cutoff: datetime) -> int:
        total = 0
        stmt = self._statements[policy.name]
        while not self._stopping.is_set():
            with self.db.engine.begin() as conn:  # one short transaction a batch
                n = int(conn.execute(stmt, {"cutoff": cutoff}).rowcount or 0)
            self.statements += 1
            if n:
                total += n
                self.deleted[policy.name] += n
                if self.on_deleted is not None:
                    self.on_deleted(policy.name, n)
            if n < self.batch_rows:
                break
            # Let the batch writer (and on SQLite, any other writer) in between batches.
            self._stopping.wait(self.pause_s)
        return total

    async def _run(self) -> None:
        if not self.policies:
            return
        # The first pass a little after start: the app's own start (schema, first poll
        # round, model loads) goes first.
        await asyncio.sleep(min(self.interval_s, 10.0))
        while True:
            self._pass = self._pool.submit(self.run_once)
            await asyncio.wrap_future(self._pass)
            await asyncio.sleep(self.interval_s)

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop the loop; a pass under way ends after its current batch (waited for up to
        ``timeout_s``, without a thread of the default executor)."""
        self._stopping.set()
        await super().stop()
        running = self._pass
        if running is not None and not running.done():
            await asyncio.wait({asyncio.wrap_future(running)}, timeout=timeout_s)
        self._pool.shutdown(wait=False)
