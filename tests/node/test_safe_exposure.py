"""Safe to expose, on a real node: no single bad input takes capacity out.

Every request-caused problem comes back with the client-error prefix (the control
plane's circuit breaker counts other node errors against the node),
and a malformed direct call to ``llava_engine`` fails alone: the streams running
beside it get exactly the tokens they get alone.
"""

from __future__ import annotations

import queue
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from numpy.typing import NDArray
from tritonclient.utils import InferenceServerException

from llava_node.client import stream_generate
from llava_node.launcher import TritonNode
from llava_wire.messages import GenerationResult, build_inputs, parse_response
from llava_wire.protocol import CLIENT_ERROR_PREFIX
from tests.media import image_bytes

PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


def stream(node: TritonNode, model: str, inputs: list[Any], timeout_s: float = 60) -> GenerationResult:
    """One request on a gRPC stream; raises the error response, if one comes."""
    responses: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client = grpcclient.InferenceServerClient(node.grpc_url)
    result = GenerationResult()
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer(model, inputs, enable_empty_final_response=True)
        while True:
            r, error = responses.get(timeout=timeout_s)
            if error is not None:
                raise error
            if r.get_response().outputs:
                result.add(parse_response(r))
            final = r.get_response().parameters.get("triton_final_response")
            if final is not None and final.bool_param:
                return result
    finally:
        client.stop_stream()
        client.close()


def raw_inputs(**tensors: NDArray[Any]) -> list[Any]:
    """``InferInput`` objects from arrays (BYTES for object arrays)."""
    out = []
    for name, arr in tensors.items():
        dtype = {np.int64: "INT64", np.int32: "INT32", np.float32: "FP32"}.get(arr.dtype.type, "BYTES")
        inp = grpcclient.InferInput(name, list(arr.shape), dtype)
        inp.set_data_from_numpy(arr)
        out.append(inp)
    return out


def expect_client_error(call: Any, message: str) -> str:
    """The error a client gets: the control plane tells client errors by this prefix
    (on a stream, tritonclient reports no status code; test_triton_glue.py checks that
    the models answer INVALID_ARG)."""
    with pytest.raises(InferenceServerException) as err:
        call()
    text = str(err.value.message())
    assert CLIENT_ERROR_PREFIX + message in text, text
    return text


@pytest.mark.slow
def test_invalid_text_is_a_client_error_and_costs_the_node_nothing(node: TritonNode) -> None:
    lone = '[{"role": "user", "content": "hi \\ud800"}]'  # what a JSON client sends
    for _ in range(12):  # 12 of these took 3 nodes out of routing (as INTERNAL errors)
        expect_client_error(
            lambda: stream(node, "llava", build_inputs(grpcclient, messages=lone, max_tokens=4)),
            "messages[0].content is not valid Unicode: it holds a lone surrogate U+D800",
        )
    not_utf8 = raw_inputs(
        prompt=np.array([b"USER: hi ASSISTANT:"], dtype=np.object_),
        stop=np.array([b"ok", b"\xff\xfe"], dtype=np.object_),
    )
    expect_client_error(lambda: stream(node, "llava", not_utf8), "stop[1] is not valid UTF-8")
    cesu = raw_inputs(prompt=np.array([b"hi \xed\xa0\x80"], dtype=np.object_))  # an encoded surrogate
    expect_client_error(lambda: stream(node, "llava", cesu), "input prompt is not valid UTF-8")
    ok = stream(node, "llava", build_inputs(grpcclient, prompt="USER: still there? ASSISTANT:", max_tokens=4))
    assert ok.finish_reason == "length"


@pytest.mark.slow
def test_oversized_inputs_are_refused_quickly_with_their_limit(node: TritonNode) -> None:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (1, 2000)).save(buf, "PNG")
    started = time.monotonic()
    expect_client_error(
        lambda: stream(node, "llava", build_inputs(grpcclient, prompt=PROMPT, images=[buf.getvalue()])),
        "image 0 is 1x2000 pixels, an aspect ratio of 2000:1; the limit is 20:1",
    )
    expect_client_error(
        lambda: stream(node, "llava", build_inputs(grpcclient, prompt="word " * 2_000_000)),
        "the prompt is at least 10000000 bytes; the limit is 24576 bytes",
    )
    assert time.monotonic() - started < 3  # the two took ~4 s and ~10 s of node CPU before


def engine_inputs(ids: list[int], pixels: NDArray[Any] | None = None, max_tokens: int = 16) -> list[Any]:
    """A direct call to llava_engine, as a tritonclient user makes it."""
    tensors = {
        "input_ids": np.array(ids, dtype=np.int64),
        "pixel_values": np.zeros((0, 3, 336, 336), dtype=np.float32) if pixels is None else pixels,
        "gen_max_tokens": np.array([max_tokens], dtype=np.int32),
        "gen_temperature": np.array([0.0], dtype=np.float32),
        "gen_top_p": np.array([1.0], dtype=np.float32),
        "gen_seed": np.array([0], dtype=np.int64),
    }
    return raw_inputs(**tensors)


@pytest.mark.slow
def test_a_malformed_direct_engine_call_fails_alone(node: TritonNode, tiny_checkpoint: Path) -> None:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_checkpoint)
    vocab, image_token = int(config.text_config.vocab_size), int(config.image_token_id)
    kwargs: dict[str, Any] = {
        "prompt": PROMPT,
        "images": [image_bytes(color=(20, 200, 90))],
        "max_tokens": 48,
        "temperature": 0.0,
    }
    alone = GenerationResult()
    for chunk in stream_generate(node.grpc_url, **kwargs):
        alone.add(chunk)
    beside = GenerationResult()
    first = threading.Event()
    failure: list[BaseException] = []

    def run() -> None:
        try:
            for chunk in stream_generate(node.grpc_url, **kwargs):
                beside.add(chunk)
                first.set()
        except BaseException as exc:
            failure.append(exc)
            first.set()

    t = threading.Thread(target=run)
    t.start()
    try:
        assert first.wait(60)
        # (what failed every stream on the node, and opened the control plane's circuit)
        expect_client_error(
            lambda: stream(node, "llava_engine", engine_inputs([1, 5, vocab + 3, 9])),
            f"input_ids holds the token id {vocab + 3}; ids must be in [0, {vocab})",
        )
        expect_client_error(
            lambda: stream(node, "llava_engine", engine_inputs([1, image_token, 5])),
            f"input_ids holds 1 image tokens (id {image_token}) for 0 image(s); each image takes 576",
        )
        expect_client_error(
            lambda: stream(
                node, "llava_engine", engine_inputs([1, 5], pixels=np.zeros((1, 3, 224, 224), np.float32))
            ),
            "pixel_values is of shape [1, 3, 224, 224]; this model's vision tower takes [images, 3, 336, 336]",
        )
        expect_client_error(
            lambda: stream(node, "llava_engine", raw_inputs(gen_max_tokens=np.array([4], dtype=np.int32))),
            "bad llava_engine inputs: input input_ids is missing",
        )
    finally:
        t.join(120)
    assert not failure, failure
    assert beside.token_ids == alone.token_ids and beside.finish_reason == "length"
    # A well-formed direct call works, with the ensemble's defaults for what it leaves out.
    ok = stream(node, "llava_engine", raw_inputs(input_ids=np.array([1, 5, 9], dtype=np.int64)))
    assert ok.finish_reason in ("length", "stop") and ok.prompt_tokens == 3
