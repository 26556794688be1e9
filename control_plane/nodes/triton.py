"""The :class:`NodeClient` of real Triton nodes: HTTP (aiohttp) for polls and model
control, gRPC (``tritonclient.grpc.aio``, one reused channel per node) for streams.

Everything read from a node is bounded and parsed defensively (a broken or hostile node
must not overflow the store's integers, skew routing without bound or break a poll
round): a repository index and a metrics page are a few kB; reported loads are clamped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote, urlsplit

import aiohttp
import grpc
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from control_plane.nodes.client import (
    GenerationInputs,
    ModelStatus,
    NodeCallError,
    NodeStreamError,
    PollResult,
)
from control_plane.nodes.watchdog import Watchdog
from llava_wire.messages import Chunk, build_inputs, cancel_inputs, parse_infer_response
from llava_wire.protocol import ACTIVE_METRIC, CANCEL_OUTPUT, CLIENT_ERROR_PREFIX, QUEUE_METRIC, engine_model

__all__ = [
    "MAX_REPORTED_LOAD",
    "TritonNodeClient",
    "clamp_load",
    "clean_node_error",
    "parse_index",
    "parse_load",
]

log = logging.getLogger(__name__)

# What a node reports is clamped to this (a broken or hostile node must not overflow the
# store's integers or skew routing without bound).
MAX_REPORTED_LOAD = 1_000_000
MAX_INDEX_BYTES = 4 << 20
MAX_METRICS_BYTES = 4 << 20
UNLOAD_BODY = {"parameters": {"unload_dependents": True}}
# Unloading a model that does not exist is a no-op that answers 200 in explicit mode
# and 503 "explicit model load / unload is not allowed" in the other modes.
PROBE_MODEL = "__control_plane_mode_probe__"
NOT_EXPLICIT = "explicit model load / unload is not allowed"
_UNREACHABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
# A stream whose final response has come is left to end on its own (read to its end in
# the background, for at most this long), never cancelled: Triton 2.51's gRPC stream
# handler leaks a request whose client cancels right after its final response is written
# (the leaked request holds its model, which then never finishes unloading), and gRPC
# cancels a call that is garbage-collected before it ended.
DRAIN_TIMEOUT_S = 5.0


def clamp_load(value: float) -> int:
    """A reported queue length or request count as an int in [0, MAX_REPORTED_LOAD]."""
    if not math.isfinite(value):
        return MAX_REPORTED_LOAD if value > 0 else 0
    return int(min(max(value, 0.0), MAX_REPORTED_LOAD))


def parse_load(metrics_text: str) -> tuple[int, int]:
    """(queued, active) summed over a node's engine models, from its metrics page;
    malformed values count as 0, and each sum is clamped (:func:`clamp_load`)."""
    queued = active = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(QUEUE_METRIC):
            queued += _sample_value(line)
        elif line.startswith(ACTIVE_METRIC):
            active += _sample_value(line)
    return clamp_load(queued), clamp_load(active)


def _sample_value(line: str) -> float:
    try:
        value = float(line.rsplit(" ", 1)[-1])
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def parse_index(body: bytes) -> dict[str, ModelStatus]:
    """Each model's state from a node's ``/v2/repository/index`` answer; raises ValueError
    when it is not the list of objects Triton sends."""
    entries = json.loads(body)
    if not isinstance(entries, list):
        raise ValueError("the repository index is not a JSON list")
    models: dict[str, ModelStatus] = {}
    for m in entries:
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or not name or len(name) > 256:
            raise ValueError("the repository index has an entry without a valid model name")
        state, reason = m.get("state", ""), m.get("reason", "")
        state = state if isinstance(state, str) else ""
        reason = reason if isinstance(reason, str) else ""
        models[name] = ModelStatus(ready=state == "READY", state=state[:64], reason=reason[:2000])
    return models


def clean_node_error(body: str) -> str:
    """The cause in a Triton error body: its ``error`` text, without Python tracebacks."""
    text = body
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            text = parsed["error"]
    lines: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.strip() == "At:":
            in_traceback = True
            continue
        if in_traceback and (line.startswith(" ") or not line.strip()):
            continue
        in_traceback = False
        if line.strip():
            lines.append(line.strip())
    message = " ".join(lines).strip().rstrip(";").strip()
    return message[:1500] or "(the node gave no reason)"


def _node_message(text: str) -> tuple[str, bool]:
    """The client-facing part of a node's error text, and whether it blames the request."""
    i = text.find(CLIENT_ERROR_PREFIX)
    if i >= 0:
        return text[i + len(CLIENT_ERROR_PREFIX) :], True
    return text, False


async def _read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = await response.content.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the node sent more than {limit} bytes")
    return data


def _describe(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error or exc}"
    return f"{type(exc).__name__}: {exc}"


class TritonNodeClient:
    """:class:`~control_plane.nodes.client.NodeClient` over Triton's HTTP and gRPC APIs.

    Make it inside the event loop that uses it (its aiohttp session belongs to that loop).
    """

    def __init__(self, session: aiohttp.ClientSession | None = None) -> None:
        self.session = session or aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=512, limit_per_host=8)
        )
        self._owns_session = session is None
        self._channels: dict[str, grpcclient.InferenceServerClient] = {}
        self._draining: set[asyncio.Task[None]] = set()

    # -- polls and discovery ---------------------------------------------------------------
    async def poll(self, http_url: str, metrics_url: str, timeout_s: float) -> PollResult:
        """Readiness, repository index and load of one node; never raises.

        A node that is live and answers its index counts as up even when not ready:
        Triton's strict readiness turns false for good once any model failed to load,
        and routing goes by each model's state.
        """
        res = PollResult()
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        started = time.perf_counter()
        try:
            # One after the other, each request made only when it is entered: a request
            # made and never entered (its node refused the first) is a coroutine never awaited.
            async with self.session.get(f"{http_url}/v2/health/ready", timeout=timeout) as ready:
                res.server_ready = ready.status == 200
            async with self.session.post(
                f"{http_url}/v2/repository/index", json={}, timeout=timeout
            ) as index:
                if index.status == 200:
                    res.models = parse_index(await _read_bounded(index, MAX_INDEX_BYTES))
            res.latency_ms = (time.perf_counter() - started) * 1000.0
            res.ok = res.server_ready
            if not res.server_ready and res.models is not None:
                async with self.session.get(f"{http_url}/v2/health/live", timeout=timeout) as live:
                    res.ok = live.status == 200
            if not res.ok:
                res.error = "server not ready (/v2/health/ready did not answer 200)"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            res.error = _describe(exc, timeout_s)
            return res
        if metrics_url:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                async with self.session.get(metrics_url, timeout=timeout) as m:
                    if m.status == 200:
                        page = await _read_bounded(m, MAX_METRICS_BYTES)
                        res.queued, res.active = parse_load(page.decode("utf-8", "replace"))
        return res

    async def discover(self, http_url: str, timeout_s: float = 2.0) -> tuple[str, str]:
        """Guess a node's gRPC address and metrics URL from its HTTP base URL.

        Triton's defaults put gRPC and metrics on the two ports after HTTP (8000, 8001,
        8002); the metrics URL is checked, the gRPC port is taken by that convention.
        """
        parts = urlsplit(http_url)
        host = parts.hostname or "127.0.0.1"
        host = f"[{host}]" if ":" in host else host  # an IPv6 address
        port = parts.port or (443 if parts.scheme == "https" else 80)
        candidates = [port + 2, 8002] if port != 8000 else [8002]
        metrics_url = f"{parts.scheme}://{host}:{candidates[0]}/metrics"
        for p in candidates:
            url = f"{parts.scheme}://{host}:{p}/metrics"
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                    # a bounded prefix: a metrics page is a few kB; this is only a sniff
                    if r.status == 200 and b"nv_" in await r.content.read(1 << 20):
                        metrics_url = url
                        break
        return f"{host}:{port + 1}", metrics_url

    # -- model control -----------------------------------------------------------------------
    async def explicit_mode(self, http_url: str, timeout_s: float) -> bool | None:
        """Whether the node takes loads: a no-op unload of a model that does not exist."""
        url = f"{http_url}/v2/repository/models/{PROBE_MODEL}/unload"
        with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError):
            async with self.session.post(url, json={}, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                body = await _read_bounded(r, 1 << 16)
                if r.status == 200:
                    return True
                if NOT_EXPLICIT.encode() in body:
                    return False
        return None

    async def _model_call(self, url: str, body: dict[str, Any], timeout_s: float, doing: str) -> None:
        try:
            async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    error = clean_node_error((await _read_bounded(r, 1 << 20)).decode("utf-8", "replace"))
                    raise NodeCallError(error, not_explicit=NOT_EXPLICIT in error)
        except TimeoutError:
            raise NodeCallError(f"the node did not finish {doing} within {timeout_s:g} s") from None
        except (aiohttp.ClientError, OSError, ValueError) as exc:
            raise NodeCallError(f"the node could not be reached: {exc}") from None

    async def load(self, http_url: str, model: str, timeout_s: float) -> None:
        """``POST /v2/repository/models/<m>/load``: answered when the ensemble and its
        steps are ready, or 400 naming the step that failed and why."""
        url = f"{http_url}/v2/repository/models/{quote(model, safe='')}/load"
        await self._model_call(url, {}, timeout_s, "loading")

    async def unload(self, http_url: str, model: str, timeout_s: float) -> None:
        """``.../unload`` with ``unload_dependents``: the steps go too (without it they stay)."""
        url = f"{http_url}/v2/repository/models/{quote(model, safe='')}/unload"
        await self._model_call(url, UNLOAD_BODY, timeout_s, "unloading")

    # -- generation ------------------------------------------------------------------------
    def _channel(self, grpc_url: str) -> grpcclient.InferenceServerClient:
        c = self._channels.get(grpc_url)
        if c is None:
            c = grpcclient.InferenceServerClient(grpc_url)
            self._channels[grpc_url] = c
        return c

    async def stream(
        self,
        grpc_url: str,
        model: str,
        inputs: GenerationInputs,
        request_id: str,
        *,
        first_token_timeout_s: float,
        stall_timeout_s: float,
    ) -> AsyncIterator[Chunk]:
        """Stream ``model``'s responses over the node's shared channel; raises
        :class:`NodeStreamError`. Closing the iterator early cancels the gRPC call."""
        tensors = build_inputs(
            grpcclient,
            prompt=inputs.prompt,
            messages=inputs.messages,
            images=inputs.images,
            max_tokens=inputs.max_tokens,
            temperature=inputs.temperature,
            top_p=inputs.top_p,
            stop=inputs.stop,
            seed=inputs.seed,
        )

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {
                "model_name": model,
                "inputs": tensors,
                "request_id": request_id,
                "parameters": None,
                "enable_empty_final_response": True,
            }

        call = self._channel(grpc_url).stream_infer(one_request())
        finished = False
        timeout = first_token_timeout_s
        watchdog = Watchdog(call)
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
            if finished:
                self._drain(call)
            else:
                with contextlib.suppress(Exception):
                    call.cancel()

    async def cancel(self, grpc_url: str, model: str, request_id: str, timeout_s: float = 5.0) -> int:
        """Stop the generation with ``request_id``; returns how many were running.

        Triton 2.51 does not pass a stream's cancellation on to an ensemble step that is
        already running, so the engine is told directly.
        """
        inputs = cancel_inputs(grpcclient, request_id)

        async def one_request() -> AsyncIterator[dict[str, Any]]:
            yield {"model_name": engine_model(model), "inputs": inputs, "enable_empty_final_response": True}

        call = self._channel(grpc_url).stream_infer(one_request())
        answered = False
        try:
            async with asyncio.timeout(timeout_s):
                async for result, error in call:
                    if error is not None:
                        raise InferenceServerException(msg=str(error.message()))
                    if result.get_response().outputs:
                        answered = True
                        return int(result.as_numpy(CANCEL_OUTPUT).reshape(-1)[0])
        finally:
            if answered:  # the engine closes the call a moment after its answer
                self._drain(call)
            else:
                with contextlib.suppress(Exception):
                    call.cancel()
        return 0

    def _drain(self, call: Any) -> None:
        """Read a call to its end in the background (see ``DRAIN_TIMEOUT_S``)."""

        async def drain() -> None:
            try:
                async with asyncio.timeout(DRAIN_TIMEOUT_S):
                    while True:
                        await call.__anext__()
            except StopAsyncIteration:
                return
            except BaseException:  # it did not end in time (or the channel closed): give it up
                with contextlib.suppress(Exception):
                    call.cancel()

        task = asyncio.get_running_loop().create_task(drain())
        self._draining.add(task)
        task.add_done_callback(self._draining.discard)

    async def forget(self, grpc_url: str) -> None:
        """Close the channel of a node that left."""
        c = self._channels.pop(grpc_url, None)
        if c is not None:
            await c.close()

    async def close(self) -> None:
        """Close every channel, and the HTTP session if it is this client's own."""
        for task in list(self._draining):
            task.cancel()
        channels, self._channels = list(self._channels.values()), {}
        for c in channels:
            with contextlib.suppress(Exception):
                await c.close()
        if self._owns_session:
            await self.session.close()
