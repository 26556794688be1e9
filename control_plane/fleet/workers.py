"""A worker as the control plane sees it: its state and the live view routing reads.

:class:`WorkerInfo` objects are read by every layer and written by one:
:class:`~control_plane.fleet.store.WorkerStore` (which also writes them through to the
database). The one exception is :meth:`WorkerInfo.forget_prefixes`, which the prefix
affinity index calls when a node shows it lost its prefix cache.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

from control_plane.nodes.client import ModelStatus
from control_plane.storage.schema import utcnow
from llava_wire.protocol import STEP_SUFFIXES, is_served_model

__all__ = ["STEP_SUFFIXES", "ModelStatus", "WorkerInfo", "WorkerState", "is_served_model"]

# Cache epochs are unique in the process, so that a worker removed and registered again
# (a new WorkerInfo with the same id) never matches what was learned of its earlier self.
_epochs = itertools.count(1)


class WorkerState(StrEnum):
    """A worker's health, as the poller sees it."""

    UNKNOWN = "unknown"  # registered, or restored at start: no poll answered yet
    HEALTHY = "healthy"  # polls succeed: eligible for routing
    UNHEALTHY = "unhealthy"  # recent polls failed: out of routing, still polled
    OFFLINE = "offline"  # failing for longer than the expiry: not listed, still polled (removed after offline_worker_ttl_s)
    REMOVED = "removed"  # removed (an admin, the offline retention, /refresh_all_workers): not polled


@dataclass
class WorkerInfo:
    """The live view of one worker."""

    id: int
    name: str
    http_url: str
    grpc_url: str
    metrics_url: str
    labels: dict[str, Any] = field(default_factory=dict)
    speed: int = 1
    source: str = "admin"
    state: WorkerState = WorkerState.UNKNOWN
    models: dict[str, ModelStatus] = field(default_factory=dict)
    queue_length: int = 0  # waiting on the node (node metrics or pushed heartbeat)
    active: int = 0  # generating on the node (node metrics)
    inflight: int = 0  # this control plane's open streams to it
    model_inflight: dict[str, int] = field(default_factory=dict)  # the same, per model
    model_last_used: dict[str, float] = field(default_factory=dict)  # model -> monotonic time
    # model -> monotonic time this control plane set its status (a load or unload it made):
    # a poll that started before then does not undo it
    models_marked_at: dict[str, float] = field(default_factory=dict)
    consecutive_failures: int = 0  # failed polls in a row
    failing_since: float | None = None  # monotonic time of the first failed poll in a row
    last_error: str = ""
    last_poll_latency_ms: float | None = None
    registered_at: datetime = field(default_factory=utcnow)
    last_seen_at: datetime | None = None
    # Changes whenever the node leaves routing (state or a model no longer ready): what the
    # prefix affinity index learned of it before is stale (serving/affinity.py).
    cache_epoch: int = field(default_factory=lambda: next(_epochs))

    def forget_prefixes(self) -> None:
        """Whatever was learned of this node's prefix cache is stale from now on."""
        self.cache_epoch = next(_epochs)

    def set_state(self, state: WorkerState) -> None:
        """Take ``state``; leaving ``healthy`` (routing) forgets the node's prefixes."""
        if self.state is WorkerState.HEALTHY and state is not WorkerState.HEALTHY:
            self.forget_prefixes()
        self.state = state

    def set_models(self, models: dict[str, ModelStatus]) -> None:
        """Take ``models``; a model ready before and not now forgets the node's prefixes."""
        if any(m.ready and not (n in models and models[n].ready) for n, m in self.models.items()):
            self.forget_prefixes()
        self.models = models

    def ready_models(self) -> list[str]:
        """Models this node has ready."""
        return sorted(name for name, m in self.models.items() if m.ready and is_served_model(name))

    def can_serve(self, model: str) -> bool:
        """Healthy and with ``model`` ready."""
        status = self.models.get(model)
        return self.state is WorkerState.HEALTHY and status is not None and status.ready

    def to_dict(self) -> dict[str, Any]:
        """JSON form for the admin API."""
        return {
            "id": self.id,
            "name": self.name,
            "http_url": self.http_url,
            "grpc_url": self.grpc_url,
            "metrics_url": self.metrics_url,
            "labels": self.labels,
            "speed": self.speed,
            "source": self.source,
            "state": self.state.value,
            "models": {
                name: {"ready": m.ready, "state": m.state, "reason": m.reason}
                for name, m in self.models.items()
            },
            "queue_length": self.queue_length,
            "active": self.active,
            "inflight": self.inflight,
            "model_inflight": {m: n for m, n in self.model_inflight.items() if n},
            "consecutive_failures": self.consecutive_failures,
            "last_error": self.last_error,
            "last_poll_latency_ms": self.last_poll_latency_ms,
            "registered_at": self.registered_at.isoformat() + "Z",
            "last_seen_at": self.last_seen_at.isoformat() + "Z" if self.last_seen_at else None,
        }
