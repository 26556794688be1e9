"""Blocking tritonclient helpers for power users: stream a generation from a node, cancel one.

The requests and responses themselves are :mod:`llava_wire.messages`.
"""

from __future__ import annotations

import queue
from collections.abc import Iterator
from typing import Any

from llava_wire.messages import Chunk, build_inputs, cancel_inputs, parse_response
from llava_wire.protocol import CANCEL_OUTPUT, engine_model

__all__ = ["cancel", "stream_generate"]


def stream_generate(
    grpc_url: str, model: str = "llava", timeout_s: float = 120.0, request_id: str = "", **kwargs: Any
) -> Iterator[Chunk]:
    """Stream ``model``'s responses over gRPC (blocking); raises on an error response."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    ended = False
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(
            model,
            build_inputs(grpcclient, **kwargs),
            request_id=request_id,
            enable_empty_final_response=True,
        )
        while True:
            result, error = responses.get(timeout=timeout_s)
            if error is not None:
                raise error
            final = result.get_response().parameters.get("triton_final_response")
            if result.get_response().outputs:
                yield parse_response(result)
            if final is not None and final.bool_param:
                ended = True
                return
    finally:
        # An ended stream is left to close, not cancelled: Triton 2.51 leaks a request whose
        # client cancels right after its final response (its model then never unloads).
        client.stop_stream(cancel_requests=not ended)
        client.close()


def cancel(grpc_url: str, request_id: str, model: str = "llava", timeout_s: float = 10.0) -> int:
    """Cancel the requests with ``request_id`` on a node; returns how many were running.

    Triton 2.51 does not pass a client's cancellation on to an ensemble step that is
    already running, so closing a stream alone leaves the engine generating; this call
    reaches the engine itself.
    """
    import tritonclient.grpc as grpcclient

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(engine_model(model), cancel_inputs(grpcclient, request_id))
        result, error = responses.get(timeout=timeout_s)
        if error is not None:
            raise error
        return int(result.as_numpy(CANCEL_OUTPUT).reshape(-1)[0])
    finally:
        client.stop_stream()
        client.close()
