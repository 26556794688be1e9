"""The batched writer: every write of the control plane.

Writes never happen on the event loop or on a request's path: callers hand rows to
:class:`BatchWriter`, whose thread writes them in batches, in order, one transaction
a batch. A batch that fails is written again one operation at a time, so that one bad
row costs only itself; every row that never reaches the database is counted by reason
(:data:`LOSS_REASONS`).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session

from control_plane.storage.batch_rows import Op, write_rows
from control_plane.storage.db import Database

__all__ = ["LOSS_REASONS", "BatchWriter"]

log = logging.getLogger(__name__)


LOSS_REASONS = ("queue_full", "write_failed", "db_unavailable")

# SQLite reports SQL errors and an unusable database alike as OperationalError; these
# messages are the ones that say the database itself cannot be written now.
_SQLITE_UNAVAILABLE = (
    "locked",
    "busy",
    "unable to open",
    "disk i/o",
    "disk is full",
    "readonly database",
    "read-only database",
    "malformed",
    "not a database",
)


def _unavailable(exc: BaseException, dialect: str) -> bool:
    """Whether ``exc`` says the database cannot be written at all now (connection lost,
    server down, file unusable), not that one statement's values were wrong."""
    if isinstance(exc, (DisconnectionError, PoolTimeout)):
        return True
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, OperationalError):
        if dialect != "sqlite":
            # PostgreSQL's drivers raise OperationalError for the connection and the server
            # (refused, closed, shutting down, cancelled), DataError/IntegrityError for values.
            return True
        message = str(exc.orig).lower()
        return any(m in message for m in _SQLITE_UNAVAILABLE)
    return False


def _describe(exc: BaseException) -> str:
    """The error, short: the driver's exception without SQLAlchemy's statement and parameters
    (a parameter may be the very value that failed, and huge)."""
    orig = getattr(exc, "orig", None) or exc
    text = " ".join(str(orig).split())
    return f"{type(orig).__name__}: {text[:300]}"


class _RateLimitedLog:
    """One warning per kind of loss at most every ``interval_s``; the first at once, the
    next ones with the rows lost the same way in between."""

    def __init__(self, interval_s: float = 60.0) -> None:
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last: dict[tuple[str, ...], float] = {}
        self._since: dict[tuple[str, ...], int] = {}

    def report(self, key: tuple[str, ...], rows: int, message: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._since[key] = self._since.get(key, 0) + rows
                return
            self._last[key] = now
            since = self._since.pop(key, 0)
        suffix = f" ({since} more rows lost the same way since the last report)" if since else ""
        log.warning(message + suffix, *args)


class BatchWriter:
    """Writes rows on its own thread, in batches, one transaction a batch: a batch holds
    what is queued within ``flush_interval_s`` of its first row (at most ``batch_size``).

    ``insert`` and ``update`` return at once. Within a batch, the inserts into one table
    become one ``executemany`` (in the order given), then the updates of one table (by
    primary key) another: an update of a row inserted in the same batch is folded into
    the insert, and several updates of one row become one (later values win). Tables go
    parents first (foreign keys); a ``call`` is a barrier: what was queued before it is
    written before it runs. Each batch commits as a whole, so readers never see its
    statements in between: they see every write in the order given. A full queue drops
    the newest row rather than block the caller.

    A batch that fails is retried one operation at a time, in order, each in its own
    transaction (``call`` operations too), so that one row the database refuses (a value
    too large for its column, say) costs that row only, not the batch. The retry stops at
    the first operation that fails because the database is unavailable (connection
    refused or lost, file unusable; see :func:`_unavailable`): the rest of the batch is
    given up, so a database that is away costs two failed attempts a batch, not one per
    row. Lost rows are counted by reason in :attr:`lost` (:data:`LOSS_REASONS`),
    :attr:`dropped` is their total, ``on_lost(reason, rows)`` is called for each loss
    (metrics), and each kind of loss is logged with its table and error, rate-limited.
    """

    def __init__(
        self,
        db: Database,
        flush_interval_s: float = 0.25,
        batch_size: int = 500,
        max_queue: int = 200_000,
        on_lost: Callable[[str, int], None] | None = None,
    ) -> None:
        self.db = db
        self.flush_interval_s = flush_interval_s
        self.batch_size = batch_size
        self.on_lost = on_lost
        self._queue: queue.Queue[Op | None] = queue.Queue(maxsize=max_queue)
        self._idle = threading.Event()
        self._idle.set()
        self._wake = threading.Event()  # flush(): write the batch being collected now
        self._lock = threading.Lock()  # losses are counted on the callers' threads and the writer's
        self.lost: dict[str, int] = dict.fromkeys(LOSS_REASONS, 0)
        self.dropped = 0
        self.batches = 0
        self.failed_batches = 0
        self.rows_written = 0
        self._loss_log = _RateLimitedLog()
        self._thread = threading.Thread(target=self._run, name="db-writer", daemon=True)
        self._thread.start()

    def describe(self) -> dict[str, Any]:
        """Counts for ``/admin/status``: batches written, rows written, rows lost (total and
        by reason), batches that failed as a whole and were retried one operation at a time."""
        with self._lock:
            lost = dict(self.lost)
        return {
            "batches": self.batches,
            "rows": self.rows_written,
            "dropped": sum(lost.values()),
            "lost": lost,
            "failed_batches": self.failed_batches,
            "queued": self._queue.qsize(),
        }

    def _lose(self, reason: str, ops: list[Op], error: str) -> None:
        rows = sum(op.size for op in ops)
        if not rows:
            return
        with self._lock:
            self.lost[reason] = self.lost.get(reason, 0) + rows
            self.dropped += rows
        if self.on_lost is not None:
            try:
                self.on_lost(reason, rows)
            except Exception:  # a metrics callback must not stop the writer
                log.exception("the database writer's on_lost callback failed")
        tables = ", ".join(sorted({op.table for op in ops}))
        self._loss_log.report(
            (reason, tables, error.split(":", 1)[0]),
            rows,
            "database writer: %d row(s) of %s lost (%s): %s",
            rows,
            tables,
            reason,
            error,
        )

    def _put(self, op: Op) -> None:
        self._idle.clear()
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._lose("queue_full", [op], f"queue full: {self._queue.maxsize} operations waiting")

    def insert(self, model: Any, row: dict[str, Any]) -> None:
        """Queue one row to insert into ``model``'s table."""
        self._put(Op("insert", model, [row]))

    def update(self, model: Any, row: dict[str, Any]) -> None:
        """Queue an update of one row by primary key (``row`` includes it)."""
        self._put(Op("update", model, [row]))

    def call(self, fn: Callable[[Session], None]) -> None:
        """Queue an arbitrary write, run in the writer's transaction."""
        self._put(Op("call", call=fn))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is written (the batch being collected is
        written at once, without waiting for the rest of its interval)."""
        if not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._idle.clear()
        try:
            self._queue.put(Op("mark", done=done), timeout=timeout_s)
        except queue.Full:
            return False
        self._wake.set()
        return done.wait(timeout_s)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(None)
        self._wake.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=1.0)
            except queue.Empty:
                self._idle.set()
                continue
            if first is None:
                break
            # A batch is what comes within flush_interval_s of its first row (or batch_size
            # rows): a few transactions a second however many rows come, and the writes
            # (which hold the GIL at times) stay off the moments a request's tokens pass.
            batch = [first]
            flush_at = time.monotonic() + self.flush_interval_s
            stopping = self._drain(batch)
            if not stopping and len(batch) < self.batch_size and not _marked(batch):
                self._wake.wait(max(0.0, flush_at - time.monotonic()))
                stopping = self._drain(batch)
            self._wake.clear()
            try:
                self._write([op for op in batch if op.kind != "mark"])
            except Exception:  # never let the thread die: later rows would queue forever
                log.exception("database writer: unexpected failure")
            for op in batch:
                if op.done is not None:
                    op.done.set()
            if self._queue.empty():
                self._idle.set()

    def _drain(self, batch: list[Op]) -> bool:
        """Move queued operations into ``batch`` (up to ``batch_size``); True at the stop mark."""
        while len(batch) < self.batch_size:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return False
            if op is None:
                return True
            batch.append(op)
        return False

    def _transaction(self, ops: list[Op]) -> None:
        """Write ``ops`` in one transaction (committed, or rolled back as a whole)."""
        with self.db.session() as s:
            segment: list[Op] = []
            for op in ops:
                if op.kind == "call":
                    write_rows(s, segment)
                    segment = []
                    assert op.call is not None
                    op.call(s)
                else:
                    segment.append(op)
            write_rows(s, segment)

    def _write(self, batch: list[Op]) -> None:
        if not batch:
            return
        try:
            self._transaction(batch)
        except Exception as exc:
            self.failed_batches += 1
            log.debug("database write of %d operations failed (%s); retrying one by one", len(batch), exc)
        else:
            self.batches += 1
            self.rows_written += sum(op.size for op in batch)
            return
        dialect = self.db.dialect
        for i, op in enumerate(batch):
            try:
                self._transaction([op])
            except Exception as exc:
                if _unavailable(exc, dialect):
                    # The database, not this row: trying the rest one by one would only
                    # wait on it once per row (a connect or busy timeout each).
                    self._lose("db_unavailable", batch[i:], _describe(exc))
                    return
                self._lose("write_failed", [op], _describe(exc))
            else:
                self.rows_written += op.size


def _marked(batch: list[Op]) -> bool:
    return any(op.kind == "mark" for op in batch)
