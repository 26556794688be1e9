"""The database: engine, schema and views, and the batched writer.

Writes never happen on the event loop or on a request's path: callers hand rows to
:class:`BatchWriter`, whose thread writes them in batches, in order, one transaction
a batch. A batch that fails is written again one operation at a time, so that one bad
row costs only itself; every row that never reaches the database is counted by reason
(:data:`LOSS_REASONS`). Reads (admin API, SQL) run in worker threads with short sessions.
"""

from __future__ import annotations

import functools
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    bindparam,
    create_engine,
    event,
    insert,
    inspect,
    text,
    update,
)
from sqlalchemy.exc import DBAPIError, DisconnectionError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from sqlalchemy.orm import Session, sessionmaker

from control_plane.storage.schema import Base

__all__ = ["LOSS_REASONS", "VIEWS", "BatchWriter", "Database"]

log = logging.getLogger(__name__)


def _dialect_sql(dialect: str) -> dict[str, Callable[[str], str]]:
    if dialect == "sqlite":
        return {
            "epoch": lambda col: f"((julianday({col}) - 2440587.5) * 86400.0)",
            "now": lambda _: "((julianday('now') - 2440587.5) * 86400.0)",
            "hour": lambda col: f"strftime('%Y-%m-%d %H:00', {col})",
        }
    return {  # PostgreSQL
        "epoch": lambda col: f"EXTRACT(EPOCH FROM {col})",
        "now": lambda _: "EXTRACT(EPOCH FROM (now() AT TIME ZONE 'UTC'))",
        "hour": lambda col: f"to_char({col}, 'YYYY-MM-DD HH24:00')",
    }


def _views(dialect: str) -> dict[str, str]:
    f = _dialect_sql(dialect)
    epoch, now, hour = f["epoch"], f["now"](""), f["hour"]
    return {
        "v_heartbeats": f"""
            SELECT h.*, w.name AS worker, {epoch("h.at")} AS at_unix,
                   {now} - {epoch("h.at")} AS age_s, {hour("h.at")} AS hour
            FROM heartbeats h JOIN workers w ON w.id = h.worker_id""",
        "v_worker_events": f"""
            SELECT e.*, w.name AS worker, {epoch("e.at")} AS at_unix,
                   {now} - {epoch("e.at")} AS age_s, {hour("e.at")} AS hour
            FROM worker_events e JOIN workers w ON w.id = e.worker_id""",
        "v_requests": f"""
            SELECT r.*, w.name AS worker, {epoch("r.started_at")} AS started_unix,
                   ({epoch("r.ended_at")} - {epoch("r.started_at")}) * 1000.0 AS duration_ms,
                   {now} - {epoch("r.started_at")} AS age_s, {hour("r.started_at")} AS hour
            FROM requests r LEFT JOIN workers w ON w.id = r.worker_id""",
        "v_model_events": f"""
            SELECT m.*, w.name AS worker, {epoch("m.at")} AS at_unix,
                   {now} - {epoch("m.at")} AS age_s, {hour("m.at")} AS hour
            FROM model_events m LEFT JOIN workers w ON w.id = m.worker_id""",
        "worker_uptime_24h": """
            SELECT worker_id, worker, COUNT(*) AS polls,
                   SUM(CASE WHEN ok THEN 1 ELSE 0 END) AS ok_polls,
                   AVG(CASE WHEN ok THEN 1.0 ELSE 0.0 END) AS uptime
            FROM v_heartbeats WHERE source = 'poll' AND age_s < 86400
            GROUP BY worker_id, worker""",
    }


VIEWS = tuple(_views("sqlite"))

# Any constant: replicas starting at once take turns creating the schema (PostgreSQL).
_SCHEMA_LOCK_KEY = 0x11A7A_5C4E


def _add_missing_columns(conn: Connection) -> list[str]:
    """Add columns that the models have and an older database lacks.

    The schema only ever gains columns (docs/schema.md), all nullable or defaulted in
    code, so an ``ALTER TABLE ... ADD COLUMN`` brings an older database up to date.
    """
    inspector = inspect(conn)
    added = []
    for table in Base.metadata.sorted_tables:
        if not inspector.has_table(table.name):
            continue
        present = {c["name"] for c in inspector.get_columns(table.name)}
        for column in table.columns:
            if column.name not in present:
                kind = column.type.compile(dialect=conn.dialect)
                conn.execute(text(f"ALTER TABLE {table.name} ADD COLUMN {column.name} {kind}"))
                added.append(f"{table.name}.{column.name}")
    return added


class Database:
    """One SQLAlchemy engine and session factory, with the schema and views in place."""

    def __init__(self, url: str) -> None:
        self.url = url
        connect_args: dict[str, Any] = {}
        if url.startswith("sqlite"):
            path = url.split("///", 1)[-1]
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            connect_args = {"check_same_thread": False, "timeout": 30}
        self.engine: Engine = create_engine(
            url,
            connect_args=connect_args,
            pool_pre_ping=True,
            # JSON columns (worker models and labels, every heartbeat's models) through orjson:
            # the poller writes and reads them for every node every round.
            json_serializer=_json_dumps,
            json_deserializer=orjson.loads,
        )
        if self.engine.dialect.name == "sqlite":
            event.listen(self.engine, "connect", _sqlite_pragmas)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self.engine.dialect.name)

    def create_schema(self) -> None:
        """Create missing tables and columns, and (re)create the views.

        One transaction; on PostgreSQL under an advisory lock, so that replicas
        starting together do not trip over each other's DDL.
        """
        views = _views(self.dialect)
        with self.engine.begin() as conn:
            if self.dialect == "postgresql":
                conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})
            added = _add_missing_columns(conn)
            if added:
                log.info("added columns to an older database: %s", ", ".join(added))
            Base.metadata.create_all(conn)
            for name in reversed(views):  # dependents first: worker_uptime_24h uses v_heartbeats
                conn.execute(text(f"DROP VIEW IF EXISTS {name}"))
            for name, sql in views.items():
                conn.execute(text(f"CREATE VIEW {name} AS {sql}"))

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction, committed on success."""
        with self.sessions() as s, s.begin():
            yield s

    def dispose(self) -> None:
        """Close every pooled connection."""
        self.engine.dispose()


def _json_dumps(value: Any) -> str:
    return orjson.dumps(value).decode()


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")  # readers never block the writer
    cur.execute("PRAGMA synchronous=NORMAL")  # durable across process crashes in WAL mode
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


@dataclass
class _Op:
    kind: str  # "insert" | "update" | "call" | "mark" (flush: set done once written)
    model: Any = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    call: Callable[[Session], None] | None = None
    done: threading.Event | None = None

    @property
    def table(self) -> str:
        """The table it writes, for counts and logs (``call`` for an arbitrary write)."""
        return str(self.model.__table__.name) if self.model is not None else "call"

    @property
    def size(self) -> int:
        """Rows it writes (a ``call`` counts as one)."""
        return len(self.rows) or 1


# Why rows are lost: the queue was full (the caller's row was refused at once), the row's
# own write failed (retried alone, it still failed: a value the column cannot hold, a
# constraint), or the database was unavailable (its batch was given up, see BatchWriter).
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
        self._queue: queue.Queue[_Op | None] = queue.Queue(maxsize=max_queue)
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

    def _lose(self, reason: str, ops: list[_Op], error: str) -> None:
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

    def _put(self, op: _Op) -> None:
        self._idle.clear()
        try:
            self._queue.put_nowait(op)
        except queue.Full:
            self._lose("queue_full", [op], f"queue full: {self._queue.maxsize} operations waiting")

    def insert(self, model: Any, row: dict[str, Any]) -> None:
        """Queue one row to insert into ``model``'s table."""
        self._put(_Op("insert", model, [row]))

    def update(self, model: Any, row: dict[str, Any]) -> None:
        """Queue an update of one row by primary key (``row`` includes it)."""
        self._put(_Op("update", model, [row]))

    def call(self, fn: Callable[[Session], None]) -> None:
        """Queue an arbitrary write, run in the writer's transaction."""
        self._put(_Op("call", call=fn))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued so far is written (the batch being collected is
        written at once, without waiting for the rest of its interval)."""
        if not self._thread.is_alive():
            return self._queue.empty()
        done = threading.Event()
        self._idle.clear()
        try:
            self._queue.put(_Op("mark", done=done), timeout=timeout_s)
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

    def _drain(self, batch: list[_Op]) -> bool:
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

    def _transaction(self, ops: list[_Op]) -> None:
        """Write ``ops`` in one transaction (committed, or rolled back as a whole)."""
        with self.db.session() as s:
            segment: list[_Op] = []
            for op in ops:
                if op.kind == "call":
                    _write_rows(s, segment)
                    segment = []
                    assert op.call is not None
                    op.call(s)
                else:
                    segment.append(op)
            _write_rows(s, segment)

    def _write(self, batch: list[_Op]) -> None:
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


def _marked(batch: list[_Op]) -> bool:
    return any(op.kind == "mark" for op in batch)


def _write_rows(s: Session, ops: list[_Op]) -> None:
    """Inserts and updates of one batch segment: one executemany per table and kind."""
    if not ops:
        return
    inserts: dict[Table, list[dict[str, Any]]] = {}
    inserted: dict[Table, dict[Any, dict[str, Any]]] = {}  # table -> primary key -> row
    updates: dict[Table, dict[Any, dict[str, Any]]] = {}
    for op in ops:
        table = op.model.__table__
        pk = _pk_column(table)
        for row in op.rows:
            key = row.get(pk) if pk is not None else None
            if op.kind == "insert":
                row = dict(row)
                inserts.setdefault(table, []).append(row)
                if key is not None:
                    inserted.setdefault(table, {})[key] = row
                continue
            pending = inserted.get(table, {}).get(key)
            if pending is not None:  # inserted in this batch: insert the final values
                pending.update(row)
                continue
            earlier = updates.setdefault(table, {}).get(key)
            if earlier is not None:
                earlier.update(row)
            else:
                updates[table][key] = dict(row)
    conn = s.connection()
    for table in _ordered(inserts):
        rows = inserts[table]
        start = 0
        for i in range(1, len(rows) + 1):  # executemany takes the columns of its first row
            if i == len(rows) or rows[i].keys() != rows[start].keys():
                conn.execute(insert(table), rows[start:i])
                start = i
    for table in _ordered(updates):
        pk = _pk_column(table)
        assert pk is not None, f"updates of {table.name} need a single-column primary key"
        by_keys: dict[tuple[str, ...], list[dict[str, Any]]] = {}
        for row in updates[table].values():
            params = {k: v for k, v in row.items() if k != pk}
            params["_pk"] = row[pk]
            by_keys.setdefault(tuple(sorted(params)), []).append(params)
        stmt = update(table).where(table.c[pk] == bindparam("_pk"))
        for rows in by_keys.values():
            conn.execute(stmt, rows)


def _pk_column(table: Table) -> str | None:
    cols = list(table.primary_key.columns)
    return cols[0].key if len(cols) == 1 else None


def _ordered(by_table: dict[Table, Any]) -> list[Table]:
    """The tables of ``by_table``, parents before children (foreign keys)."""
    order = _table_order()
    return sorted(by_table, key=lambda t: order.get(t, len(order)))


@functools.cache
def _table_order() -> dict[Table, int]:
    return {t: i for i, t in enumerate(Base.metadata.sorted_tables)}
