"""Request-body size limit, enforced before a handler reads the body."""

from __future__ import annotations

from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from control_plane.api.errors import error_response
from control_plane.errors import LLAVA_BAD_REQUEST

__all__ = ["BodySizeLimit"]


class BodySizeLimit:
    """Answers 413 (in the API family's error shape) to bodies above ``max_bytes``,
    whether announced by Content-Length or streamed in chunks."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _reject(self, scope: Scope) -> Any:
        message = f"the request body is larger than the limit of {self.max_bytes} bytes"
        return error_response(
            scope["path"],
            413,
            message,
            llava_code=LLAVA_BAD_REQUEST,
            openai_type="invalid_request_error",
            openai_code="request_too_large",
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    break
                if length > self.max_bytes:
                    await self._reject(scope)(scope, receive, send)
                    return
                # The server reads exactly Content-Length bytes: nothing to count, and no
                # wrapper on the response's send (a stream calls it once per token).
                await self.app(scope, receive, send)
                return
        # No Content-Length (chunked): read the body here, up to the limit, before the app
        # sees it; a body past the limit gets 413 before any handler runs (a limit hit
        # while a handler parses the body would surface as that handler's parse error).
        messages: list[Message] = []
        seen = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                messages.append(message)
                break
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                await self._reject(scope)(scope, receive, send)
                return
            messages.append(message)
            if not message.get("more_body", False):
                break
        replay = iter(messages)

        async def buffered_receive() -> Message:
            return next(replay, None) or await receive()

        await self.app(scope, buffered_receive, send)
