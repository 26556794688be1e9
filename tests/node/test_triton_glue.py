"""The models' Triton glue in-process, over a fake ``triton_python_backend_utils``.

On a real node a stream's error reaches tritonclient as text only (no status code), so
these tests check what a node cannot show: request-caused errors are INVALID_ARG and
node faults INTERNAL, and every path ends a request's stream with exactly one response
flagged final (Triton frees a request, and can unload its model, only then).
"""

from __future__ import annotations

import importlib.util
import json
import sys
import threading
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from torch.utils.dlpack import from_dlpack, to_dlpack  # type: ignore[attr-defined]

from llava_node.engine.batching import BatchingEngine
from llava_node.engine.loading import load_llava
from llava_node.engine.runner import LlavaRunner, RunnerConfig
from llava_node.launcher import PROJECT_ROOT
from llava_node.preprocess import Preprocessor
from llava_wire.protocol import CLIENT_ERROR_PREFIX, MODEL_INFO_METRIC

FINAL = 1


class TritonError:
    INVALID_ARG = "INVALID_ARG"
    INTERNAL = "INTERNAL"

    def __init__(self, message: str, code: str = "INTERNAL") -> None:
        message.encode("utf-8")  # pybind11 converts to std::string: a surrogate raises there
        self._message, self._code = message, code

    def message(self) -> str:
        return self._message

    def code(self) -> str:
        return self._code


class Tensor:
    def __init__(self, name: str, array: Any) -> None:
        self.name, self.array = name, np.asarray(array)

    @staticmethod
    def from_dlpack(name: str, capsule: Any) -> Tensor:
        return Tensor(name, from_dlpack(capsule).numpy().copy())

    def as_numpy(self) -> Any:
        return self.array

    def to_dlpack(self) -> Any:
        return to_dlpack(torch.from_numpy(np.ascontiguousarray(self.array)))


class InferenceResponse:
    def __init__(self, output_tensors: list[Tensor], error: TritonError | None = None) -> None:
        self.outputs = {t.name: t.array for t in output_tensors}
        self.error = error


class Sender:
    """A response sender as the Python backend's stub behaves: closed by the first
    send flagged final (even one that then fails), refusing anything after."""

    def __init__(self) -> None:
        self.sent: list[tuple[InferenceResponse | None, int, float]] = []
        self.closed = False
        self.fail_sends = 0  # the next n sends raise (the server refused them)
        self.done = threading.Event()

    def send(self, response: InferenceResponse | None = None, flags: int = 0) -> None:
        if self.closed:
            raise RuntimeError("Unable to send response. Response sender has been closed.")
        if flags == FINAL:
            self.closed = True
        if self.fail_sends:
            self.fail_sends -= 1
            raise RuntimeError("An error occurred while sending a response.")
        self.sent.append((response, flags, time.monotonic()))
        if flags == FINAL:
            self.done.set()

    def finals(self) -> int:
        return sum(1 for _, flags, _ in self.sent if flags == FINAL)


class Request:
    def __init__(self, inputs: dict[str, Any], request_id: str = "") -> None:
        self.inputs = inputs
        self._id = request_id
        self.sender = Sender()

    def request_id(self) -> str:
        return self._id

    def get_response_sender(self) -> Sender:
        return self.sender

    def is_cancelled(self) -> bool:
        return False


def get_input_tensor_by_name(request: Request, name: str) -> Tensor | None:
    arr = request.inputs.get(name)
    return None if arr is None else Tensor(name, arr)


def load_model(name: str) -> Any:
    """``model_repository/<name>/1/model.py`` as a module, over the fake utils."""
    path = PROJECT_ROOT / "model_repository" / name / "1" / "model.py"
    spec = importlib.util.spec_from_file_location(f"_glue_test_{name}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class MetricFamily:
    """Triton's custom-metric family: its metrics' labels and values, as set."""

    COUNTER, GAUGE = "counter", "gauge"
    families: ClassVar[list[MetricFamily]] = []

    def __init__(self, name: str, description: str, kind: str) -> None:
        self.name, self.kind = name, kind
        self.metrics: list[_Metric] = []
        MetricFamily.families.append(self)

    def Metric(self, labels: dict[str, str]) -> _Metric:
        metric = _Metric(labels)
        self.metrics.append(metric)
        return metric


class _Metric:
    def __init__(self, labels: dict[str, str]) -> None:
        self.labels, self.value = labels, 0.0

    def set(self, value: float) -> None:
        self.value = value

    def increment(self, value: float) -> None:
        self.value += value


@pytest.fixture(scope="module")
def models() -> Iterator[dict[str, Any]]:
    fake = types.ModuleType("triton_python_backend_utils")
    for obj in (TritonError, Tensor, InferenceResponse, get_input_tensor_by_name, MetricFamily):
        setattr(fake, obj.__name__, obj)
    fake.TRITONSERVER_RESPONSE_COMPLETE_FINAL = FINAL  # type: ignore[attr-defined]
    saved = sys.modules.get("triton_python_backend_utils")
    sys.modules["triton_python_backend_utils"] = fake
    try:
        yield {name: load_model(name) for name in ("llava_preprocess", "llava_engine")}
    finally:
        if saved is None:
            sys.modules.pop("triton_python_backend_utils", None)
        else:
            sys.modules["triton_python_backend_utils"] = saved


def text_input(*values: bytes) -> Any:
    return np.array(list(values), dtype=np.object_)


# -- llava_preprocess -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocess(models: dict[str, Any], tiny_checkpoint: Path) -> Any:
    model = models["llava_preprocess"].TritonPythonModel()
    model.preprocessor = Preprocessor(tiny_checkpoint)
    return model


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        (
            {"messages": text_input(b'[{"role": "user", "content": "hi \\ud800"}]')},
            "messages[0].content is not",
        ),
        ({"prompt": text_input(b"hi \xed\xa0\x80")}, "input prompt is not valid UTF-8"),
        ({"prompt": text_input(b"hi"), "stop": text_input(b"ok", b"\xff")}, "stop[1] is not valid UTF-8"),
        (
            {"prompt": text_input(b"hi"), "max_tokens": np.array([1, 2], dtype=np.int32)},
            "must hold one value",
        ),
        (
            {"prompt": text_input(b"hi"), "temperature": np.array([np.nan], dtype=np.float32)},
            "temperature is nan",
        ),
        ({"messages": text_input(b"[" * 20000 + b"]" * 20000)}, "nests too deeply"),
        (
            {"prompt": text_input(b"<image>"), "images": text_input(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)},
            "image 0",
        ),
    ],
)
def test_preprocess_answers_a_client_error_as_invalid_arg(
    preprocess: Any, inputs: dict[str, Any], message: str
) -> None:
    response = preprocess._one(Request(inputs))
    assert response.error is not None and response.outputs == {}
    assert response.error.code() == TritonError.INVALID_ARG
    assert response.error.message().startswith(CLIENT_ERROR_PREFIX)
    assert message in response.error.message()


def test_preprocess_answers_its_own_bug_as_internal(preprocess: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(raw: Any) -> Any:
        raise KeyError("a bug")

    monkeypatch.setattr(preprocess.preprocessor, "prepare", broken)
    response = preprocess._one(Request({"prompt": text_input(b"hi")}))
    assert response.error.code() == TritonError.INTERNAL
    assert response.error.message() == "preprocessing failed: KeyError('a bug')"


def test_preprocess_reads_its_limits_from_the_model_config(
    models: dict[str, Any], tiny_checkpoint: Path
) -> None:
    params = {
        "checkpoint": str(tiny_checkpoint),
        "max_image_side": "4096",
        "max_image_aspect": "8",
        "max_resized_pixels": "1000000",
        "max_prompt_bytes": "5000",
        "max_image_pixels": "",  # empty: the default
    }
    config = {"parameters": {k: {"string_value": v} for k, v in params.items()}}
    model = models["llava_preprocess"].TritonPythonModel()
    model.initialize({"model_config": json.dumps(config), "model_name": "llava_preprocess"})
    try:
        # the name LLaVA's web UI should see, exported for the control plane
        (info,) = [m for f in MetricFamily.families if f.name == MODEL_INFO_METRIC for m in f.metrics]
        assert info.value == 1 and info.labels["model"] == "llava_preprocess"
        assert info.labels["served_name"] == "tiny-llava-v1.5"
        assert info.labels["checkpoint"] == tiny_checkpoint.name
        limits = model.preprocessor.limits
        assert (limits.max_image_side, limits.max_image_aspect, limits.max_resized_pixels) == (
            4096,
            8.0,
            1000000,
        )
        assert limits.max_image_pixels == 40_000_000
        assert model.preprocessor.max_prompt_bytes == 5000
        response = model._one(Request({"prompt": text_input(b"x" * 5001)}))
        assert "the prompt is 5001 bytes; the limit is 5000 bytes (the node's max_prompt_bytes)" in (
            response.error.message()
        )
    finally:
        model.finalize()


# -- llava_engine ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_model(models: dict[str, Any], tiny_checkpoint: Path) -> Iterator[Any]:
    mod = models["llava_engine"]
    model = mod.TritonPythonModel()
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    model.engine = BatchingEngine(
        LlavaRunner(loaded, RunnerConfig(max_batch=4)), loaded.tokenizer, loaded.eos_token_ids
    )
    model.log = mod.log
    model.sinks = mod.SinkRegistry()
    model.late = mod.LateFinals(delay_s=0.05)
    model.vocab = int(loaded.model.config.text_config.vocab_size)
    yield model
    model.engine.shutdown()
    model.late.stop()


def engine_request(ids: list[int], request_id: str = "", **extra: Any) -> Request:
    """A direct call to llava_engine (greedy: the tiny model's output is then fixed)."""
    inputs = {"input_ids": np.array(ids, dtype=np.int64), "gen_temperature": np.array([0.0], np.float32)}
    return Request({**inputs, **extra}, request_id)


def wait_closed(req: Request, timeout_s: float = 30) -> Sender:
    assert req.sender.done.wait(timeout_s), "the stream was never closed"
    time.sleep(0.1)  # nothing may follow the final response
    assert req.sender.finals() == 1, req.sender.sent
    assert req.sender.sent[-1][1] == FINAL
    return req.sender


def test_a_generation_streams_and_ends_with_one_final_response(engine_model: Any) -> None:
    req = engine_request([1, 5, 9], "g", gen_max_tokens=np.array([6], dtype=np.int32))
    engine_model.execute([req])
    sender = wait_closed(req)
    responses = [r for r, _, _ in sender.sent]
    assert all(r is not None and r.error is None for r in responses)
    assert sum(len(r.outputs["token_ids"]) for r in responses if r) == 6
    assert responses[-1] is not None and responses[-1].outputs["finish_reason"][0] == b"length"


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"input_ids": np.array([1, 5, 10**6], dtype=np.int64)}, "input_ids holds the token id 1000000"),
        ({"gen_max_tokens": np.array([4], dtype=np.int32)}, "input input_ids is missing"),
        (
            {"input_ids": np.array([1, 5], dtype=np.int64), "gen_stop": text_input(b"\xff")},
            "gen_stop[0] is not",
        ),
        (
            {"input_ids": np.array([1, 5], dtype=np.int64), "gen_top_p": np.array([0], np.float32)},
            "top_p is 0.0",
        ),
        ({"cancel_request_id": text_input(b"\xc3")}, "input cancel_request_id is not valid UTF-8"),
    ],
)
def test_a_bad_engine_request_is_answered_invalid_arg_then_closed(
    engine_model: Any, inputs: dict[str, Any], message: str
) -> None:
    req = Request(inputs)
    engine_model.execute([req])
    sender = wait_closed(req)
    (error_response, flags, at), (final, _, closed_at) = sender.sent
    assert flags == 0 and final is None  # the error, then an empty final response
    assert closed_at - at >= 0.04  # later: a client that closes its stream on the error finds it open
    assert error_response is not None and error_response.error is not None
    assert error_response.error.code() == TritonError.INVALID_ARG
    assert error_response.error.message().startswith(CLIENT_ERROR_PREFIX)
    assert message in error_response.error.message()


def test_one_bad_request_in_a_batch_leaves_the_others_served(engine_model: Any) -> None:
    bad = engine_request([1, engine_model.vocab])
    good = engine_request([1, 5, 9], gen_max_tokens=np.array([3], dtype=np.int32))
    engine_model.execute([bad, good])
    error = wait_closed(bad).sent[0][0]
    assert error is not None and error.error is not None and error.error.code() == TritonError.INVALID_ARG
    last = wait_closed(good).sent[-1][0]
    assert last is not None and last.outputs["finish_reason"][0] == b"length"


def test_a_cancel_call_answers_at_once_and_closes_later(engine_model: Any) -> None:
    running = engine_request([1, 5, 9], "victim", gen_max_tokens=np.array([1500], dtype=np.int32))
    engine_model.execute([running])
    deadline = time.monotonic() + 30
    while not running.sender.sent:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    call = Request({"cancel_request_id": text_input(b"victim")})
    engine_model.execute([call])
    sender = wait_closed(call)
    (answer, flags, at), (final, _, closed_at) = sender.sent
    # The control plane closes a cancel call on its answer: with the final flag on it,
    # Triton 2.51's gRPC handler could leak the call (see LateFinals).
    assert flags == 0 and answer is not None and int(answer.outputs["cancelled_requests"][0]) == 1
    assert final is None and closed_at - at >= 0.04
    last = wait_closed(running).sent[-1][0]
    assert last is not None and last.outputs["finish_reason"][0] == b"cancelled"


def test_a_failed_send_still_closes_the_stream(engine_model: Any) -> None:
    req = engine_request([1, 5, 9], gen_max_tokens=np.array([50], dtype=np.int32))
    original = req.sender.send
    calls = {"n": 0}

    def flaky(response: Any = None, flags: int = 0) -> None:
        calls["n"] += 1
        if calls["n"] == 3:  # the third response: the server refuses it
            raise RuntimeError("An error occurred while sending a response.")
        original(response, flags)

    req.sender.send = flaky  # type: ignore[method-assign]
    engine_model.execute([req])
    sender = wait_closed(req)
    assert sender.sent[-1][0] is None  # an empty final response closed it
    assert len(sender.sent) == 3  # two pieces, then the close


def test_an_error_that_cannot_be_sent_still_closes_the_stream(models: dict[str, Any]) -> None:
    mod = models["llava_engine"]
    late = mod.LateFinals(delay_s=0.01)
    req = Request({})
    sink = mod.TritonSink(req, mod.SinkRegistry(), late)
    req.sender.fail_sends = 1  # the error response is refused
    sink.fail("boom", client_error=True)
    sink.fail("again")  # a second end is ignored
    assert wait_closed(req).sent == [(None, FINAL, req.sender.sent[0][2])]
    late.stop()


def test_late_finals_are_all_sent_at_stop(models: dict[str, Any]) -> None:
    late = models["llava_engine"].LateFinals(delay_s=60)
    senders = [Sender() for _ in range(3)]
    for s in senders:
        late.close_later(s)
    started = time.monotonic()
    late.stop()
    assert time.monotonic() - started < 2
    assert all(s.finals() == 1 for s in senders)
    after = Sender()
    late.close_later(after)  # after stop: at once
    assert after.finals() == 1
