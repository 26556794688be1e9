"""The database: one engine and session factory, the schema and its dialect-specific views.

Writes go through :class:`~control_plane.storage.writer.BatchWriter`; reads (admin API,
SQL) run in worker threads with short sessions.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import orjson
from sqlalchemy import (
    Connection,
    Engine,
    create_engine,
    event,
    inspect,
    text,
)
from sqlalchemy.orm import Session, sessionmaker

from control_plane.storage.schema import Base

__all__ = ["VIEWS", "Database"]

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
        "v_routing_decisions": f"""
            SELECT d.*, w.name AS worker, a.name AS affinity_worker, {epoch("d.at")} AS at_unix,
                   {now} - {epoch("d.at")} AS age_s, {hour("d.at")} AS hour
            FROM routing_decisions d LEFT JOIN workers w ON w.id = d.worker_id
                 LEFT JOIN workers a ON a.id = d.affinity_worker_id""",
        "v_migrations": f"""
            SELECT m.*, f.name AS from_worker, t.name AS to_worker, {epoch("m.at")} AS at_unix,
                   {now} - {epoch("m.at")} AS age_s, {hour("m.at")} AS hour
            FROM migrations m LEFT JOIN workers f ON f.id = m.from_worker_id
                 LEFT JOIN workers t ON t.id = m.to_worker_id""",
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
