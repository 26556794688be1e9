"""What both APIs stream tokens with: the generation once started, and the response."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterable, Awaitable, Mapping
from typing import Any, TypeVar

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from llava_wire.messages import Chunk

__all__ = [
    "ClientGone",
    "ClientWatch",
    "StartedStream",
    "TokenStreamResponse",
    "start_stream",
    "start_watched",
]

T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before its response began (answered with nothing: it is gone)."""


class ClientWatch:
    """Cancels the request's task when its client disconnects.

    Started once the request's body is read, it covers the whole request: the wait for a
    node and for the first token (a client that leaves while queued gives its place up),
    a non-streamed answer being collected, and then the stream (handed to
    :class:`TokenStreamResponse`). Run the waits before the response with :meth:`guard`.
    """

    __slots__ = ("_receive", "_task", "_watcher", "disconnected", "done")

    def __init__(self, receive: Receive) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._task = task
        self._receive = receive
        self.disconnected = False
        self.done = False
        self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        try:
            while (await self._receive())["type"] != "http.disconnect":
                pass
        except Exception:  # the server could not say: treat it as gone
            pass
        if not self.done:
            self.disconnected = True
            self._task.cancel()

    def went_away(self) -> bool:
        """Whether a ``CancelledError`` being handled is this watch's (then it is consumed)."""
        return self.disconnected and self._task.uncancel() == 0

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await ``awaitable``; raise :class:`ClientGone` if the client leaves meanwhile."""
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.went_away():
                self.close()
                raise ClientGone from None
            raise

    def close(self) -> None:
        """Stop watching (the response is complete, or the request failed)."""
        self.done = True
        self._watcher.cancel()


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


async def start_watched(
    chunks: AsyncGenerator[Chunk, None], receive: Receive
) -> tuple[ClientWatch, StartedStream]:
    """:func:`start_stream` with a :class:`ClientWatch` on the request's ``receive``: a
    client that leaves before the first chunk cancels the wait (and the generation). The
    watch goes on to the response, which closes it; it is closed here if starting fails."""
    watch = ClientWatch(receive)
    try:
        return watch, await watch.guard(start_stream(chunks))
    except BaseException:
        watch.close()
        raise


class TokenStreamResponse(StreamingResponse):
    """A :class:`StreamingResponse` that sends its first chunk before anything else.

    Starlette's, under a server that does not report disconnects through ``send`` (ASGI
    spec < 2.4, which uvicorn reports), opens an anyio task group with a second task that
    listens for the disconnect, before the first byte goes out. This one sends the
    headers and the first chunk from the request's own task, with a :class:`ClientWatch`
    listening (the request's, or its own, started after the first chunk); when the client
    goes away, the watch cancels the streaming task, which closes the body iterator (the
    generation is cancelled on the node) and ends quietly, as Starlette's does. The body
    iterator is always closed before returning.
    """

    def __init__(
        self,
        content: AsyncIterable[bytes],
        *,
        media_type: str | None = None,
        headers: Mapping[str, str] | None = None,
        watch: ClientWatch | None = None,
    ) -> None:
        super().__init__(content, media_type=media_type, headers=headers)
        self.watch = watch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await super().__call__(scope, receive, send)
            return
        watch = self.watch
        iterator: Any = self.body_iterator
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            async for chunk in iterator:
                if not isinstance(chunk, bytes | memoryview):
                    chunk = chunk.encode(self.charset)
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                if watch is None:  # after the first chunk: off the first token's path
                    watch = ClientWatch(receive)
            if watch is not None:
                watch.done = True
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if watch is None or not watch.went_away():
                raise
            return  # the client went away
        except OSError:  # ASGI spec >= 2.4: send raises when the client went away
            return
        finally:
            if watch is not None:
                watch.close()
            aclose = getattr(iterator, "aclose", None)
            if aclose is not None:
                await aclose()
        if self.background is not None:
            await self.background()
