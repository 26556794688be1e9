"""Generation through the fleet: pick a node, stream from it, record the request.

Both public APIs (LLaVA's protocol and the OpenAI API) call :meth:`GenerationService.stream`
and turn its chunks and errors into their own wire formats.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import tritonclient.grpc.aio as grpcclient

from control_plane.config import Settings
from control_plane.db import BatchWriter
from control_plane.errors import BadRequest, NodeFailed, NoWorker, UnknownModel, WorkerUnreachable
from control_plane.metrics import ControlPlaneMetrics
from control_plane.proxy import NodeStreamError, TritonPool
from control_plane.routing import Router
from control_plane.schema import RequestRecord, utcnow
from control_plane.store import WorkerInfo, WorkerStore
from llava_node.client import Chunk, build_inputs

__all__ = ["GenerateRequest", "GenerationService"]

log = logging.getLogger(__name__)


@dataclass
class GenerateRequest:
    """One generation, in the terms of the ``llava`` ensemble's inputs."""

    model: str
    api: str
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    images: list[bytes] = field(default_factory=list)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    request_id: str = ""
    pinned_worker: int | None = None


@dataclass
class _Record:
    key: str
    started: float
    first_token: float | None = None
    first_token_at: datetime | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    finish_reason: str | None = None
    attempts: int = 0
    worker_id: int | None = None


class GenerationService:
    """Routes, streams and records generations."""

    def __init__(
        self,
        settings: Settings,
        store: WorkerStore,
        router: Router,
        pool: TritonPool,
        writer: BatchWriter,
        metrics: ControlPlaneMetrics,
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.pool = pool
        self.writer = writer
        self.metrics = metrics
        self._running_ids: set[str] = set()
        self._background: set[asyncio.Task[Any]] = set()
        self.max_attempts = 3
        # Cold start (lifecycle.ModelManager.ensure_loaded): load a model that is ready nowhere.
        self.ensure_loaded: Callable[[str], Awaitable[None]] | None = None

    def new_request_id(self, given: str | None) -> str:
        """The Triton request id: the client's (if unused right now) or a fresh one."""
        if given:
            rid = given.strip()
            if not rid or len(rid) > 128 or not rid.isprintable():
                raise BadRequest("X-Request-Id must be 1 to 128 printable characters", param="X-Request-Id")
            if rid in self._running_ids:
                raise BadRequest(
                    f"request id {rid!r} is already in use by a running request", param="X-Request-Id"
                )
            return rid
        return f"req-{uuid.uuid4().hex}"

    def _choose(self, req: GenerateRequest, exclude: set[int]) -> WorkerInfo:
        if req.pinned_worker is not None and req.pinned_worker not in exclude:
            pinned = self.store.get(req.pinned_worker)
            if pinned is not None and pinned.can_serve(req.model):
                return pinned
        worker = self.router.choose(self.store.candidates(req.model), exclude)
        if worker is not None:
            return worker
        if req.model not in self.store.known_models():
            known = ", ".join(self.store.listed_models()) or "none"
            raise UnknownModel(
                f"no worker serves model {req.model!r} (models available: {known})", param="model"
            )
        if exclude:
            raise WorkerUnreachable(
                f"every worker serving model {req.model!r} failed to take the request", param="model"
            )
        raise NoWorker(f"no healthy worker has model {req.model!r} ready right now", param="model")

    async def _choose_or_load(self, req: GenerateRequest, exclude: set[int]) -> WorkerInfo:
        """:meth:`_choose`; a model that is ready nowhere is loaded first (cold start)."""
        try:
            return self._choose(req, exclude)
        except NoWorker:
            if self.ensure_loaded is None:
                raise
        await self.ensure_loaded(req.model)
        return self._choose(req, exclude)

    def _inputs(self, req: GenerateRequest) -> list[Any]:
        return build_inputs(
            grpcclient,
            prompt=req.prompt,
            messages=req.messages,
            images=req.images,
            max_tokens=req.max_tokens,
            temperature=req.temperature,
            top_p=req.top_p,
            stop=req.stop,
            seed=req.seed,
        )

    async def stream(self, req: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        """Stream a generation from a healthy node; raises a :class:`ServiceError`.

        Before the first chunk, a node that cannot be reached is retried on another
        one. A client that goes away (the generator is closed or cancelled) cancels the
        generation on the node.
        """
        if not req.request_id:
            req.request_id = self.new_request_id(None)
        rec = _Record(key=uuid.uuid4().hex, started=time.monotonic())
        self._running_ids.add(req.request_id)
        self.metrics.inflight.inc()
        self._record_start(req, rec)
        status, error = "error", None
        worker: WorkerInfo | None = None
        try:
            inputs = self._inputs(req)
            exclude: set[int] = set()
            while True:
                worker = await self._choose_or_load(req, exclude)
                rec.attempts += 1
                rec.worker_id = worker.id
                self.store.adjust_inflight(worker, +1, req.model)
                try:
                    async for chunk in self.pool.stream(
                        worker.grpc_url,
                        req.model,
                        inputs,
                        req.request_id,
                        first_token_timeout_s=self.settings.first_token_timeout_s,
                        stall_timeout_s=self.settings.stall_timeout_s,
                    ):
                        if rec.first_token is None:
                            rec.first_token = time.monotonic()
                            rec.first_token_at = utcnow()
                            self.metrics.ttft.labels(req.api).observe(rec.first_token - rec.started)
                        rec.prompt_tokens = chunk.prompt_tokens
                        rec.completion_tokens = chunk.completion_tokens
                        rec.finish_reason = chunk.finish_reason or rec.finish_reason
                        yield chunk
                    status = "ok"
                    return
                except NodeStreamError as exc:
                    streamed = rec.first_token is not None
                    if exc.client_error:
                        raise BadRequest(exc.message) from None
                    if exc.unreachable and not streamed and rec.attempts < self.max_attempts:
                        log.warning(
                            "worker %s failed before streaming (%s); retrying", worker.name, exc.message
                        )
                        self.metrics.retries.inc()
                        exclude.add(worker.id)
                        continue
                    if exc.stalled and streamed:
                        self._cancel_on_node(worker, req)
                    if exc.unreachable:
                        raise WorkerUnreachable(f"worker {worker.name}: {exc.message}") from None
                    raise NodeFailed(f"worker {worker.name} failed: {exc.message}") from None
                finally:
                    self.store.adjust_inflight(worker, -1, req.model)
        except (GeneratorExit, asyncio.CancelledError):
            status, error = "cancelled", "the client went away"
            if worker is not None:
                self._cancel_on_node(worker, req)
            raise
        except Exception as exc:
            error = getattr(exc, "message", None) or str(exc)
            raise
        finally:
            self._running_ids.discard(req.request_id)
            self.metrics.inflight.dec()
            self.metrics.requests.labels(req.api, req.model, status).inc()
            self.metrics.tokens.labels(req.api).inc(rec.completion_tokens)
            self._record_end(rec, status, error)

    def _cancel_on_node(self, worker: WorkerInfo, req: GenerateRequest) -> None:
        async def cancel() -> None:
            try:
                n = await self.pool.cancel(worker.grpc_url, req.model, req.request_id)
                log.info("cancelled %s on %s (%d running)", req.request_id, worker.name, n)
            except Exception as exc:
                log.warning("could not cancel %s on %s: %s", req.request_id, worker.name, exc)

        task = asyncio.get_running_loop().create_task(cancel())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for background cancellations to finish (at shutdown)."""
        if self._background:
            await asyncio.wait(list(self._background), timeout=5)

    def _record_start(self, req: GenerateRequest, rec: _Record) -> None:
        self.writer.insert(
            RequestRecord,
            {
                "id": rec.key,
                "request_id": req.request_id,
                "api": req.api,
                "model": req.model[:256],
                "worker_id": None,
                "replica": self.settings.replica_name,
                "started_at": utcnow(),
                "status": "running",
                "attempts": 0,
            },
        )

    def _record_end(self, rec: _Record, status: str, error: str | None) -> None:
        ttft_ms = (rec.first_token - rec.started) * 1000.0 if rec.first_token is not None else None
        self.writer.update(
            RequestRecord,
            {
                "id": rec.key,
                "worker_id": rec.worker_id,
                "first_token_at": rec.first_token_at,
                "ttft_ms": ttft_ms,
                "ended_at": utcnow(),
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": rec.completion_tokens,
                "status": status,
                "finish_reason": rec.finish_reason,
                "attempts": rec.attempts,
                "error": error[:2000] if error else None,
            },
        )
