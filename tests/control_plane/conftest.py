"""A control plane process over the session's two nodes, with helpers for its APIs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_node.launcher import TritonNode
from tests.processes import ControlPlaneProcess

# what the nodes serve the tiny checkpoint (a directory "tiny-llava") as: llava_node/served_name.py
TINY_SERVED_NAME = "tiny-llava-v1.5"
WORKER_TOKEN = "test-worker-token"  # the module control plane's: LLaVA's worker pushes need it


@pytest.fixture(scope="module")
def control_plane(
    fleet: list[TritonNode], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    """A control plane (real uvicorn, real SQLite file) with both nodes as static workers."""
    cp = ControlPlaneProcess(
        tmp_path_factory.mktemp("cp"),
        [n.http_url for n in fleet],
        env={"LLAVA_CP_WORKER_TOKEN": WORKER_TOKEN},
    )
    cp.start()
    try:
        wait_for(lambda: len(healthy_workers(cp)) == len(fleet), 30, "both workers healthy")
        yield cp
    finally:
        cp.stop()


def wait_for(predicate: Any, timeout_s: float, what: str) -> None:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for: {what}")


def admin_get(cp: ControlPlaneProcess, path: str, token: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{cp.url}{path}", headers=headers, timeout=10)
    r.raise_for_status()
    return r.json()


def healthy_workers(cp: ControlPlaneProcess) -> list[dict[str, Any]]:
    return [w for w in admin_get(cp, "/admin/workers")["workers"] if w["state"] == "healthy"]


def llava_stream(url: str, params: dict[str, Any], timeout_s: float = 60) -> tuple[int, list[dict[str, Any]]]:
    """POST LLaVA generate params; split the body on NUL bytes as LLaVA's clients do."""
    frames = []
    with httpx.stream("POST", url, json=params, timeout=timeout_s) as r:
        buf = b""
        for data in r.iter_bytes():
            buf += data
            *done, buf = buf.split(b"\0")
            frames += [json.loads(f) for f in done if f]
        assert buf == b"", "the stream ended inside a frame"
        return r.status_code, frames


def sql(cp: ControlPlaneProcess, query: str) -> list[dict[str, Any]]:
    r = httpx.post(f"{cp.url}/admin/sql", json={"query": query}, timeout=30)
    assert r.status_code == 200, r.text
    body = r.json()
    return [dict(zip(body["columns"], row, strict=True)) for row in body["rows"]]


def sql_statements(doc: Path) -> list[str]:
    """The ```sql blocks of a Markdown document."""
    text = doc.read_text()
    blocks = []
    for part in text.split("```sql")[1:]:
        blocks.append(part.split("```", 1)[0].strip())
    return blocks
