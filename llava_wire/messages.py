"""Requests to and responses from the ``llava`` ensemble, for any tritonclient flavour.

:func:`build_inputs` makes the ``InferInput`` objects of a generation (gRPC, gRPC aio or
HTTP: the module is an argument), :func:`parse_infer_response` reads a streamed response
into a :class:`Chunk` without NumPy (the control plane's hot path). Torch-free: the
control plane, the node, the tests and the benchmarks share it.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from llava_wire.protocol import CANCEL_INPUT

__all__ = [
    "Chunk",
    "GenerationResult",
    "build_inputs",
    "cancel_inputs",
    "parse_infer_response",
    "parse_response",
]


@dataclass
class Chunk:
    """One streamed response of ``llava``."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # prompt tokens the node served from its prefix cache


@dataclass
class GenerationResult:
    """A whole stream, collected."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    chunks: int = 0

    def add(self, chunk: Chunk) -> None:
        """Fold one chunk in."""
        self.text += chunk.text
        self.token_ids += chunk.token_ids
        self.chunks += 1
        self.prompt_tokens = chunk.prompt_tokens
        self.completion_tokens = chunk.completion_tokens
        self.cached_tokens = chunk.cached_tokens
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
    prior_token_ids: Sequence[int] = (),
) -> list[Any]:
    """``InferInput`` objects for ``llava``; ``module`` is ``tritonclient.grpc`` (or
    ``.grpc.aio`` or ``.http``). Inputs left as None are not sent (server defaults);
    ``prior_token_ids`` makes the request a continuation (see :mod:`llava_wire.protocol`)."""

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
    if prior_token_ids:
        add("prior_token_ids", "INT64", np.array(list(prior_token_ids), dtype=np.int64))
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
    each of the six outputs, without building NumPy arrays (this runs once per streamed
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
        elif name == "cached_tokens":
            chunk.cached_tokens = _first_int(output.datatype, raw)
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
        elif name == "cached_tokens":
            chunk.cached_tokens = numbers[0] if numbers else 0
    return chunk


def cancel_inputs(module: Any, request_id: str) -> list[Any]:
    """The inputs of the engine's cancel call for ``request_id`` (see
    :data:`llava_wire.protocol.CANCEL_INPUT`); ``module`` as for :func:`build_inputs`."""
    inp = module.InferInput(CANCEL_INPUT, [1], "BYTES")
    inp.set_data_from_numpy(np.array([request_id.encode()], dtype=np.object_))
    return [inp]
