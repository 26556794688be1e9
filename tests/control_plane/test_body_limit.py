"""The request-body limit: 413 before any handler reads the body, in each API family's shape,
whether the body is announced by Content-Length or streamed in chunks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from control_plane.config import Settings
from control_plane.main import create_app
from control_plane.nodes.fake import FakeNodeClient

LIMIT = 2000


@pytest.fixture()
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings(data_dir=tmp_path, max_body_bytes=LIMIT, poll_interval_s=60, lease_period_s=120)
    with TestClient(create_app(settings, node_client=FakeNodeClient())) as c:
        yield c


def chunked(payload: bytes) -> Iterator[bytes]:
    for i in range(0, len(payload), 500):
        yield payload[i : i + 500]


BIG = json.dumps({"model": "llava", "prompt": "x" * (2 * LIMIT), "query": "x" * (2 * LIMIT)}).encode()
SMALL = json.dumps({"model": "llava", "messages": [{"role": "user", "content": "hi"}]}).encode()


@pytest.mark.parametrize("streamed", [False, True])
def test_an_oversized_body_gets_413_in_each_familys_shape(client: TestClient, streamed: bool) -> None:
    def post(path: str) -> object:
        return client.post(path, content=chunked(BIG) if streamed else BIG)

    openai = post("/v1/chat/completions")
    assert openai.status_code == 413  # type: ignore[attr-defined]
    assert openai.json()["error"]["code"] == "request_too_large"  # type: ignore[attr-defined]
    llava = post("/worker_generate_stream")
    assert llava.status_code == 413  # type: ignore[attr-defined]
    frame = json.loads(llava.content.rstrip(b"\0"))  # type: ignore[attr-defined]
    assert frame["error_code"] == 5 and f"limit of {LIMIT} bytes" in frame["text"]
    admin = post("/admin/sql")
    assert admin.status_code == 413 and f"limit of {LIMIT} bytes" in admin.json()["detail"]  # type: ignore[attr-defined]


def test_a_body_within_the_limit_reaches_its_handler_streamed_or_not(client: TestClient) -> None:
    for content in (SMALL, chunked(SMALL)):
        r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
        # no node serves llava here: the handler ran and said so
        assert r.status_code == 404 and "no worker serves model 'llava'" in r.json()["error"]["message"]


def test_errors_outside_every_route_are_plain(client: TestClient) -> None:
    assert client.get("/v1/nothing-here").json() == {"detail": "Not Found"}
    assert client.get("/worker_generate_stream").status_code == 405
