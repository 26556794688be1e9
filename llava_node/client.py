"""Small helpers for calling the ``llava`` ensemble with ``tritonclient``.

Power users can call a node with tritonclient alone (see the README); these helpers
build the inputs and read the streamed responses, for the control plane, the tests
and the benchmarks.
"""

from __future__ import annotations

import json
import queue
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = [
    "Chunk",
    "GenerationResult",
    "build_inputs",
    "cancel",
    "engine_model",
    "parse_response",
    "stream_generate",
]


@dataclass
class Chunk:
    """One streamed response of ``llava``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int


@dataclass
class GenerationResult:
    """A whole stream, collected."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    chunks: int = 0

    def add(self, chunk: Chunk) -> None:
        """Fold one chunk in."""
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.chunks += 1
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        if chunk.finish_reason:
            self.finish_reason = chunk.finish_reason


def build_inputs(
    module: Any,
    *,
    prompt: str | None = None,
    messages: Sequence[dict[str, Any]] | str | None = None,
    images: Sequence[bytes] = (),
    max_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    stop: Sequence[str] = (),
    seed: int | None = None,
) -> list[Any]:
    """``InferInput`` objects for ``llava``; ``module`` is ``tritonclient.grpc`` (or
    ``.grpc.aio`` or ``.http``). Inputs left as None are not sent (server defaults)."""

    def add(name: str, dtype: str, arr: NDArray[Any]) -> None:
        inp = module.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)

    inputs: list[Any] = []
    if prompt is not None:
        add("prompt", "BYTES", np.array([prompt.encode("utf-8")], dtype=np.object_))
    if messages is not None:
        text = messages if isinstance(messages, str) else json.dumps(list(messages))
        add("messages", "BYTES", np.array([text.encode("utf-8")], dtype=np.object_))
    if images:
        add("images", "BYTES", np.array(list(images), dtype=np.object_))
    if max_tokens is not None:
        add("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32))
    if temperature is not None:
        add("temperature", "FP32", np.array([temperature], dtype=np.float32))
    if top_p is not None:
        add("top_p", "FP32", np.array([top_p], dtype=np.float32))
    if stop:
        add("stop", "BYTES", np.array([s.encode("utf-8") for s in stop], dtype=np.object_))
    if seed is not None:
        add("seed", "INT64", np.array([seed], dtype=np.int64))
    return inputs


def parse_response(result: Any) -> Chunk:
    """A tritonclient ``InferResult`` of ``llava`` as a :class:`Chunk`."""
    text = result.as_numpy("text_output")
    ids = result.as_numpy("token_ids")
    reason = result.as_numpy("finish_reason")
    prompt_tokens = result.as_numpy("prompt_tokens")
    completion = result.as_numpy("completion_tokens")
    reason_s = reason.reshape(-1)[0].decode() if reason is not None and reason.size else ""
    return Chunk(
        text=text.reshape(-1)[0].decode("utf-8") if text is not None and text.size else "",
        token_ids=[] if ids is None else [int(i) for i in ids.reshape(-1)],
        finish_reason=reason_s or None,
        prompt_tokens=int(prompt_tokens.reshape(-1)[0]) if prompt_tokens is not None else 0,
        completion_tokens=int(completion.reshape(-1)[0]) if completion is not None else 0,
    )


def stream_generate(
    grpc_url: str, model: str = "llava", timeout_s: float = 120.0, request_id: str = "", **kwargs: Any
) -> Iterator[Chunk]:
    """Stream ``model``'s responses over gRPC (blocking); raises on an error response."""
    import tritonclient.grpc as grpcclient

    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(grpc_url)
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
                chunk = parse_response(result)
                yield chunk
            if final is not None and final.bool_param:
                return
    finally:
        client.stop_stream(cancel_requests=True)
        client.close()


def engine_model(model: str) -> str:
    """The engine step of an ensemble: ``llava`` -> ``llava_engine``."""
    return f"{model}_engine"


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
        inp = grpcclient.InferInput("cancel_request_id", [1], "BYTES")
        inp.set_data_from_numpy(np.array([request_id.encode()], dtype=np.object_))
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(engine_model(model), [inp])
        result, error = responses.get(timeout=timeout_s)
        if error is not None:
            raise error
        return int(result.as_numpy("cancelled_requests").reshape(-1)[0])
    finally:
        client.stop_stream()
        client.close()
