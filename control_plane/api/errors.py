"""The error body of each API family, for every failure a client can see.

* OpenAI API (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``
  (:func:`openai_error`);
* LLaVA protocol streams (``.../worker_generate_stream``): one NUL-terminated frame
  ``{"text": message, "error_code": n}``, with an HTTP status that fits (:func:`llava_error`);
* everything else (admin, LLaVA's other endpoints): ``{"detail": message}`` (:func:`plain_error`).

Each family's router renders its own (:func:`control_plane.api.routes.family_route`); the
handlers :func:`install` adds answer only what no route handles: an unknown path, a
method a path does not take, and a client that left.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from control_plane.api.streaming import ClientGone
from control_plane.errors import Overloaded, ServiceError

__all__ = ["install", "llava_error", "llava_frame", "openai_error", "plain_error"]

log = logging.getLogger(__name__)


def llava_frame(payload: dict[str, Any]) -> bytes:
    """One frame of LLaVA's stream: JSON, then a NUL byte."""
    return orjson.dumps(payload) + b"\0"


def _headers(exc: ServiceError) -> dict[str, str] | None:
    if isinstance(exc, Overloaded):
        return {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return None


def openai_error(exc: ServiceError) -> Response:
    """OpenAI's error body."""
    body = {
        "error": {
            "message": exc.message,
            "type": exc.openai_type,
            "param": exc.param,
            "code": exc.openai_code,
        }
    }
    return JSONResponse(body, status_code=exc.status_code, headers=_headers(exc))


def llava_error(exc: ServiceError) -> Response:
    """LLaVA's error frame."""
    return Response(
        llava_frame({"text": exc.message, "error_code": exc.llava_code}),
        status_code=exc.status_code,
        media_type="application/octet-stream",
        headers=_headers(exc),
    )


def plain_error(exc: ServiceError) -> Response:
    """``{"detail": message}``."""
    return JSONResponse({"detail": exc.message}, status_code=exc.status_code, headers=_headers(exc))


def install(app: FastAPI) -> None:
    """The handlers for what no route handles."""

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _gone(_request: Request, _exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has gone

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> Response:
        return JSONResponse({"detail": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse({"detail": f"internal error: {type(exc).__name__}"}, status_code=500)
