"""Overload, circuit breaking, failover before the first token, cancellation end to end."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llava_node.launcher import TritonNode, free_port
from tests.control_plane.conftest import TINY_SERVED_NAME, admin_get, llava_stream, sql, wait_for
from tests.media import image_b64
from tests.processes import ControlPlaneProcess

LONG = {
    "model": "llava",
    "prompt": "USER: <image>\ngo on and on ASSISTANT:",
    "images": [image_b64()],
    "max_new_tokens": 1400,
    "temperature": 0,  # greedy runs the whole 1400 here; sampled, it can end at an early EOS
}


def node_metric(node: TritonNode, name: str) -> float:
    text = urllib.request.urlopen(node.metrics_url, timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{"))


@pytest.fixture()
def one_node_cp(fleet: list[TritonNode], tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    """A control plane over one node that takes one stream at a time, one waiting."""
    cp = ControlPlaneProcess(
        tmp_path / "cp",
        [fleet[0].http_url],
        env={
            "LLAVA_CP_MAX_INFLIGHT_PER_WORKER": "1",
            "LLAVA_CP_MAX_WAITING": "1",
            "LLAVA_CP_QUEUE_TIMEOUT_S": "0.5",
            "LLAVA_CP_MAX_NEW_TOKENS_CAP": "4096",
        },
    )
    cp.start()
    try:
        wait_for(
            lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [TINY_SERVED_NAME], 30, "ready"
        )
        yield cp
    finally:
        cp.stop()


def test_overload_gets_429_with_retry_after_and_an_overloaded_frame(one_node_cp: ControlPlaneProcess) -> None:
    url = one_node_cp.url
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        running = pool.submit(llava_stream, f"{url}/worker_generate_stream", LONG)
        wait_for(lambda: admin_get(one_node_cp, "/admin/workers")["workers"][0]["inflight"] == 1, 10, "busy")
        waiting = pool.submit(llava_stream, f"{url}/worker_generate_stream", {**LONG, "max_new_tokens": 5})
        wait_for(
            lambda: admin_get(one_node_cp, "/admin/status")["admission"]["waiting"] == 1, 10, "one waiting"
        )
        r = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "llava", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert r.status_code == 429
        # "at capacity" (queue full) or, if the waiter has just timed out, "within 0.5 s"
        assert (
            r.json()["error"]["type"] == "rate_limit_error" and "retry later" in r.json()["error"]["message"]
        )
        assert int(r.headers["Retry-After"]) >= 1
        status, frames = llava_stream(f"{url}/worker_generate_stream", LONG)
        assert status == 429 and len(frames) == 1 and frames[0]["error_code"] == 4
        assert "retry later" in frames[0]["text"]
        status, frames = waiting.result(30)  # the waiter timed out after 0.5 s
        assert status == 429 and "within 0.5 s" in frames[0]["text"]
        assert running.result(60)[1][-1]["error_code"] == 0


def test_failing_node_is_retried_invisibly_and_its_circuit_opens(
    fleet: list[TritonNode], tmp_path: Path
) -> None:
    """A worker whose health endpoints answer but whose gRPC port is dead."""
    cp = ControlPlaneProcess(
        tmp_path / "cp",
        [fleet[1].http_url],
        env={
            "LLAVA_CP_BREAKER_THRESHOLD": "2",
            "LLAVA_CP_BREAKER_COOLDOWN_S": "1.5",
            "LLAVA_CP_DISPATCH_POLICY": "round_robin",
        },
    )
    cp.start()
    try:
        dead_grpc = f"127.0.0.1:{free_port()}"
        r = httpx.post(
            f"{cp.url}/admin/workers", json={"url": fleet[0].http_url, "grpc_url": dead_grpc}, timeout=30
        )
        assert r.status_code == 201 and r.json()["state"] == "healthy"
        broken = r.json()["id"]
        for i in range(4):
            status, frames = llava_stream(
                f"{cp.url}/worker_generate_stream",
                {"model": "llava", "prompt": f"USER: hi {i} ASSISTANT:", "max_new_tokens": 4},
            )
            assert status == 200 and frames[-1]["error_code"] == 0, frames  # never seen by the client
        state = admin_get(cp, f"/admin/workers/{broken}")
        assert state["state"] == "unhealthy"
        assert any("circuit open: 2 requests in a row failed" in e["reason"] for e in state["events"])
        time.sleep(0.6)
        rows = sql(cp, "SELECT attempts, status FROM requests")
        assert all(r["status"] == "ok" for r in rows) and sum(r["attempts"] for r in rows) == len(rows) + 2
        # after the cooldown a successful poll closes it (half-open); one failure reopens it
        wait_for(lambda: admin_get(cp, f"/admin/workers/{broken}")["state"] == "healthy", 10, "half-open")
        for i in range(3):
            llava_stream(
                f"{cp.url}/worker_generate_stream", {"model": "llava", "prompt": f"x{i}", "max_new_tokens": 2}
            )
        assert admin_get(cp, f"/admin/workers/{broken}")["state"] == "unhealthy"
        metrics = httpx.get(f"{cp.url}/metrics").text
        retries = re.search(r"^cp_retries_total (\S+)$", metrics, re.MULTILINE)
        assert retries is not None and float(retries.group(1)) >= 3
    finally:
        cp.stop()


@pytest.mark.parametrize("api", ["llava", "openai"])
def test_client_disconnect_stops_generation_on_the_node(
    control_plane: ControlPlaneProcess, fleet: list[TritonNode], api: str
) -> None:
    before = sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in fleet)
    rid = f"disconnect-{api}"
    if api == "llava":
        url, body = f"{control_plane.url}/worker_generate_stream", LONG
    else:
        url = f"{control_plane.url}/v1/chat/completions"
        body = {
            "model": "llava",
            "stream": True,
            "max_tokens": 1000,
            "messages": [{"role": "user", "content": "go on"}],
        }
    with httpx.stream("POST", url, json=body, timeout=60, headers={"X-Request-Id": rid}) as r:
        assert r.status_code == 200
        seen = 0
        for data in r.iter_bytes():
            seen += data.count(b"\0") + data.count(b"data: ")
            if seen >= 5:
                break
    wait_for(
        lambda: sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in fleet) >= before + 1,
        10,
        "the node counted the cancellation",
    )
    logs = "".join(n.log_path.read_text() for n in fleet)
    # (the node knows it as the client's id and a suffix of its own, records.node_request_id)
    m = re.search(rf"request {re.escape(rid)}\.[0-9a-f]{{8}} cancelled after (\d+) tokens", logs)
    assert m, "the node did not log the cancellation"
    assert int(m.group(1)) < 1000
    time.sleep(0.6)
    rows = sql(control_plane, f"SELECT status, error FROM requests WHERE request_id = '{rid}'")
    assert rows == [{"status": "cancelled", "error": "the client went away"}]
    assert all(w["inflight"] == 0 for w in admin_get(control_plane, "/admin/workers")["workers"])


@pytest.mark.parametrize(
    ("path", "check"),
    [
        ("/worker_generate_stream", lambda r: json.loads(r.content.rstrip(b"\0"))["error_code"] == 5),
        ("/v1/chat/completions", lambda r: r.json()["error"]["code"] == "request_too_large"),
        ("/admin/sql", lambda r: "larger than the limit" in r.json()["detail"]),
    ],
)
def test_bodies_above_the_limit_are_413(fleet: list[TritonNode], tmp_path: Path, path: str, check) -> None:
    cp = ControlPlaneProcess(tmp_path / "cp", [], env={"LLAVA_CP_MAX_BODY_BYTES": "1000"})
    cp.start()
    try:
        r = httpx.post(
            f"{cp.url}{path}", content=b"{" + b" " * 5000 + b"}", headers={"Content-Type": "application/json"}
        )
        assert r.status_code == 413 and check(r)
    finally:
        cp.stop()
