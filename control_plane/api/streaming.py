"""What both APIs stream tokens with: the generation once started, and the response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llava_node.client import Chunk

__all__ = ["StartedStream", "TokenStreamResponse", "start_stream"]


class StartedStream:
    """A generation whose first chunk has arrived; iterating it gives every chunk, the
    first included. Close it (``aclose``) when done: that ends the generation."""

    def __init__(self, chunks: AsyncGenerator[Chunk, None], first: Chunk | None) -> None:
        self._chunks = chunks
        self._first = first

    def __aiter__(self) -> StartedStream:
        return self

    async def __anext__(self) -> Chunk:
        if self._first is not None:
            chunk, self._first = self._first, None
            return chunk
        return await anext(self._chunks)

    async def aclose(self) -> None:
        """Close the generation (cancels it on the node if it is still running)."""
        await self._chunks.aclose()


async def start_stream(chunks: AsyncGenerator[Chunk, None]) -> StartedStream:
    """Wait for the first chunk of ``chunks``, before any response starts: errors until
    then (no worker, bad input, a node that fails) raise here and get their own HTTP
    status; later ones can only be reported inside the stream."""
    try:
        first: Chunk | None = await anext(chunks)
    except StopAsyncIteration:
        first = None
    return StartedStream(chunks, first)


class TokenStreamResponse(StreamingResponse):
    """A :class:`StreamingResponse` that sends its first chunk before anything else.

    Starlette's, under a server that does not report disconnects through ``send`` (ASGI
    spec < 2.4, which uvicorn reports), opens an anyio task group with a second task that
    listens for the disconnect, before the first byte goes out. This one sends the
    headers and the first chunk from the request's own task, then starts the listener
    (a plain task); when the client goes away, the listener cancels the streaming task,
    which closes the body iterator (the generation is cancelled on the node) and ends
    quietly, as Starlette's does. The body iterator is always closed before returning.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        task = asyncio.current_task()
        assert task is not None
        state = {"disconnected": False, "done": False}

        async def watch() -> None:
            while (await receive())["type"] != "http.disconnect":
                pass
            if not state["done"]:
                state["disconnected"] = True
                task.cancel()

        watcher: asyncio.Task[None] | None = None
        iterator: Any = self.body_iterator
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in iterator:
                if not isinstance(chunk, bytes | memoryview):
                    chunk = chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watcher is None:  # after the first chunk: off the first token's path
                    watcher = asyncio.get_running_loop().create_task(watch())
            state["done"] = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not state["disconnected"] or task.uncancel() > 0:
                raise
            return  # the client went away
        except OSError:  # ASGI spec >= 2.4: send raises when the client went away
            return
        finally:
            state["done"] = True
            if watcher is not None:
                watcher.cancel()
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if self.background is not None:
            await self.background()
