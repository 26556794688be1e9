"""Moving the worker history from SQLite to PostgreSQL with ``copy-db``."""

from __future__ import annotations

import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, ModelEvent, RequestRecord, Worker, WorkerEvent, utcnow
from control_plane.storage.sql import run_readonly
from llava_node.launcher import PROJECT_ROOT
from tests.control_plane.conftest import sql_statements
from tests.postgres import PostgresServer


def fill(db: Database) -> None:
    now = utcnow()
    with db.session() as s:
        for i in range(2):
            w = Worker(
                name=f"http://10.0.0.{i}:8000",
                http_url=f"http://10.0.0.{i}:8000",
                grpc_url=f"10.0.0.{i}:8001",
                labels={"gpu": "h100"},
                state="healthy",
                models={"llava": {"ready": True, "state": "READY"}},
                registered_at=now - timedelta(hours=2),
            )
            s.add(w)
            s.flush()
            s.add(
                WorkerEvent(worker_id=w.id, at=now, from_state="unknown", to_state="healthy", reason="poll")
            )
            for k in range(50):
                s.add(
                    Heartbeat(
                        worker_id=w.id,
                        at=now - timedelta(seconds=2 * k),
                        ok=k % 10 != 0,
                        latency_ms=1.0 + k,
                        server_ready=True,
                        models={"llava": True},
                    )
                )
            s.add(
                RequestRecord(
                    id=f"r{i}",
                    request_id=f"req-{i}",
                    api="llava",
                    model="llava",
                    worker_id=w.id,
                    started_at=now - timedelta(minutes=1),
                    ended_at=now,
                    ttft_ms=12.5,
                    completion_tokens=5,
                    status="ok",
                )
            )
            s.add(ModelEvent(model="llava", worker_id=w.id, at=now, event="loaded", duration_ms=900.0))


def copy_db(source: str, target: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane", "copy-db", "--from", source, "--to", target],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=PROJECT_ROOT,
    )


def test_copy_db_moves_the_history_from_sqlite_to_postgresql(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    sqlite_url = f"sqlite:///{tmp_path / 'control_plane.db'}"
    db = Database(sqlite_url)
    db.create_schema()
    fill(db)
    db.dispose()
    pg_url = postgres.create_database("moved")
    out = copy_db(sqlite_url, pg_url)
    assert out.returncode == 0, out.stderr
    assert "heartbeats: 100 rows" in out.stdout and "copied 108 rows" in out.stdout
    for query in sql_statements(PROJECT_ROOT / "docs" / "schema.md"):
        before, after = run_readonly(sqlite_url, query), run_readonly(pg_url, query)
        assert before.columns == after.columns, query
        normalized = [
            [float(v) if isinstance(v, (int, float)) or type(v).__name__ == "Decimal" else v for v in r]
            for r in after.rows
        ]
        expected = [[float(v) if isinstance(v, (int, float)) else v for v in r] for r in before.rows]
        if "age_s" in query or "hour" in query:
            assert len(normalized) == len(expected), query
        else:
            assert normalized == expected, query
    uptime = run_readonly(pg_url, sql_statements(PROJECT_ROOT / "docs" / "schema.md")[0])
    assert [float(r[3]) for r in uptime.rows] == [90.0, 90.0]
    # the copied ids are taken: new rows get the next ones
    moved = Database(pg_url)
    try:
        with moved.session() as s:
            w = Worker(name="http://10.0.0.9:8000", http_url="x", grpc_url="x", registered_at=utcnow())
            s.add(w)
            s.flush()
            assert w.id == 3
            s.add(Heartbeat(worker_id=w.id, at=utcnow(), ok=True))
    finally:
        moved.dispose()
    again = copy_db(sqlite_url, pg_url)
    assert again.returncode == 2 and "already has rows" in again.stderr
