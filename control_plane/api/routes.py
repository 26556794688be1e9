"""Routes whose API family renders their errors, and bounds their bodies.

Each router of an API family is made with ``route_class=family_route(render)``: every
:class:`~control_plane.errors.ServiceError` its handlers (or their dependencies, or the
parsing of their bodies) raise is answered by ``render``, the family's error shape (an
OpenAI error body, a LLaVA error frame, an admin ``detail``). A body larger than
``max_body_bytes`` gets 413 in that shape before any handler reads it, whether announced
by Content-Length or streamed in chunks (a chunked body is read here, up to the limit).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException
from starlette.types import Message

from control_plane.errors import BadRequest, PayloadTooLarge, ServiceError

__all__ = ["Render", "family_route", "validation_message"]

log = logging.getLogger(__name__)

Render = Callable[[ServiceError], Response]


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A readable message for a request that failed validation, and the first bad field."""
    parts = []
    param = None
    for err in exc.errors():
        loc = [str(p) for p in err.get("loc", ()) if p != "body"]
        where = ".".join(loc)
        if err.get("type") == "json_invalid":
            parts.append(f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
            continue
        param = param or (where or None)
        msg = str(err.get("msg")).removeprefix("Value error, ")
        parts.append(f"{where}: {msg}" if where else msg)
    return "; ".join(parts) or "invalid request", param


async def _bounded(request: Request, limit: int) -> Request:
    """``request``, its body checked against ``limit`` first (read here when chunked)."""
    length = request.headers.get("content-length")
    if length is not None:
        if length.isdigit() and int(length) > limit:
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
        return request  # the server reads exactly Content-Length bytes: nothing to count
    messages: list[Message] = []
    seen = 0
    while True:
        message = await request.receive()
        messages.append(message)
        if message["type"] != "http.request":  # the client went away
            break
        seen += len(message.get("body", b""))
        if seen > limit:
            raise PayloadTooLarge(f"the request body is larger than the limit of {limit} bytes")
        if not message.get("more_body", False):
            break
    replay = iter(messages)
    receive = request.receive

    async def buffered() -> Message:
        return next(replay, None) or await receive()

    return Request(request.scope, buffered)


def family_route(render: Render) -> type[APIRoute]:
    """A route class whose errors ``render`` answers (see the module docstring)."""

    class FamilyRoute(APIRoute):
        def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
            handler = super().get_route_handler()

            async def route(request: Request) -> Response:
                try:
                    request = await _bounded(request, request.app.state.settings.max_body_bytes)
                    return await handler(request)
                except ServiceError as exc:
                    return render(exc)
                except RequestValidationError as exc:
                    message, param = validation_message(exc)
                    return render(BadRequest(message, param=param))
                except HTTPException as exc:  # e.g. FastAPI's "error parsing the body"
                    if exc.status_code >= 500:
                        raise
                    return render(BadRequest(str(exc.detail)))

            return route

    FamilyRoute.__name__ = f"FamilyRoute[{getattr(render, '__name__', 'render')}]"
    return FamilyRoute
