"""Fast tests with the app in-process (no nodes): auth, validation, routing, SQL, storage."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from control_plane.config import DispatchPolicy, Settings
from control_plane.errors import BadRequest
from control_plane.fleet.addresses import normalize_worker_url
from control_plane.fleet.workers import WorkerInfo, WorkerState
from control_plane.main import create_app
from control_plane.nodes.parsing import parse_load
from control_plane.serving.routing import Router
from control_plane.storage.db import Database
from control_plane.storage.schema import Heartbeat, Worker
from control_plane.storage.sql import ReadOnlyViolation, run_readonly
from control_plane.storage.writer import BatchWriter

ADMIN = "admin-secret"


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(
        data_dir=tmp_path, admin_token=ADMIN, api_keys=["k1", "k2"], poll_interval_s=60, lease_period_s=120
    )
    with TestClient(create_app(settings)) as c:
        yield c


@pytest.mark.parametrize("path", ["/admin/workers", "/admin/status"])
def test_admin_needs_the_token(client: TestClient, path: str) -> None:
    assert client.get(path).status_code == 401
    assert "Bearer" in client.get(path).json()["detail"]
    assert client.get(path, headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get(path, headers={"Authorization": f"Bearer {ADMIN}"}).status_code == 200


def test_admin_sql_and_worker_changes_need_the_token(client: TestClient) -> None:
    assert client.post("/admin/sql", json={"query": "SELECT 1"}).status_code == 401
    assert client.post("/admin/workers", json={"url": "http://127.0.0.1:9"}).status_code == 401
    assert client.delete("/admin/workers/1").status_code == 401
    ok = client.post(
        "/admin/sql", json={"query": "SELECT 1 AS one"}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert ok.json() == {"columns": ["one"], "rows": [[1]], "truncated": False}


def test_inference_api_keys(client: TestClient) -> None:
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"Authorization": "Bearer k2"}).status_code == 200
    # LLaVA's protocol stays open unless llava_api_requires_key is set (its clients send no key)
    assert client.post("/list_models").status_code == 200


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("", "empty"),
        ("10.0.0.5:8000", "no scheme"),
        ("ftp://10.0.0.5:8000", "scheme must be http or https"),
        ("http://user:pw@10.0.0.5:8000", "credentials"),
        ("http://10.0.0.5:8000/v2/models", "only scheme, host and port"),
        ("http://10.0.0.5:99999", "invalid port"),
        ("http://:8000", "no host"),
    ],
)
def test_worker_urls_are_validated(url: str, message: str) -> None:
    with pytest.raises(BadRequest) as err:
        normalize_worker_url(url)
    assert message in err.value.message


def test_worker_urls_are_normalized() -> None:
    assert normalize_worker_url(" HTTP://Node-1.Example:8000/ ") == "http://node-1.example:8000"


def test_admin_add_worker_validates(client: TestClient) -> None:
    h = {"Authorization": f"Bearer {ADMIN}"}
    r = client.post("/admin/workers", json={"url": "http://u:p@h:1"}, headers=h)
    assert r.status_code == 400 and "credentials" in r.json()["detail"]
    r = client.post("/admin/workers", json={"url": "http://h:1", "grpc_url": "nonsense"}, headers=h)
    assert r.status_code == 400 and "host:port" in r.json()["detail"]
    r = client.post("/admin/workers", json={"url": "http://h:1", "speed": 0}, headers=h)
    assert r.status_code == 400


def test_generate_endpoints_validate_before_routing(client: TestClient) -> None:
    r = client.post("/worker_generate_stream", content=b'{"model": "llava", "prompt": 5}')
    assert r.status_code == 400 and r.content.endswith(b"\0") and b'"error_code":5' in r.content
    r = client.post("/worker_generate_stream", json={"model": "llava", "prompt": "x", "images": ["a"] * 9})
    assert r.status_code == 400 and b"at most 8 are accepted" in r.content
    r = client.post("/worker_generate_stream", json={"model": "llava", "prompt": "x"})
    assert r.status_code == 404 and b'"error_code":2' in r.content
    r = client.post(
        "/v1/chat/completions",
        headers={"Authorization": "Bearer k1"},
        json={"model": "llava", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = client.get("/no/such/path")
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


def test_sql_is_read_only_by_construction(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'x.db'}")
    db.create_schema()
    url = db.url
    assert run_readonly(url, "SELECT COUNT(*) FROM workers").rows == [(0,)]
    assert run_readonly(url, "PRAGMA table_info(workers)").rows
    for query in [
        "INSERT INTO workers (name) VALUES ('x')",
        "DELETE FROM workers",
        "DROP VIEW v_requests",
        f"ATTACH DATABASE '{tmp_path / 'y.db'}' AS y",
        "PRAGMA user_version = 7",
        "PRAGMA journal_mode = DELETE",
        "CREATE TEMP TABLE t (x)",
        "VACUUM",
    ]:
        with pytest.raises(BadRequest) as err:
            run_readonly(url, query)
        assert (
            isinstance(err.value, ReadOnlyViolation)
            or "read-only" in err.value.message
            or "not authorized" in err.value.message
        ), query
    with pytest.raises(BadRequest, match="one statement"):
        run_readonly(url, "SELECT 1; SELECT 2")
    assert not (tmp_path / "y.db").exists()
    with sqlite3.connect(tmp_path / "x.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (0,)


def test_batch_writer_keeps_order_and_batches(tmp_path: Path) -> None:
    db = Database(f"sqlite:///{tmp_path / 'w.db'}")
    db.create_schema()
    with db.session() as s:
        s.add(Worker(id=1, name="http://a:1", http_url="http://a:1", grpc_url="a:2"))
    writer = BatchWriter(db, flush_interval_s=0.05, batch_size=100)
    for i in range(250):
        writer.insert(Heartbeat, {"worker_id": 1, "ok": True, "latency_ms": float(i), "server_ready": True})
        writer.update(Worker, {"id": 1, "queue_length": i})
    assert writer.flush(10)
    writer.close()
    rows = run_readonly(db.url, "SELECT latency_ms FROM heartbeats ORDER BY id").rows
    assert [r[0] for r in rows] == [float(i) for i in range(250)]
    assert run_readonly(db.url, "SELECT queue_length FROM workers").rows == [(249,)]
    assert 3 <= writer.batches < 250


def _worker(i: int, inflight: int = 0, speed: int = 1) -> WorkerInfo:
    return WorkerInfo(
        id=i,
        name=f"http://w{i}:1",
        http_url="",
        grpc_url="",
        metrics_url="",
        speed=speed,
        state=WorkerState.HEALTHY,
        inflight=inflight,
    )


def test_dispatch_policies() -> None:
    pool = [_worker(1, inflight=3), _worker(2, inflight=1), _worker(3, inflight=1, speed=4)]
    sq = Router(DispatchPolicy.SHORTEST_QUEUE, random.Random(0))
    assert {sq.choose(pool).id for _ in range(20)} == {3}  # type: ignore[union-attr]
    rr = Router(DispatchPolicy.ROUND_ROBIN)
    assert [rr.choose(pool).id for _ in range(6)] == [1, 2, 3, 1, 2, 3]  # type: ignore[union-attr]
    lottery = Router(DispatchPolicy.LOTTERY, random.Random(1))
    picks = [lottery.choose(pool).id for _ in range(600)]  # type: ignore[union-attr]
    assert picks.count(3) > picks.count(1) * 2  # weighted by speed
    p2 = Router(DispatchPolicy.POWER_OF_TWO, random.Random(2))
    # two distinct nodes drawn, the less loaded taken: the most loaded one never, the others both
    assert {p2.choose(pool).id for _ in range(50)} == {2, 3}  # type: ignore[union-attr]
    assert {p2.choose([_worker(1, 9), _worker(2, 0)]).id for _ in range(10)} == {2}  # type: ignore[union-attr]
    assert sq.choose(pool, exclude={1, 2, 3}) is None


def test_metrics_parsing() -> None:
    text = (
        "# HELP llava_engine_queued_requests Requests waiting\n"
        'llava_engine_queued_requests{model="llava_engine"} 3\n'
        'llava_engine_active_requests{model="llava_engine"} 5\n'
        'llava_engine_active_requests{model="other_engine"} 2\n'
        'nv_inference_count{model="llava"} 7\n'
    )
    assert parse_load(text) == (3, 7)


@pytest.mark.parametrize(
    ("delta", "finish"),
    [
        ({"role": "assistant", "content": ""}, None),
        ({"content": ' é "x"\n日本'}, None),
        ({}, "stop"),
        ({}, "length"),
    ],
)
def test_chunk_events_are_the_whole_object_serialized(delta: dict[str, str], finish: str | None) -> None:
    from control_plane.api.openai import ChunkEvents, _sse

    whole = _sse(
        {
            "id": "chatcmpl-req-1",
            "object": "chat.completion.chunk",
            "created": 1700000000,
            "model": 'llava "7b"',
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
    )
    assert ChunkEvents("chatcmpl-req-1", 1700000000, 'llava "7b"')(delta, finish) == whole
