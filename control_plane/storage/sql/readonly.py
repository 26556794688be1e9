"""Running one read-only, bounded query over the worker history (SQLite or PostgreSQL).

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

import math
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from control_plane.errors import BadRequest, ServiceError
from control_plane.storage.sql.results import (
    QueryHandle,
    QueryResult,
    ReadOnlyViolation,
    SqlInterrupted,
    SqlTimeout,
    row_size,
)

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
            n = row_size(row)
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
