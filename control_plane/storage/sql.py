"""Read-only SQL over the worker history, for admins (CLI and admin API).

Read-only by construction, not by inspecting the text: on SQLite the connection is
opened read-only (``mode=ro``) with ``query_only`` on and an authorizer that allows
only reading (no writes, no ATTACH, no PRAGMA that changes anything, none of the
functions in :data:`UNSAFE_FUNCTIONS`); on PostgreSQL the query runs in a ``READ ONLY``
transaction with a statement timeout, sent as one statement of the extended protocol,
so that a second statement (``COMMIT; DELETE ...``) cannot leave that transaction: the
server refuses it. For defence in depth on PostgreSQL, point the control plane at a
database role that may only read when it is used for this (see docs/schema.md).

Bounded too, so that no query can burn the process: every query has a time limit (on
SQLite a progress handler checks a deadline, on PostgreSQL ``statement_timeout``), its
answer is cut at a row limit and at a byte limit counted while fetching (and on SQLite
no single value may be larger than the byte limit), and :class:`SqlExecutor` runs the
admin API's queries on threads of their own, a fixed number at a time, never on the
event loop's default executor; a running query can be interrupted from another thread
(:class:`QueryHandle`), which the app does when its client leaves and at shutdown.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

from control_plane.errors import BadRequest, Overloaded, ServiceError

__all__ = [
    "DEFAULT_MAX_RESULT_BYTES",
    "DEFAULT_TIMEOUT_S",
    "UNSAFE_FUNCTIONS",
    "QueryHandle",
    "QueryResult",
    "ReadOnlyViolation",
    "SqlBusy",
    "SqlExecutor",
    "SqlInterrupted",
    "SqlTimeout",
    "format_table",
    "json_value",
    "run_readonly",
]

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RESULT_BYTES = 8 * 1024 * 1024

# PRAGMAs whose argument names a table or index: they only read.
_LOOKUP_PRAGMAS = frozenset(
    {"table_info", "table_xinfo", "index_list", "index_info", "index_xinfo", "foreign_key_list"}
)
# PRAGMAs that only read when called without a value (with one, most of them set it).
_READ_PRAGMAS = _LOOKUP_PRAGMAS | frozenset(
    {
        "table_list",
        "integrity_check",
        "quick_check",
        "journal_mode",
        "page_count",
        "page_size",
        "user_version",
        "schema_version",
        "database_list",
        "compile_options",
    }
)
_ALLOWED = {
    sqlite3.SQLITE_SELECT,
    sqlite3.SQLITE_READ,
    sqlite3.SQLITE_FUNCTION,
    getattr(sqlite3, "SQLITE_RECURSIVE", 33),
}
# SQL functions that reach past the data: native pointers, native code, files, the
# connection's configuration. The rest of SQLite's functions only compute on values (their
# cost is bounded by the time limit, their results by the length limit).
UNSAFE_FUNCTIONS = frozenset(
    {
        "fts3_tokenizer",  # returns a native pointer (an address in this process); with two arguments installs one
        "fts5",  # hands out the FTS5 API's native pointer
        "load_extension",  # loads a shared library (native code) into the process
        "icu_load_collation",  # changes the connection (ICU builds)
        # the sqlite3 shell's file functions, where a build links them into the library
        "readfile",
        "writefile",
        "edit",
        "fsdir",
        "lsmode",
    }
)
# The progress handler runs every this many virtual-machine steps (about every 2 ms): often
# enough to stop on time, rarely enough that runaway queries on several threads do not keep
# taking the GIL from the event loop (every 10,000 steps, six of them slowed /health to 1 s).
_PROGRESS_STEPS = 100_000
# Rows fetched from the driver at a time while counting the answer's size.
_FETCH_CHUNK = 256

T = TypeVar("T")


class ReadOnlyViolation(BadRequest):
    """The query tried to change something."""


class SqlTimeout(BadRequest):
    """The query ran longer than the time limit (``sql_timeout_s``).

    400, not 408: the query itself is what is too slow, so sending it again will not help,
    and clients and proxies may repeat a request answered 408 on their own."""


class SqlBusy(Overloaded):
    """As many admin queries as allowed (``sql_max_concurrent``) are running: 429, at once."""


class SqlInterrupted(ServiceError):
    """The query was stopped from outside: the control plane is stopping, or its client left."""

    status_code = 503
    openai_type = "service_unavailable"


@dataclass
class QueryResult:
    """Columns, rows, and whether (and why) rows were cut: ``truncated_reason`` is
    ``max_rows`` or ``max_result_bytes``."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    truncated_reason: str | None = None
    result_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The admin API's answer: every value JSON-safe (see :func:`json_value`);
        ``truncated_reason`` only when the rows were cut."""
        body: dict[str, Any] = {
            "columns": self.columns,
            "rows": [[json_value(v) for v in row] for row in self.rows],
            "truncated": self.truncated,
        }
        if self.truncated:
            body["truncated_reason"] = self.truncated_reason
        return body


class QueryHandle:
    """Stops a running query from another thread: the reason is kept, and the driver is
    told at once (``sqlite3.Connection.interrupt``, PostgreSQL's cancel request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupt: Callable[[], None] | None = None
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self.reason is not None

    def bind(self, interrupt: Callable[[], None] | None) -> None:
        """Set (or clear, with None) what stops the query now running."""
        with self._lock:
            self._interrupt = interrupt

    def cancel(self, reason: str) -> None:
        """Stop the query (if one runs) and keep ``reason``; the first reason stays."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            interrupt = self._interrupt
        if interrupt is not None:
            with contextlib.suppress(Exception):  # the query ended and its connection closed meanwhile
                interrupt()


def _sqlite_path(url: str) -> str:
    path = url.split("///", 1)[1] if "///" in url else ""
    if not path or path == ":memory:":
        raise BadRequest("the SQL interface needs a file database")
    return path


def run_readonly(
    url: str,
    query: str,
    params: Sequence[Any] | dict[str, Any] = (),
    max_rows: int = 1000,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES,
    handle: QueryHandle | None = None,
) -> QueryResult:
    """Run one read-only query against the store.

    Raises ReadOnlyViolation on any write or unsafe function, SqlTimeout past
    ``timeout_s``, SqlInterrupted when ``handle`` is cancelled, BadRequest on any other SQL
    error. Rows are cut at ``max_rows`` and once their size (as JSON) would pass
    ``max_result_bytes``; the result says which limit cut them.
    """
    if not query.strip():
        raise BadRequest("the query is empty")
    handle = handle or QueryHandle()
    limits = _Limits(max_rows, max(1, max_result_bytes), timeout_s, handle)
    if url.startswith("sqlite"):
        return _run_sqlite(_sqlite_path(url), query, params, limits)
    return _run_sqlalchemy(url, query, params, limits)


@dataclass
class _Limits:
    max_rows: int
    max_bytes: int
    timeout_s: float
    handle: QueryHandle

    def stopped(self, message: str) -> ServiceError:
        """The error for a query the driver stopped (``message`` is the driver's)."""
        if self.handle.reason is not None:
            return SqlInterrupted(f"the query was interrupted: {self.handle.reason}")
        return SqlTimeout(
            f"the query ran longer than the limit of {self.timeout_s:g} s (sql_timeout_s) and was "
            f"stopped ({message.strip()})"
        )


def _collect(
    fetch: Callable[[], Sequence[Any]], limits: _Limits
) -> tuple[list[tuple[Any, ...]], str | None, int]:
    """Rows from ``fetch`` (a chunk at a time, empty at the end) up to the row and byte
    limits; the reason rows were cut, if they were; the answer's size."""
    rows: list[tuple[Any, ...]] = []
    size = 2
    while True:
        chunk = fetch()
        if not chunk:
            return rows, None, size
        for row in chunk:
            if len(rows) >= limits.max_rows:
                return rows, "max_rows", size
            n = _row_size(row)
            if size + n > limits.max_bytes:
                return rows, "max_result_bytes", size
            rows.append(tuple(row))
            size += n


def _run_sqlite(path: str, query: str, params: Any, limits: _Limits) -> QueryResult:
    resolved = Path(path).resolve()
    if not resolved.exists():
        raise BadRequest(f"no database at {resolved}")
    deadline = time.monotonic() + limits.timeout_s
    handle = limits.handle
    refused: list[str] = []

    def authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None) -> int:
        if action == sqlite3.SQLITE_FUNCTION:
            name = (arg2 or "").lower()
            if name in UNSAFE_FUNCTIONS:
                refused.append(name)
                return sqlite3.SQLITE_DENY
            return sqlite3.SQLITE_OK
        if action in _ALLOWED:
            return sqlite3.SQLITE_OK
        if action == sqlite3.SQLITE_PRAGMA:
            name = (arg1 or "").lower()
            if (name in _READ_PRAGMAS and arg2 is None) or name in _LOOKUP_PRAGMAS:
                return sqlite3.SQLITE_OK
        return sqlite3.SQLITE_DENY

    def progress() -> int:
        # Non-zero stops the statement ("interrupted"); the handle's reason or the
        # deadline says which error that becomes.
        return 1 if handle.reason is not None or time.monotonic() > deadline else 0

    # The busy timeout is the only wait the progress handler does not see: keep it short
    # (a WAL reader waits only while the database is being recovered).
    conn = sqlite3.connect(f"{resolved.as_uri()}?mode=ro", uri=True, timeout=min(limits.timeout_s, 5.0))
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(authorizer)
        conn.set_progress_handler(progress, _PROGRESS_STEPS)
        # No single string or blob, intermediate or not, may pass the answer's byte limit
        # (zeroblob(1e9), printf('%.*c', 1e9, 'x'), group_concat over a cross join...).
        length_limit = max(limits.max_bytes, 1024 * 1024)
        if hasattr(conn, "setlimit"):  # Python 3.11+
            which = getattr(sqlite3, "SQLITE_LIMIT_LENGTH", 0)
            if length_limit < conn.getlimit(which):
                conn.setlimit(which, length_limit)
        handle.bind(conn.interrupt)
        try:
            if handle.cancelled:
                raise limits.stopped("before it started")
            cur = conn.execute(query, params)
            columns = [d[0] for d in cur.description or ()]
            rows, reason, size = _collect(lambda: cur.fetchmany(_FETCH_CHUNK), limits)
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if refused:
                raise ReadOnlyViolation(
                    f"refused: the SQL interface does not allow the function {refused[0]}() "
                    "(it reaches past the data)"
                ) from None
            if "interrupted" in text:
                raise limits.stopped(text) from None
            if any(m in text for m in ("not authorized", "authorization denied", "readonly", "read-only")):
                raise ReadOnlyViolation(f"refused: the SQL interface is read-only ({text})") from None
            if "too big" in text:
                raise BadRequest(
                    f"SQL error: {text} (no value may be larger than {length_limit} bytes: "
                    "sql_max_result_bytes)"
                ) from None
            raise BadRequest(f"SQL error: {text}") from None
        except sqlite3.Warning as exc:  # e.g. several statements at once
            raise BadRequest(f"SQL error: {exc}") from None
        except (OverflowError, ValueError) as exc:  # a parameter SQLite cannot hold, a lone surrogate
            raise BadRequest(f"SQL error: {exc}") from None
        finally:
            handle.bind(None)
        return QueryResult(columns, rows, reason is not None, reason, size)
    finally:
        conn.close()


def _run_sqlalchemy(url: str, query: str, params: Any, limits: _Limits) -> QueryResult:
    from sqlalchemy import create_engine, make_url, text
    from sqlalchemy.exc import DBAPIError
    from sqlalchemy.pool import NullPool

    parsed = make_url(url)
    postgres = parsed.get_backend_name() == "postgresql"
    if postgres and parsed.get_driver_name() != "psycopg":
        raise BadRequest("the SQL interface on PostgreSQL needs the psycopg driver (postgresql+psycopg://)")
    # A server that does not answer must not hold the query's thread past its limit.
    connect_args = {"connect_timeout": max(1, math.ceil(limits.timeout_s))} if postgres else {}
    engine = create_engine(url, poolclass=NullPool, connect_args=connect_args)
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            if postgres:
                # SET LOCAL: for this transaction only, so it covers the query and its rows.
                conn.exec_driver_sql(f"SET LOCAL statement_timeout = {max(1, int(limits.timeout_s * 1000))}")
            try:
                if postgres:
                    columns, rows, reason, size = _run_streamed(conn, query, params, limits)
                else:
                    cur = conn.execute(text(query), params or {})
                    columns = list(cur.keys()) if cur.returns_rows else []
                    rows, reason, size = (
                        _collect(lambda: cur.fetchmany(_FETCH_CHUNK), limits)
                        if cur.returns_rows
                        else ([], None, 2)
                    )
            except DBAPIError as exc:
                raise _refusal(exc.orig, limits) from None
            except ServiceError:
                raise
            except (OverflowError, ValueError) as exc:  # a value the driver cannot send
                raise BadRequest(f"SQL error: {exc}") from None
            except Exception as exc:
                if type(exc).__module__.startswith("psycopg"):
                    raise _refusal(exc, limits) from None
                raise
            conn.rollback()
            return QueryResult(columns, rows, reason is not None, reason, size)
    finally:
        engine.dispose()


def _refusal(exc: BaseException | None, limits: _Limits) -> ServiceError:
    message = str(exc).strip()
    # 57014 query_canceled: statement_timeout, or the cancel request of QueryHandle.cancel
    if getattr(exc, "sqlstate", None) == "57014" or "canceling statement" in message:
        return limits.stopped(message)
    if "read-only" in message or "read only" in message:
        return ReadOnlyViolation(f"refused: the SQL interface is read-only ({message})")
    return BadRequest(f"SQL error: {message}")


def _run_streamed(
    conn: Any, query: str, params: Any, limits: _Limits
) -> tuple[list[str], list[tuple[Any, ...]], str | None, int]:
    """The query on the connection's psycopg connection, inside its read-only transaction
    (``:name`` parameters, as with SQLAlchemy), its rows streamed from the server so that
    the limits apply while they arrive (a plain cursor would first hold every row).

    ``stream`` sends one statement of the extended protocol: the server refuses a second
    one (``COMMIT; DELETE ...``). Leaving the stream early cancels the rest on the server.
    """
    from psycopg import capabilities
    from sqlalchemy import text

    compiled = text(query).compile(dialect=conn.dialect)
    values = compiled.construct_params(dict(params or {}))
    raw = conn.connection.driver_connection
    handle = limits.handle
    handle.bind(lambda: raw.cancel_safe(timeout=5.0))
    try:
        if handle.cancelled:
            raise limits.stopped("before it started")
        with raw.cursor() as cur:
            # chunks of rows from the server where libpq can (17+), else one row a message
            size = _FETCH_CHUNK if capabilities.has_stream_chunked() else 1
            stream = cur.stream(str(compiled), values, size=size)
            try:

                def fetch() -> list[Any]:
                    return [row for _, row in zip(range(_FETCH_CHUNK), stream, strict=False)]

                rows, reason, nbytes = _collect(fetch, limits)
            finally:
                stream.close()  # leaving early: psycopg cancels the rest and drains the connection
            columns = [d.name for d in cur.description or ()]
        if not columns:  # no row came: the stream never saw the columns; ask the server
            columns = _describe_columns(raw, query)
        return columns, rows, reason, nbytes
    finally:
        handle.bind(None)


def _describe_columns(raw: Any, query: str) -> list[str]:
    """The query's column names from the server (prepared, described, never run)."""
    from sqlalchemy import text
    from sqlalchemy.dialects.postgresql.psycopg import PGDialect_psycopg

    try:
        command = str(text(query).compile(dialect=PGDialect_psycopg(paramstyle="numeric_dollar")))
        pgconn = raw.pgconn
        prepared = pgconn.prepare(b"", command.encode(), None)  # the unnamed statement
        if prepared.error_message:
            return []
        described = pgconn.describe_prepared(b"")
        return [described.fname(i).decode() for i in range(described.nfields)]
    except Exception:  # only the column names of an empty answer are lost
        return []


def json_value(value: Any) -> Any:
    """``value`` as JSON can hold it: BLOBs (bytes) as ``{"blob_hex": "...", "bytes": n}``;
    infinities and NaN (which JSON lacks) as the strings ``"Infinity"``, ``"-Infinity"``,
    ``"NaN"``; decimals as numbers, timestamps as ISO 8601, intervals as seconds; anything
    else the driver returns as its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"blob_hex": data.hex(), "bytes": len(data)}
    if isinstance(value, Decimal):
        if not value.is_finite():
            return json_value(float(value))
        return int(value) if int(value.as_tuple().exponent) >= 0 else float(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def _value_size(value: Any) -> int:
    """About how many bytes ``value`` takes in the JSON answer (cheap, never much under)."""
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "replace"))) + 2
    if isinstance(value, (bytes, bytearray, memoryview)):
        return 2 * len(value) + 32  # as hex, in its marker object
    if isinstance(value, dict):
        return 2 + sum(_value_size(str(k)) + _value_size(v) + 2 for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 2 + sum(_value_size(v) + 1 for v in value)
    if isinstance(value, (int, float, Decimal)):
        return 24
    return len(str(value)) + 2


def _row_size(row: Sequence[Any]) -> int:
    return 3 + sum(_value_size(v) + 1 for v in row)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"X'{bytes(value).hex().upper()}'"  # SQL's BLOB literal: never raw bytes on a terminal
    return str(value)


def format_table(result: QueryResult) -> str:
    """Rows as an aligned text table (BLOBs as SQL literals ``X'0A1B'``)."""
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=False)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()

    out = [line(result.columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    cut = f", truncated at {result.truncated_reason or 'max_rows'}" if result.truncated else ""
    out.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''}{cut})")
    return "\n".join(out)


class SqlExecutor:
    """Runs the admin API's queries on ``max_concurrent`` threads of their own.

    Never the event loop's default executor (6 threads on a 2-core host), which polling,
    registration and the lifespan use: however many queries run, those keep their threads.
    A query beyond ``max_concurrent`` is answered at once (:class:`SqlBusy`, 429), never
    queued. A query whose client leaves is interrupted; :meth:`aclose` interrupts every
    running query, so that stopping the control plane does not wait for one.
    """

    def __init__(self, max_concurrent: int = 2, on_outcome: Callable[[str], None] | None = None) -> None:
        self.max_concurrent = max(1, max_concurrent)
        self.on_outcome = on_outcome
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="admin-sql")
        self._lock = threading.Lock()
        self._running: set[QueryHandle] = set()
        self._futures: set[asyncio.Future[Any]] = set()  # of the running jobs (for aclose)
        self._closed = False
        self.outcomes: dict[str, int] = dict.fromkeys(("ok", "error", "timeout", "busy", "interrupted"), 0)

    @property
    def running(self) -> int:
        """Queries whose threads are running now."""
        with self._lock:
            return len(self._running)

    def describe(self) -> dict[str, Any]:
        """Counts for ``/admin/status``."""
        return {"max_concurrent": self.max_concurrent, "running": self.running, **self.outcomes}

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def run(
        self,
        job: Callable[[QueryHandle], T],
        *,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.25,
    ) -> T:
        """Run ``job(handle)`` on one of the threads; ``disconnected`` is asked every
        ``poll_s`` while it runs, and the query is interrupted once it says True."""
        handle = QueryHandle()
        with self._lock:
            if self._closed:
                busy: ServiceError | None = SqlInterrupted("the control plane is stopping")
            elif len(self._running) >= self.max_concurrent:
                busy = SqlBusy(
                    f"{len(self._running)} admin SQL queries are running, the most allowed at once "
                    "(sql_max_concurrent): try again when one has ended"
                )
            else:
                busy = None
                self._running.add(handle)
        if busy is not None:
            self._count("busy" if isinstance(busy, SqlBusy) else "interrupted")
            raise busy
        try:
            future = asyncio.wrap_future(self._pool.submit(self._call, job, handle))
        except RuntimeError:  # the pool was shut down meanwhile
            with self._lock:
                self._running.discard(handle)
            self._count("interrupted")
            raise SqlInterrupted("the control plane is stopping") from None
        future.add_done_callback(_retrieve)  # no "exception never retrieved" when nobody awaits it
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=poll_s if disconnected else None)
                if done:
                    break
                if disconnected is not None and await disconnected():
                    handle.cancel("the client went away")
                    disconnected = None  # the thread ends at its next progress check
            result = future.result()
        except asyncio.CancelledError:
            handle.cancel("the request was cancelled")
            raise
        except SqlTimeout:
            self._count("timeout")
            raise
        except SqlInterrupted:
            self._count("interrupted")
            raise
        except BaseException:
            self._count("error")
            raise
        self._count("ok")
        return result

    def _call(self, job: Callable[[QueryHandle], T], handle: QueryHandle) -> T:
        try:
            return job(handle)
        finally:
            with self._lock:
                self._running.discard(handle)

    def interrupt_all(self, reason: str) -> int:
        """Interrupt every running query; how many there were."""
        with self._lock:
            handles = list(self._running)
        for h in handles:
            h.cancel(reason)
        return len(handles)

    def _stopping(self) -> None:
        with self._lock:
            self._closed = True
        self.interrupt_all("the control plane is stopping")

    def interrupt_on_signals(
        self, loop: asyncio.AbstractEventLoop, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> Callable[[], None]:
        """Interrupt the running queries (and refuse new ones) as soon as the process is
        told to stop, then hand the signal on to the handler that was there (uvicorn's).

        The lifespan's shutdown comes too late for that: uvicorn first waits for every
        open request to be answered, so a query whose client is still connected would hold
        the process up to its time limit. Returns what puts the previous handlers back.
        Only in the main thread (where signals are handled); elsewhere (TestClient) a no-op.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            # Not the lock here (the interrupted code may hold it): on the loop, soon.
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(self._stopping)
            before = previous.get(signum)
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        for sig in signals:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, before in previous.items():
                if signal.getsignal(sig) is handler and before is not None:
                    signal.signal(sig, before)

        return restore

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Refuse new queries, interrupt the running ones and wait (up to ``timeout_s``)
        until their threads have given them up."""
        with self._lock:
            self._closed = True
        self.interrupt_all("the control plane is stopping")
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._futures:
            await asyncio.wait(set(self._futures), timeout=timeout_s)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
