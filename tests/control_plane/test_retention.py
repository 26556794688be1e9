"""Retention: old heartbeats and requests go, recent ones stay, in bounded batches, on
SQLite and PostgreSQL (replicas at once too); the loop starts and stops with the app."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import event, func, insert, select

from control_plane.config import Settings
from control_plane.main import create_app
from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, RequestRecord, Worker, utcnow
from tests.postgres import PostgresServer


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control_plane.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    name = "ret_" + request.node.name.lower().replace("[", "_").replace("]", "").replace("-", "_")[:40]
    return postgres.create_database(name)


@pytest.fixture()
def db(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    db.create_schema()
    try:
        yield db
    finally:
        db.dispose()


def seed(db: Database, old_beats: int, new_beats: int, old_requests: int, new_requests: int) -> None:
    """Heartbeats 20 and 1 days old, requests 40 and 10 days old."""
    now = utcnow()
    with db.engine.begin() as conn:
        if conn.execute(select(func.count()).select_from(Worker.__table__)).scalar_one() == 0:
            # removed: an app on this database does not poll it (its own heartbeats would count)
            worker = {"id": 1, "name": "w", "http_url": "w", "grpc_url": "w:1", "state": "removed"}
            conn.execute(insert(Worker), [{**worker, "removed_at": now}])
        beats = [
            {"worker_id": 1, "at": now - timedelta(days=20 if i < old_beats else 1), "ok": True}
            for i in range(old_beats + new_beats)
        ]
        if beats:
            conn.execute(insert(Heartbeat), beats)
        base = conn.execute(select(func.count()).select_from(RequestRecord.__table__)).scalar_one()
        reqs = [
            {
                "id": f"r{base + i}",
                "request_id": f"q{i}",
                "api": "llava",
                "model": "m",
                "started_at": now - timedelta(days=40 if i < old_requests else 10),
                "status": "ok",
            }
            for i in range(old_requests + new_requests)
        ]
        if reqs:
            conn.execute(insert(RequestRecord), reqs)


def counts(db: Database) -> tuple[int, int]:
    with db.engine.connect() as conn:
        beats = conn.execute(select(func.count()).select_from(Heartbeat.__table__)).scalar_one()
        reqs = conn.execute(select(func.count()).select_from(RequestRecord.__table__)).scalar_one()
    return int(beats), int(reqs)


def retention(db: Database, **kwargs: Any) -> Any:
    from control_plane.storage.retention import RetentionLoop

    settings = Settings(**{"heartbeat_retention_days": 14, "request_retention_days": 30, **kwargs})
    return RetentionLoop.from_settings(db, settings)


def test_old_rows_go_recent_ones_stay_in_batches(db: Database) -> None:
    seed(db, old_beats=25, new_beats=5, old_requests=12, new_requests=3)
    deletes: list[tuple[str, Any]] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, parameters: Any, *_args: Any) -> None:
        if statement.lstrip().upper().startswith("DELETE"):
            deletes.append((statement.split()[2], parameters))

    loop = retention(db, retention_batch_rows=10, retention_pause_s=0)
    assert loop.run_once() == {"heartbeats": 25, "requests": 12}
    assert counts(db) == (5, 3)
    # 10 + 10 + 5 heartbeats, 10 + 2 requests: each statement at most 10 rows, its own transaction
    assert [table for table, _ in deletes] == ["heartbeats"] * 3 + ["requests"] * 2, deletes
    for _, params in deletes:
        assert 10 in (params.values() if isinstance(params, dict) else params), params
    status = loop.describe()
    assert status["deleted"] == {"heartbeats": 25, "requests": 12} and status["statements"] == 5
    assert status["last_error"] is None and status["passes"] == 1
    # nothing left to do: one statement a table, nothing deleted
    assert loop.run_once() == {"heartbeats": 0, "requests": 0}
    assert counts(db) == (5, 3)


def test_zero_days_keeps_a_table(db: Database) -> None:
    seed(db, old_beats=4, new_beats=1, old_requests=4, new_requests=1)
    loop = retention(db, heartbeat_retention_days=0)
    assert loop.run_once() == {"requests": 4}
    assert counts(db) == (5, 1)
    assert retention(db, heartbeat_retention_days=0, request_retention_days=0).run_once() == {}


def test_replicas_pruning_at_once_split_the_rows(postgres: PostgresServer) -> None:
    """Several replicas share a PostgreSQL database: pruning at once, each row goes once."""
    database_url = postgres.create_database("ret_replicas")
    db = Database(database_url)
    db.create_schema()
    seed(db, old_beats=3000, new_beats=10, old_requests=0, new_requests=0)
    replicas = [Database(database_url) for _ in range(3)]
    loops = [retention(r, retention_batch_rows=100, retention_pause_s=0) for r in replicas]
    done: list[dict[str, int]] = []
    threads = [threading.Thread(target=lambda lp=lp: done.append(lp.run_once())) for lp in loops]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for r in replicas:
        r.dispose()
    assert [lp.last_error for lp in loops] == [None] * 3
    assert sum(d["heartbeats"] for d in done) == 3000  # each row deleted once, by one of them
    assert counts(db)[0] == 10
    db.dispose()


def _status(c: TestClient) -> dict[str, Any]:
    body: dict[str, Any] = c.get("/admin/status").json()
    return body


def test_the_loop_starts_and_stops_with_the_app(tmp_path: Path, database_url: str) -> None:
    db = Database(database_url)
    db.create_schema()
    seed(db, old_beats=30, new_beats=4, old_requests=7, new_requests=2)
    settings = Settings(
        data_dir=tmp_path,
        database_url=database_url,
        poll_interval_s=60,
        lease_period_s=120,
        retention_interval_s=0.2,
        retention_batch_rows=8,
    )
    app = create_app(settings)
    with TestClient(app) as c:
        deadline = time.monotonic() + 10
        while counts(db) != (4, 2) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counts(db) == (4, 2)
        status = _status(c)["retention"]
        assert status["deleted"] == {"heartbeats": 30, "requests": 7}, status
        assert status["batch_rows"] == 8 and status["passes"] >= 1
        metrics = c.get("/metrics").text
        assert 'cp_retention_deleted_rows_total{table="heartbeats"} 30.0' in metrics
        seed(db, old_beats=3, new_beats=0, old_requests=0, new_requests=0)  # the next pass takes them
        deadline = time.monotonic() + 5
        while counts(db)[0] != 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert counts(db)[0] == 4
        loop = app.state.cp.retention
    assert loop._task is None  # stopped by the lifespan
    time.sleep(0.1)
    assert not [t for t in threading.enumerate() if t.name.startswith("retention") and t.is_alive()]
    passes = loop.passes
    seed(db, old_beats=2, new_beats=0, old_requests=0, new_requests=0)
    time.sleep(0.5)
    assert loop.passes == passes and counts(db)[0] == 6  # nothing runs after the app stopped
    db.dispose()


def test_sqlite_writer_and_retention_share_the_file(tmp_path: Path) -> None:
    """The batch writer keeps writing while retention deletes (SQLite: one writer at a time)."""
    from control_plane.storage.writer import BatchWriter

    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    db.create_schema()
    seed(db, old_beats=20_000, new_beats=0, old_requests=0, new_requests=0)
    writer = BatchWriter(db, flush_interval_s=0.01)
    loop = retention(db, retention_batch_rows=1000, retention_pause_s=0.01)
    t = threading.Thread(target=loop.run_once)
    t.start()
    for _ in range(200):
        writer.insert(Heartbeat, {"worker_id": 1, "at": utcnow(), "ok": True})
        time.sleep(0.001)
    assert writer.flush(10)
    t.join(30)
    writer.close()
    assert loop.deleted["heartbeats"] == 20_000 and sum(writer.lost.values()) == 0
    with sqlite3.connect(tmp_path / "w.db") as conn:
        assert conn.execute("SELECT COUNT(*) FROM heartbeats").fetchone() == (200,)
    db.dispose()
