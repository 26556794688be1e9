"""``parse_infer_response`` (raw output bytes) against tritonclient's own parsing (NumPy)."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.grpc import InferResult, service_pb2
from tritonclient.utils import serialize_byte_tensor

from llava_wire.messages import Chunk, parse_infer_response, parse_response

OUTPUTS: dict[str, tuple[str, Any]] = {
    "text_output": ("BYTES", np.object_),
    "token_ids": ("INT64", np.int64),
    "finish_reason": ("BYTES", np.object_),
    "prompt_tokens": ("INT32", np.int32),
    "completion_tokens": ("INT32", np.int32),
}


def make_response(values: dict[str, Any], *, raw: bool = True, order: list[str] | None = None) -> Any:
    """A ``ModelInferResponse`` as a node sends it: raw output bytes (or typed contents)."""
    response = service_pb2.ModelInferResponse(model_name="llava", id="req-1")
    for name in order or list(values):
        datatype, dtype = OUTPUTS[name]
        arr = np.array(values[name], dtype=dtype)
        out = response.outputs.add(name=name, datatype=datatype, shape=list(arr.shape))
        if raw:
            data = serialize_byte_tensor(arr).item() if datatype == "BYTES" else arr.tobytes()
            response.raw_output_contents.append(data)
        elif datatype == "BYTES":
            out.contents.bytes_contents.extend(arr.tolist())
        elif datatype == "INT64":
            out.contents.int64_contents.extend(int(x) for x in arr)
        else:
            out.contents.int_contents.extend(int(x) for x in arr)
    return response


def reference(response: Any) -> Chunk:
    """What the control plane parsed before: tritonclient's ``as_numpy`` per output."""
    result = InferResult(response)
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


def values(text: str, ids: list[int], reason: str, prompt: int, completion: int) -> dict[str, Any]:
    return {
        "text_output": [text.encode("utf-8")],
        "token_ids": ids,
        "finish_reason": [reason.encode()],
        "prompt_tokens": [prompt],
        "completion_tokens": [completion],
    }


CASES = [
    values(" hello", [1234], "", 17, 1),
    values("", [], "", 17, 3),  # a token that completes no character yet
    values("日本 → ok", [5, 6, 7], "stop", 600, 64),
    values("x", [2**40, -1], "length", 2**31 - 1, 0),
    values("", [], "cancelled", 0, 12),
]


@pytest.mark.parametrize("case", CASES)
def test_same_as_tritonclient(case: dict[str, Any]) -> None:
    response = make_response(case)
    assert parse_infer_response(response) == reference(response)
    assert parse_response(InferResult(response)) == reference(response)


@pytest.mark.parametrize("case", CASES)
def test_typed_contents(case: dict[str, Any]) -> None:
    """Outputs in typed ``contents`` fields (tritonclient reads only BYTES ones there)."""
    expected = parse_infer_response(make_response(case))
    assert parse_infer_response(make_response(case, raw=False)) == expected


def test_any_output_order_and_missing_outputs() -> None:
    case = values("abc", [9, 8], "stop", 3, 2)
    names = list(case)
    rng = random.Random(0)
    for _ in range(20):
        rng.shuffle(names)
        kept = names[: rng.randint(0, len(names))]
        response = make_response({n: case[n] for n in kept}, order=kept)
        assert parse_infer_response(response) == reference(response)


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(),
    ids=st.lists(st.integers(-(2**63), 2**63 - 1), max_size=8),
    reason=st.sampled_from(["", "stop", "length", "cancelled"]),
    prompt=st.integers(0, 2**31 - 1),
    completion=st.integers(0, 2**31 - 1),
)
def test_property_same_as_tritonclient(
    text: str, ids: list[int], reason: str, prompt: int, completion: int
) -> None:
    response = make_response(values(text, ids, reason, prompt, completion))
    assert parse_infer_response(response) == reference(response)
