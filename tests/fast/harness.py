"""The control plane in-process on fake nodes: its app through its real lifespan (a real
SQLite file, the real poller, admission, breaker, lifecycle), driven over ASGI by a client
that can disconnect at any moment. Nothing here opens a socket."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import FastAPI

from control_plane.config import Settings
from control_plane.container import ControlPlane
from control_plane.main import create_app
from control_plane.nodes.fake import FakeNode, FakeNodeClient

FAST = {  # short intervals so that tests take milliseconds, not the production seconds
    "poll_interval_s": 0.05,
    "poll_timeout_s": 0.05,
    "lease_period_s": 5.0,  # long against a stall of a loaded machine (tests of lapses set theirs)
    "lifecycle_interval_s": 0.05,
    "db_flush_interval_s": 0.01,
    "retry_backoff_s": 0.0,
    "breaker_cooldown_s": 0.2,
    "unhealthy_after_failures": 2,
    "idle_ttl_s": 0,
    "scale_out_inflight": 0,
}


def node(port: int, **behaviour: Any) -> FakeNode:
    """A fake node at ``http://127.0.0.1:<port>`` with ``llava`` loaded."""
    return FakeNode(f"http://127.0.0.1:{port}", **behaviour)


@dataclass
class Response:
    """What a client got: status, headers and the body's chunks as sent."""

    status: int
    headers: dict[str, str]
    chunks: list[bytes] = field(default_factory=list)

    @property
    def body(self) -> bytes:
        return b"".join(self.chunks)

    def json(self) -> Any:
        return json.loads(self.body)

    def frames(self) -> list[dict[str, Any]]:
        """LLaVA's NUL-delimited frames."""
        return [json.loads(f) for f in self.body.split(b"\0") if f]

    def events(self) -> list[Any]:
        """SSE ``data:`` payloads (``[DONE]`` as the string)."""
        out: list[Any] = []
        for line in self.body.decode().split("\n"):
            if line.startswith("data: "):
                data = line[6:]
                out.append(data if data == "[DONE]" else json.loads(data))
        return out


class Client:
    """Calls the app over ASGI. ``disconnect_after``: chunks of the response body after
    which the client goes away; ``disconnect_at``: seconds after the call."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        *,
        headers: dict[str, str] | None = None,
        disconnect_after: int | None = None,
        disconnect_at: float | None = None,
        timeout_s: float = 10.0,
    ) -> Response:
        raw = b"" if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        hdrs = [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
        hdrs += [(b"content-type", b"application/json"), (b"content-length", str(len(raw)).encode())]
        path, _, query = path.partition("?")
        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "query_string": query.encode(),
            "root_path": "",
            "headers": hdrs,
            "client": ("127.0.0.1", 50000),
            "server": ("testserver", 80),
        }
        gone = asyncio.Event()
        sent_body = False
        result = Response(0, {})

        async def receive() -> MutableMapping[str, Any]:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": raw, "more_body": False}
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: MutableMapping[str, Any]) -> None:
            if gone.is_set():
                return  # uvicorn drops what is sent to a client that left
            if message["type"] == "http.response.start":
                result.status = message["status"]
                result.headers = {k.decode(): v.decode() for k, v in message.get("headers", [])}
            elif message["type"] == "http.response.body":
                if message.get("body"):
                    result.chunks.append(message["body"])
                if not message.get("more_body", False):
                    gone.set()  # complete: what uvicorn's receive answers from now on
                elif disconnect_after is not None and len(result.chunks) >= disconnect_after:
                    gone.set()

        if disconnect_at is not None:
            asyncio.get_running_loop().call_later(disconnect_at, gone.set)
        await asyncio.wait_for(self.app(scope, receive, send), timeout_s)
        return result

    async def post(self, path: str, body: Any = None, **kwargs: Any) -> Response:
        return await self.request("POST", path, body, **kwargs)

    async def get(self, path: str, **kwargs: Any) -> Response:
        return await self.request("GET", path, **kwargs)


class Harness:
    """One control plane on fake nodes."""

    def __init__(
        self, tmp_path: Path, nodes: list[FakeNode], *, fakes: FakeNodeClient | None = None, **settings: Any
    ) -> None:
        """``fakes``: the node client of another harness, for replicas that share the nodes."""
        self.nodes = fakes or FakeNodeClient(nodes)
        workers = settings.pop("workers", [n.http_url for n in nodes])
        self.settings = Settings(
            **{
                "data_dir": tmp_path,
                "workers": workers,
                "worker_allowed_hosts": ["loopback"],
                **FAST,
                **settings,
            }
        )
        self.app = create_app(self.settings, node_client=self.nodes)
        self.client = Client(self.app)

    @property
    def cp(self) -> ControlPlane:
        cp: ControlPlane = self.app.state.cp
        return cp

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Harness]:
        """The app through its lifespan (startup, then shutdown on exit)."""
        async with self.app.router.lifespan_context(self.app):
            yield self

    async def llava(self, path: str = "/worker_generate_stream", **params: Any) -> Response:
        """A LLaVA-protocol generation (``disconnect_after`` / ``disconnect_at`` / ``headers``)."""
        opts = {
            k: params.pop(k)
            for k in ("disconnect_after", "disconnect_at", "headers", "timeout_s")
            if k in params
        }
        body = {"model": "llava", "prompt": "USER: hi ASSISTANT:", **params}
        return await self.client.post(path, body, **opts)

    async def chat(self, **params: Any) -> Response:
        """An OpenAI chat completion."""
        opts = {
            k: params.pop(k)
            for k in ("disconnect_after", "disconnect_at", "headers", "timeout_s")
            if k in params
        }
        body = {"model": "llava", "messages": [{"role": "user", "content": "hi"}], **params}
        return await self.client.post("/v1/chat/completions", body, **opts)

    async def rows(self, query: str) -> list[dict[str, Any]]:
        """Rows of a read-only query (the batch writer is flushed first)."""
        r = await self.client.post("/admin/sql", {"query": query})
        assert r.status == 200, r.body
        data = r.json()
        return [dict(zip(data["columns"], row, strict=True)) for row in data["rows"]]

    def worker(self, fake: FakeNode) -> Any:
        info = self.cp.store.by_name(fake.http_url)
        assert info is not None
        return info


async def eventually(predicate: Any, timeout_s: float = 3.0, what: str = "") -> None:
    """Wait until ``predicate()`` holds (polls every 10 ms)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or predicate}")
