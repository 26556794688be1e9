"""The worker history in SQLite: heartbeats, transitions, requests; admin queries; restarts."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from llava_node.launcher import PROJECT_ROOT, TritonNode
from tests.control_plane.conftest import admin_get, llava_stream, sql, sql_statements, wait_for
from tests.processes import ControlPlaneProcess

SCHEMA_DOC = PROJECT_ROOT / "docs" / "schema.md"


def run_sql_cli(data_dir: Path, query: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane", "sql", "--data-dir", str(data_dir), query],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    )


def test_history_tables_fill_and_documented_queries_answer(control_plane: ControlPlaneProcess) -> None:
    for i in range(3):
        llava_stream(
            f"{control_plane.url}/worker_generate_stream",
            # greedy: sampling (LLaVA's default temperature is 1) may end a stream early
            {
                "model": "llava",
                "prompt": f"USER: count {i} ASSISTANT:",
                "max_new_tokens": 5,
                "temperature": 0,
            },
        )
    llava_stream(f"{control_plane.url}/worker_generate_stream", {"model": "nope", "prompt": "x"})
    time.sleep(1.5)  # a few polls, and the batched writes
    counts = sql(
        control_plane,
        "SELECT (SELECT COUNT(*) FROM heartbeats) AS hb, (SELECT COUNT(*) FROM "
        "worker_events) AS ev, (SELECT COUNT(*) FROM requests) AS rq",
    )[0]
    assert counts["hb"] >= 4 and counts["ev"] >= 4 and counts["rq"] >= 4
    queries = sql_statements(SCHEMA_DOC)
    assert len(queries) >= 5
    results = [sql(control_plane, q) for q in queries]
    uptime, latency, per_hour = results[0], results[1], results[2]
    assert {r["worker"] for r in uptime} == {
        w["name"] for w in admin_get(control_plane, "/admin/workers")["workers"]
    }
    assert all(r["uptime_pct"] == 100.0 for r in uptime)
    assert all(r["p50_ms"] is not None and r["p95_ms"] >= r["p50_ms"] for r in latency)
    assert sum(r["requests"] for r in per_hour) >= 4
    assert sum(r["errors"] for r in per_hour) >= 1  # the request for a missing model
    ok = [r for r in sql(control_plane, "SELECT * FROM requests WHERE status = 'ok'")]
    assert ok and all(r["ttft_ms"] > 0 and r["completion_tokens"] == 5 and r["worker_id"] for r in ok), ok


def test_sql_command_prints_a_table_and_refuses_writes(control_plane: ControlPlaneProcess) -> None:
    out = run_sql_cli(control_plane.data_dir, "SELECT name, state FROM workers ORDER BY id")
    assert out.returncode == 0, out.stderr
    assert "name" in out.stdout and "healthy" in out.stdout and "(2 rows)" in out.stdout
    for statement in [
        "INSERT INTO workers (name, http_url, grpc_url) VALUES ('x', 'x', 'x')",
        "DELETE FROM heartbeats",
        "UPDATE workers SET state = 'removed'",
        "DROP TABLE requests",
        "ATTACH DATABASE '/tmp/other.db' AS other",
        "PRAGMA journal_mode = DELETE",
        "CREATE TABLE t (x INTEGER)",
    ]:
        refused = run_sql_cli(control_plane.data_dir, statement)
        assert refused.returncode == 2, statement
        assert "error" in refused.stderr, statement
    assert run_sql_cli(control_plane.data_dir, "SELECT COUNT(*) FROM workers").returncode == 0
    r = httpx.post(f"{control_plane.url}/admin/sql", json={"query": "DELETE FROM workers"})
    assert r.status_code == 400 and "read-only" in r.json()["detail"]


@pytest.mark.parametrize("query", ["SELEC nonsense", "SELECT * FROM no_such_table"])
def test_sql_errors_are_400(control_plane: ControlPlaneProcess, query: str) -> None:
    r = httpx.post(f"{control_plane.url}/admin/sql", json={"query": query})
    assert r.status_code == 400 and "SQL error" in r.json()["detail"]


def test_restart_keeps_registered_workers(fleet: list[TritonNode], tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "cp")
    cp.start()
    try:
        for n in fleet:
            r = httpx.post(
                f"{cp.url}/admin/workers", json={"url": n.http_url, "labels": {"zone": "a"}}, timeout=30
            )
            assert r.status_code == 201, r.text
            assert r.json()["state"] == "healthy" and r.json()["grpc_url"] == n.grpc_url
        cp.stop()
        cp.start()
        wait_for(
            lambda: (
                len([w for w in admin_get(cp, "/admin/workers")["workers"] if w["state"] == "healthy"]) == 2
            ),
            15,
            "workers back after restart",
        )
        workers = admin_get(cp, "/admin/workers")["workers"]
        assert sorted(w["name"] for w in workers) == sorted(n.http_url for n in fleet)
        assert all(w["labels"] == {"zone": "a"} for w in workers)
        # removal is remembered too, and the history stays
        wid = workers[0]["id"]
        assert httpx.delete(f"{cp.url}/admin/workers/{wid}").status_code == 200
        assert httpx.delete(f"{cp.url}/admin/workers/{wid}").status_code == 404
        cp.stop()
        cp.start()
        assert [w["id"] for w in admin_get(cp, "/admin/workers")["workers"]] == [workers[1]["id"]]
        shown = admin_get(cp, f"/admin/workers/{workers[1]['id']}")
        assert shown["events"] and shown["heartbeats"]
    finally:
        cp.stop()
