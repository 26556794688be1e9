"""BatchWriter: one executemany per table and kind, folded updates, the same end state."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import event, select
from sqlalchemy.orm import Session

from control_plane.db import BatchWriter, Database
from control_plane.schema import Heartbeat, RequestRecord, Worker, utcnow


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
