"""Admin SQL cannot burn the process: time limit, byte limit, safe values, unsafe
functions refused, its own bounded threads, interrupted when its client leaves and at
shutdown. SQLite in-process; PostgreSQL with the ``postgres`` fixture where it differs."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from control_plane.config import Settings
from control_plane.errors import BadRequest, ServiceError
from control_plane.main import create_app
from control_plane.storage.db import Database
from control_plane.storage.sql import run_readonly
from llava_node.launcher import PROJECT_ROOT
from tests.postgres import PostgresServer

# Never ends: SQLite counts forever (the security review's query).
RUNAWAY = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) SELECT count(*) FROM c"


def _db(tmp_path: Path) -> Database:
    db = Database(f"sqlite:///{tmp_path / 'control_plane.db'}")
    db.create_schema()
    return db


def _in_thread(fn: Callable[[], Any], timeout_s: float) -> Any:
    """``fn()`` in a daemon thread: its result or exception, or AssertionError once
    ``timeout_s`` passed (a query that never ends must fail the test, not hang it)."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:
            out["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout_s)
    assert not t.is_alive(), f"still running after {timeout_s} s"
    if "error" in out:
        raise out["error"]
    return out["value"]


def _app(tmp_path: Path, **overrides: Any) -> TestClient:
    settings = Settings(data_dir=tmp_path, poll_interval_s=60, lease_period_s=120, **overrides)
    return TestClient(create_app(settings))


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with _app(tmp_path, sql_timeout_s=0.5, sql_max_result_bytes=64 * 1024) as c:
        yield c


# -- SQLite ---------------------------------------------------------------------------


def test_a_runaway_query_is_stopped_at_the_time_limit(tmp_path: Path) -> None:
    url = _db(tmp_path).url
    started = time.monotonic()
    with pytest.raises(BadRequest) as err:
        _in_thread(lambda: run_readonly(url, RUNAWAY, timeout_s=0.5), 10)
    elapsed = time.monotonic() - started
    assert elapsed < 3, elapsed
    assert err.value.status_code == 400
    assert "0.5 s" in err.value.message and "sql_timeout_s" in err.value.message, err.value.message


def test_the_api_answers_a_runaway_query_with_a_400_naming_the_limit(client: TestClient) -> None:
    started = time.monotonic()
    r = _in_thread(lambda: client.post("/admin/sql", json={"query": RUNAWAY}), 10)
    assert time.monotonic() - started < 3
    assert r.status_code == 400, r.text
    assert "sql_timeout_s" in r.json()["detail"] and "0.5 s" in r.json()["detail"]
    assert client.get("/admin/status").json()["sql"]["timeout"] == 1
    assert 'cp_admin_sql_queries_total{outcome="timeout"} 1.0' in client.get("/metrics").text


def test_blobs_and_non_finite_numbers_come_back_as_json(client: TestClient) -> None:
    r = client.post(
        "/admin/sql",
        json={"query": "SELECT x'00ff10' AS b, zeroblob(2) AS z, 1e999 AS inf, -1e999 AS ninf, 'é' AS t"},
    )
    assert r.status_code == 200, r.text
    assert r.json()["rows"] == [
        [{"blob_hex": "00ff10", "bytes": 3}, {"blob_hex": "0000", "bytes": 2}, "Infinity", "-Infinity", "é"]
    ]


@pytest.mark.parametrize(
    ("query", "function"),
    [
        ("SELECT fts3_tokenizer('simple')", "fts3_tokenizer"),  # a native pointer
        ("SELECT hex(fts3_tokenizer('simple'))", "fts3_tokenizer"),
        ("SELECT load_extension('/tmp/x.so')", "load_extension"),
        ("SELECT LOAD_EXTENSION('/tmp/x.so')", "load_extension"),
    ],
)
def test_unsafe_functions_are_refused(client: TestClient, query: str, function: str) -> None:
    r = client.post("/admin/sql", json={"query": query})
    assert r.status_code == 400, r.text
    assert function in r.json()["detail"] and "refused" in r.json()["detail"]


def test_answers_are_cut_at_the_byte_limit(client: TestClient) -> None:
    # 5,000 rows of ~1 kB: ~5 MB, far past this app's 64 KiB
    query = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c LIMIT 5000) "
        "SELECT x, printf('%.*c', 1000, 'y') AS pad FROM c"
    )
    r = client.post("/admin/sql", json={"query": query, "max_rows": 100_000})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] is True and body["truncated_reason"] == "max_result_bytes"
    assert 0 < len(body["rows"]) < 100 and len(r.content) <= 64 * 1024
    # the row limit says so too, and a small answer is as before (no extra field)
    r = client.post("/admin/sql", json={"query": query, "max_rows": 3})
    assert r.json()["truncated_reason"] == "max_rows" and len(r.json()["rows"]) == 3
    assert client.post("/admin/sql", json={"query": "SELECT 1 AS one"}).json() == {
        "columns": ["one"],
        "rows": [[1]],
        "truncated": False,
    }


def test_no_single_value_may_pass_the_byte_limit(tmp_path: Path) -> None:
    url = _db(tmp_path).url
    with pytest.raises(BadRequest, match="too big") as err:
        run_readonly(url, "SELECT length(zeroblob(500000000))", max_result_bytes=2 * 1024 * 1024)
    assert "sql_max_result_bytes" in err.value.message


def test_runaway_queries_leave_the_app_and_its_default_executor_free(tmp_path: Path) -> None:
    """Six runaway queries (as many as asyncio's default executor has threads on a
    2-core host) run; the app still answers, registers and reads through the default
    executor; a seventh query is refused at once; stopping the app interrupts all six."""
    n = 6
    app = _app(tmp_path, sql_max_concurrent=n, sql_timeout_s=120)
    app.__enter__()
    answers: list[Any] = []  # responses
    runners = [
        threading.Thread(
            target=lambda: answers.append(app.post("/admin/sql", json={"query": RUNAWAY})), daemon=True
        )
        for _ in range(n)
    ]
    stopped = False
    try:
        for t in runners:
            t.start()
        deadline = time.monotonic() + 10
        cp = app.app.state.cp  # type: ignore[attr-defined]
        while getattr(getattr(cp, "sql", None), "running", n) < n and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # today's code has no counter: give its queries time to take their threads
        assert not answers, [a.text for a in answers]  # all six still running

        assert _in_thread(lambda: app.get("/health"), 5).status_code == 200
        added = _in_thread(lambda: app.post("/admin/workers", json={"url": "http://127.0.0.1:9"}), 5)
        assert added.status_code == 201, added.text
        shown = _in_thread(lambda: app.get(f"/admin/workers/{added.json()['id']}"), 5)
        assert shown.status_code == 200 and shown.json()["events"], shown.text

        async def default_executor_free() -> float:
            started = time.monotonic()
            await asyncio.wait_for(asyncio.to_thread(time.sleep, 0.01), 2)
            return time.monotonic() - started

        assert _in_thread(lambda: app.portal.call(default_executor_free), 5) < 1  # type: ignore[union-attr]

        started = time.monotonic()
        busy = _in_thread(lambda: app.post("/admin/sql", json={"query": "SELECT 1"}), 5)
        assert time.monotonic() - started < 1
        assert busy.status_code == 429, busy.text
        assert "sql_max_concurrent" in busy.json()["detail"] and busy.headers["Retry-After"]

        started = time.monotonic()
        _in_thread(lambda: app.__exit__(None, None, None), 10)
        stopped = True
        assert time.monotonic() - started < 5
        for t in runners:
            t.join(5)
        assert [a.status_code for a in answers] == [503] * n, [a.text for a in answers]
        assert all("stopping" in a.json()["detail"] for a in answers)
    finally:
        if not stopped:  # best effort, after a failure: stop what can be stopped
            with contextlib.suppress(AssertionError):
                _in_thread(lambda: app.__exit__(None, None, None), 5)


async def test_a_query_whose_client_left_is_interrupted(tmp_path: Path) -> None:
    from control_plane.storage.sql import QueryHandle, SqlExecutor, SqlInterrupted

    url = _db(tmp_path).url
    executor = SqlExecutor(1)
    left_at = time.monotonic() + 0.3

    async def disconnected() -> bool:
        return time.monotonic() > left_at

    def job(handle: QueryHandle) -> Any:
        return run_readonly(url, RUNAWAY, timeout_s=60, handle=handle)

    try:
        with pytest.raises(SqlInterrupted, match="client went away"):
            await asyncio.wait_for(executor.run(job, disconnected=disconnected, poll_s=0.05), 5)
        assert time.monotonic() - left_at < 2
        assert executor.running == 0  # its thread is free again
        ok = await asyncio.wait_for(executor.run(lambda h: run_readonly(url, "SELECT 1", handle=h)), 5)
        assert ok.rows == [(1,)]
    finally:
        await executor.aclose()


def test_the_cli_has_the_same_limits_and_prints_blobs_as_literals(tmp_path: Path) -> None:
    _db(tmp_path)

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "control_plane", "sql", "--data-dir", str(tmp_path), *args],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=PROJECT_ROOT,
        )

    started = time.monotonic()
    out = cli("--timeout", "0.5", RUNAWAY)
    assert time.monotonic() - started < 20
    assert out.returncode == 2 and "sql_timeout_s" in out.stderr, out.stderr
    out = cli("SELECT x'00ff' AS b")
    assert out.returncode == 0, out.stderr
    assert "X'00FF'" in out.stdout, out.stdout
    out = cli("--json", "SELECT x'00ff' AS b, 1e999 AS i")
    assert out.returncode == 0, out.stderr
    assert '{"blob_hex": "00ff", "bytes": 2}' in out.stdout and '"Infinity"' in out.stdout, out.stdout
    out = cli("SELECT fts3_tokenizer('simple')")
    assert out.returncode == 2 and "fts3_tokenizer" in out.stderr, out.stderr


# -- PostgreSQL -----------------------------------------------------------------------


@pytest.fixture()
def pg_url(postgres: PostgresServer, request: pytest.FixtureRequest) -> str:
    name = "sql_" + request.node.name.lower().replace("[", "_").replace("]", "").replace("-", "_")[:40]
    url = postgres.create_database(name)
    Database(url).create_schema()
    return url


def _pg_active(postgres: PostgresServer, marker: str) -> int:
    rows = postgres.execute(
        f"SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE '%{marker}%' "
        "AND pid <> pg_backend_pid()"
    )
    return int(rows[0][0])  # type: ignore[call-overload]


def test_postgresql_statement_timeout_applies_and_names_the_limit(pg_url: str) -> None:
    started = time.monotonic()
    with pytest.raises(BadRequest) as err:
        _in_thread(lambda: run_readonly(pg_url, "SELECT pg_sleep(30)", timeout_s=0.5), 10)
    assert time.monotonic() - started < 3
    assert "0.5 s" in err.value.message and "sql_timeout_s" in err.value.message, err.value.message


def test_postgresql_rows_stream_under_the_limits(postgres: PostgresServer, pg_url: str) -> None:
    # endless on the server: only the limits end it, and the server stops it as well
    endless = (
        "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c) "
        "SELECT x, repeat('y', 1000) AS pad /* endless-stream */ FROM c"
    )
    started = time.monotonic()
    result = run_readonly(pg_url, endless, max_rows=100_000, max_result_bytes=200_000, timeout_s=20)
    assert time.monotonic() - started < 3
    assert result.truncated and result.truncated_reason == "max_result_bytes"
    assert 0 < len(result.rows) < 250
    result = run_readonly(pg_url, endless, max_rows=10, timeout_s=20)
    assert result.truncated_reason == "max_rows" and len(result.rows) == 10
    time.sleep(0.3)
    assert _pg_active(postgres, "endless-stream") == 0
    # an empty answer still names its columns; bytea comes back as a marked hex string
    assert run_readonly(pg_url, "SELECT id, name FROM workers").columns == ["id", "name"]
    blob = run_readonly(pg_url, "SELECT '\\x00ff'::bytea AS b, 'NaN'::float8 AS f")
    assert blob.to_json()["rows"] == [[{"blob_hex": "00ff", "bytes": 2}, "NaN"]]
    # still one statement, still read-only
    for query in ("SELECT 1; DELETE FROM heartbeats", "COMMIT; DELETE FROM heartbeats"):
        with pytest.raises(BadRequest):
            run_readonly(pg_url, query)
    with pytest.raises(BadRequest, match="read-only"):
        run_readonly(pg_url, "WITH gone AS (DELETE FROM heartbeats RETURNING id) SELECT COUNT(*) FROM gone")


def test_postgresql_queries_are_cancelled_on_the_server(postgres: PostgresServer, pg_url: str) -> None:
    from control_plane.storage.sql import QueryHandle, SqlInterrupted

    handle = QueryHandle()
    threading.Timer(0.5, handle.cancel, args=("the control plane is stopping",)).start()
    started = time.monotonic()
    with pytest.raises(SqlInterrupted, match="stopping"):
        _in_thread(lambda: run_readonly(pg_url, "SELECT pg_sleep(30) /* cancel-me */", handle=handle), 10)
    assert time.monotonic() - started < 3
    time.sleep(0.3)
    assert _pg_active(postgres, "cancel-me") == 0


def test_postgresql_app_answers_the_time_limit_with_a_400(tmp_path: Path, pg_url: str) -> None:
    with _app(tmp_path, database_url=pg_url, sql_timeout_s=0.5) as c:
        r = _in_thread(lambda: c.post("/admin/sql", json={"query": "SELECT pg_sleep(30)"}), 10)
        assert r.status_code == 400 and "sql_timeout_s" in r.json()["detail"], r.text
        r = c.post("/admin/sql", json={"query": "SELECT '\\x0a'::bytea AS b"})
        assert r.status_code == 200 and r.json()["rows"] == [[{"blob_hex": "0a", "bytes": 1}]], r.text


def test_service_errors_are_never_500(client: TestClient) -> None:
    for query in ["SELECT * FROM no_such_table", "SELEC 1", RUNAWAY, "SELECT fts3_tokenizer('simple')"]:
        r = client.post("/admin/sql", json={"query": query})
        assert 400 <= r.status_code < 500, (query, r.status_code, r.text)
    assert issubclass(BadRequest, ServiceError)


def test_sigterm_stops_a_real_control_plane_with_runaway_queries_running(tmp_path: Path) -> None:
    """uvicorn waits for open requests before the lifespan ends: SIGTERM itself must
    interrupt the queries, or a connected admin client holds the process up."""
    import os
    import signal

    import httpx

    from tests.processes import ControlPlaneProcess

    n = 6
    cp = ControlPlaneProcess(
        tmp_path, env={"LLAVA_CP_SQL_TIMEOUT_S": "120", "LLAVA_CP_SQL_MAX_CONCURRENT": str(n)}
    ).start()
    answers: list[Any] = []

    def runaway() -> None:
        try:
            answers.append(httpx.post(f"{cp.url}/admin/sql", json={"query": RUNAWAY}, timeout=60).status_code)
        except httpx.HTTPError as exc:
            answers.append(repr(exc))

    clients = [threading.Thread(target=runaway, daemon=True) for _ in range(n)]
    try:
        for t in clients:
            t.start()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            sql = httpx.get(f"{cp.url}/admin/status", timeout=5).json().get("sql") or {}
            if sql.get("running") == n:
                break
            time.sleep(0.1)
        assert not answers
        assert httpx.get(f"{cp.url}/health", timeout=5).status_code == 200
        added = httpx.post(f"{cp.url}/admin/workers", json={"url": "http://127.0.0.1:9"}, timeout=5)
        assert added.status_code == 201, added.text
        assert cp.process is not None
        stopped = time.monotonic()
        os.kill(cp.process.pid, signal.SIGTERM)
        cp.process.wait(10)
        assert time.monotonic() - stopped < 5
        for t in clients:
            t.join(5)
        assert answers == [503] * n, answers
    finally:
        cp.stop()


@pytest.mark.parametrize(
    "body",
    [
        b'{"query": "SELECT :x", "params": {"x": 1000000000000000000000000000000}}',  # no SQLite INTEGER holds it
        b'{"query": "SELECT :x", "params": {"x": {"a": 1}}}',
        b'{"query": "SELECT \'\\ud800\'"}',  # a lone surrogate: valid JSON, no UTF-8
    ],
)
def test_values_the_driver_cannot_take_are_400(client: TestClient, body: bytes) -> None:
    r = client.post("/admin/sql", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text  # never a 500
