"""One error body per API family, for every failure a client can see.

* LLaVA protocol streams (``.../worker_generate_stream``): one NUL-terminated frame
  ``{"text": message, "error_code": n}``, with an HTTP status that fits.
* OpenAI API (``/v1/...``): ``{"error": {"message", "type", "param", "code"}}``.
* Everything else (admin, LLaVA's other endpoints): ``{"detail": message}``.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from control_plane.api.streaming import ClientGone
from control_plane.errors import (
    LLAVA_BAD_REQUEST,
    LLAVA_NODE_ERROR,
    BadRequest,
    Overloaded,
    ServiceError,
)

__all__ = ["error_response", "install", "llava_frame", "validation_message"]

log = logging.getLogger(__name__)


def llava_frame(payload: dict[str, Any]) -> bytes:
    """One frame of LLaVA's stream: JSON, then a NUL byte."""
    return orjson.dumps(payload) + b"\0"


def _family(path: str) -> str:
    if path.startswith("/v1/"):
        return "openai"
    if path.endswith("/worker_generate_stream"):
        return "llava_stream"
    return "plain"


def error_response(
    path: str,
    status: int,
    message: str,
    *,
    llava_code: int,
    openai_type: str,
    openai_code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> Response:
    """The error response for a request to ``path``, in its API family's shape."""
    family = _family(path)
    if family == "openai":
        body = {"error": {"message": message, "type": openai_type, "param": param, "code": openai_code}}
        return JSONResponse(body, status_code=status, headers=headers)
    if family == "llava_stream":
        return Response(
            llava_frame({"text": message, "error_code": llava_code}),
            status_code=status,
            media_type="application/octet-stream",
            headers=headers,
        )
    return JSONResponse({"detail": message}, status_code=status, headers=headers)


def service_error_response(path: str, exc: ServiceError) -> Response:
    """The response for a :class:`ServiceError`."""
    headers = None
    if isinstance(exc, Overloaded):
        headers = {"Retry-After": str(max(1, round(exc.retry_after_s)))}
    return error_response(
        path,
        exc.status_code,
        exc.message,
        llava_code=exc.llava_code,
        openai_type=exc.openai_type,
        openai_code=exc.openai_code,
        param=exc.param,
        headers=headers,
    )


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


def install(app: FastAPI) -> None:
    """Register the exception handlers."""

    @app.exception_handler(ServiceError)
    async def _service(request: Request, exc: ServiceError) -> Response:
        return service_error_response(request.url.path, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> Response:
        message, param = validation_message(exc)
        return service_error_response(request.url.path, BadRequest(message, param=param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        code = LLAVA_BAD_REQUEST if exc.status_code < 500 else LLAVA_NODE_ERROR
        return error_response(
            request.url.path,
            exc.status_code,
            str(exc.detail),
            llava_code=code,
            openai_type=kind,
            openai_code=None,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(ClientGone)
    @app.exception_handler(ClientDisconnect)
    async def _gone(_request: Request, _exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it: the client has gone

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        log.exception("unhandled error on %s", request.url.path)
        return error_response(
            request.url.path,
            500,
            f"internal error: {type(exc).__name__}",
            llava_code=LLAVA_NODE_ERROR,
            openai_type="server_error",
        )
