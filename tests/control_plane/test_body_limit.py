"""BodySizeLimit at the ASGI level: announced and streamed bodies."""

from __future__ import annotations

from typing import Any

from control_plane.api.limits import BodySizeLimit


def _scope(headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {"type": "http", "path": "/v1/chat/completions", "method": "POST", "headers": headers}


async def _run(limit: int, headers: list[tuple[bytes, bytes]], chunks: list[bytes]) -> tuple[list[Any], Any]:
    seen: dict[str, Any] = {}

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen["send"] = send
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    messages = [
        {"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)
    ]
    sent: list[Any] = []

    async def receive() -> Any:
        return messages.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    await BodySizeLimit(app, limit)(_scope(headers), receive, send)
    return sent, seen.get("send") is send


async def test_an_announced_body_within_the_limit_goes_straight_through() -> None:
    sent, same_send = await _run(100, [(b"content-length", b"5")], [b"hello"])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"hello"
    assert same_send  # no wrapper on the response path


async def test_an_announced_body_above_the_limit_is_413() -> None:
    sent, _ = await _run(3, [(b"content-length", b"5")], [b"hello"])
    assert sent[0]["status"] == 413


async def test_a_streamed_body_is_counted() -> None:
    sent, _ = await _run(100, [], [b"he", b"llo"])
    assert sent[0]["status"] == 200 and sent[1]["body"] == b"hello"
    sent, _ = await _run(3, [], [b"he", b"llo"])
    assert sent[0]["status"] == 413
