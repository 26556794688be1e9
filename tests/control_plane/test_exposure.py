"""Safe to expose, in-process (no nodes): who may steer the fleet, and inputs refused at the edge.

Each test names the finding of the security review it covers (issue 15); each failed on
the code before the fix.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from control_plane.config import Settings
from control_plane.fleet.addresses import AddressPolicy, normalize_grpc_url, normalize_worker_url
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import ModelStatus
from control_plane.lifecycle.manager import ModelManager
from control_plane.main import create_app
from control_plane.nodes.parsing import MAX_REPORTED_LOAD, parse_index, parse_load
from tests.control_plane.test_lifecycle_policy import manager, store, worker  # noqa: F401

ADMIN = "admin-secret"
WORKER = "worker-secret"
NODE = "http://127.0.0.1:9"  # nothing listens there: registration works, polls fail


def make_client(tmp_path: Path, **settings: Any) -> TestClient:
    base: dict[str, Any] = {
        "data_dir": tmp_path,
        "admin_token": ADMIN,
        "poll_interval_s": 60,
        "lease_period_s": 120,
        "poll_timeout_s": 0.5,
    }
    return TestClient(create_app(Settings(**{**base, **settings})))


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    with make_client(tmp_path, worker_token=WORKER) as c:
        yield c


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def register(client: TestClient, token: str | None, **body: Any) -> Any:
    return client.post(
        "/register_worker",
        json={"worker_name": NODE, "check_heart_beat": True, "worker_status": None, **body},
        headers=bearer(token) if token else {},
    )


def workers(client: TestClient) -> list[dict[str, Any]]:
    return list(client.get("/admin/workers", headers=bearer(ADMIN)).json()["workers"])


# -- finding 1: registration and heartbeats need a credential ------------------------------


def test_registration_needs_the_worker_or_admin_token(client: TestClient) -> None:
    r = register(client, None)
    assert r.status_code == 401 and "Bearer" in r.json()["detail"]
    assert register(client, "wrong").status_code == 401
    assert workers(client) == []
    assert register(client, WORKER).status_code == 200
    assert [w["name"] for w in workers(client)] == [NODE]
    assert register(client, ADMIN, worker_name="http://127.0.0.1:19").status_code == 200


def test_with_no_token_configured_worker_pushes_are_off_unless_enabled(tmp_path: Path) -> None:
    with make_client(tmp_path, admin_token="") as c:
        r = register(c, None)
        assert r.status_code == 403
        assert "LLAVA_CP_WORKER_TOKEN" in r.json()["detail"]
        assert "LLAVA_CP_OPEN_WORKER_REGISTRATION" in r.json()["detail"]
        beat = c.post("/receive_heart_beat", json={"worker_name": NODE, "queue_length": 1})
        assert beat.status_code == 403
    with make_client(tmp_path, admin_token="", open_worker_registration=True) as c:
        assert register(c, None).status_code == 200


def test_heartbeats_need_a_credential_and_reported_load_is_clamped(client: TestClient) -> None:
    assert register(client, WORKER).status_code == 200
    body = {"worker_name": NODE, "queue_length": 10**30}
    assert client.post("/receive_heart_beat", json=body).status_code == 401
    r = client.post("/receive_heart_beat", json=body, headers=bearer(WORKER))
    assert r.json() == {"exist": True}
    assert workers(client)[0]["queue_length"] == MAX_REPORTED_LOAD


def test_only_an_admin_changes_a_registered_workers_addresses(client: TestClient) -> None:
    assert register(client, WORKER, grpc_url="127.0.0.1:10").status_code == 200
    hijack = register(client, WORKER, grpc_url="127.0.0.1:4444")
    assert hijack.status_code == 409
    assert "only an admin" in hijack.json()["detail"]
    assert register(client, WORKER, worker_status={"speed": 1000}).status_code == 409
    assert workers(client)[0]["grpc_url"] == "127.0.0.1:10"
    assert register(client, WORKER, grpc_url="127.0.0.1:10").status_code == 200  # the same: fine
    assert register(client, ADMIN, grpc_url="127.0.0.1:4444").status_code == 200
    assert workers(client)[0]["grpc_url"] == "127.0.0.1:4444"


@pytest.mark.parametrize(
    ("body", "what"),
    [
        ({"worker_name": "http://8.8.8.8:8000"}, "worker URL: host 8.8.8.8"),
        ({"worker_name": "http://169.254.169.254:80"}, "worker URL: host 169.254.169.254"),
        ({"grpc_url": "203.0.113.7:8001"}, "gRPC address: host 203.0.113.7"),
        ({"metrics_url": "http://198.51.100.1:8002/metrics"}, "metrics URL: host 198.51.100.1"),
    ],
)
def test_worker_addresses_must_be_in_the_allowed_hosts(
    client: TestClient, body: dict[str, Any], what: str
) -> None:
    r = register(client, WORKER, **body)
    assert r.status_code == 403, r.text
    assert what in r.json()["detail"] and "LLAVA_CP_WORKER_ALLOWED_HOSTS" in r.json()["detail"]
    # the same through the admin API: an admin gets no way around the allow-list either
    url = body.get("worker_name", NODE)
    admin = client.post(
        "/admin/workers",
        json={"url": url, "grpc_url": body.get("grpc_url"), "metrics_url": body.get("metrics_url")},
        headers=bearer(ADMIN),
    )
    assert admin.status_code == 403
    assert workers(client) == []


def test_metrics_urls_may_not_carry_a_path_or_query(client: TestClient) -> None:
    r = register(client, WORKER, metrics_url="http://127.0.0.1:11/admin/delete?all=1")
    assert r.status_code == 400 and "/metrics" in r.json()["detail"]


def test_the_allow_list_rules() -> None:
    async def allowed(policy: AddressPolicy, host: str) -> bool:
        try:
            await policy.check(host, "x")
        except Exception:
            return False
        return True

    import asyncio

    default = AddressPolicy(["loopback", "private"])
    checks = {
        "127.0.0.1": True,
        "::1": True,
        "10.1.2.3": True,
        "172.31.0.1": True,
        "192.168.5.5": True,
        "fd12::1": True,
        "::ffff:10.0.0.5": True,
        "169.254.169.254": False,
        "8.8.8.8": False,
        "100.64.0.1": False,
        "localhost": True,  # resolves to loopback
    }
    for host, expected in checks.items():
        assert asyncio.run(allowed(default, host)) is expected, host
    named = AddressPolicy(["*.svc.cluster.local", "node-1.example", "203.0.113.0/24"])
    assert asyncio.run(allowed(named, "triton.llava.svc.cluster.local"))
    assert asyncio.run(allowed(named, "node-1.example"))
    assert asyncio.run(allowed(named, "203.0.113.9"))
    assert not asyncio.run(allowed(named, "node-2.example"))
    assert not asyncio.run(allowed(named, "10.0.0.1"))
    assert asyncio.run(allowed(AddressPolicy(["*"]), "8.8.8.8"))
    with pytest.raises(ValueError):
        Settings(worker_allowed_hosts=["not a host!"])


# -- finding 2: numbers that reach the store are range-checked --------------------------------


@pytest.mark.parametrize("speed", [1e30, 0, -5, 10**7, "fast", True])
def test_a_registered_speed_out_of_range_is_a_400(client: TestClient, speed: Any) -> None:
    r = register(client, WORKER, worker_status={"speed": speed})
    assert r.status_code == 400 and "speed" in r.json()["detail"]
    assert workers(client) == []


def test_what_a_node_reports_is_clamped_and_parsed_defensively() -> None:
    page = 'llava_engine_queued_requests{model="a"} 1e30\nllava_engine_active_requests{model="a"} nan\n'
    assert parse_load(page) == (MAX_REPORTED_LOAD, 0)
    assert parse_load("llava_engine_queued_requests{} garbage\n") == (0, 0)
    with pytest.raises(ValueError):
        parse_index(b'[{"name": 5}]')
    with pytest.raises(ValueError):
        parse_index(b'{"not": "a list"}')
    assert parse_index(b'[{"name": "llava", "state": "READY"}]')["llava"].ready


# -- finding 3 and 10: a client's bad text and numbers are 400s at the edge -------------------


def chat(client: TestClient, **body: Any) -> Any:
    payload = {"model": "llava", "messages": [{"role": "user", "content": "hi"}], **body}
    import json

    # json.dumps keeps a lone surrogate as the escape \ud800, as a client's JSON would
    return client.post(
        "/v1/chat/completions", content=json.dumps(payload), headers={"Content-Type": "application/json"}
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "bad \ud800 text"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]}, "messages"),
        ({"stop": "\ud800"}, "stop"),
        ({"stop": ["ok", "\ud800"]}, "stop"),
        ({"max_tokens": 1e30}, "max_tokens"),
        ({"max_tokens": 2**32 + 5}, "max_tokens"),
        ({"max_completion_tokens": 2**40}, "max_completion_tokens"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"temperature": 1e400}, "temperature"),
        ({"top_p": 0}, "top_p"),
    ],
)
def test_openai_inputs_that_would_break_the_node_are_400s(
    client: TestClient, body: dict[str, Any], param: str
) -> None:
    r = chat(client, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and param in (error["param"] or "") + error["message"]


def test_a_lone_surrogate_is_named_in_the_error(client: TestClient) -> None:
    r = chat(client, messages=[{"role": "user", "content": "bad \ud800 text"}])
    assert "lone surrogate" in r.json()["error"]["message"]


def llava(client: TestClient, **params: Any) -> Any:
    import json

    body = {"model": "llava", "prompt": "USER: hi ASSISTANT:", **params}
    return client.post("/worker_generate_stream", content=json.dumps(body))


@pytest.mark.parametrize(
    "params",
    [
        {"seed": 2**64},
        {"temperature": 1e400},
        {"top_p": 5},
        {"stop": "\ud800"},
        {"model": "\ud800"},
    ],
)
def test_llava_inputs_that_would_break_the_node_are_400s(client: TestClient, params: dict[str, Any]) -> None:
    r = llava(client, **params)
    assert r.status_code == 400, r.text
    assert r.content.endswith(b"\0")


def test_prompts_are_bounded_in_bytes_at_the_edge(tmp_path: Path) -> None:
    with make_client(tmp_path, max_prompt_bytes=1000) as c:
        r = llava(c, prompt="x" * 1001)
        assert r.status_code == 400 and b"the limit is 1000 bytes" in r.content
        r = chat(c, messages=[{"role": "user", "content": "é" * 501}])
        assert r.status_code == 400 and "the limit is 1000 bytes" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "url", ["http://" + "a" * 64 + ".example:8000", "http://a..b:8000", "http://-x.example:8000"]
)
def test_malformed_host_names_are_400s(client: TestClient, url: str) -> None:
    r = client.post("/admin/workers", json={"url": url}, headers=bearer(ADMIN))
    assert r.status_code == 400, r.text
    assert "not a valid host name" in r.json()["detail"]


def test_host_names_and_grpc_addresses_are_normalized() -> None:
    assert normalize_worker_url("http://[::1]:8000") == "http://[::1]:8000"
    assert normalize_grpc_url("[::1]:8001") == "[::1]:8001"
    assert normalize_grpc_url("Node-1.Example:8001") == "node-1.example:8001"
    for bad in ("::1:8001", "[::1:8001", "a" * 64 + ":1"):
        with pytest.raises(Exception):  # noqa: B017 - BadRequest, whatever the message
            normalize_grpc_url(bad)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/admin/sql"])
def test_an_oversized_chunked_body_is_413_on_every_api(tmp_path: Path, path: str) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"query": "'
        for _ in range(40):
            yield b"x" * 1000
        yield b'"}'

    with make_client(tmp_path, max_body_bytes=10_000) as c:
        r = c.post(path, content=chunks(), headers={**bearer(ADMIN), "Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert "larger than the limit of 10000 bytes" in r.text


# -- finding 12: IPv6 nodes ---------------------------------------------------------------------


def test_an_ipv6_worker_gets_a_well_formed_metrics_url(client: TestClient) -> None:
    r = client.post("/admin/workers", json={"url": "http://[::1]:9"}, headers=bearer(ADMIN))
    assert r.status_code == 201, r.text
    assert r.json()["grpc_url"] == "[::1]:10"
    assert r.json()["metrics_url"] == "http://[::1]:11/metrics"


# -- finding 14: loads go only to nodes that answer, never beside an unloading engine -------


def test_a_node_whose_last_poll_failed_gets_no_load(store: WorkerStore) -> None:  # noqa: F811
    frozen = worker(store, 1, {"a": False})
    answering = worker(store, 2, {"a": False}, inflight=10)
    m: ModelManager = manager(store)
    assert m.best_node("a") is frozen  # the least busy
    frozen.consecutive_failures = 1  # one poll failed: it may be frozen
    assert m.best_node("a") is answering


def test_no_load_beside_an_engine_that_is_still_unloading(store: WorkerStore) -> None:  # noqa: F811
    w = worker(store, 1, {"a": False, "a_engine": False})
    m: ModelManager = manager(store)
    w.models["a_engine"] = ModelStatus(False, "UNLOADING")
    assert m.best_node("a") is None
    w.models["a_engine"] = ModelStatus(False, "UNAVAILABLE", "unloaded")
    assert m.best_node("a") is w


# -- the admin API is never open on an exposed address --------------------------------------------


def test_an_open_admin_api_is_refused_on_a_non_loopback_host() -> None:
    with pytest.raises(ValueError, match="LLAVA_CP_ADMIN_TOKEN"):
        Settings(host="0.0.0.0")
    Settings(host="0.0.0.0", admin_token="t")
    Settings(host="0.0.0.0", allow_open_admin=True)
    Settings(host="::1")


def test_a_static_worker_outside_the_allowed_hosts_stops_the_start(tmp_path: Path) -> None:
    app = create_app(Settings(data_dir=tmp_path, workers=["http://8.8.8.8:8000"], lease_period_s=30))
    with pytest.raises(RuntimeError, match=r"static worker http://8\.8\.8\.8:8000"), TestClient(app):
        pass


def test_refreshes_share_one_poll_round(client: TestClient) -> None:
    """LLaVA's /refresh_all_workers is open (its web UI calls it on every page load): callers
    that come while a refresh runs share it instead of each polling the whole fleet."""
    import asyncio
    from concurrent.futures import ThreadPoolExecutor

    cp = client.app.state.cp  # type: ignore[attr-defined]
    rounds = 0

    async def slow_round() -> list[object]:
        nonlocal rounds
        rounds += 1
        await asyncio.sleep(0.5)
        return []

    cp.fleet.poller.refresh = slow_round
    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(lambda _: client.post("/refresh_all_workers").status_code, range(8)))
    assert codes == [200] * 8
    assert 1 <= rounds <= 2, rounds
