"""Admin actions on the model lifecycle: load, unload, pin and unpin (the admin API's)."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from control_plane.errors import Conflict, NotFound, NoWorker, UnknownModel
from control_plane.fleet.workers import WorkerInfo, WorkerState
from control_plane.lifecycle.manager import ModelManager
from control_plane.lifecycle.views import ModelViews

__all__ = ["ModelAdmin"]


class ModelAdmin:
    """What admins ask of the lifecycle; each answer is the model's new state."""

    def __init__(self, manager: ModelManager, views: ModelViews) -> None:
        self.manager = manager
        self.views = views

    def _servable_or_404(self, model: str) -> None:
        servable = self.manager.store.servable_models()
        if model not in servable:
            raise UnknownModel(
                f"no healthy worker lists model {model!r} (models: {', '.join(servable) or 'none'})",
                param="model",
            )

    def _worker_or_404(self, worker_id: int) -> WorkerInfo:
        w = self.manager.store.get(worker_id)
        if w is None:
            raise NotFound(f"no worker with id {worker_id}")
        return w

    async def load(self, model: str, worker_id: int | None = None) -> dict[str, Any]:
        """Load ``model`` on a worker (the best one if not given) and wait until it is loaded."""
        m = self.manager
        self._servable_or_404(model)
        if worker_id is not None:
            worker = self._worker_or_404(worker_id)
            if worker.state is not WorkerState.HEALTHY:
                raise Conflict(f"worker {worker.id} ({worker.name}) is {worker.state.value}")
            if model not in worker.models:
                raise NotFound(f"worker {worker.id} ({worker.name}) has no model {model!r} in its repository")
            if m._explicit.get(worker.id) is False:
                raise Conflict(f"worker {worker.id} ({worker.name}) is not in explicit model-control mode")
            if m._unloading_on(model, worker):
                raise Conflict(
                    f"model {model!r} is still unloading on worker {worker.id} ({worker.name}); "
                    "load it again once the unload has finished"
                )
            if worker.can_serve(model):
                return {"model": model, "worker_id": worker.id, "worker": worker.name, "state": "loaded"}
        else:
            found = m.best_node(model)
            if found is None:
                if any(w.can_serve(model) for w in self.manager.store.all()):
                    raise Conflict(f"model {model!r} is loaded on every worker that can take it")
                raise NoWorker(m._why_no_node(model), param="model")
            worker = found
        started = time.monotonic()
        await asyncio.shield(m._start_load(model, worker, "admin"))
        return {
            "model": model,
            "worker_id": worker.id,
            "worker": worker.name,
            "state": "loaded",
            "duration_ms": round((time.monotonic() - started) * 1000.0, 1),
        }

    async def unload(self, model: str, worker_id: int | None = None) -> dict[str, Any]:
        """Unload ``model`` from a worker (from every worker if not given)."""
        m = self.manager
        if model in m.pinned:
            raise Conflict(f"model {model!r} is pinned; unpin it first")
        ready = [w for w in self.manager.store.all() if w.can_serve(model)]
        if worker_id is not None:
            worker = self._worker_or_404(worker_id)
            if not worker.can_serve(model):
                raise Conflict(f"model {model!r} is not loaded on worker {worker.id} ({worker.name})")
            targets = [worker]
        else:
            if not ready:
                if model not in self.manager.store.known_models():
                    raise UnknownModel(f"no worker lists model {model!r}", param="model")
                raise Conflict(f"model {model!r} is not loaded on any worker")
            targets = ready
        for w in targets:
            if m._explicit.get(w.id) is False:
                raise Conflict(f"worker {w.id} ({w.name}) is not in explicit model-control mode")
        left, minimum = len(ready) - len(targets), m.min_replicas(model)
        if left < minimum:
            raise Conflict(
                f"unloading would leave model {model!r} with {left} replica(s), below its minimum of "
                f"{minimum} (LLAVA_CP_MODEL_MIN_REPLICAS)"
            )
        for w in targets:
            m._begin_unload(model, w)
        results = await asyncio.gather(
            *(m._unload(model, w, "admin") for w in targets), return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return {"model": model, "unloaded_from": [w.id for w in targets]}

    def pin(self, model: str) -> dict[str, Any]:
        """Pin ``model``: it is never unloaded (neither for idleness nor by admins)."""
        m = self.manager
        if model not in self.manager.store.known_models():
            raise UnknownModel(f"no worker lists model {model!r}", param="model")
        if model not in m.pinned:
            m.pinned.add(model)
            m.events.record(model, None, "pinned", "admin")
        return self.views.describe_model(model)

    def unpin(self, model: str) -> dict[str, Any]:
        """Unpin ``model``: idle replicas above its minimum are unloaded again."""
        m = self.manager
        if model in m.pinned:
            m.pinned.discard(model)
            m.events.record(model, None, "unpinned", "admin")
        elif model not in self.manager.store.known_models():
            raise UnknownModel(f"no worker lists model {model!r}", param="model")
        return self.views.describe_model(model)
