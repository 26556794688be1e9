"""Model lifecycle on real nodes in explicit model-control mode.

Two nodes serve a copy of ``model_repository/`` with three models added by
``scripts/add_model.py``: ``alpha`` (the seed-0 tiny checkpoint, the one ``llava``
serves), ``beta`` (a seed-1 tiny checkpoint) and ``broken`` (a directory that is no
checkpoint). Node 0 starts with ``llava`` loaded, node 1 with nothing; the control
plane loads and unloads the rest.
"""

from __future__ import annotations

import concurrent.futures
import json
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_node.launcher import DEFAULT_MODEL_REPOSITORY, PROJECT_ROOT, TritonNode
from llava_node.tiny_checkpoint import build_tiny_checkpoint
from tests.control_plane.conftest import TINY_SERVED_NAME, llava_stream, wait_for
from tests.processes import ControlPlaneProcess, running_nodes

TTL_S = 4.0
TOKEN = "lifecycle-admin-token"
PROMPT = "USER: Describe the picture in a few words. ASSISTANT:"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def add_model(repo: Path, name: str, checkpoint: Path) -> None:
    out = subprocess.run(
        [
            sys.executable,
            "scripts/add_model.py",
            name,
            "--checkpoint",
            str(checkpoint),
            "--repository",
            str(repo),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=PROJECT_ROOT,
    )
    assert out.returncode == 0, out.stderr


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: Path) -> Path:
    """A copy of model_repository/ plus alpha (seed 0), beta (seed 1) and broken."""
    root = tmp_path_factory.mktemp("lifecycle")
    repo = root / "model_repository"
    shutil.copytree(DEFAULT_MODEL_REPOSITORY, repo)
    add_model(repo, "alpha", tiny_checkpoint)
    add_model(repo, "beta", build_tiny_checkpoint(root / "tiny-seed1", seed=1))
    (root / "not-a-checkpoint").mkdir()
    add_model(repo, "broken", root / "not-a-checkpoint")
    return repo


@pytest.fixture(scope="module")
def nodes(repository: Path, tiny_checkpoint: Path) -> Iterator[list[TritonNode]]:
    """Node 0 with llava loaded, node 1 with nothing: explicit model control on both."""
    loads = (("llava",), ())
    configs = [{"model_repository": repository, "model_control": "explicit", "load_models": m} for m in loads]
    with running_nodes(tiny_checkpoint, 2, configs) as started:
        yield started


@pytest.fixture(scope="module")
def cp(nodes: list[TritonNode], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlaneProcess]:
    """A control plane with short lifecycle settings."""
    proc = ControlPlaneProcess(
        tmp_path_factory.mktemp("cp-lifecycle"),
        [n.http_url for n in nodes],
        env={
            "LLAVA_CP_ADMIN_TOKEN": TOKEN,
            "LLAVA_CP_IDLE_TTL_S": str(TTL_S),
            "LLAVA_CP_LIFECYCLE_INTERVAL_S": "0.25",
            "LLAVA_CP_SCALE_OUT_INFLIGHT": "2",
            "LLAVA_CP_COLD_START_TIMEOUT_S": "150",
        },
    )
    proc.start()
    try:
        wait_for(lambda: all(w["state"] == "healthy" for w in workers(proc)), 30, "both workers healthy")
        yield proc
    finally:
        proc.stop()


# -- helpers ------------------------------------------------------------------------------
def admin(
    cp: ControlPlaneProcess, method: str, path: str, body: Any = None, timeout: float = 120
) -> httpx.Response:
    return httpx.request(method, f"{cp.url}{path}", json=body, headers=AUTH, timeout=timeout)


def workers(cp: ControlPlaneProcess) -> list[dict[str, Any]]:
    r = admin(cp, "GET", "/admin/workers")
    r.raise_for_status()
    return list(r.json()["workers"])


def worker_id(cp: ControlPlaneProcess, node: TritonNode) -> int:
    return next(int(w["id"]) for w in workers(cp) if w["name"] == node.http_url)


def model(cp: ControlPlaneProcess, name: str) -> dict[str, Any]:
    r = admin(cp, "GET", f"/admin/models/{name}")
    r.raise_for_status()
    return dict(r.json())


def loaded_on(cp: ControlPlaneProcess, name: str) -> set[int]:
    return {p["worker_id"] for p in model(cp, name)["placements"] if p["state"] == "loaded"}


def events(cp: ControlPlaneProcess, name: str, after: int = 0) -> list[dict[str, Any]]:
    r = admin(
        cp,
        "POST",
        "/admin/sql",
        {
            "query": "SELECT id, worker_id, event, duration_ms, reason FROM model_events "
            "WHERE model = :m AND id > :after ORDER BY id",
            "params": {"m": name, "after": after},
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def last_event_id(cp: ControlPlaneProcess) -> int:
    r = admin(cp, "POST", "/admin/sql", {"query": "SELECT COALESCE(MAX(id), 0) FROM model_events"})
    return int(r.json()["rows"][0][0])


def kinds(evs: list[dict[str, Any]]) -> list[str]:
    return [e["event"] for e in evs]


def generate(cp: ControlPlaneProcess, name: str, max_new_tokens: int = 8) -> str:
    params = {"model": name, "prompt": PROMPT, "temperature": 0.0, "max_new_tokens": max_new_tokens}
    status, frames = llava_stream(f"{cp.url}/worker_generate_stream", params, timeout_s=200)
    assert status == 200 and frames[-1]["error_code"] == 0, frames[-1]
    return str(frames[-1]["text"])[len(PROMPT) :]


def make_cold(cp: ControlPlaneProcess, name: str) -> None:
    if loaded_on(cp, name):
        assert admin(cp, "POST", f"/admin/models/{name}/unload").status_code == 200
    wait_for(lambda: model(cp, name)["state"] == "unloaded", 30, f"{name} unloaded")


def cli(cp: ControlPlaneProcess, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "control_plane", "models", *args, "--url", cp.url, "--admin-token", TOKEN],
        capture_output=True,
        text=True,
        timeout=200,
        cwd=PROJECT_ROOT,
    )


# -- tests --------------------------------------------------------------------------------
def test_catalog_lists_every_servable_model_loaded_or_not(
    cp: ControlPlaneProcess, nodes: list[TritonNode]
) -> None:
    # llava under its served name; the models added on the same checkpoint under their own
    names = ["alpha", "beta", "broken", TINY_SERVED_NAME]
    assert httpx.post(f"{cp.url}/list_models", timeout=10).json() == {"models": names}
    listed = httpx.get(f"{cp.url}/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in listed] == ["alpha", "beta", "broken", TINY_SERVED_NAME]
    state = {m["id"]: (m["ready"], m["state"]) for m in listed}
    assert state[TINY_SERVED_NAME] == (True, "loaded") and state["alpha"] == (False, "unloaded")
    llava = model(cp, "llava")
    assert llava["default"] and llava["min_replicas"] == 1 and llava["replicas"] == 1
    by_worker = {p["worker"]: p for p in llava["placements"]}
    assert by_worker[nodes[0].http_url]["state"] == "loaded"
    assert by_worker[nodes[1].http_url]["state"] == "unloaded"
    assert all(p["explicit"] is True for p in llava["placements"])
    # the admin API names models as Triton does
    assert [m["model"] for m in admin(cp, "GET", "/admin/models").json()["models"]] == [*names[:3], "llava"]


def test_cold_start_serves_the_request(cp: ControlPlaneProcess, nodes: list[TritonNode]) -> None:
    assert model(cp, "alpha")["state"] == "unloaded"
    before = last_event_id(cp)
    started = time.monotonic()
    text = generate(cp, "alpha")
    took = time.monotonic() - started
    # alpha serves the checkpoint llava serves: the same greedy output
    assert text == generate(cp, "llava")
    # the emptier node got it (node 0 has llava)
    assert loaded_on(cp, "alpha") == {worker_id(cp, nodes[1])}
    wait_for(lambda: "loaded" in kinds(events(cp, "alpha", before)), 10, "loaded event")
    evs = events(cp, "alpha", before)
    assert kinds(evs) == ["load_requested", "loaded"]
    assert all(e["reason"] == "cold start" for e in evs)
    load_ms = evs[1]["duration_ms"]
    assert 0 < load_ms < took * 1000
    print(f"alpha cold start: load {load_ms / 1000:.1f} s, request {took:.1f} s")


def test_load_above_the_threshold_adds_a_replica_on_the_other_node(cp: ControlPlaneProcess) -> None:
    # alpha is on one node (from the test before) or on none (then the requests load it)
    where = loaded_on(cp, "alpha")
    if len(where) > 1:
        assert admin(cp, "POST", "/admin/models/alpha/unload", {"worker_id": min(where)}).status_code == 200
    before = last_event_id(cp)

    def loads() -> list[dict[str, Any]]:
        return [e for e in events(cp, "alpha", before) if e["event"] == "loaded"]

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        # 6 streams on one replica: 6 in flight per replica > the threshold of 2
        running = [pool.submit(generate, cp, "alpha", 1000) for _ in range(6)]
        assert all(len(f.result()) > 0 for f in running)
    # (the first replica may be idle, and unloaded, by the time the second is ready)
    wait_for(lambda: any(e["reason"].startswith("scale out: ") for e in loads()), 150, "a second replica")
    scale_out = next(e for e in loads() if e["reason"].startswith("scale out: "))
    assert "requests in flight on 1 replica(s)" in scale_out["reason"]
    first = {e["worker_id"] for e in loads() if e["reason"] == "cold start"} or where
    assert scale_out["worker_id"] not in first, events(cp, "alpha", before)


def test_idle_model_is_unloaded_after_the_ttl_and_recorded(
    cp: ControlPlaneProcess, nodes: list[TritonNode]
) -> None:
    before = last_event_id(cp)
    generate(cp, "alpha")  # on one or two nodes (from the tests before), or loaded now
    used_at = time.monotonic()
    where = loaded_on(cp, "alpha") | {
        e["worker_id"] for e in events(cp, "alpha", before) if e["event"] == "loaded"
    }
    assert where
    # the replica that served the request goes TTL_S after that; any other one earlier
    wait_for(lambda: model(cp, "alpha")["state"] == "unloaded", TTL_S + 20, "alpha unloaded everywhere")
    assert time.monotonic() - used_at >= TTL_S

    def unloaded() -> list[dict[str, Any]]:
        return [e for e in events(cp, "alpha", before) if e["event"] == "unloaded"]

    wait_for(lambda: {e["worker_id"] for e in unloaded()} >= where, 5, "an unloaded event per replica")
    assert all(e["reason"].startswith("idle for") for e in unloaded())
    served = [n for n in nodes if worker_id(cp, n) in where]

    def steps_unloaded() -> bool:
        for node in served:
            states = {m["name"]: m.get("state") for m in node.repository_index()}
            if any(states[f"alpha{s}"] == "READY" for s in ("", "_preprocess", "_engine")):
                return False
        return True

    wait_for(steps_unloaded, 30, "alpha and its steps unloaded on the nodes")
    # the default model keeps its one replica however idle it is
    assert loaded_on(cp, "llava") == {worker_id(cp, nodes[0])}
    assert "unloaded" not in kinds(events(cp, "llava"))


def test_concurrent_cold_requests_share_one_load(cp: ControlPlaneProcess) -> None:
    make_cold(cp, "beta")
    before = last_event_id(cp)

    def web_ui_flow() -> str:
        """LLaVA's web UI: ask for an address (it waits for the load), then stream from it."""
        r = httpx.post(f"{cp.url}/get_worker_address", json={"model": "beta"}, timeout=200)
        address = r.json()["address"]
        assert address == cp.url, r.json()  # cache_aware: chosen per stream
        params = {"model": "beta", "prompt": PROMPT, "temperature": 0.0, "max_new_tokens": 8}
        status, frames = llava_stream(f"{address}/worker_generate_stream", params)
        assert status == 200 and frames[-1]["error_code"] == 0
        return str(frames[-1]["text"])[len(PROMPT) :]

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        direct, via_address = pool.submit(generate, cp, "beta"), pool.submit(web_ui_flow)
        texts = [direct.result(), via_address.result()]
    assert texts[0] == texts[1]
    assert texts[0] != generate(cp, "llava")  # another checkpoint (seed 1), another model
    wait_for(lambda: "loaded" in kinds(events(cp, "beta", before)), 10, "loaded event")
    assert kinds(events(cp, "beta", before)) == ["load_requested", "loaded"]


def test_a_model_with_a_broken_checkpoint_fails_with_a_clear_error(
    cp: ControlPlaneProcess, nodes: list[TritonNode]
) -> None:
    before = last_event_id(cp)
    status, frames = llava_stream(
        f"{cp.url}/worker_generate_stream", {"model": "broken", "prompt": PROMPT}, timeout_s=200
    )
    assert status == 502 and len(frames) == 1 and frames[0]["error_code"] == 1
    assert "model 'broken' could not be loaded" in frames[0]["text"]
    assert "has no config.json" in frames[0]["text"]
    # the next request tries the other node: the OpenAI API says the same
    r = httpx.post(
        f"{cp.url}/v1/chat/completions",
        json={"model": "broken", "messages": [{"role": "user", "content": "hi"}]},
        timeout=200,
    )
    assert r.status_code == 502 and r.json()["error"]["code"] == "model_load_failed"
    assert "broken" in r.json()["error"]["message"] and "has no config.json" in r.json()["error"]["message"]

    def failures() -> list[dict[str, Any]]:
        return [e for e in events(cp, "broken", before) if e["event"] == "load_failed"]

    wait_for(lambda: len(failures()) == 2, 10, "two load_failed events")
    failed = failures()
    assert len({e["worker_id"] for e in failed}) == 2 and all("config.json" in e["reason"] for e in failed)
    # failed everywhere lately: the next request fails at once, with the cause
    started = time.monotonic()
    status, frames = llava_stream(f"{cp.url}/worker_generate_stream", {"model": "broken", "prompt": PROMPT})
    assert status == 502 and time.monotonic() - started < 2
    assert (
        "failed to load on every eligible worker" in frames[0]["text"] and "config.json" in frames[0]["text"]
    )
    assert model(cp, "broken")["state"] == "failed"
    # a failed load leaves the nodes healthy (Triton's strict readiness turns false for good)
    time.sleep(1.5)
    assert all(w["state"] == "healthy" for w in workers(cp))
    assert generate(cp, "llava")


def test_a_pinned_model_is_never_unloaded(cp: ControlPlaneProcess, nodes: list[TritonNode]) -> None:
    pinned = cli(cp, "pin", "beta")
    assert pinned.returncode == 0, pinned.stderr
    target = worker_id(cp, nodes[0])
    if target not in loaded_on(cp, "beta"):
        loaded = cli(cp, "load", "beta", "--worker", str(target))
        assert loaded.returncode == 0, loaded.stderr
        assert f"loaded on worker {target}" in loaded.stdout
    before = last_event_id(cp)
    time.sleep(TTL_S + 2)
    assert target in loaded_on(cp, "beta")
    assert "unloaded" not in kinds(events(cp, "beta", before))
    refused = cli(cp, "unload", "beta")
    assert refused.returncode == 2 and "pinned" in refused.stderr
    listed = json.loads(cli(cp, "list", "--json").stdout)["models"]
    assert next(m for m in listed if m["model"] == "beta")["pinned"] is True
    # admin refusals: below the default model's minimum, unknown model
    r = admin(cp, "POST", "/admin/models/llava/unload")
    assert r.status_code == 409 and "minimum" in r.json()["detail"]
    assert admin(cp, "POST", "/admin/models/nope/load").status_code == 404
    # unpinned, it goes when idle
    assert cli(cp, "unpin", "beta").returncode == 0
    wait_for(lambda: "unloaded" in kinds(events(cp, "beta", before)), TTL_S + 20, "beta unloaded after unpin")
    assert [e for e in kinds(events(cp, "beta")) if e.endswith("pinned")][-2:] == ["pinned", "unpinned"]
