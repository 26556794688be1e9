"""Two control-plane processes on one real PostgreSQL database, two real Triton nodes.

Register through one replica, stream through the other; each node is polled by one
replica at a time; kill the polling replica and the other takes over within the
lease period; the documented admin queries and the read-only SQL interface work on
PostgreSQL as on SQLite.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_node.launcher import PROJECT_ROOT, TritonNode
from tests.control_plane.conftest import (
    TINY_SERVED_NAME,
    admin_get,
    llava_stream,
    sql,
    sql_statements,
    wait_for,
)
from tests.postgres import PostgresServer
from tests.processes import ControlPlaneProcess

SCHEMA_DOC = PROJECT_ROOT / "docs" / "schema.md"
POLL_INTERVAL_S = 0.5
LEASE_PERIOD_S = 3.0


def start_replica(data_dir: Path, name: str, url: str) -> ControlPlaneProcess:
    cp = ControlPlaneProcess(
        data_dir,
        poll_interval_s=POLL_INTERVAL_S,
        extra_args=["--database-url", url, "--instance-name", name, "--lease-period", str(LEASE_PERIOD_S)],
        env={"LLAVA_CP_POLL_TIMEOUT_S": "1.0"},
    )
    return cp.start()


@pytest.fixture(scope="module")
def database_url(postgres: PostgresServer) -> str:
    return postgres.create_database("replicas")


@pytest.fixture(scope="module")
def replicas(
    database_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[ControlPlaneProcess]]:
    """Replicas ``cp-a`` and ``cp-b``, with no workers yet."""
    a = start_replica(tmp_path_factory.mktemp("cp-a"), "cp-a", database_url)
    try:
        b = start_replica(tmp_path_factory.mktemp("cp-b"), "cp-b", database_url)
    except BaseException:
        a.stop()
        raise
    try:
        yield [a, b]
    finally:
        a.stop()
        b.stop()


def workers_of(cp: ControlPlaneProcess) -> dict[str, dict[str, Any]]:
    return {w["name"]: w for w in admin_get(cp, "/admin/workers")["workers"]}


def leases(cp: ControlPlaneProcess) -> dict[str, str]:
    """worker name -> replica holding its poll lease, from the database."""
    rows = sql(cp, "SELECT w.name, l.holder FROM poll_leases l JOIN workers w ON w.id = l.worker_id")
    return {r["name"]: r["holder"] for r in rows}


def replica_runs(cp: ControlPlaneProcess, worker: str) -> list[str]:
    """The replicas that polled ``worker``, in order, consecutive repeats folded."""
    rows = sql(
        cp,
        "SELECT h.replica FROM heartbeats h JOIN workers w ON w.id = h.worker_id "
        f"WHERE w.name = '{worker}' AND h.source = 'poll' ORDER BY h.at, h.id",
    )
    return [k for k, _ in itertools.groupby(r["replica"] for r in rows)]


def test_register_through_one_replica_and_stream_through_the_other(
    replicas: list[ControlPlaneProcess], fleet: list[TritonNode]
) -> None:
    a, b = replicas
    for n in fleet:
        r = httpx.post(f"{a.url}/admin/workers", json={"url": n.http_url}, timeout=30)
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "healthy"
    registered = time.monotonic()
    names = {n.http_url for n in fleet}
    wait_for(
        lambda: {n for n, w in workers_of(b).items() if w["state"] == "healthy"} == names,
        2 * LEASE_PERIOD_S,
        "replica b sees both workers healthy",
    )
    seen_s = time.monotonic() - registered
    assert seen_s < 3 * POLL_INTERVAL_S + 1.0, seen_s
    print(f"\nreplica b routes to workers registered through a after {seen_s:.2f} s")
    # registering again through b finds the worker, it does not make a second one
    again = httpx.post(f"{b.url}/admin/workers", json={"url": fleet[0].http_url}, timeout=30)
    assert again.status_code == 200 and again.json()["id"] == workers_of(a)[fleet[0].http_url]["id"]
    for i in range(4):
        status, frames = llava_stream(
            f"{b.url}/worker_generate_stream",
            {"model": "llava", "prompt": f"USER: replica {i} ASSISTANT:", "max_new_tokens": 4},
        )
        assert status == 200 and frames[-1]["error_code"] == 0, frames
    assert httpx.post(f"{b.url}/list_models", timeout=10).json() == {"models": [TINY_SERVED_NAME]}
    time.sleep(1.0)  # batched writes
    served = sql(b, "SELECT replica, status, COUNT(*) AS n FROM requests GROUP BY replica, status")
    assert served == [{"replica": "cp-b", "status": "ok", "n": 4}]
    # each node is polled by exactly one replica, and only its heartbeats are recorded
    held = leases(b)
    assert set(held) == names and set(held.values()) <= {"cp-a", "cp-b"}
    for name in names:
        assert replica_runs(b, name) == [held[name]], name
    events = sql(
        b,
        "SELECT worker, from_state, to_state, COUNT(*) AS n, MIN(replica) AS r1, MAX(replica) AS r2 "
        "FROM v_worker_events "
        "GROUP BY worker, from_state, to_state",
    )
    assert all(e["n"] == 1 for e in events), events  # no transition recorded twice
    assert {(e["from_state"], e["to_state"]) for e in events} == {("", "unknown"), ("unknown", "healthy")}


def test_documented_admin_queries_run_on_postgresql(
    replicas: list[ControlPlaneProcess], database_url: str
) -> None:
    b = replicas[1]
    queries = sql_statements(SCHEMA_DOC)
    assert len(queries) >= 6
    results = [sql(b, q) for q in queries]
    uptime, latency, per_hour = results[0], results[1], results[2]
    assert {r["worker"] for r in uptime} == set(workers_of(b))
    assert all(float(r["uptime_pct"]) == 100.0 for r in uptime)
    assert all(r["p50_ms"] is not None and r["p95_ms"] >= r["p50_ms"] for r in latency)
    assert sum(r["requests"] for r in per_hour) >= 4
    # the command line too, given the PostgreSQL URL
    out = subprocess.run(
        [sys.executable, "-m", "control_plane", "sql", "--database-url", database_url, queries[0]],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert "uptime_pct" in out.stdout and "(2 rows)" in out.stdout


@pytest.mark.parametrize(
    "statement",
    [
        "INSERT INTO workers (name, http_url, grpc_url) VALUES ('x', 'x', 'x')",
        "DELETE FROM heartbeats",
        "UPDATE workers SET state = 'removed'",
        "DROP TABLE requests",
        "CREATE TABLE t (x INTEGER)",
        "WITH gone AS (DELETE FROM heartbeats RETURNING id) SELECT COUNT(*) FROM gone",
        "SELECT 1; DELETE FROM heartbeats",
        "COMMIT; DELETE FROM heartbeats",
        "SELECT set_config('transaction_read_only', 'off', true)",
        "TRUNCATE heartbeats",
    ],
)
def test_sql_interface_refuses_writes_on_postgresql(
    replicas: list[ControlPlaneProcess], statement: str
) -> None:
    b = replicas[1]
    counts = "SELECT (SELECT COUNT(*) FROM workers) AS w, (SELECT COUNT(*) FROM requests) AS r, (SELECT COUNT(*) FROM heartbeats) AS h"
    before = sql(b, counts)[0]
    r = httpx.post(f"{b.url}/admin/sql", json={"query": statement}, timeout=30)
    assert r.status_code == 400, (statement, r.text)
    assert "read-only" in r.json()["detail"] or "SQL error" in r.json()["detail"], r.text
    after = sql(b, counts)[0]
    assert (after["w"], after["r"]) == (before["w"], before["r"]) and after["h"] >= before["h"]
    assert sql(b, "SELECT to_regclass('t') AS t") == [{"t": None}]


def test_killing_the_polling_replica_hands_its_nodes_over(
    replicas: list[ControlPlaneProcess], fleet: list[TritonNode]
) -> None:
    a, b = replicas
    by_name = {"cp-a": a, "cp-b": b}
    held = leases(b)
    victim_name = held[fleet[0].http_url]
    victim = by_name[victim_name]
    survivor_name = "cp-b" if victim_name == "cp-a" else "cp-a"
    survivor = by_name[survivor_name]
    victim.kill()  # SIGKILL: no clean release of its leases
    killed = time.monotonic()
    names = {n.http_url for n in fleet}
    wait_for(lambda: set(leases(survivor).values()) == {survivor_name}, 3 * LEASE_PERIOD_S, "takeover")
    takeover_s = time.monotonic() - killed
    print(f"\npoll leases of a SIGKILLed replica taken over in {takeover_s:.2f} s (lease {LEASE_PERIOD_S} s)")
    assert takeover_s <= LEASE_PERIOD_S + POLL_INTERVAL_S + 1.0, takeover_s
    before = {n: sql(survivor, _beats(n))[0]["n"] for n in names}
    time.sleep(4 * POLL_INTERVAL_S)
    after = {n: sql(survivor, _beats(n))[0]["n"] for n in names}
    assert all(after[n] > before[n] for n in names), (before, after)  # the survivor polls them now
    for name in names:
        runs = replica_runs(survivor, name)
        assert runs[-1] == survivor_name and len(runs) == len(set(runs)), runs  # never interleaved
    assert {n for n, w in workers_of(survivor).items() if w["state"] == "healthy"} == names
    status, frames = llava_stream(
        f"{survivor.url}/worker_generate_stream",
        {"model": "llava", "prompt": "USER: still here ASSISTANT:", "max_new_tokens": 3},
    )
    assert status == 200 and frames[-1]["error_code"] == 0
    # the killed replica comes back under its name: it follows, and the survivor keeps polling
    victim.start()
    time.sleep(2 * LEASE_PERIOD_S)
    assert set(leases(survivor).values()) == {survivor_name}
    assert {n for n, w in workers_of(victim).items() if w["state"] == "healthy"} == names
    # a clean stop releases the leases: the other replica takes over at its next round
    survivor.stop()
    stopped = time.monotonic()
    wait_for(lambda: set(leases(victim).values()) == {victim_name}, 3 * LEASE_PERIOD_S, "handover")
    handover_s = time.monotonic() - stopped
    print(f"poll leases of a cleanly stopped replica taken over in {handover_s:.2f} s")
    assert handover_s < LEASE_PERIOD_S, handover_s
    survivor.start()


def _beats(worker: str) -> str:
    return (
        "SELECT COUNT(*) AS n FROM heartbeats h JOIN workers w ON w.id = h.worker_id "
        f"WHERE w.name = '{worker}' AND h.source = 'poll'"
    )
