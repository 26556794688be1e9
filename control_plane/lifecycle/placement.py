"""Placement: which nodes may take a model and which one a new replica goes to, a
placement's state in words, label matching."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from control_plane.config import Settings
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import STEP_SUFFIXES, ModelStatus, WorkerInfo, WorkerState

__all__ = ["Failure", "Key", "PlacementPolicy", "labels_match", "load_failed", "placement_state"]

Key = tuple[str, int]  # (model, worker id)


def labels_match(labels: Mapping[str, Any], required: Mapping[str, Any]) -> bool:
    """Whether a worker's labels carry every required label with the same value."""
    return all(k in labels and str(labels[k]) == str(v) for k, v in required.items())


def load_failed(status: ModelStatus) -> bool:
    """Whether a model's (or step's) state says its last load failed."""
    return status.state == "UNAVAILABLE" and bool(status.reason) and status.reason != "unloaded"


def placement_state(
    status: ModelStatus,
    steps: Iterable[ModelStatus] = (),
    *,
    loading: bool = False,
    unloading: bool = False,
    failed: bool = False,
) -> str:
    """A model's state on one node, in words: loaded, loading, unloading, failed,
    unreachable or unloaded. ``steps``: its steps' states (a failed load leaves the
    ensemble without a state and the failed step ``UNAVAILABLE`` with the reason)."""
    if loading or status.state == "LOADING":
        return "loading"
    if unloading or status.state == "UNLOADING":
        return "unloading"
    if status.ready:
        return "loaded"
    if status.state == "UNREACHABLE":
        return "unreachable"
    if failed or load_failed(status) or any(load_failed(s) for s in steps):
        return "failed"
    return "unloaded"


@dataclass
class Failure:
    """The last failed load of a model on a worker."""

    at: float  # monotonic
    worker_id: int
    message: str


class PlacementPolicy:
    """Where models may go and which node a new replica goes to: the lifecycle's state
    (loads and unloads in flight, failures, each node's mode) and the rules over it.
    :class:`~control_plane.lifecycle.manager.ModelManager` acts on it."""

    def __init__(self, settings: Settings, store: WorkerStore) -> None:
        self.settings = settings
        self.store = store
        self._loads: dict[Key, asyncio.Task[WorkerInfo]] = {}  # loads in flight, one per placement
        self._unloading: set[Key] = set()
        self._ready_since: dict[Key, float] = {}  # when a placement was seen or made ready
        self._failed: dict[Key, Failure] = {}  # the last failed load per placement
        self._explicit: dict[int, bool] = {}  # worker id -> takes explicit loads (probed)

    # -- settings per model ---------------------------------------------------------------
    def min_replicas(self, model: str) -> int:
        """Replicas never unloaded for idleness (and loaded when missing)."""
        default = 1 if model == self.settings.default_model else 0
        return max(0, self.settings.model_min_replicas.get(model, default))

    def max_replicas(self, model: str) -> int | None:
        """Most replicas scale-out goes to; None: one per eligible node."""
        n = self.settings.model_max_replicas.get(model, self.settings.default_max_replicas)
        return n if n > 0 else None

    def required_labels(self, model: str) -> dict[str, str]:
        """Worker labels a node needs to be given this model."""
        return dict(self.settings.model_labels.get(model, {}))

    # -- placement ------------------------------------------------------------------------
    def _recent_failure(self, key: Key, now: float) -> Failure | None:
        failure = self._failed.get(key)
        if failure is not None and now - failure.at < self.settings.load_retry_after_s:
            return failure
        return None

    def _loadable_on(self, model: str) -> list[WorkerInfo]:
        """Healthy workers that could be given ``model``: they list it, don't have it
        ready, loading or unloading, answered their last poll, accept explicit loads and
        carry its labels.

        A node whose last poll failed may be frozen (a load sent to one hung 49.5 s); a
        model still unloading there would get a second engine beside the old one, which
        holds its memory until it has finished."""
        labels = self.required_labels(model)
        return [
            w
            for w in self.store.all()
            if w.state is WorkerState.HEALTHY
            and w.consecutive_failures == 0
            and model in w.models
            and not w.can_serve(model)
            and not self._unloading_on(model, w)
            and (model, w.id) not in self._loads
            and self._explicit.get(w.id) is not False
            and labels_match(w.labels, labels)
        ]

    def _unloading_on(self, model: str, w: WorkerInfo) -> bool:
        """Whether ``model`` or one of its steps is being unloaded on ``w``."""
        if (model, w.id) in self._unloading:
            return True
        names = (model, *(model + suffix for suffix in STEP_SUFFIXES))
        return any(w.models[n].state == "UNLOADING" for n in names if n in w.models)

    def best_node(self, model: str) -> WorkerInfo | None:
        """The worker a new replica of ``model`` goes to (see the module docstring)."""
        now = time.monotonic()
        loading_on: dict[int, int] = {}
        for _, wid in self._loads:
            loading_on[wid] = loading_on.get(wid, 0) + 1

        def rank(w: WorkerInfo) -> tuple[bool, int, int, int]:
            failed = self._recent_failure((model, w.id), now) is not None
            models = len(w.ready_models()) + loading_on.get(w.id, 0)
            return failed, models, w.inflight + w.queue_length, w.id

        candidates = self._loadable_on(model)
        return min(candidates, key=rank) if candidates else None

    def _backing_off(self, model: str) -> bool:
        """Whether the model failed lately on every worker it could be loaded on."""
        now = time.monotonic()
        candidates = self._loadable_on(model)
        return bool(candidates) and all(self._recent_failure((model, w.id), now) for w in candidates)

    def _why_no_node(self, model: str) -> str:
        listing = [w for w in self.store.all() if w.state is WorkerState.HEALTHY and model in w.models]
        labels = self.required_labels(model)
        why = []
        if labels and not any(labels_match(w.labels, labels) for w in listing):
            why.append(f"it needs workers labelled {labels}")
        if listing and all(self._explicit.get(w.id) is False for w in listing):
            why.append("its workers do not run in explicit model-control mode")
        return f"no healthy worker can load model {model!r}" + (f" ({'; '.join(why)})" if why else "")

    def _unloading_somewhere(self, model: str) -> bool:
        return any(
            w.state is WorkerState.HEALTHY and model in w.models and self._unloading_on(model, w)
            for w in self.store.all()
        )
