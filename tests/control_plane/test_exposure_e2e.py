"""Safe to expose, end to end: real nodes, real uvicorn. Clients that hold slots without
reading, clients that leave non-streamed requests, and bad input that must not cost a node
its place in routing (issue 15, findings 3, 8 and 11; each failed before the fix)."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_node.launcher import TritonNode
from tests.control_plane.conftest import TINY_SERVED_NAME, admin_get, llava_stream, sql, wait_for
from tests.control_plane.test_resilience import LONG, node_metric
from tests.media import image_b64
from tests.processes import ControlPlaneProcess

SEND_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def tight_cp(
    fleet: list[TritonNode], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    """Two nodes, one stream each: two clients that read nothing would hold the whole fleet."""
    cp = ControlPlaneProcess(
        tmp_path_factory.mktemp("cp-tight"),
        [n.http_url for n in fleet],
        env={
            "LLAVA_CP_MAX_INFLIGHT_PER_WORKER": "1",
            "LLAVA_CP_QUEUE_TIMEOUT_S": "20",
            "LLAVA_CP_MAX_NEW_TOKENS_CAP": "1400",
            "LLAVA_CP_CLIENT_SEND_TIMEOUT_S": str(SEND_TIMEOUT_S),
            "LLAVA_CP_CLIENT_HEADER_TIMEOUT_S": "2",
            "LLAVA_CP_BREAKER_THRESHOLD": "3",
        },
    )
    cp.start()
    try:
        wait_for(lambda: len(admin_get(cp, "/admin/workers")["workers"]) == 2, 30, "workers")
        wait_for(
            lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [TINY_SERVED_NAME], 60, "ready"
        )
        yield cp
    finally:
        cp.stop()


def inflight(cp: ControlPlaneProcess) -> int:
    return sum(w["inflight"] for w in admin_get(cp, "/admin/workers")["workers"])


def silent_reader(cp: ControlPlaneProcess, body: dict[str, Any]) -> socket.socket:
    """A client that sends a stream request and then reads nothing."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", cp.port))
    data = json.dumps(body).encode()
    s.sendall(
        b"POST /worker_generate_stream HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(data), data)
    )
    return s


def test_clients_that_read_nothing_lose_their_slot(tight_cp: ControlPlaneProcess) -> None:
    readers = [silent_reader(tight_cp, LONG) for _ in range(2)]
    try:
        wait_for(lambda: inflight(tight_cp) == 2, 30, "both slots taken by clients that read nothing")
        started = time.monotonic()
        # Before the fix this waited out the queue timeout and got 429: the nodes sat idle.
        status, frames = llava_stream(
            f"{tight_cp.url}/worker_generate_stream", {**LONG, "max_new_tokens": 4}, timeout_s=60
        )
        waited = time.monotonic() - started
        assert status == 200 and frames[-1]["error_code"] == 0, frames[-1]
        assert waited < SEND_TIMEOUT_S + 15, waited
        wait_for(lambda: inflight(tight_cp) == 0, 20, "the silent readers' slots freed")
        # the control plane saw them go (their generations, if still running, are cancelled)
        rows = sql(tight_cp, "SELECT status, error FROM requests WHERE api = 'llava' ORDER BY started_at")
        assert [r["status"] for r in rows[-3:]].count("cancelled") == 2, rows[-3:]
    finally:
        for s in readers:
            s.close()


def test_a_connection_that_sends_no_headers_is_closed(tight_cp: ControlPlaneProcess) -> None:
    with socket.create_connection(("127.0.0.1", tight_cp.port), timeout=15) as s:
        s.sendall(b"POST /worker_generate_stream HTTP/1.1\r\nhost: x\r\n")  # and never the rest
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - started < 10


def test_a_client_that_leaves_a_non_streamed_request_cancels_it(
    tight_cp: ControlPlaneProcess, fleet: list[TritonNode]
) -> None:
    cancelled_before = sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in fleet)
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64," + image_b64()}}
    body = {  # greedy, with this image the tiny model runs all 1400 tokens (about 3 s here)
        "model": "llava",
        "messages": [{"role": "user", "content": [image, {"type": "text", "text": "go on and on"}]}],
        "max_tokens": 1400,
        "temperature": 0,
    }

    def leave_early() -> None:
        # the client gives up and closes its connection
        with contextlib.suppress(httpx.TimeoutException):
            httpx.post(f"{tight_cp.url}/v1/chat/completions", json=body, timeout=0.8)

    worker = threading.Thread(target=leave_early)
    worker.start()
    worker.join(30)
    wait_for(
        lambda: (
            sum(node_metric(n, "llava_engine_requests_cancelled_total") for n in fleet) > cancelled_before
        ),
        15,
        "the node told to stop the non-streamed generation",
    )
    wait_for(lambda: inflight(tight_cp) == 0, 15, "its slot freed")


def test_bad_text_does_not_take_nodes_out_of_routing(tight_cp: ControlPlaneProcess) -> None:
    """Before the fix, 12 messages with a lone surrogate in 0.14 s opened every node's circuit."""
    bad = json.dumps(
        {"model": "llava", "max_tokens": 4, "messages": [{"role": "user", "content": "x \ud800 y"}]}
    )
    with httpx.Client(timeout=30) as client:
        for _ in range(12):
            r = client.post(
                f"{tight_cp.url}/v1/chat/completions",
                content=bad,
                headers={"content-type": "application/json"},
            )
            assert r.status_code == 400, r.text
            assert "lone surrogate" in r.json()["error"]["message"]
        states = {w["state"] for w in admin_get(tight_cp, "/admin/workers")["workers"]}
        assert states == {"healthy"}
        good = client.post(
            f"{tight_cp.url}/v1/chat/completions",
            json={"model": "llava", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        )
        assert good.status_code == 200, good.text


def test_the_control_plane_refuses_an_unauthenticated_worker(
    tight_cp: ControlPlaneProcess, tmp_path: Path
) -> None:
    """A fake node registered by anyone received 24 of 30 users' requests before the fix."""
    r = httpx.post(
        f"{tight_cp.url}/register_worker",
        json={"worker_name": "http://127.0.0.1:1", "worker_status": {"speed": 1000000}},
    )
    assert r.status_code in (401, 403), r.text
    assert len(admin_get(tight_cp, "/admin/workers")["workers"]) == 2
    beat = httpx.post(f"{tight_cp.url}/receive_heart_beat", json={"worker_name": "http://127.0.0.1:1"})
    assert beat.status_code in (401, 403)
