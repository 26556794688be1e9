"""The dashboard's queries on SQLite and PostgreSQL alike: rows written at known times land
in the right buckets, percentiles and rates come out the same on both, and rows outside the
range are not read."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import insert

from control_plane.dashboard.queries import HistoryReader
from control_plane.dashboard.ranges import parse_range
from control_plane.dashboard.series import build_plots, state_segments
from control_plane.storage.db import Database
from control_plane.storage.schema import (
    Heartbeat,
    ModelEvent,
    RequestRecord,
    RoutingDecision,
    Worker,
    WorkerEvent,
)
from tests.postgres import PostgresServer

T0 = datetime(2026, 11, 30, 12, 0, 0)  # naive UTC, as the control plane writes
T0_UNIX = 1796040000.0  # 2026-11-30T12:00:00Z


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'control_plane.db'}"
    else:
        postgres: PostgresServer = request.getfixturevalue("postgres")
        url = postgres.create_database(
            "dash_" + request.node.name.lower()[-20:].strip("[]_").replace("[", "_")
        )
    database = Database(url)
    database.create_schema()
    try:
        yield database
    finally:
        database.dispose()


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def fill(db: Database) -> None:
    workers = [
        {"id": i, "name": f"http://n{i}:8000", "http_url": f"http://n{i}:8000", "grpc_url": f"n{i}:8001"}
        for i in (1, 2)
    ]
    requests = []
    for i in range(10):  # bucket 0 (0-60 s): 10 llava requests on node 1, TTFT 10..100 ms
        requests.append(
            {
                "id": f"a{i}",
                "request_id": f"a{i}",
                "api": "llava",
                "model": "llava",
                "worker_id": 1,
                "started_at": at(1 + i),
                "ended_at": at(2 + i),
                "ttft_ms": 10.0 * (i + 1),
                "prompt_tokens": 100,
                "completion_tokens": 11,
                "cached_tokens": 50 if i % 2 else 0,
                "status": "ok",
            }
        )
    requests.append(  # bucket 1: an error on node 2
        {
            "id": "e1",
            "request_id": "e1",
            "api": "openai",
            "model": "llava",
            "worker_id": 2,
            "started_at": at(70),
            "ended_at": at(71),
            "status": "error",
            "error": "worker http://n2:8000 failed: Stub process is not healthy",
        }
    )
    requests.append(  # before the range: never read
        {
            "id": "old",
            "request_id": "old",
            "api": "llava",
            "model": "llava",
            "worker_id": 1,
            "started_at": at(-500),
            "ended_at": at(-499),
            "ttft_ms": 1.0,
            "completion_tokens": 3,
            "status": "ok",
        }
    )
    with db.engine.begin() as conn:
        conn.execute(insert(Worker), workers)
        for row in requests:  # one at a time: their columns differ
            conn.execute(insert(RequestRecord), [row])
        conn.execute(
            insert(RoutingDecision),
            [
                {
                    "id": f"d{i}",
                    "request_id": f"a{i}",
                    "at": at(1 + i),
                    "model": "llava",
                    "policy": "cache_aware",
                    "reason": "affinity" if i else "least_loaded",
                    "worker_id": 1,
                    "candidates": [],
                }
                for i in range(10)
            ],
        )
        conn.execute(
            insert(WorkerEvent),
            [
                {"worker_id": 1, "at": at(-1000), "from_state": "", "to_state": "unknown", "reason": ""},
                {
                    "worker_id": 1,
                    "at": at(-999),
                    "from_state": "unknown",
                    "to_state": "healthy",
                    "reason": "",
                },
                {
                    "worker_id": 1,
                    "at": at(90),
                    "from_state": "healthy",
                    "to_state": "unhealthy",
                    "reason": "2 failed polls",
                },
            ],
        )
        conn.execute(
            insert(ModelEvent),
            [
                {
                    "model": "llava",
                    "worker_id": 2,
                    "at": at(30),
                    "event": "loaded",
                    "duration_ms": 4200.0,
                    "reason": "admin",
                }
            ],
        )
        conn.execute(
            insert(Heartbeat),
            [
                {"worker_id": 1, "at": at(s), "ok": True, "inflight": 2, "queue_length": 1, "active": 2}
                for s in (5, 65)
            ],
        )


def test_the_queries_answer_alike_on_both_databases(db: Database) -> None:
    fill(db)
    span = parse_range(since=str(T0_UNIX), until=str(T0_UNIX + 120), bucket="60", now=T0_UNIX + 120)
    rows = HistoryReader(db.url, db.dialect, timeout_s=10, max_result_bytes=1 << 20).read(span)
    assert not rows.truncated
    plots = build_plots(rows, span)
    requests = {t["name"]: t["y"] for t in plots["requests"]}
    assert requests == {"llava ok": [10.0, 0.0], "openai error": [0.0, 1.0]}  # per minute
    ttft = {t["name"]: t["y"] for t in plots["ttft_worker"]}
    assert ttft == {"http://n1:8000 p50": [50.0, None], "http://n1:8000 p95": [100.0, None]}
    tokens = {t["name"]: t["y"] for t in plots["tokens_api"]}
    assert tokens["llava p50"][0] == pytest.approx(
        10 * 1000 / (1000 - 50), rel=0.01
    )  # 10 tokens after the first
    assert {t["name"]: t["y"] for t in plots["errors"]} == {"node failed": [0.0, 1.0]}
    cache = {t["name"]: t["y"] for t in plots["cache"]}
    assert cache == {
        "http://n1:8000 requests hit": [50.0, None],
        "http://n1:8000 prompt tokens cached": [25.0, None],
    }
    assert {t["name"]: t["y"] for t in plots["routing"]} == {
        "affinity (cache_aware)": [9.0, 0.0],
        "least_loaded (cache_aware)": [1.0, 0.0],
    }
    loads = plots["model_loads"]
    assert [(t["name"], t["y"]) for t in loads] == [("llava loaded", [4200.0])]
    assert {t["name"]: t["y"] for t in plots["load"]}["http://n1:8000 in flight"] == [2.0, 2.0]
    segments = state_segments(rows, span, now=T0_UNIX + 200)["http://n1:8000"]
    assert [(s[0] - T0_UNIX, s[1] - T0_UNIX, s[2]) for s in segments] == [
        (0.0, pytest.approx(90.0, abs=0.01), "healthy"),
        (pytest.approx(90.0, abs=0.01), 120.0, "unhealthy"),
    ]
