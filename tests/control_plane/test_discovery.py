"""DNS discovery: the A records of a name are the fleet (a Kubernetes headless Service)."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest

from control_plane.fleet.discovery import DnsDiscovery, parse_target, resolve_ipv4
from control_plane.fleet.registry import Fleet
from control_plane.fleet.workers import WorkerState
from llava_node.launcher import TritonNode
from tests.control_plane.conftest import admin_get, llava_stream, wait_for
from tests.processes import ControlPlaneProcess


@dataclass
class FakeWorker:
    id: int
    name: str
    source: str
    state: WorkerState = WorkerState.HEALTHY


@dataclass
class FakeFleet:
    """What discovery uses of a Fleet: its store's workers, register and remove."""

    workers: dict[str, FakeWorker] = field(default_factory=dict)
    removed: list[tuple[str, str]] = field(default_factory=list)

    @property
    def store(self) -> FakeFleet:
        return self

    def all(self) -> list[FakeWorker]:
        return list(self.workers.values())

    def by_name(self, name: str) -> FakeWorker | None:
        return self.workers.get(name)

    async def register(self, url: str, *, source: str, **_: Any) -> tuple[FakeWorker, bool]:
        w = FakeWorker(len(self.workers) + len(self.removed) + 1, url, source)
        self.workers[url] = w
        return w, True

    async def remove(self, worker_id: int, reason: str = "") -> FakeWorker | None:
        for name, w in list(self.workers.items()):
            if w.id == worker_id:
                del self.workers[name]
                self.removed.append((name, reason))
                return w
        return None


class Answers:
    """A resolver that gives what the test says, or fails."""

    def __init__(self) -> None:
        self.addresses: list[str] | None = []
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if self.addresses is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return list(self.addresses)


async def test_discovery_follows_the_records_and_leaves_other_workers_alone() -> None:
    fleet = FakeFleet()
    fleet.workers["http://10.0.0.9:8000"] = FakeWorker(100, "http://10.0.0.9:8000", "admin")
    answers = Answers()
    d = DnsDiscovery(cast(Fleet, fleet), "triton-nodes.llava.svc.cluster.local:8000", resolver=answers)
    answers.addresses = ["10.0.0.2", "10.0.0.1"]
    assert await d.discover() == (["http://10.0.0.1:8000", "http://10.0.0.2:8000"], [])
    assert answers.asked == [("triton-nodes.llava.svc.cluster.local", 8000)]
    assert {w.name: w.source for w in fleet.all()} == {
        "http://10.0.0.9:8000": "admin",
        "http://10.0.0.1:8000": "dns",
        "http://10.0.0.2:8000": "dns",
    }
    assert await d.discover() == ([], [])  # nothing new
    answers.addresses = ["10.0.0.2", "10.0.0.3"]  # a pod replaced
    assert await d.discover() == (["http://10.0.0.3:8000"], ["http://10.0.0.1:8000"])
    assert fleet.removed == [
        ("http://10.0.0.1:8000", "no longer in DNS (triton-nodes.llava.svc.cluster.local)")
    ]
    answers.addresses = None  # DNS down: the fleet stays as it is
    assert await d.discover() == ([], [])
    assert "Name or service not known" in d.describe()["error"]
    assert len(fleet.all()) == 3
    answers.addresses = []  # every node gone
    assert await d.discover() == ([], ["http://10.0.0.2:8000", "http://10.0.0.3:8000"])
    assert [w.name for w in fleet.all()] == ["http://10.0.0.9:8000"]  # not a dns worker: kept


@pytest.mark.parametrize(
    ("target", "expected"),
    [("nodes:8000", ("nodes", 8000)), ("10.1.2.3:9000", ("10.1.2.3", 9000)), ("[::1]:8000", ("::1", 8000))],
)
def test_targets_parse(target: str, expected: tuple[str, int]) -> None:
    assert parse_target(target) == expected


@pytest.mark.parametrize("target", ["nodes", "nodes:", ":8000", "nodes:http", "nodes:70000"])
def test_bad_targets_are_refused(target: str) -> None:
    with pytest.raises(ValueError, match="host:port"):
        parse_target(target)


async def test_the_real_resolver_gives_a_records() -> None:
    assert await resolve_ipv4("localhost", 8000) == ["127.0.0.1"]
    with pytest.raises(OSError):
        await resolve_ipv4("no-such-host.invalid", 8000)


def test_a_control_plane_finds_its_node_by_dns(fleet: list[TritonNode], tmp_path: Path) -> None:
    node = fleet[0]
    cp = ControlPlaneProcess(
        tmp_path / "cp",
        env={"LLAVA_CP_DISCOVERY_DNS": f"localhost:{node.http_port}", "LLAVA_CP_DISCOVERY_INTERVAL_S": "0.5"},
    )
    cp.start()
    try:
        wait_for(
            lambda: (
                [(w["name"], w["source"], w["state"]) for w in admin_get(cp, "/admin/workers")["workers"]]
                == [(node.http_url, "dns", "healthy")]
            ),
            20,
            "the node found by DNS and healthy",
        )
        worker = admin_get(cp, "/admin/workers")["workers"][0]
        assert worker["grpc_url"] == node.grpc_url and worker["metrics_url"] == node.metrics_url
        status, frames = llava_stream(
            f"{cp.url}/worker_generate_stream",
            {"model": "llava", "prompt": "USER: found by DNS ASSISTANT:", "max_new_tokens": 3},
        )
        assert status == 200 and frames[-1]["error_code"] == 0
    finally:
        cp.stop()
