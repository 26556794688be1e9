"""The :class:`NodeClient` of real Triton nodes: HTTP (aiohttp) for polls and model
control, gRPC (``tritonclient.grpc.aio``, one reused channel per node) for streams.
Everything read from a node is bounded and parsed defensively (:mod:`.parsing`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
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
    NodeCallError,
    NodeStreamError,
    PollResult,
)
from control_plane.nodes.parsing import (
    MAX_INDEX_BYTES,
    MAX_METRICS_BYTES,
    clean_node_error,
    describe_error,
    node_message,
    parse_index,
    parse_load,
    parse_served_names,
    read_bounded,
)
from control_plane.nodes.watchdog import Watchdog
from llava_wire.messages import Chunk, build_inputs, cancel_inputs, parse_infer_response
from llava_wire.protocol import CANCEL_OUTPUT, engine_model

__all__ = ["TritonNodeClient"]

log = logging.getLogger(__name__)

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
                    res.models = parse_index(await read_bounded(index, MAX_INDEX_BYTES))
            res.latency_ms = (time.perf_counter() - started) * 1000.0
            res.ok = res.server_ready
            if not res.server_ready and res.models is not None:
                async with self.session.get(f"{http_url}/v2/health/live", timeout=timeout) as live:
                    res.ok = live.status == 200
            if not res.ok:
                res.error = "server not ready (/v2/health/ready did not answer 200)"
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            res.error = describe_error(exc, timeout_s)
            return res
        if metrics_url:
            with contextlib.suppress(aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
                async with self.session.get(metrics_url, timeout=timeout) as m:
                    if m.status == 200:
                        page = await read_bounded(m, MAX_METRICS_BYTES)
                        text = page.decode("utf-8", "replace")
                        res.queued, res.active = parse_load(text)
                        res.served_names = parse_served_names(text)
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
                body = await read_bounded(r, 1 << 16)
                if r.status == 200:
                    return True
                if NOT_EXPLICIT.encode() in body:
                    return False
        return None

    async def _model_call(self, url: str, body: dict[str, Any], timeout_s: float, doing: str) -> None:
        try:
            async with self.session.post(url, json=body, timeout=aiohttp.ClientTimeout(total=timeout_s)) as r:
                if r.status != 200:
                    error = clean_node_error((await read_bounded(r, 1 << 20)).decode("utf-8", "replace"))
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
            prior_token_ids=inputs.prior_token_ids,
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
                    message, client_error = node_message(str(error.message()))
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
