"""Model lifecycle: load on demand, unload when idle, add replicas under load.

Nodes run Triton in explicit model-control mode. Each lists every model of its
repository in ``/v2/repository/index`` (``READY``, ``UNAVAILABLE`` with a reason, or
no state if never loaded) and loads or unloads one when asked:
``POST /v2/repository/models/<m>/load`` loads an ensemble together with its steps, and
``.../unload`` with ``{"parameters": {"unload_dependents": true}}`` unloads them too.
Triton is the mechanism; this module is the policy:

* **Catalog.** A model is *servable* when a healthy node's index lists it, loaded or
  not (:meth:`WorkerStore.servable_models`). Its placements are its state on each node.
* **Cold start.** A request for a servable model that is ready nowhere calls
  :meth:`ModelManager.ensure_loaded`: the model is loaded on the best node while the
  request waits, up to ``cold_start_timeout_s``. Concurrent requests share one load
  (one task per model). A failed load is recorded and reported to the client with its
  cause; the next request tries the next node, and once the model has failed on every
  eligible node within ``load_retry_after_s`` requests fail at once with the last cause.
* **Best node.** Among healthy nodes that list the model, accept explicit loads and
  carry the labels the model needs (``model_labels``): first those where it has not
  failed lately, then those with the fewest models loaded, then the least busy (this
  control plane's open streams plus the node's queue), then the lowest id.
* **Each round** (every ``lifecycle_interval_s``): a model below its minimum replicas
  (``model_min_replicas``; 1 for ``default_model``, else 0) is loaded on the best node;
  a model whose in-flight requests per replica exceed ``scale_out_inflight`` gets one
  more replica, up to its maximum; a replica unused for ``idle_ttl_s`` is unloaded,
  unless the model is pinned or would drop below its minimum.

Nodes in Triton's ``none`` mode (everything loaded at start) are found by a no-op
unload call and left as they are. Every step is a ``model_events`` row, written
through the batch writer. Pins are recorded there too (``pinned``/``unpinned``) and
read back at start. The policy acts on this control plane's own view: run it on one
replica when several share a fleet.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from control_plane.config import Settings
from control_plane.errors import ColdStartTimeout, ModelLoadFailed, NodeFailed, NoWorker
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import STEP_SUFFIXES, ModelStatus, WorkerInfo, WorkerState
from control_plane.lifecycle.events import ModelEventLog, stored_pins
from control_plane.lifecycle.placement import Failure, Key, PlacementPolicy
from control_plane.nodes.client import NodeCallError, NodeClient

__all__ = ["ModelManager"]

log = logging.getLogger(__name__)

UNLOAD_TIMEOUT_S = 30.0


class ModelManager(PlacementPolicy):
    """The model lifecycle: cold starts, idle unloads, scale-out, pins (placement rules: the base class)."""

    def __init__(
        self, settings: Settings, store: WorkerStore, nodes: NodeClient, events: ModelEventLog
    ) -> None:
        super().__init__(settings, store)
        self.nodes = nodes
        self.events = events
        self.pinned: set[str] = set(settings.pinned_models)
        self._cold: dict[str, asyncio.Task[WorkerInfo]] = {}  # cold starts in flight, one per model
        self._loaded_at: dict[Key, float] = {}  # our own successful loads
        self._background: set[asyncio.Task[Any]] = set()
        self._task: asyncio.Task[None] | None = None
        self.rounds = 0

    # -- start and stop -------------------------------------------------------------------
    async def start(self) -> None:
        """Read the pins, run a first round (learning each node's mode), then run rounds."""
        stored = await asyncio.to_thread(stored_pins, self.store.db)
        self.pinned = stored | set(self.settings.pinned_models)
        await self.run_once()
        self._task = asyncio.create_task(self._run(), name="model-lifecycle")

    async def stop(self) -> None:
        """Stop the rounds and abandon loads in flight (the nodes finish them on their own)."""
        tasks = [t for t in (self._task, *self._background) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(BaseException):
                await t
        self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.settings.lifecycle_interval_s)
            try:
                await self.run_once()
            except Exception:  # one bad round must not end the policy
                log.exception("model lifecycle round failed")

    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task: asyncio.Task[Any] = asyncio.create_task(coro, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_consume)
        return task

    # -- the periodic round ---------------------------------------------------------------
    async def run_once(self) -> None:
        """One round: learn new nodes' modes, then the minimum, scale-out and idle checks."""
        workers = self.store.all()
        for w in workers:
            if w.state is not WorkerState.HEALTHY:
                self._explicit.pop(w.id, None)  # it may come back in another mode
        healthy = [w for w in workers if w.state is WorkerState.HEALTHY]
        unknown = [w for w in healthy if w.id not in self._explicit]
        if unknown:
            await asyncio.gather(*(self._probe(w) for w in unknown))
        now = time.monotonic()
        current = {(m, w.id) for w in healthy for m in w.ready_models()}
        for key in current:
            self._ready_since.setdefault(key, now)
        for key in list(self._ready_since):
            if key not in current and key not in self._loads:
                del self._ready_since[key]
        for model in self.store.servable_models():
            self._check(model, healthy, now)
        self.rounds += 1

    def _check(self, model: str, healthy: list[WorkerInfo], now: float) -> None:
        s = self.settings
        ready = [w for w in healthy if w.can_serve(model)]
        loading = [key for key in self._loads if key[0] == model]
        minimum = self.min_replicas(model)
        if len(ready) + len(loading) < minimum:
            if not self._backing_off(model):
                self._load_on_best(model, f"below its minimum of {minimum} replica(s)")
            return
        if loading:
            return
        if s.scale_out_inflight > 0 and ready:
            inflight = sum(w.model_inflight.get(model, 0) for w in ready)
            most = self.max_replicas(model)
            if inflight / len(ready) > s.scale_out_inflight and (most is None or len(ready) < most):
                reason = f"scale out: {inflight} requests in flight on {len(ready)} replica(s)"
                if self._load_on_best(model, reason) is not None:
                    return
        if s.idle_ttl_s <= 0 or model in self.pinned:
            return
        idle: list[tuple[float, WorkerInfo]] = []
        for w in ready:
            key = (model, w.id)
            if (
                key in self._unloading
                or w.model_inflight.get(model, 0)
                or self._explicit.get(w.id) is not True
            ):
                continue
            since = max(self._ready_since.get(key, now), w.model_last_used.get(model, 0.0))
            if now - since >= s.idle_ttl_s:
                idle.append((now - since, w))
        idle.sort(key=lambda item: -item[0])
        for idle_s, w in idle[: max(0, len(ready) - minimum)]:
            # Out of routing now, before any await: no request can be sent to it any more.
            self._begin_unload(model, w)
            reason = f"idle for {idle_s:.0f} s (TTL {s.idle_ttl_s:g} s)"
            self._spawn(self._unload(model, w, reason), f"unload {model} from {w.id}")

    async def _probe(self, w: WorkerInfo) -> None:
        explicit = await self.nodes.explicit_mode(w.http_url, self.settings.poll_timeout_s)
        if explicit is not None:
            self._explicit[w.id] = explicit
            if not explicit:
                log.info(
                    "worker %s is not in explicit model-control mode: its models stay as they are", w.name
                )

    # -- loading --------------------------------------------------------------------------
    def _load_on_best(self, model: str, reason: str) -> asyncio.Task[WorkerInfo] | None:
        worker = self.best_node(model)
        if worker is None:
            return None
        return self._start_load(model, worker, reason)

    def _start_load(self, model: str, worker: WorkerInfo, reason: str) -> asyncio.Task[WorkerInfo]:
        """The load of ``model`` on ``worker``: the one in flight, or a new one."""
        key = (model, worker.id)
        task = self._loads.get(key)
        if task is None:
            task = self._spawn(self._load(model, worker, reason), f"load {model} on {worker.id}")
            self._loads[key] = task

            def done(t: asyncio.Task[WorkerInfo], key: Key = key) -> None:
                if self._loads.get(key) is t:
                    del self._loads[key]

            task.add_done_callback(done)
        return task

    async def _load(self, model: str, worker: WorkerInfo, reason: str) -> WorkerInfo:
        s = self.settings
        key = (model, worker.id)
        log.info("loading model %s on worker %s (%s)", model, worker.name, reason)
        self.events.record(model, worker.id, "load_requested", reason)
        started = time.monotonic()
        error: str | None = None
        try:
            await self.nodes.load(worker.http_url, model, s.model_load_timeout_s)
        except NodeCallError as exc:
            error = exc.message
            if exc.not_explicit:
                self._explicit[worker.id] = False
        elapsed = time.monotonic() - started
        if error is not None:
            self._failed[key] = Failure(time.monotonic(), worker.id, error)
            self.events.record(model, worker.id, "load_failed", error, elapsed * 1000.0)
            self.events.count_load(model, "failed", elapsed)
            log.warning("model %s failed to load on worker %s: %s", model, worker.name, error)
            raise ModelLoadFailed(
                f"model {model!r} could not be loaded on worker {worker.name}: {error}", param="model"
            )
        self._failed.pop(key, None)
        self._mark(worker, model, ready=True, state="READY")
        now = time.monotonic()
        self._ready_since[key] = self._loaded_at[key] = now
        self.events.record(model, worker.id, "loaded", reason, elapsed * 1000.0)
        self.events.count_load(model, "loaded", elapsed)
        log.info("model %s loaded on worker %s in %.1f s", model, worker.name, elapsed)
        return worker

    def _mark(self, worker: WorkerInfo, model: str, *, ready: bool, state: str) -> None:
        """Set the model (and its steps) in the live view, ahead of the next poll."""
        names = [n for n in (model, *(model + x for x in STEP_SUFFIXES)) if n == model or n in worker.models]
        self.store.mark_models(worker, names, ModelStatus(ready=ready, state=state))

    def _revive(self, model: str) -> bool:
        """A poll that started before our load finished can report the model not ready;
        within a couple of polls of that load, trust the load."""
        now = time.monotonic()
        window = 2 * self.settings.poll_interval_s + 1.0
        for (m, wid), at in self._loaded_at.items():
            if m != model or now - at >= window or (m, wid) in self._unloading:
                continue
            w = self.store.get(wid)
            if w is not None and w.state is WorkerState.HEALTHY:
                self._mark(w, model, ready=True, state="READY")
                return True
        return False

    async def ensure_loaded(self, model: str) -> None:
        """Make ``model`` ready on some node (a cold start), waiting up to the cold-start timeout.

        Returns at once when it is ready somewhere, when no healthy node lists it (the
        caller reports that) or when loading on demand is off (``cold_start_timeout_s``
        0). Raises :class:`ModelLoadFailed`, :class:`ColdStartTimeout` or :class:`NoWorker`.
        """
        timeout_s = self.settings.cold_start_timeout_s
        if timeout_s <= 0 or self.store.candidates(model) or model not in self.store.servable_models():
            return
        if self._revive(model):
            return
        task = self._cold.get(model)
        if task is None:
            task = self._spawn(self._cold_start(model), f"cold start {model}")
            self._cold[model] = task

            def done(t: asyncio.Task[WorkerInfo]) -> None:
                if self._cold.get(model) is t:
                    del self._cold[model]

            task.add_done_callback(done)
        try:
            async with asyncio.timeout(timeout_s):
                await asyncio.shield(task)
        except TimeoutError:
            where = ", ".join(str(wid) for m, wid in self._loads if m == model) or "?"
            raise ColdStartTimeout(
                f"model {model!r} is still loading (worker {where}) after {timeout_s:g} s; try again shortly",
                param="model",
            ) from None

    async def _cold_start(self, model: str) -> WorkerInfo:
        running = [t for (m, _), t in self._loads.items() if m == model]
        if running:  # loading already (admin, minimum, scale-out): wait for that one
            return await asyncio.shield(running[0])
        if self._backing_off(model):
            now = time.monotonic()
            last = max(
                (f for (m, _), f in self._failed.items() if m == model), key=lambda f: f.at, default=None
            )
            assert last is not None
            worker = self.store.get(last.worker_id)
            raise ModelLoadFailed(
                f"model {model!r} failed to load on every eligible worker in the last "
                f"{self.settings.load_retry_after_s:g} s; the last attempt (worker "
                f"{worker.name if worker else last.worker_id}, {now - last.at:.0f} s ago) said: {last.message}",
                param="model",
            )
        worker = self.best_node(model)
        while worker is None and self._unloading_somewhere(model):
            # an unload is finishing (Triton drains its requests first): load once it is done;
            # loading beside it would start a second engine (the caller's timeout bounds this)
            await asyncio.sleep(self.settings.poll_interval_s)
            worker = self.best_node(model)
        if worker is None:
            raise NoWorker(self._why_no_node(model), param="model")
        return await asyncio.shield(self._start_load(model, worker, "cold start"))

    # -- unloading ------------------------------------------------------------------------
    def _begin_unload(self, model: str, worker: WorkerInfo) -> None:
        self._unloading.add((model, worker.id))
        self._mark(worker, model, ready=False, state="UNLOADING")

    async def _unload(self, model: str, worker: WorkerInfo, reason: str) -> None:
        """Unload ``model`` and its steps (call :meth:`_begin_unload` first)."""
        key = (model, worker.id)
        error: str | None = None
        try:
            await self.nodes.unload(worker.http_url, model, UNLOAD_TIMEOUT_S)
        except NodeCallError as exc:
            error = exc.message
        finally:
            self._unloading.discard(key)
        if error is not None:
            self.events.record(model, worker.id, "unload_failed", error)
            log.warning("unloading model %s from worker %s failed: %s", model, worker.name, error)
            raise NodeFailed(f"unloading model {model!r} from worker {worker.name} failed: {error}")
        self._ready_since.pop(key, None)
        self._loaded_at.pop(key, None)
        # Still "UNLOADING" in the live view until a poll says otherwise: Triton answers the
        # unload call before its engine has finished (it drains its requests first).
        self.events.record(model, worker.id, "unloaded", reason)
        self.events.count_unload(model)
        log.info("model %s unloaded from worker %s: %s", model, worker.name, reason)


def _consume(task: asyncio.Task[Any]) -> None:
    """Retrieve a background task's exception (it was logged and recorded already)."""
    if not task.cancelled():
        task.exception()
