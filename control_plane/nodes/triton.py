"""Streaming to Triton nodes over gRPC, with one reused client (channel) per node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from llava_node.client import Chunk, engine_model, parse_infer_response
from llava_node.protocol import CLIENT_ERROR_PREFIX

__all__ = ["NodeStreamError", "TritonPool"]

log = logging.getLogger(__name__)

_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}


class NodeStreamError(Exception):
    """A stream from a node failed.

    ``unreachable``: the node could not be reached or stopped answering (worth trying
    another node); ``client_error``: the node rejected the request itself.
    """

    def __init__(
        self, message: str, *, unreachable: bool = False, client_error: bool = False, stalled: bool = False
    ) -> None:
        super().__init__(message)
        self.message = message
        self.unreachable = unreachable
        self.client_error = client_error
        self.stalled = stalled


def _node_message(text: str) -> tuple[str, bool]:
    """The client-facing part of a node's error text, and whether it blames the request."""
    i = text.find(CLIENT_ERROR_PREFIX)
    if i >= 0:
        return text[i + len(CLIENT_ERROR_PREFIX) :], True
    return text, False


class _Watchdog:
    """Cancels a gRPC call whose node answers nothing for a timeout, like wrapping each
    wait in ``asyncio.timeout`` but cheap to re-arm: a stream waits on the node once per
    token, and a timer per wait (what ``asyncio.timeout`` makes) costs more than the rest
    of what the control plane does with a token but parsing it. One timer per stream
    instead: each wait moves a deadline, and the timer, when it fires, re-arms itself for
    the deadline unless the deadline passed during a wait; then it cancels the call (the
    wait raises ``CancelledError``) and sets :attr:`expired`.

    ``arm(timeout)`` before each wait, ``disarm()`` after it, ``close()`` at the end.
    """

    __slots__ = ("_call", "_handle", "_loop", "_when", "deadline", "expired", "waiting")

    def __init__(self, call: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._call = call
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0  # when the timer fires
        self.deadline = 0.0
        self.waiting = False
        self.expired = False

    def arm(self, timeout_s: float) -> None:
        """A wait starts; it may last ``timeout_s``."""
        self.deadline = self._loop.time() + timeout_s
        self.waiting = True
        if self._handle is None or self.deadline < self._when:  # none, or too late (a shorter timeout)
            self._schedule()

    def disarm(self) -> None:
        """The wait is over (the timer stays, to be re-armed cheaply)."""
        self.waiting = False

    def close(self) -> None:
        """Stop the timer."""
        self.waiting = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self.waiting:
            return  # between waits: the next arm() starts the timer again
        if self._loop.time() >= self.deadline:
            self.expired = True
            self._call.cancel()
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = self.deadline
        self._handle = self._loop.call_at(self.deadline, self._fire)


class TritonPool:
    """gRPC clients for the nodes, created on first use and closed together."""

    def __init__(self) -> None:
        self._clients: dict[str, grpcclient.InferenceServerClient] = {}

    def client(self, grpc_url: str) -> grpcclient.InferenceServerClient:
        """The shared client for ``grpc_url``."""
        c = self._clients.get(grpc_url)
        if c is None:
            c = grpcclient.InferenceServerClient(grpc_url)
            self._clients[grpc_url] = c
        return c

    async def drop(self, grpc_url: str) -> None:
        """Close the client of a node that left."""
        c = self._clients.pop(grpc_url, None)
        if c is not None:
            await c.close()

    async def close(self) -> None:
        """Close every client."""
        clients, self._clients = list(self._clients.values()), {}
        for c in clients:
            with contextlib.suppress(Exception):
                await c.close()

    async def stream(
        self,
        grpc_url: str,
        model: str,
        inputs: list[Any],
        request_id: str,
        *,
        first_token_timeout_s: float,
        stall_timeout_s: float,
    ) -> AsyncIterator[Chunk]:
        """Stream ``model``'s responses; raises :class:`NodeStreamError` on failure.

        Closing the iterator early (the client went away) cancels the gRPC call; the
        caller cancels the generation on the node with :meth:`cancel`.
        """

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": inputs,
                "request_id": request_id,
                "parameters": None,
                "enable_empty_final_response": True,
            }

        call = self.client(grpc_url).stream_infer(one_request())
        finished = False
        timeout = first_token_timeout_s
        watchdog = _Watchdog(call)
        try:
            while True:
                watchdog.arm(timeout)
                try:
                    result, error = await call.__anext__()
                except StopAsyncIteration:
                    raise NodeStreamError(
                        "the node closed the stream before its final response", unreachable=True
                    ) from None
                except asyncio.CancelledError:
                    task = asyncio.current_task()
                    if not watchdog.expired or (task is not None and task.cancelling()):
                        raise  # the task is cancelled: the client went away
                    raise NodeStreamError(
                        f"the node sent nothing for {timeout:g} s", unreachable=True, stalled=True
                    ) from None
                except grpc.aio.AioRpcError as exc:
                    raise NodeStreamError(
                        f"the node at {grpc_url} failed: {exc.code().name}: {exc.details()}",
                        unreachable=exc.code() in _UNREACHABLE,
                    ) from None
                finally:
                    watchdog.disarm()
                if error is not None:
                    finished = True
                    message, client_error = _node_message(str(error.message()))
                    raise NodeStreamError(message, client_error=client_error)
                response = result.get_response()
                final = response.parameters.get("triton_final_response")
                if response.outputs:
                    yield parse_infer_response(response)
                timeout = stall_timeout_s
                if final is not None and final.bool_param:
                    finished = True
                    return
        finally:
            watchdog.close()
            if not finished:
                with contextlib.suppress(Exception):
                    call.cancel()

    async def cancel(self, grpc_url: str, model: str, request_id: str, timeout_s: float = 5.0) -> int:
        """Stop the generation with ``request_id`` on a node; returns how many were running.

        Triton 2.51 does not pass a stream's cancellation on to an ensemble step that is
        already running, so the engine is told directly.
        """
        inp = grpcclient.InferInput("cancel_request_id", [1], "BYTES")
        inp.set_data_from_numpy(np.array([request_id.encode()], dtype=np.object_))

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": engine_model(model), "inputs": [inp], "enable_empty_final_response": True}

        call = self.client(grpc_url).stream_infer(one_request())
        try:
            async with asyncio.timeout(timeout_s):
                async for result, error in call:
                    if error is not None:
                        raise InferenceServerException(msg=str(error.message()))
                    if result.get_response().outputs:
                        return int(result.as_numpy("cancelled_requests").reshape(-1)[0])
        finally:
            with contextlib.suppress(Exception):
                call.cancel()
        return 0
