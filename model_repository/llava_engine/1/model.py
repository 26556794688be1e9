"""llava_engine: decoupled generation, one streamed response per piece of text.

``execute`` hands each request to the engine and returns at once; the engine's own
thread sends the responses, the last one flagged final, on every path. A request that
is malformed (a direct call with tritonclient may send anything) fails alone, with
``INVALID_ARG`` and the client-error prefix; the engine checks every input itself.

Answers a client acts on at once (a cancel call's count, an error) are sent without
the final flag, and the stream is closed with an empty final response a little later
(:class:`LateFinals`): Triton 2.51's gRPC stream handler leaks a request whose client
cancels the stream right after its final response was written (it issues a
cancellation and waits for a response that never comes), and the leaked request keeps
this model in UNLOADING for good. The control plane closes a cancel call as soon as
the answer arrives; that hit the window about once in 24 calls.
"""

from __future__ import annotations

import os
import sys

# The Python-backend stub starts its interpreter without reading PYTHONPATH (seen with the
# nvidia-pytriton stub), while the launcher and the node image name the project and its
# packages there: honour it before importing them.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import heapq
import json
import logging
import random
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack  # type: ignore[attr-defined]

from llava_node.checkpoints import checkpoint_from_env
from llava_node.engine import EngineOptions, GenerationRequest, build_engine
from llava_node.triton_io import param, text, text_list
from llava_wire.gc_freeze import freeze_startup_objects, unfreeze_at_shutdown
from llava_wire.protocol import (
    CLIENT_ERROR_PREFIX,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    ENGINE_METRICS,
    FinishReason,
    InvalidRequest,
    error_text,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_PERIOD_S = 1.0
# Whether a client closed its stream is a round trip to the server process per request:
# first asked CANCEL_FIRST_POLL_S after arrival, then every CANCEL_POLL_S (at 20 ms, 32
# running requests spent 13 % of the engine thread's time asking; profiled on an H100 host).
CANCEL_FIRST_POLL_S = 0.02
CANCEL_POLL_S = 0.1
# How long after an answer the client may act on (see LateFinals) its stream is closed.
# A client that closes its stream on the answer does so within a few milliseconds (a
# round trip, on a host or in a cluster); the request only waits, costing nothing.
LATE_FINAL_S = 0.2

log = logging.getLogger("llava_engine")


# Numeric tensors cross the stub boundary through DLPack, not NumPy: the pytriton stub's
# NumPy path is built for NumPy 1.x and, on a host with NumPy 2, reads inputs wrongly and
# writes outputs empty (seen on an H100/H200 host). DLPack does not depend on NumPy.
def _numeric_input(request: Any, name: str) -> torch.Tensor | None:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    return None if tensor is None else from_dlpack(tensor.to_dlpack())


def _one_value(request: Any, name: str, default: Any) -> Any:
    """The value of an optional [1]-shaped numeric input as a Python number."""
    t = _numeric_input(request, name)
    if t is None:
        return default
    if t.numel() != 1:
        raise InvalidRequest(f"input {name} must hold one value, got {t.numel()}")
    return t.reshape(-1)[0].item()


def _generation_request(request: Any, sink: TritonSink) -> GenerationRequest:
    """A request's inputs, as the engine takes them (which checks them itself).

    ``input_ids`` is required; without ``pixel_values`` the prompt has no images; the
    ``gen_*`` settings default as the ensemble's do (a random seed if none).
    """
    input_ids = _numeric_input(request, "input_ids")
    if input_ids is None:
        raise InvalidRequest("input input_ids is missing (or send only cancel_request_id, to cancel)")
    pixel_values = _numeric_input(request, "pixel_values")
    seed = _one_value(request, "gen_seed", None)
    return GenerationRequest(
        request_id=request.request_id() or "",
        input_ids=input_ids.clone(),
        pixel_values=None if pixel_values is None else pixel_values.clone(),
        max_tokens=int(_one_value(request, "gen_max_tokens", DEFAULT_MAX_TOKENS)),
        temperature=float(_one_value(request, "gen_temperature", DEFAULT_TEMPERATURE)),
        top_p=float(_one_value(request, "gen_top_p", DEFAULT_TOP_P)),
        seed=random.getrandbits(63) if seed is None else int(seed),
        stop=text_list(pb_utils, request, "gen_stop"),
        sink=sink,
        prior_tokens=int(_one_value(request, "gen_prior_tokens", 0)),
    )


def _numeric(name: str, value: torch.Tensor) -> Any:
    return pb_utils.Tensor.from_dlpack(name, to_dlpack(value))


class SinkRegistry:
    """Running requests by Triton request id, so a cancel request can find them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sinks: dict[str, set[TritonSink]] = {}

    def add(self, sink: TritonSink) -> None:
        if sink.request_id:
            with self._lock:
                self._sinks.setdefault(sink.request_id, set()).add(sink)

    def remove(self, sink: TritonSink) -> None:
        with self._lock:
            group = self._sinks.get(sink.request_id)
            if group is not None:
                group.discard(sink)
                if not group:
                    del self._sinks[sink.request_id]

    def cancel(self, request_id: str) -> int:
        with self._lock:
            group = list(self._sinks.get(request_id, ()))
        for sink in group:
            sink.cancelled = True
        return len(group)


class LateFinals:
    """Closes streams with an empty final response, ``LATE_FINAL_S`` after their answer.

    Triton 2.51's gRPC stream handler frees a request's state only through a response
    callback once the client has cancelled: a cancellation that arrives after the
    request's final response was written, but before the handler has finished with it,
    waits for a callback that never comes ("Waiting for the callback to retrieve
    cancellation" in the verbose log, never followed by "Done"). The request is never
    freed, and it holds this model, which stays in UNLOADING for good (reproduced in
    tests/node/test_unload_release.py). A client that closes its stream on an answer
    without the final flag instead finds the request open; its cancellation is then
    taken up by this later final response, and everything is freed.
    """

    def __init__(self, delay_s: float = LATE_FINAL_S) -> None:
        self.delay_s = delay_s
        self._cond = threading.Condition()
        self._due: list[tuple[float, int, Any]] = []  # (when, order, response sender)
        self._order = 0
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="llava-late-finals", daemon=True)
        self._thread.start()

    def close_later(self, sender: Any) -> None:
        """Send ``sender`` its empty final response ``delay_s`` from now."""
        with self._cond:
            if not self._stopped:
                self._order += 1
                heapq.heappush(self._due, (time.monotonic() + self.delay_s, self._order, sender))
                self._cond.notify()
                return
        _close(sender)

    def stop(self) -> None:
        """Close every stream still waiting, now."""
        with self._cond:
            self._stopped = True
            self._cond.notify()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    if self._due and (self._stopped or self._due[0][0] <= now):
                        sender = heapq.heappop(self._due)[2]
                        break
                    if self._stopped:
                        return
                    self._cond.wait(self._due[0][0] - now if self._due else None)
            _close(sender)


def _close(sender: Any) -> None:
    """The empty final response; never raises (nothing more can be done for the stream)."""
    try:
        sender.send(flags=FINAL)
    except Exception:
        log.warning("a stream could not be closed", exc_info=True)


class TritonSink:
    """Sends one request's output through its Triton response sender.

    Every path ends the stream with a response flagged final, exactly once: the last
    piece; or an error, then an empty final response from :class:`LateFinals`; or,
    where sending data failed, an empty final response, so that Triton frees the
    request.
    """

    def __init__(self, request: Any, registry: SinkRegistry, late: LateFinals) -> None:
        self.request = request
        self.request_id = request.request_id() or ""
        self.sender = request.get_response_sender()
        self.registry = registry
        self.late = late
        self.cancelled = False
        self.closed = False  # the final response has been sent (or is on its way)
        # The first check waits one poll period: a request that has just arrived is rarely
        # cancelled already, and the round trip would sit in front of its prefill.
        self._next_check = time.monotonic() + CANCEL_FIRST_POLL_S
        registry.add(self)

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: FinishReason | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        if self.closed:
            raise RuntimeError(f"request {self.request_id}: a response after its final one")
        final = finish_reason is not None
        try:
            response = pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor("text_output", np.array([text.encode("utf-8")], dtype=np.object_)),
                    _numeric("token_ids", torch.tensor(list(token_ids), dtype=torch.int64)),
                    pb_utils.Tensor(
                        "finish_reason",
                        np.array([(finish_reason.value if finish_reason else "").encode()], dtype=np.object_),
                    ),
                    _numeric("prompt_tokens", torch.tensor([prompt_tokens], dtype=torch.int32)),
                    _numeric("completion_tokens", torch.tensor([completion_tokens], dtype=torch.int32)),
                    _numeric("cached_tokens", torch.tensor([cached_tokens], dtype=torch.int32)),
                ]
            )
        except Exception:
            self._close_now()
            raise
        if final:
            self.closed = True
            self.registry.remove(self)  # a cancel call must no longer find it
        try:
            self.sender.send(response, flags=FINAL if final else 0)
        except Exception:
            # Nothing more reaches the client (the engine stops generating for it), but the
            # stream must still end with a final response, or the request is never freed.
            # (A final send that failed has closed the sender already: nothing to add.)
            if not final:
                self._close_now()
            raise

    def fail(self, message: str, client_error: bool = False) -> None:
        """End the stream with an error: INVALID_ARG for a client error, else INTERNAL."""
        if self.closed:
            return
        self.closed = True
        self.registry.remove(self)
        code = pb_utils.TritonError.INVALID_ARG if client_error else pb_utils.TritonError.INTERNAL
        try:
            error = pb_utils.TritonError(error_text(message), code)
            self.sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=0)
        except Exception:
            log.info("request %s: the error response was not sent", self.request_id, exc_info=True)
            _close(self.sender)
            return
        self.late.close_later(self.sender)  # clients close their stream on an error

    def _close_now(self) -> None:
        if not self.closed:
            self.closed = True
            self.registry.remove(self)
            _close(self.sender)

    def is_cancelled(self) -> bool:
        if self.cancelled:
            return True
        # Asking Triton is a round trip to the server process: at most every CANCEL_POLL_S.
        now = time.monotonic()
        if now >= self._next_check:
            self._next_check = now + CANCEL_POLL_S
            self.cancelled = bool(self.request.is_cancelled())
        return self.cancelled


class TritonPythonModel:
    """Owns one engine; exports its counters as Triton custom metrics."""

    def initialize(self, args: dict[str, Any]) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        self.log = logging.getLogger("llava_engine")
        config = json.loads(args["model_config"])
        self.model_name = args["model_name"]
        checkpoint = checkpoint_from_env(param(config, "checkpoint"))

        options = EngineOptions.from_model_config(lambda key, env, default: param(config, key, env, default))
        self.engine = build_engine(checkpoint, options)
        self.log.info("llava_engine ready: %s, checkpoint %s", self.engine.describe(), checkpoint)
        self.sinks = SinkRegistry()
        self.late = LateFinals()
        self._metrics_stop = threading.Event()
        self._init_metrics()
        freeze_startup_objects()  # a full collection over torch and the model: ~180 ms

    # -- metrics ---------------------------------------------------------------------
    def _init_metrics(self) -> None:
        labels = {"model": self.model_name}
        kinds = {"counter": pb_utils.MetricFamily.COUNTER, "gauge": pb_utils.MetricFamily.GAUGE}
        fams = {key: (name, desc, kinds[kind]) for key, (name, desc, kind) in ENGINE_METRICS.items()}
        # A Metric stays valid only while its MetricFamily object lives: keep both.
        self._families = {
            key: pb_utils.MetricFamily(name=name, description=desc, kind=kind)
            for key, (name, desc, kind) in fams.items()
        }
        self._metrics = {key: fam.Metric(labels=labels) for key, fam in self._families.items()}
        self._last: dict[str, float] = {}
        self._metrics_thread = threading.Thread(target=self._publish_metrics, daemon=True)
        self._metrics_thread.start()

    def _publish_metrics(self) -> None:
        # Off the token path: one update a second instead of one per token.
        while not self._metrics_stop.wait(METRICS_PERIOD_S):
            self._publish_once()

    def _publish_once(self) -> None:
        snap = {**self.engine.stats.snapshot(), **self.engine.cache_counters()}
        gauges = self.engine.gauges()
        for key, metric in self._metrics.items():
            if key in gauges:
                metric.set(gauges[key])
            elif key in snap:
                delta = snap[key] - self._last.get(key, 0)
                if delta:
                    metric.increment(delta)
                self._last[key] = snap[key]

    # -- requests --------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            self._one(request)
        return None

    def _one(self, request: Any) -> None:
        """Hand one request to the engine, or end it; never raises (each request of a
        batch is answered whatever another one holds)."""
        try:
            cancel_id = text(pb_utils, request, "cancel_request_id")
        except InvalidRequest as exc:
            self._refuse(request, CLIENT_ERROR_PREFIX + str(exc), client_error=True)
            return
        if cancel_id is not None:
            self._cancel(request, cancel_id)
            return
        try:
            sink = TritonSink(request, self.sinks, self.late)
        except Exception as exc:
            self._refuse(request, f"llava_engine could not take the request: {exc!r}")
            return
        try:
            gen = _generation_request(request, sink)
        except InvalidRequest as exc:
            sink.fail(CLIENT_ERROR_PREFIX + f"bad llava_engine inputs: {exc}", client_error=True)
            return
        except Exception as exc:
            sink.fail(f"llava_engine could not read the request: {exc!r}")
            return
        try:
            self.engine.submit(gen)  # an invalid request fails there, alone
        except Exception as exc:
            self.log.exception("submit failed")
            sink.fail(f"llava_engine could not queue the request: {exc!r}")

    def _refuse(self, request: Any, message: str, client_error: bool = False) -> None:
        code = pb_utils.TritonError.INVALID_ARG if client_error else pb_utils.TritonError.INTERNAL
        sender = request.get_response_sender()
        try:
            error = pb_utils.TritonError(error_text(message), code)
            sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=0)
        except Exception:
            self.log.exception("the error response was not sent")
        self.late.close_later(sender)

    def _cancel(self, request: Any, request_id: str) -> None:
        count = self.sinks.cancel(request_id) if request_id else 0
        self.log.info("cancel request for id %r: %d request(s) cancelled", request_id, count)
        response = pb_utils.InferenceResponse(
            output_tensors=[_numeric("cancelled_requests", torch.tensor([count], dtype=torch.int32))]
        )
        sender = request.get_response_sender()
        try:
            sender.send(response, flags=0)
        except Exception:
            self.log.exception("the answer to a cancel call was not sent")
        # The control plane closes its cancel call as soon as the answer arrives: with the
        # final flag on the answer, that left the call's request leaked (see LateFinals).
        self.late.close_later(sender)

    def finalize(self) -> None:
        self._metrics_stop.set()
        self.engine.shutdown()
        self.late.stop()
        self.log.info("llava_engine stopped: %s", self.engine.stats.snapshot())
        unfreeze_at_shutdown()
