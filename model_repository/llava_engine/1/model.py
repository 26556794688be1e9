"""llava_engine: decoupled generation, one streamed response per piece of text.

``execute`` hands each request to the engine and returns at once; the engine's own
thread sends the responses, the last one flagged final, on every path.
"""

from __future__ import annotations

import os
import sys

# The Python-backend stub starts its interpreter without reading PYTHONPATH (seen with the
# nvidia-pytriton stub), while the launcher and the node image name the project and its
# packages there: honour it before importing them.
sys.path[:0] = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import json
import logging
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils.dlpack import from_dlpack, to_dlpack  # type: ignore[attr-defined]

from llava_node.engine import EngineOptions, GenerationRequest, build_engine
from llava_node.engine.loading import checkpoint_from_env
from llava_node.gc_freeze import freeze_startup_objects, unfreeze_at_shutdown
from llava_node.protocol import FinishReason
from llava_node.triton_io import bytes_list, param, text

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
METRICS_PERIOD_S = 1.0
# Whether a client closed its stream is a round trip to the server process per request:
# first asked CANCEL_FIRST_POLL_S after arrival, then every CANCEL_POLL_S (at 20 ms, 32
# running requests spent 13 % of the engine thread's time asking; profiled on an H100 host).
CANCEL_FIRST_POLL_S = 0.02
CANCEL_POLL_S = 0.1


# Numeric tensors cross the stub boundary through DLPack, not NumPy: the pytriton stub's
# NumPy path is built for NumPy 1.x and, on a host with NumPy 2, reads inputs wrongly and
# writes outputs empty (seen on an H100/H200 host). DLPack does not depend on NumPy.
def _numeric_input(request: Any, name: str) -> torch.Tensor:
    tensor = pb_utils.get_input_tensor_by_name(request, name)
    if tensor is None:
        raise ValueError(f"input {name} is missing")
    return from_dlpack(tensor.to_dlpack())


def _tristate(value: str) -> bool | None:
    """``auto`` (None), or a boolean."""
    v = value.strip().lower()
    if v == "auto":
        return None
    if v in ("1", "true", "yes", "0", "false", "no"):
        return v in ("1", "true", "yes")
    raise ValueError(f"expected auto, true or false, not {value!r}")


def _prefill_chunk(value: str) -> int:
    """``auto`` (-1: chunks on a GPU only) or a number of prompt tokens per step (0: off)."""
    if value.strip().lower() == "auto":
        return -1
    try:
        tokens = int(value)
    except ValueError:
        tokens = -1
    if tokens < 0:
        raise ValueError(f"prefill_chunk must be 'auto' or a number of tokens (0: off), not {value!r}")
    return tokens


def _stream_interval(value: str) -> int:
    """``auto`` (0) or a number of tokens per response."""
    if value.strip().lower() == "auto":
        return 0
    n = int(value)
    if n < 1:
        raise ValueError(f"stream_interval must be 'auto' or a positive number of tokens, not {value!r}")
    return n


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


class TritonSink:
    """Sends one request's output through its Triton response sender."""

    def __init__(self, request: Any, registry: SinkRegistry) -> None:
        self.request = request
        self.request_id = request.request_id() or ""
        self.sender = request.get_response_sender()
        self.registry = registry
        self.cancelled = False
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
    ) -> None:
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
            ]
        )
        if finish_reason is not None:
            self.registry.remove(self)
        try:
            self.sender.send(response, flags=FINAL if finish_reason is not None else 0)
        except Exception:
            # The client is gone (the engine stops generating for it): nothing more can be
            # sent, so a cancel call must no longer find it.
            self.registry.remove(self)
            raise

    def fail(self, message: str) -> None:
        self.registry.remove(self)
        error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL)
        self.sender.send(pb_utils.InferenceResponse(output_tensors=[], error=error), flags=FINAL)

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

        def opt(key: str, env: str, default: str) -> str:
            return param(config, key, env, default)

        options = EngineOptions(
            kind=opt("engine", "LLAVA_ENGINE", "auto"),
            device=opt("device", "LLAVA_DEVICE", "auto"),
            max_batch=int(opt("max_batch", "LLAVA_MAX_BATCH", "0")),
            max_seq_len=int(opt("max_seq_len", "LLAVA_MAX_SEQ_LEN", "0")),
            kv_cache_fraction=float(opt("kv_cache_fraction", "LLAVA_KV_CACHE_FRACTION", "0.9")),
            kv_cache_dtype=opt("kv_cache_dtype", "LLAVA_KV_CACHE_DTYPE", "auto"),
            cuda_graphs=opt("cuda_graphs", "LLAVA_CUDA_GRAPHS", "true").lower() in ("1", "true", "yes"),
            stream_interval=_stream_interval(opt("stream_interval", "LLAVA_STREAM_INTERVAL", "auto")),
            fused_kernels=_tristate(opt("fused_kernels", "LLAVA_FUSED_KERNELS", "auto")),
            prefill_chunk=_prefill_chunk(opt("prefill_chunk", "LLAVA_PREFILL_CHUNK", "auto")),
        )
        self.engine = build_engine(checkpoint, options)
        self.log.info("llava_engine ready: %s, checkpoint %s", self.engine.describe(), checkpoint)
        self.sinks = SinkRegistry()
        self._metrics_stop = threading.Event()
        self._init_metrics()
        freeze_startup_objects()  # a full collection over torch and the model: ~180 ms

    # -- metrics ---------------------------------------------------------------------
    def _init_metrics(self) -> None:
        labels = {"model": self.model_name}
        counter, gauge = pb_utils.MetricFamily.COUNTER, pb_utils.MetricFamily.GAUGE
        fams = {
            "tokens_generated": ("llava_engine_generated_tokens_total", "Tokens generated", counter),
            "requests_finished": ("llava_engine_requests_finished_total", "Requests finished", counter),
            "requests_cancelled": ("llava_engine_requests_cancelled_total", "Requests cancelled", counter),
            "requests_failed": ("llava_engine_requests_failed_total", "Requests failed", counter),
            "tokens_after_cancel": (
                "llava_engine_tokens_after_cancel_total",
                "Tokens computed for requests after they were cancelled",
                counter,
            ),
            "decode_steps": ("llava_engine_decode_steps_total", "Batched decode steps run", counter),
            "mixed_steps": (
                "llava_engine_mixed_steps_total",
                "Decode steps that also carried a chunk of a prompt",
                counter,
            ),
            "requests_started": ("llava_engine_requests_started_total", "Requests started", counter),
            "first_token_seconds": (
                "llava_engine_time_to_first_token_seconds_total",
                "Time from a request's arrival at the engine to its first token sent, summed",
                counter,
            ),
            "queue_seconds": (
                "llava_engine_queue_seconds_total",
                "Time from a request's arrival at the engine to the start of its prefill, summed",
                counter,
            ),
            "prefill_seconds": (
                "llava_engine_prefill_seconds_total",
                "Engine time spent on prompts (vision tower and prefill)",
                counter,
            ),
            "decode_wait_seconds": (
                "llava_engine_decode_wait_seconds_total",
                "Engine time spent waiting for a decode step's tokens from the device",
                counter,
            ),
            "token_handling_seconds": (
                "llava_engine_token_handling_seconds_total",
                "Engine time spent handling tokens on the host (detokenizing, sending)",
                counter,
            ),
            "active": ("llava_engine_active_requests", "Requests generating now", gauge),
            "queue": ("llava_engine_queued_requests", "Requests waiting to start", gauge),
        }
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
        snap = self.engine.stats.snapshot()
        for key, metric in self._metrics.items():
            if key == "active":
                metric.set(self.engine.active)
            elif key == "queue":
                metric.set(self.engine.queue_length)
            else:
                delta = snap[key] - self._last.get(key, 0)
                if delta:
                    metric.increment(delta)
                self._last[key] = snap[key]

    # -- requests --------------------------------------------------------------------
    def execute(self, requests: list[Any]) -> None:
        for request in requests:
            cancel_id = text(pb_utils, request, "cancel_request_id")
            if cancel_id is not None:
                self._cancel(request, cancel_id)
                continue
            sink = TritonSink(request, self.sinks)
            try:
                gen = GenerationRequest(
                    request_id=request.request_id() or "",
                    input_ids=_numeric_input(request, "input_ids").clone(),
                    pixel_values=_numeric_input(request, "pixel_values").clone(),
                    max_tokens=int(_numeric_input(request, "gen_max_tokens").reshape(-1)[0]),
                    temperature=float(_numeric_input(request, "gen_temperature").reshape(-1)[0]),
                    top_p=float(_numeric_input(request, "gen_top_p").reshape(-1)[0]),
                    seed=int(_numeric_input(request, "gen_seed").reshape(-1)[0]),
                    stop=[s.decode("utf-8", "replace") for s in bytes_list(pb_utils, request, "gen_stop")],
                    sink=sink,
                )
            except Exception as exc:  # malformed direct call to llava_engine
                sink.fail(f"bad llava_engine inputs: {exc}")
                continue
            self.engine.submit(gen)
        return None

    def _cancel(self, request: Any, request_id: str) -> None:
        count = self.sinks.cancel(request_id) if request_id else 0
        self.log.info("cancel request for id %r: %d request(s) cancelled", request_id, count)
        response = pb_utils.InferenceResponse(
            output_tensors=[_numeric("cancelled_requests", torch.tensor([count], dtype=torch.int32))]
        )
        request.get_response_sender().send(response, flags=FINAL)

    def finalize(self) -> None:
        self._metrics_stop.set()
        self.engine.shutdown()
        self.log.info("llava_engine stopped: %s", self.engine.stats.snapshot())
        unfreeze_at_shutdown()
