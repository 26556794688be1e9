"""TokenStreamResponse at the ASGI level: chunks, the end, and a client that goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.types import Message

from control_plane.api.streaming import TokenStreamResponse

SCOPE = {"type": "http", "asgi": {"spec_version": "2.3"}}


class Source:
    """An async iterator of chunks that records whether it was closed."""

    def __init__(self, chunks: list[bytes], gap_s: float = 0.0) -> None:
        self.chunks = chunks
        self.gap_s = gap_s
        self.closed = False

    async def gen(self) -> AsyncIterator[bytes]:
        try:
            for c in self.chunks:
                yield c
                await asyncio.sleep(self.gap_s)
        finally:
            self.closed = True


async def test_streams_every_chunk_then_the_end() -> None:
    src = Source([b"a", b"b", b"c"])
    sent: list[Message] = []
    disconnect = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await disconnect.wait()
        return {"type": "http.disconnect"}

    async def send(m: Message) -> None:
        sent.append(m)
        if m.get("more_body") is False:
            disconnect.set()  # what uvicorn's receive answers once the response is complete

    await TokenStreamResponse(src.gen(), media_type="application/octet-stream")(SCOPE, receive, send)
    await asyncio.sleep(0.01)
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert [m["body"] for m in sent[1:]] == [b"a", b"b", b"c", b""]
    assert sent[-1]["more_body"] is False and src.closed


async def test_a_client_that_goes_away_closes_the_iterator_quietly() -> None:
    src = Source([b"x"] * 100, gap_s=0.01)
    sent: list[Message] = []
    gone = asyncio.Event()

    async def receive() -> dict[str, Any]:
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(m: Message) -> None:
        sent.append(m)

    asyncio.get_running_loop().call_later(0.05, gone.set)
    await asyncio.wait_for(TokenStreamResponse(src.gen())(SCOPE, receive, send), 5)
    assert src.closed
    assert 2 <= len(sent) < 50 and all(m.get("more_body", True) for m in sent[1:])


async def test_a_cancellation_from_elsewhere_propagates() -> None:
    src = Source([b"x"] * 100, gap_s=0.01)

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def send(_m: Message) -> None:
        pass

    task = asyncio.create_task(TokenStreamResponse(src.gen())(SCOPE, receive, send))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert src.closed
