"""The lifecycle's records: ``model_events`` rows (through the batch writer), its metrics,
and the pins read back at start."""

from __future__ import annotations

from sqlalchemy import select

from control_plane.metrics import ControlPlaneMetrics
from control_plane.storage.db import Database
from control_plane.storage.schema import ModelEvent, utcnow
from control_plane.storage.writer import BatchWriter

__all__ = ["ModelEventLog", "stored_pins"]


class ModelEventLog:
    """Writes every lifecycle step as a ``model_events`` row and counts loads and unloads."""

    def __init__(self, writer: BatchWriter, metrics: ControlPlaneMetrics | None = None) -> None:
        self.writer = writer
        self.metrics = metrics

    def record(
        self,
        model: str,
        worker_id: int | None,
        event: str,
        reason: str = "",
        duration_ms: float | None = None,
    ) -> None:
        """One step: load_requested, loaded, load_failed, unloaded, unload_failed, pinned, unpinned."""
        self.writer.insert(
            ModelEvent,
            {
                "model": model[:256],
                "worker_id": worker_id,
                "at": utcnow(),
                "event": event,
                "duration_ms": duration_ms,
                "reason": reason[:2000],
            },
        )

    def count_load(self, model: str, outcome: str, seconds: float) -> None:
        """A load that ended (``loaded`` or ``failed``) after ``seconds``."""
        if self.metrics is not None:
            self.metrics.model_loads.labels(model, outcome).inc()
            if outcome == "loaded":
                self.metrics.model_load_seconds.observe(seconds)

    def count_unload(self, model: str) -> None:
        """A replica unloaded."""
        if self.metrics is not None:
            self.metrics.model_unloads.labels(model).inc()


def stored_pins(db: Database) -> set[str]:
    """The models pinned, as the ``pinned``/``unpinned`` rows say (blocking: call from a thread)."""
    with db.session() as s:
        rows = s.execute(
            select(ModelEvent.model, ModelEvent.event)
            .where(ModelEvent.event.in_(("pinned", "unpinned")))
            .order_by(ModelEvent.id)
        ).all()
    pinned: set[str] = set()
    for model, event in rows:
        if event == "pinned":
            pinned.add(model)
        else:
            pinned.discard(model)
    return pinned
