"""Health polling: a node that dies leaves routing within three polls and comes back."""

from __future__ import annotations

import time

import httpx

from llava_node.launcher import TritonNode
from tests.control_plane.conftest import TINY_SERVED_NAME, admin_get, llava_stream, sql, wait_for
from tests.processes import ControlPlaneProcess


def worker_state(cp: ControlPlaneProcess, name: str) -> str:
    return next(w["state"] for w in admin_get(cp, "/admin/workers")["workers"] if w["name"] == name)


def test_a_dead_node_leaves_routing_and_returns(
    control_plane: ControlPlaneProcess, fleet: list[TritonNode]
) -> None:
    victim, survivor = fleet
    victim.kill()
    killed_at = time.monotonic()
    wait_for(lambda: worker_state(control_plane, victim.http_url) == "unhealthy", 10, "victim unhealthy")
    detected_s = time.monotonic() - killed_at
    assert control_plane.poll_interval_s is not None
    assert detected_s <= 3 * control_plane.poll_interval_s + 0.5, detected_s
    try:
        ids = []
        for i in range(6):
            status, frames = llava_stream(
                f"{control_plane.url}/worker_generate_stream",
                {"model": "llava", "prompt": f"USER: hello {i} ASSISTANT:", "max_new_tokens": 4},
            )
            assert status == 200 and frames[-1]["error_code"] == 0
            ids.append(frames[-1]["text"])
        time.sleep(0.6)
        rows = sql(
            control_plane,
            "SELECT w.name AS worker, COUNT(*) AS n FROM requests r JOIN workers w "
            "ON w.id = r.worker_id WHERE r.started_at > (SELECT MAX(at) FROM worker_events "
            "WHERE to_state = 'unhealthy') GROUP BY w.name",
        )
        assert rows == [{"worker": survivor.http_url, "n": 6}]
    finally:
        victim.restart()
    wait_for(lambda: worker_state(control_plane, victim.http_url) == "healthy", 15, "victim healthy again")
    events = sql(
        control_plane,
        "SELECT from_state, to_state, reason FROM v_worker_events "
        f"WHERE worker = '{victim.http_url}' ORDER BY id",
    )
    transitions = [(e["from_state"], e["to_state"]) for e in events]
    assert ("healthy", "unhealthy") in transitions and ("unhealthy", "healthy") in transitions
    reason = next(e["reason"] for e in events if e["to_state"] == "unhealthy")
    assert "failed polls" in reason and "connection" in reason
    assert httpx.post(f"{control_plane.url}/list_models").json() == {"models": [TINY_SERVED_NAME]}
