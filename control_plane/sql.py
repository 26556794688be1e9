"""Read-only SQL over the worker history, for admins (CLI and admin API).

Read-only by construction, not by inspecting the text: on SQLite the connection is
opened read-only (``mode=ro``) with ``query_only`` on and an authorizer that allows
only reading (no writes, no ATTACH, no PRAGMA that changes anything); on PostgreSQL
the query runs in a ``READ ONLY`` transaction with a statement timeout, sent as one
prepared statement (the extended protocol), so that a second statement
(``COMMIT; DELETE ...``) cannot leave that transaction: the server refuses it.
For defence in depth on PostgreSQL, point the control plane at a database role that
may only read when it is used for this (see docs/schema.md).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from control_plane.errors import BadRequest

__all__ = ["QueryResult", "ReadOnlyViolation", "format_table", "run_readonly"]

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


class ReadOnlyViolation(BadRequest):
    """The query tried to change something."""


@dataclass
class QueryResult:
    """Columns, rows, and whether rows were cut at the limit."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool


def _authorizer(action: int, arg1: str | None, arg2: str | None, _db: str | None, _src: str | None) -> int:
    if action in _ALLOWED:
        return sqlite3.SQLITE_OK
    if action == sqlite3.SQLITE_PRAGMA:
        name = (arg1 or "").lower()
        if (name in _READ_PRAGMAS and arg2 is None) or name in _LOOKUP_PRAGMAS:
            return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


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
    timeout_s: float = 30.0,
) -> QueryResult:
    """Run one read-only query against the store; raise ReadOnlyViolation on any write."""
    if not query.strip():
        raise BadRequest("the query is empty")
    if url.startswith("sqlite"):
        return _run_sqlite(_sqlite_path(url), query, params, max_rows, timeout_s)
    return _run_sqlalchemy(url, query, params, max_rows, timeout_s)


def _run_sqlite(path: str, query: str, params: Any, max_rows: int, timeout_s: float) -> QueryResult:
    from pathlib import Path

    resolved = Path(path).resolve()
    if not resolved.exists():
        raise BadRequest(f"no database at {resolved}")
    conn = sqlite3.connect(f"{resolved.as_uri()}?mode=ro", uri=True, timeout=timeout_s)
    try:
        conn.execute("PRAGMA query_only = ON")
        conn.set_authorizer(_authorizer)
        try:
            cur = conn.execute(query, params)
        except sqlite3.DatabaseError as exc:
            text = str(exc)
            if any(m in text for m in ("not authorized", "authorization denied", "readonly", "read-only")):
                raise ReadOnlyViolation(f"refused: the SQL interface is read-only ({text})") from None
            raise BadRequest(f"SQL error: {text}") from None
        except sqlite3.Warning as exc:  # e.g. several statements at once
            raise BadRequest(f"SQL error: {exc}") from None
        columns = [d[0] for d in cur.description or ()]
        rows = cur.fetchmany(max_rows + 1)
        return QueryResult(columns, [tuple(r) for r in rows[:max_rows]], len(rows) > max_rows)
    finally:
        conn.close()


def _run_sqlalchemy(url: str, query: str, params: Any, max_rows: int, timeout_s: float) -> QueryResult:
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import DBAPIError

    engine = create_engine(url)
    try:
        if engine.dialect.name == "postgresql" and engine.dialect.driver != "psycopg":
            raise BadRequest(
                "the SQL interface on PostgreSQL needs the psycopg driver (postgresql+psycopg://)"
            )
        with engine.connect() as conn:
            conn.exec_driver_sql("SET TRANSACTION READ ONLY")
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {int(timeout_s * 1000)}")
            try:
                if engine.dialect.name == "postgresql":
                    columns, rows = _run_prepared(conn, query, params, max_rows)
                else:
                    cur = conn.execute(text(query), params or {})
                    columns = list(cur.keys()) if cur.returns_rows else []
                    rows = list(cur.fetchmany(max_rows + 1)) if cur.returns_rows else []
            except DBAPIError as exc:
                raise _refusal(str(exc.orig)) from None
            except Exception as exc:
                if type(exc).__module__.startswith("psycopg"):
                    raise _refusal(str(exc)) from None
                raise
            conn.rollback()
            return QueryResult(columns, [tuple(r) for r in rows[:max_rows]], len(rows) > max_rows)
    finally:
        engine.dispose()


def _refusal(message: str) -> BadRequest:
    message = message.strip()
    if "read-only" in message or "read only" in message:
        return ReadOnlyViolation(f"refused: the SQL interface is read-only ({message})")
    return BadRequest(f"SQL error: {message}")


def _run_prepared(conn: Any, query: str, params: Any, max_rows: int) -> tuple[list[str], list[Any]]:
    """The query as one prepared statement on the connection's psycopg connection,
    inside its read-only transaction (``:name`` parameters, as with SQLAlchemy)."""
    from sqlalchemy import text

    compiled = text(query).compile(dialect=conn.dialect)
    values = compiled.construct_params(dict(params or {}))
    raw = conn.connection.driver_connection
    with raw.cursor() as cur:
        cur.execute(str(compiled), values, prepare=True)  # one statement, or the server refuses
        columns = [d.name for d in cur.description or ()]
        rows = cur.fetchmany(max_rows + 1) if cur.description else []
    return columns, rows


def format_table(result: QueryResult) -> str:
    """Rows as an aligned text table."""
    cells = [[("" if v is None else str(v)) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=False)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()

    out = [line(result.columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    out.append(
        f"({len(cells)} row{'s' if len(cells) != 1 else ''}{', truncated' if result.truncated else ''})"
    )
    return "\n".join(out)
