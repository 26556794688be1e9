"""BatchWriter: one executemany per table and kind, folded updates, the same end state; one bad
row costs only itself, a database that is away costs two attempts a batch, every lost row counted."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, RequestRecord, Worker, WorkerEvent, utcnow
from control_plane.storage.writer import BatchWriter


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    db.create_schema()
    return db


def _statements(db: Database) -> list[str]:
    seen: list[str] = []

    @event.listens_for(db.engine, "before_cursor_execute")
    def _record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        if statement.split()[0] in ("INSERT", "UPDATE"):
            seen.append(
                statement.split()[0] + " " + statement.split()[2 if statement.startswith("INSERT") else 1]
            )

    return seen


def test_a_batch_is_one_statement_per_table_and_kind_with_the_same_end_state(tmp_path: Path) -> None:
    db = _db(tmp_path)
    with db.session() as s:
        s.add(Worker(id=1, name="http://b:1", http_url="http://b:1", grpc_url="b:2"))
    statements = _statements(db)
    writer = BatchWriter(db, flush_interval_s=0.3, batch_size=10_000)
    now = utcnow()
    # a worker and heartbeats for it, the heartbeat queued first (parents go first)
    writer.insert(Heartbeat, {"worker_id": 7, "at": now, "ok": True, "server_ready": True})
    writer.insert(Worker, {"id": 7, "name": "http://a:1", "http_url": "http://a:1", "grpc_url": "a:2"})
    for i in range(20):
        writer.insert(RequestRecord, {"id": f"r{i}", "request_id": f"q{i}", "api": "llava", "model": "m",
                                      "started_at": now, "status": "running", "attempts": 0})  # fmt: skip
        writer.insert(
            Heartbeat, {"worker_id": 7, "at": now, "ok": True, "latency_ms": float(i), "server_ready": True}
        )
        for wid in (1, 7):
            models = {"m": {"ready": True, "state": "READY"}}
            writer.update(Worker, {"id": wid, "queue_length": i, "models": models})
            if i % 2:
                writer.update(Worker, {"id": wid, "state": "healthy"})  # another set of columns
        writer.update(RequestRecord, {"id": f"r{i}", "status": "ok", "completion_tokens": i})
    assert writer.flush(10)
    writer.close()
    with db.session() as s:
        for wid in (1, 7):
            w = s.get(Worker, wid)
            assert w is not None
            assert (w.queue_length, w.state, w.models) == (
                19,
                "healthy",
                {"m": {"ready": True, "state": "READY"}},
            )
        beats = s.scalars(select(Heartbeat.latency_ms).order_by(Heartbeat.id)).all()
        assert beats == [None] + [float(i) for i in range(20)]
        reqs = s.execute(
            select(RequestRecord.id, RequestRecord.status, RequestRecord.completion_tokens)
        ).all()
        assert sorted(reqs) == sorted((f"r{i}", "ok", i) for i in range(20))
    assert writer.batches == 1 and writer.rows_written == 2 + 20 * 5 + 20
    # workers first (worker 7's updates folded into its insert), then heartbeats (two sets
    # of columns: two statements) and requests (their updates folded in), then worker 1's
    # updates folded into one
    assert statements[0] == "INSERT workers", statements
    assert sorted(statements[1:4]) == ["INSERT heartbeats"] * 2 + ["INSERT requests"], statements
    assert statements[4:] == ["UPDATE workers"], statements


def test_a_call_is_a_barrier(tmp_path: Path) -> None:
    db = _db(tmp_path)
    writer = BatchWriter(db, flush_interval_s=0.3)
    seen: list[Any] = []

    def read(s: Session) -> None:
        w = s.get(Worker, 1)
        seen.append(None if w is None else w.queue_length)

    writer.insert(Worker, {"id": 1, "name": "http://a:1", "http_url": "http://a:1", "grpc_url": "a:2"})
    writer.update(Worker, {"id": 1, "queue_length": 5})
    writer.call(read)
    writer.update(Worker, {"id": 1, "queue_length": 6})
    writer.call(read)
    assert writer.flush(10)
    writer.close()
    assert seen == [5, 6]


def test_rows_wait_for_the_interval_and_flush_writes_them_at_once(tmp_path: Path) -> None:
    import time

    db = _db(tmp_path)
    writer = BatchWriter(db, flush_interval_s=10.0)
    try:
        for i in range(5):
            writer.insert(Worker, {"id": i + 1, "name": f"http://a:{i}", "http_url": "x", "grpc_url": "a:2"})
        time.sleep(0.3)
        with db.session() as s:
            assert s.scalars(select(Worker.id)).all() == []  # still collecting the batch
        started = time.monotonic()
        assert writer.flush(5)
        assert time.monotonic() - started < 2
        with db.session() as s:
            assert s.scalars(select(Worker.id).order_by(Worker.id)).all() == [1, 2, 3, 4, 5]
        assert writer.batches == 1
    finally:
        writer.close()


def _request(i: int) -> dict[str, Any]:
    return {"id": f"r{i}", "request_id": f"q{i}", "api": "llava", "model": "m", "started_at": utcnow(),
            "status": "running", "attempts": 0}  # fmt: skip


def test_one_bad_row_costs_only_itself(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An INTEGER SQLite cannot hold (the security review's ``queue_length: 10**30``) in a
    worker's update: the batch is retried one operation at a time, only that row is lost,
    counted and logged (once per kind of failure)."""
    db = _db(tmp_path)
    with db.session() as s:
        s.add(Worker(id=1, name="http://a:1", http_url="http://a:1", grpc_url="a:2"))
    writer = BatchWriter(db, flush_interval_s=0.3, batch_size=10_000)
    lost: list[tuple[str, int]] = []
    writer.on_lost = lambda reason, rows: lost.append((reason, rows))
    calls: list[int] = []

    def event_row(s: Session) -> None:  # a call: retried in order, in its own transaction
        calls.append(s.scalar(select(func.count()).select_from(RequestRecord)) or 0)
        s.add(WorkerEvent(worker_id=1, from_state="unknown", to_state="healthy", reason="x"))

    try:
        with caplog.at_level(logging.WARNING, logger="control_plane.storage.db"):
            for i in range(6):
                writer.insert(RequestRecord, _request(i))
                writer.insert(Heartbeat, {"worker_id": 1, "at": utcnow(), "ok": True, "server_ready": True})
                if i == 2:
                    writer.update(Worker, {"id": 1, "queue_length": 10**30, "state": "healthy"})
                    writer.call(event_row)
            writer.update(Worker, {"id": 1, "speed": 3})
            assert writer.flush(10)
            with db.session() as s:
                assert s.scalar(select(func.count()).select_from(RequestRecord)) == 6
                assert s.scalar(select(func.count()).select_from(Heartbeat)) == 6
                assert s.scalar(select(func.count()).select_from(WorkerEvent)) == 1  # once, not twice
                w = s.get(Worker, 1)
                assert w is not None and (w.speed, w.queue_length, w.state) == (3, 0, "unknown")
            assert calls[-1] == 3  # the three requests queued before it were written before it ran
            assert writer.lost == {"queue_full": 0, "write_failed": 1, "db_unavailable": 0}
            assert writer.dropped == 1 and lost == [("write_failed", 1)]
            assert writer.describe()["dropped"] == 1 and writer.failed_batches == 1
            warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
            assert len(warnings) == 1 and "workers" in warnings[0] and "OverflowError" in warnings[0], (
                warnings
            )
            # the same failure again: counted, not logged again (rate-limited)
            writer.update(Worker, {"id": 1, "queue_length": 10**30})
            writer.insert(RequestRecord, _request(6))
            assert writer.flush(10)
            assert writer.lost["write_failed"] == 2 and len(lost) == 2
            assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
            with db.session() as s:
                assert s.scalar(select(func.count()).select_from(RequestRecord)) == 7
    finally:
        writer.close()


def test_a_full_queue_counts_what_it_drops(tmp_path: Path) -> None:
    db = _db(tmp_path)
    writer = BatchWriter(db, flush_interval_s=0.01, max_queue=2)
    release = threading.Event()

    def hold(_s: Session) -> None:  # holds the writer's thread
        release.wait(10)

    writer.call(hold)
    time.sleep(0.2)
    try:
        for i in range(5):
            writer.insert(RequestRecord, _request(i))
        assert writer.lost["queue_full"] == 3 and writer.dropped == 3
    finally:
        release.set()
        assert writer.flush(10)
        writer.close()


def _count_connects(db: Database) -> list[int]:
    attempts = [0]

    @event.listens_for(db.engine, "do_connect")
    def _connect(*_args: Any) -> None:
        attempts[0] += 1

    return attempts


@pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
def test_a_database_that_is_away_gives_the_batch_up_at_once(tmp_path: Path, kind: str) -> None:
    """Every row failing for the database itself: two attempts a batch (the batch, then
    its first operation alone), not one per row; every row counted as lost."""
    if kind == "sqlite":
        db = _db(tmp_path)
        db.dispose()
        for suffix in ("", "-wal", "-shm"):
            (tmp_path / f"w.db{suffix}").unlink(missing_ok=True)
        (tmp_path / "w.db").mkdir()  # "unable to open database file"
    else:
        from llava_node.launcher import free_port

        db = Database(f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none")  # connection refused
    attempts = _count_connects(db)
    writer = BatchWriter(db, flush_interval_s=0.05, batch_size=10_000)
    started = time.monotonic()
    try:
        for i in range(300):
            writer.insert(RequestRecord, _request(i))
            writer.update(RequestRecord, {"id": f"r{i}", "status": "ok"})
        assert writer.flush(20)
        assert time.monotonic() - started < 5
        assert writer.lost["db_unavailable"] == 600 and writer.rows_written == 0
        assert attempts[0] == 2, attempts
    finally:
        writer.close()


def test_status_and_metrics_show_lost_rows(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from control_plane.config import Settings
    from control_plane.main import create_app

    settings = Settings(data_dir=tmp_path, poll_interval_s=60, lease_period_s=120)
    with TestClient(create_app(settings)) as c:
        cp = c.app.state.cp  # type: ignore[attr-defined]
        cp.writer.insert(Heartbeat, {"worker_id": 1, "at": utcnow(), "ok": True, "queue_length": 10**30})
        cp.writer.insert(RequestRecord, _request(1))
        assert cp.writer.flush(10)
        writer = c.get("/admin/status").json()["writer"]
        assert writer["dropped"] == 1 and writer["lost"]["write_failed"] == 1, writer
        assert writer["rows"] >= 1 and writer["failed_batches"] == 1
        metrics = c.get("/metrics").text
        assert 'cp_db_rows_lost_total{reason="write_failed"} 1.0' in metrics
        assert 'cp_db_rows_lost_total{reason="queue_full"} 0.0' in metrics
