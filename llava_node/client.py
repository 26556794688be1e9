"""Small helpers for calling the ``llava`` ensemble with ``tritonclient``.

Power users can call a node with tritonclient alone (see the README); these helpers
build the inputs and read the streamed responses, for the control plane, the tests
and the benchmarks.
"""

from __future__ import annotations

import json
import queue
import struct
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
    "parse_infer_response",
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
    return parse_infer_response(result.get_response())


_INT_FORMATS = {"INT32": "i", "INT64": "q", "UINT32": "I", "UINT64": "Q", "INT16": "h", "INT8": "b"}


def _first_bytes(raw: bytes) -> bytes:
    """The first element of a serialized BYTES tensor (4-byte little-endian length, bytes)."""
    return raw[4 : 4 + int.from_bytes(raw[:4], "little")] if len(raw) >= 4 else b""


def _ints(datatype: str, raw: bytes) -> list[int]:
    """The elements of a raw little-endian integer tensor."""
    fmt = _INT_FORMATS.get(datatype)
    if fmt is None:
        raise ValueError(f"unexpected datatype {datatype} for an integer output")
    return list(struct.unpack(f"<{len(raw) // struct.calcsize(fmt)}{fmt}", raw))


def _first_int(datatype: str, raw: bytes) -> int:
    """The first element of a raw integer tensor (0 for none)."""
    if datatype in ("INT32", "INT64") and len(raw) in (4, 8):
        return int.from_bytes(raw, "little", signed=True)  # a scalar: the usual case
    ints = _ints(datatype, raw)
    return ints[0] if ints else 0


def _typed_contents(output: Any) -> tuple[list[bytes], list[int]]:
    """An output sent in typed ``contents`` fields instead of raw bytes."""
    c = output.contents
    return list(c.bytes_contents), [*c.int64_contents, *c.int_contents, *c.uint64_contents, *c.uint_contents]


def parse_infer_response(response: Any) -> Chunk:
    """A ``ModelInferResponse`` protobuf of ``llava`` (``InferResult.get_response()``) as a
    :class:`Chunk`.

    Reads the raw output bytes directly: the same values as ``InferResult.as_numpy`` for
    each of the five outputs, without building NumPy arrays (this runs once per streamed
    response on the control plane's hot path; ``tests/node/test_client_parse.py`` checks
    it against tritonclient's own parsing).
    """
    chunk = Chunk(text="", token_ids=[], finish_reason=None, prompt_tokens=0, completion_tokens=0)
    outputs = response.outputs
    raw_contents = response.raw_output_contents
    if len(raw_contents) != len(outputs):
        return _parse_typed(response, chunk)
    for output, raw in zip(outputs, raw_contents, strict=True):
        name = output.name
        if name == "text_output":
            chunk.text = _first_bytes(raw).decode("utf-8")
        elif name == "token_ids":
            chunk.token_ids = _ints(output.datatype, raw)
        elif name == "finish_reason":
            chunk.finish_reason = _first_bytes(raw).decode() or None
        elif name == "prompt_tokens":
            chunk.prompt_tokens = _first_int(output.datatype, raw)
        elif name == "completion_tokens":
            chunk.completion_tokens = _first_int(output.datatype, raw)
    return chunk


def _parse_typed(response: Any, chunk: Chunk) -> Chunk:
    # Outputs without raw bytes come in typed contents (tritonclient pairs raw bytes with
    # outputs by position, and reads the rest from ``contents``).
    raw_contents = response.raw_output_contents
    for i, output in enumerate(response.outputs):
        if i < len(raw_contents):
            raw = raw_contents[i]
            is_bytes = output.datatype == "BYTES"
            strings = [_first_bytes(raw)] if is_bytes else []
            numbers = [] if is_bytes else _ints(output.datatype, raw)
        else:
            strings, numbers = _typed_contents(output)
        name = output.name
        if name == "text_output":
            chunk.text = strings[0].decode("utf-8") if strings else ""
        elif name == "token_ids":
            chunk.token_ids = numbers
        elif name == "finish_reason":
            chunk.finish_reason = (strings[0].decode() if strings else "") or None
        elif name == "prompt_tokens":
            chunk.prompt_tokens = numbers[0] if numbers else 0
        elif name == "completion_tokens":
            chunk.completion_tokens = numbers[0] if numbers else 0
    return chunk


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
