"""Routing decisions in SQL: one ``routing_decisions`` row per request through real nodes,
naming the node that served it and why; the table and ``requests.cached_tokens`` added to
an older database (SQLite and PostgreSQL); decisions deleted with their requests by
retention."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, insert, select, text

from control_plane.serving.routing import REASONS
from control_plane.storage.db import VIEWS, Database
from control_plane.storage.retention import RetentionLoop, RetentionPolicy
from control_plane.storage.schema import RequestRecord, RoutingDecision, Worker, utcnow
from control_plane.storage.sql import run_readonly
from llava_node.launcher import PROJECT_ROOT
from tests.control_plane.conftest import llava_stream, sql, sql_statements, wait_for
from tests.media import image_bytes
from tests.postgres import PostgresServer
from tests.processes import ControlPlaneProcess


def chat(cp: ControlPlaneProcess, messages: list[dict[str, object]]) -> dict[str, object]:
    r = httpx.post(
        f"{cp.url}/v1/chat/completions",
        json={"model": "llava", "messages": messages, "max_tokens": 3, "temperature": 0},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_every_request_has_a_decision_naming_the_node_that_served_it(
    control_plane: ControlPlaneProcess,
) -> None:
    image = "data:image/png;base64," + base64.b64encode(image_bytes(color=(10, 120, 60))).decode()
    messages: list[dict[str, object]] = [
        {"role": "system", "content": "Routing decisions test: describe the image in one sentence."},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": "What is it?"},
            ],
        },
    ]
    answers = []
    for follow_up in ["", "And its colours?"]:
        if follow_up:
            messages.append({"role": "user", "content": follow_up})
        answers.append(chat(control_plane, messages))
        reply = answers[-1]["choices"][0]["message"]["content"]  # type: ignore[index]
        messages.append({"role": "assistant", "content": reply})
    status, frames = llava_stream(
        f"{control_plane.url}/worker_generate_stream",
        {
            "model": "llava",
            "prompt": "USER: routing decisions ASSISTANT:",
            "max_new_tokens": 2,
            "temperature": 0,
        },
    )
    assert status == 200 and "cached_tokens" in frames[-1]["usage"]
    ids = [str(a["id"]).removeprefix("chatcmpl-") for a in answers]
    wait_for(
        lambda: len(sql(control_plane, "SELECT id FROM requests WHERE status = 'running'")) == 0, 10, "ended"
    )
    rows = sql(
        control_plane,
        "SELECT r.request_id, r.worker_id AS served_by, r.cached_tokens AS request_cached, d.attempt, "
        "d.worker_id, d.reason, d.policy, d.expected_hit_tokens, d.cached_tokens, d.candidates "
        "FROM requests r JOIN routing_decisions d ON d.request_id = r.id "
        f"WHERE r.request_id IN ('{ids[0]}', '{ids[1]}') ORDER BY r.started_at",
    )
    assert [r["request_id"] for r in rows] == ids  # one decision each: nothing failed
    for row, answer in zip(rows, answers, strict=True):
        assert row["attempt"] == 1 and row["worker_id"] == row["served_by"] and row["policy"] == "cache_aware"
        assert row["reason"] in REASONS and row["reason"] != "retry"
        assert row["cached_tokens"] == row["request_cached"] >= 0
        usage = answer["usage"]
        assert usage["prompt_tokens_details"] == {"cached_tokens": row["cached_tokens"]}  # type: ignore[index]
        assert {c["worker_id"] for c in json.loads(row["candidates"])} == {1, 2}
    # the second turn starts as the first did (the image, the system prompt): the node of the first
    assert rows[1]["reason"] == "affinity" and rows[1]["expected_hit_tokens"] > 0
    assert rows[1]["worker_id"] == rows[0]["worker_id"]
    everything = sql(
        control_plane,
        "SELECT COUNT(*) AS n FROM requests r WHERE r.status = 'ok' AND NOT EXISTS "
        "(SELECT 1 FROM routing_decisions d WHERE d.request_id = r.id AND d.worker_id = r.worker_id)",
    )
    assert everything == [{"n": 0}]  # every request served has the decision that sent it there


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'control_plane.db'}"
    postgres: PostgresServer = request.getfixturevalue("postgres")
    return postgres.create_database("rd_" + request.node.name.lower().replace("[", "_").replace("]", "")[:40])


@pytest.fixture()
def db(database_url: str) -> Iterator[Database]:
    db = Database(database_url)
    try:
        yield db
    finally:
        db.dispose()


def test_an_older_database_gains_the_table_and_the_column(db: Database) -> None:
    db.create_schema()
    with db.engine.begin() as conn:  # as an older version left it
        for view in reversed(VIEWS):
            conn.execute(text(f"DROP VIEW {view}"))
        conn.execute(text("DROP TABLE routing_decisions"))
        conn.execute(text("ALTER TABLE requests DROP COLUMN cached_tokens"))
        conn.execute(insert(Worker), [{"id": 1, "name": "w", "http_url": "w", "grpc_url": "w:1"}])
        conn.execute(
            text(
                "INSERT INTO requests (id, request_id, api, model, replica, started_at, status, attempts) "
                "VALUES ('old', 'r-old', 'llava', 'llava', 'a', :at, 'ok', 1)"
            ),
            {"at": utcnow()},
        )
    db.create_schema()
    with db.engine.begin() as conn:
        conn.execute(
            insert(RoutingDecision),
            [
                {
                    "id": "d1",
                    "request_id": "old",
                    "model": "llava",
                    "policy": "cache_aware",
                    "reason": "affinity",
                    "worker_id": 1,
                    "candidates": [{"worker_id": 1, "load": 0.0, "expected_hit_tokens": 9}],
                }
            ],
        )
    rows = run_readonly(
        db.url, "SELECT request_id, worker, reason, cached_tokens FROM v_routing_decisions"
    ).rows
    assert rows == [("old", "w", "affinity", None)]
    assert run_readonly(db.url, "SELECT cached_tokens FROM requests").rows == [(None,)]
    for query in sql_statements(PROJECT_ROOT / "docs" / "schema.md"):
        run_readonly(db.url, query)  # every documented query runs on it


def test_retention_deletes_the_decisions_with_their_requests(db: Database) -> None:
    db.create_schema()
    now = utcnow()
    with db.engine.begin() as conn:
        conn.execute(insert(Worker), [{"id": 1, "name": "w", "http_url": "w", "grpc_url": "w:1"}])
        conn.execute(
            insert(RequestRecord),
            [
                {
                    "id": f"r{i}",
                    "request_id": f"r{i}",
                    "api": "llava",
                    "model": "llava",
                    "started_at": now - timedelta(days=40 if i < 3 else 1),
                    "status": "ok",
                }
                for i in range(5)
            ],
        )
        conn.execute(
            insert(RoutingDecision),
            [
                {
                    "id": f"d{i}-{k}",
                    "request_id": f"r{i}",
                    "attempt": k,
                    "model": "llava",
                    "policy": "cache_aware",
                    "reason": "least_loaded",
                    "worker_id": 1,
                    "candidates": [],
                }
                for i in range(5)
                for k in (1, 2)
            ],
        )
    loop = RetentionLoop(db, [RetentionPolicy(RequestRecord.__table__, "started_at", 30)], batch_rows=2)  # type: ignore[arg-type]
    assert loop.run_once() == {"requests": 3}
    with db.engine.connect() as conn:
        left = conn.execute(
            select(RoutingDecision.request_id, func.count()).group_by(RoutingDecision.request_id)
        )
        assert sorted(left.all()) == [("r3", 2), ("r4", 2)]
