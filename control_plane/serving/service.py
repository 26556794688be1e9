"""Generation through the fleet: pick a node, stream from it, record the request.

Both public APIs (LLaVA's protocol and the OpenAI API) call :meth:`GenerationService.stream`
and turn its chunks and errors into their own wire formats.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from control_plane.config import Settings
from control_plane.errors import (
    BadRequest,
    NodeFailed,
    NoWorker,
    ServiceError,
    UnknownModel,
    WorkerUnreachable,
)
from control_plane.fleet.breaker import CircuitBreaker
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import WorkerInfo, WorkerState
from control_plane.metrics import ControlPlaneMetrics
from control_plane.nodes.client import GenerationInputs, NodeClient, NodeStreamError
from control_plane.nodes.parsing import node_error_param
from control_plane.serving.admission import Admission
from control_plane.serving.affinity import Prefix
from control_plane.serving.cancels import NodeCancels
from control_plane.serving.migration import StreamProgress, seeded
from control_plane.serving.node_watch import watch_node
from control_plane.serving.records import RequestLog, RequestState, node_request_id
from control_plane.serving.routing import Decision, Router
from control_plane.storage.schema import utcnow
from control_plane.storage.writer import BatchWriter
from llava_wire.messages import Chunk
from llava_wire.protocol import FinishReason

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

    def inputs(self) -> GenerationInputs:
        """The ensemble's inputs for this request."""
        return GenerationInputs(
            prompt=self.prompt,
            messages=self.messages,
            images=self.images,
            max_tokens=self.max_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stop=self.stop,
            seed=self.seed,
        )


ColdStart = Callable[[str], Awaitable[None]]


class GenerationService:
    """Routes, streams and records generations."""

    def __init__(
        self,
        settings: Settings,
        store: WorkerStore,
        router: Router,
        nodes: NodeClient,
        writer: BatchWriter,
        metrics: ControlPlaneMetrics,
        breaker: CircuitBreaker,
        cold_start: ColdStart | None = None,
        listed_names: Callable[[Iterable[str]], list[str]] = sorted,  # served names, for errors
    ) -> None:
        self.settings = settings
        self.store = store
        self.router = router
        self.nodes = nodes
        self.writer = writer
        self.metrics = metrics
        self.breaker = breaker
        # Loads a model that is ready nowhere (lifecycle.ModelManager.ensure_loaded); None: no cold starts.
        self.cold_start = cold_start
        self.listed_names = listed_names
        self._running_ids: set[str] = set()
        self.cancels = NodeCancels(nodes, settings.cancel_retry_s)  # in the background, retried
        self.admission = Admission(
            settings.max_inflight_per_worker, settings.max_waiting, settings.queue_timeout_s
        )
        self.records = RequestLog(writer, metrics, settings.replica_name)

    def new_request_id(self, given: str | None) -> str:
        """The request id: the client's (if unused right now) or a fresh one (its nodes get
        it with a suffix of its own, records.node_request_id)."""
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

    def _candidates(self, req: GenerateRequest, exclude: set[int]) -> list[WorkerInfo]:
        """Healthy workers with the model ready (raises if there are none at all)."""
        candidates = [w for w in self.store.candidates(req.model) if w.id not in exclude]
        if candidates:
            return candidates
        if req.model not in self.store.known_models():
            known = ", ".join(self.listed_names(self.store.listed_models())) or "none"
            raise UnknownModel(
                f"no worker serves model {req.model!r} (models available: {known})", param="model"
            )
        if exclude:
            raise WorkerUnreachable(
                f"every worker serving model {req.model!r} failed to take the request", param="model"
            )
        raise NoWorker(f"no healthy worker has model {req.model!r} ready right now", param="model")

    async def _acquire(self, req: GenerateRequest, exclude: set[int], prefix: Prefix | None) -> Decision:
        """A worker for ``req`` with room for one more stream, counted as in flight.

        A model that is ready nowhere is loaded first (cold start), when a lifecycle
        manager is attached.
        """

        def pick() -> Decision | None:
            candidates = self._candidates(req, exclude)
            if req.pinned_worker is not None:
                pinned = next((w for w in candidates if w.id == req.pinned_worker), None)
                if pinned is not None and self.admission.has_room(pinned):
                    return self.router.pinned(pinned, prefix)
            return self.router.decide([w for w in candidates if self.admission.has_room(w)], prefix)

        try:
            decision = await self.admission.wait_for_room(pick, req.model)
        except NoWorker:
            if self.cold_start is None:
                raise
            await self.cold_start(req.model)
            decision = await self.admission.wait_for_room(pick, req.model)
        # before any await: pick and count are atomic
        self.store.adjust_inflight(decision.worker, +1, req.model)
        return decision

    def _out_of_routing(self, worker: WorkerInfo) -> Callable[[], str | None]:
        """A check naming the worker's state once the poller has taken it out of routing."""

        def check() -> str | None:
            current = self.store.get(worker.id)
            state = current.state if current is not None else WorkerState.REMOVED
            return state.value if state in (WorkerState.UNHEALTHY, WorkerState.OFFLINE) else None

        return check

    def _release(self, worker: WorkerInfo, model: str) -> None:
        self.store.adjust_inflight(worker, -1, model)
        self.admission.release()

    async def pick_worker(self, model: str) -> WorkerInfo | None:
        """A worker with room for one more stream of ``model`` (LLaVA's
        ``/get_worker_address``: the stream itself comes later, to that worker); a model
        ready nowhere is loaded first (a cold start). None when no worker serves it."""
        candidates = [w for w in self.store.candidates(model) if self.admission.has_room(w)]
        if not candidates and self.cold_start is not None and model in self.store.servable_models():
            await self.cold_start(model)
            candidates = [w for w in self.store.candidates(model) if self.admission.has_room(w)]
        return self.router.choose(candidates)

    async def stream(self, req: GenerateRequest) -> AsyncGenerator[Chunk, None]:
        """Stream a generation from a healthy node; raises a :class:`ServiceError`.

        Before the first chunk, a node that cannot be reached or fails is retried on
        another one; after it, the stream is continued on another one with the tokens sent
        so far (:mod:`control_plane.serving.migration`), ``max_migrations`` times at most.
        A client that goes away (the generator is closed or cancelled) cancels the
        generation on the node.
        """
        if not req.request_id:
            req.request_id = self.new_request_id(None)
        key = uuid.uuid4().hex
        rec = RequestState(key, node_request_id(req.request_id, key), started=time.monotonic())
        self._running_ids.add(req.request_id)
        self.metrics.inflight.inc()
        self.records.started(rec, req.request_id, req.api, req.model)
        status, error = "error", None
        worker: WorkerInfo | None = None
        prefix: Prefix | None = None
        progress = StreamProgress()
        try:
            inputs = seeded(req.inputs())
            prefix = await self.router.prefix(req.model, req.prompt, req.messages, req.images)
            exclude: set[int] = set()
            while True:
                decision = await self._next_node(req, exclude, prefix, rec, progress)
                worker = decision.worker
                rec.attempts += 1
                self.records.routed(rec, req.model, decision)
                try:
                    stream = self.nodes.stream(
                        worker.grpc_url,
                        req.model,
                        progress.inputs(inputs),
                        rec.node_id,
                        first_token_timeout_s=self.settings.first_token_timeout_s,
                        stall_timeout_s=self.settings.stall_timeout_s,
                    )
                    watched = watch_node(stream, self._out_of_routing(worker), self.settings.frozen_stream_s)
                    async for chunk in watched:
                        if rec.first_token is None:
                            rec.first_token = time.monotonic()
                            rec.first_token_at = utcnow()
                            self.metrics.ttft.labels(req.api).observe(rec.first_token - rec.started)
                            self.breaker.success(worker)
                        if progress.pending is not None:
                            self._resumed(rec, req, progress)
                        # "cancelled" is not this control plane's doing (its client is
                        # here) but a cancel call on the node: what the node held back goes
                        # out, then the client learns that its answer was cut short
                        cut = chunk.finish_reason == FinishReason.CANCELLED
                        if cut:
                            chunk.finish_reason = None
                        progress.sent(chunk)
                        rec.prompt_tokens = chunk.prompt_tokens
                        rec.completion_tokens = chunk.completion_tokens
                        rec.cached_tokens = chunk.cached_tokens
                        rec.finish_reason = chunk.finish_reason or rec.finish_reason
                        if cut:
                            if chunk.text or chunk.token_ids:
                                yield chunk
                            raise NodeFailed(
                                f"worker {worker.name} cancelled the request after "
                                f"{len(progress.token_ids)} tokens (a cancel call on the node)"
                            )
                        yield chunk
                    self.breaker.success(worker)
                    status = "ok"
                    return
                except NodeStreamError as exc:
                    if exc.client_error and not progress.streaming:
                        raise BadRequest(exc.message, param=node_error_param(exc.message, req.api)) from None
                    if not self._recover(req, worker, exc, rec, progress):
                        raise self._failure(worker, exc, progress) from None
                    exclude.add(worker.id)
                    if not progress.streaming:
                        await asyncio.sleep(self.settings.retry_backoff_s * 2 ** (rec.attempts - 1))
                finally:
                    self._release(worker, req.model)
        except (GeneratorExit, asyncio.CancelledError):
            status, error = "cancelled", "the client went away"
            if worker is not None:
                self.cancels.send(worker, req.model, rec.node_id)
            raise
        except Exception as exc:
            error = getattr(exc, "message", None) or str(exc)
            raise
        finally:
            self._running_ids.discard(req.request_id)
            self.metrics.inflight.dec()
            self.metrics.requests.labels(req.api, req.model, status).inc()
            self.metrics.tokens.labels(req.api).inc(rec.completion_tokens)
            if rec.decision is not None and rec.cached_tokens is not None:
                self.router.served(rec.decision, prefix, rec.cached_tokens, rec.prompt_tokens)
            self.metrics.affinity_blocks.set(len(self.router.index))
            self.records.ended(rec, req.api, status, error)

    async def _next_node(
        self,
        req: GenerateRequest,
        exclude: set[int],
        prefix: Prefix | None,
        rec: RequestState,
        progress: StreamProgress,
    ) -> Decision:
        """The node for the next attempt; for a continuation that no node can take, its
        break is recorded (``no_node``) and the error says where the stream broke."""
        try:
            decision = await self._acquire(req, exclude, prefix)
        except ServiceError as exc:
            brk = progress.pending
            if brk is None:
                raise
            self.records.migration(rec, req.model, brk, "no_node", None)
            progress.pending = None
            error = NodeFailed if brk.reason == "node_error" else WorkerUnreachable
            raise error(
                f"the stream broke after {brk.after_tokens} tokens ({brk.error}) and no other node "
                f"could continue it: {exc.message}"
            ) from None
        if progress.pending is not None:
            progress.pending.to_worker = decision.worker.id
        return decision

    def _resumed(self, rec: RequestState, req: GenerateRequest, progress: StreamProgress) -> None:
        """A continuation's first chunk: its break is over."""
        brk = progress.pending
        assert brk is not None
        pause = time.monotonic() - brk.last_token
        log.info(
            "request %s resumed after %d tokens (pause %.0f ms)",
            req.request_id,
            brk.after_tokens,
            pause * 1e3,
        )
        self.records.migration(rec, req.model, brk, "resumed", pause)
        progress.pending = None

    def _recover(
        self,
        req: GenerateRequest,
        worker: WorkerInfo,
        exc: NodeStreamError,
        rec: RequestState,
        progress: StreamProgress,
    ) -> bool:
        """After ``worker`` failed the stream: count it against the node (unless the node
        refused a continuation), cancel what it may still run, and say whether to go on
        elsewhere (a retry before the first token, a migration after it)."""
        if not exc.client_error:
            self.breaker.failure(worker, exc.message)
        if exc.stalled:
            self.cancels.send(worker, req.model, rec.node_id)  # it may still be generating
        if progress.pending is not None:  # a continuation failed before it sent anything
            self.records.migration(rec, req.model, progress.pending, "failed", None)
            progress.pending = None
        if exc.client_error:
            return False  # a node refused a continuation: another would too
        if not progress.streaming:
            # Nothing reached the client, so a node that failed (unreachable, or an error
            # of its own: a stub that died as its server was killed answers "Stub process
            # ... is not healthy") is retried on another; the client's own mistakes never
            # get here.
            if rec.attempts >= self.settings.max_attempts:
                return False
            log.warning("worker %s failed before streaming (%s); retrying", worker.name, exc.message)
            self.metrics.retries.inc()
            return True
        if progress.migrations >= self.settings.max_migrations:
            return False
        progress.broke(worker.id, exc)
        rec.migrations = progress.migrations
        log.warning(
            "worker %s failed after %d tokens (%s); continuing the stream elsewhere",
            worker.name,
            len(progress.token_ids),
            exc.message,
        )
        return True

    @staticmethod
    def _failure(worker: WorkerInfo, exc: NodeStreamError, progress: StreamProgress) -> ServiceError:
        """The error a stream ends with when it is not retried or continued."""
        where = f"worker {worker.name}"
        if progress.streaming:
            where += f" after {len(progress.token_ids)} tokens"
        if exc.client_error:
            return NodeFailed(f"{where} could not continue the stream: {exc.message}")
        if exc.unreachable:
            return WorkerUnreachable(f"{where}: {exc.message}")
        return NodeFailed(f"{where} failed: {exc.message}")
