"""Timeouts toward clients (control_plane/http_guard.py) on a real uvicorn server."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn

from control_plane.http_guard import ClientTimeouts, guarded_protocol
from llava_node.launcher import free_port

TIMEOUTS = ClientTimeouts(header_s=1.0, body_s=1.0, send_s=1.0)


class App:
    """Echoes a body's size; ``/stream`` sends 64 kB chunks until the client goes away."""

    def __init__(self) -> None:
        self.stream_ended = threading.Event()
        self.disconnects = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        if scope["path"] == "/stream":
            await send({"type": "http.response.start", "status": 200, "headers": []})

            async def disconnected() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass

            watcher = asyncio.ensure_future(disconnected())
            try:
                while not watcher.done():
                    await send({"type": "http.response.body", "body": b"x" * 65536, "more_body": True})
                    await asyncio.sleep(0)
            finally:
                watcher.cancel()
                self.stream_ended.set()
            return
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                self.disconnects += 1
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)
        body = str(size).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", b"%d" % len(body))],
            }
        )
        await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[int, App]]:
    app = App()
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, http=guarded_protocol(TIMEOUTS), log_level="warning", lifespan="off"
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield port, app
    finally:
        srv.should_exit = True
        thread.join(10)


def _connect(port: int, rcvbuf: int | None = None) -> socket.socket:
    s = socket.socket()
    if rcvbuf is not None:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.connect(("127.0.0.1", port))
    s.settimeout(10)
    return s


def _read_all(s: socket.socket) -> bytes:
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    return data


def test_a_complete_request_is_served(server: tuple[int, App]) -> None:
    port, _ = server
    with _connect(port) as s:
        s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello")
        assert _read_all(s).endswith(b"\r\n\r\n5")


@pytest.mark.parametrize("sent", [b"", b"POST / HTTP/1.1\r\nhost: x\r\n"])
def test_headers_that_do_not_arrive_close_the_connection(server: tuple[int, App], sent: bytes) -> None:
    port, _ = server
    with _connect(port) as s:
        s.sendall(sent)
        started = time.monotonic()
        answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"headers did not arrive within 1 s" in answer
        assert 0.8 < time.monotonic() - started < 5


def test_a_body_that_does_not_arrive_gets_408(server: tuple[int, App]) -> None:
    port, app = server
    before = app.disconnects
    with _connect(port) as s:
        s.sendall(b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\nonly ten b")
        started = time.monotonic()
        answer = _read_all(s)
        assert answer.startswith(b"HTTP/1.1 408"), answer
        assert b"body did not arrive within 1 s" in answer
        assert 0.8 < time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while app.disconnects == before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert app.disconnects == before + 1, "the app was not told that the client went away"


def test_a_client_that_reads_nothing_is_disconnected(server: tuple[int, App]) -> None:
    port, app = server
    app.stream_ended.clear()
    with _connect(port, rcvbuf=4096) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        # read nothing: the server's send buffer fills, then the send timer fires
        assert app.stream_ended.wait(10), "the stream to a client that reads nothing never ended"


def test_a_reader_that_pauses_for_less_than_the_timeout_is_not_disconnected(server: tuple[int, App]) -> None:
    port, app = server
    app.stream_ended.clear()
    with _connect(port, rcvbuf=4096) as s:
        s.sendall(b"GET /stream HTTP/1.1\r\nhost: x\r\n\r\n")
        s.settimeout(0.05)
        received = 0
        until = time.monotonic() + 4 * TIMEOUTS.send_s
        while time.monotonic() < until:
            burst_end = time.monotonic() + 0.2
            while time.monotonic() < burst_end:  # read what has arrived...
                with contextlib.suppress(TimeoutError):
                    received += len(s.recv(1 << 20))
            time.sleep(0.6 * TIMEOUTS.send_s)  # ...then nothing, for less than the send timeout
        assert not app.stream_ended.is_set()
        assert received > 1 << 20
