"""A worker's live view from its ``workers`` row, and its models back into the row's JSON."""

from __future__ import annotations

from typing import Any

from control_plane.fleet.workers import ModelStatus, WorkerInfo, WorkerState
from control_plane.storage.schema import Worker

__all__ = ["apply_row", "info_from_row", "models_from_row", "models_json"]


def models_from_row(models: dict[str, Any] | None) -> dict[str, ModelStatus]:
    """The models of a ``workers.models`` column (older rows: a flag per model)."""
    out = {}
    for name, m in (models or {}).items():
        if isinstance(m, dict):
            served = m.get("served_name")
            out[name] = ModelStatus(
                ready=bool(m.get("ready")),
                state=str(m.get("state", "")),
                served_name=served if isinstance(served, str) else "",
            )
        else:  # older rows kept only the flag
            out[name] = ModelStatus(ready=bool(m))
    return out


def info_from_row(row: Worker, state: WorkerState | None = None) -> WorkerInfo:
    """A worker's live view from its row; ``state`` instead of the row's, if given."""
    info = WorkerInfo(
        id=row.id,
        name=row.name,
        http_url=row.http_url,
        grpc_url=row.grpc_url,
        metrics_url=row.metrics_url,
        labels=dict(row.labels or {}),
        speed=row.speed,
        source=row.source,
        registered_at=row.registered_at,
        last_seen_at=row.last_seen_at,
    )
    if state is None:
        apply_row(info, row)
    else:
        info.state = state
    return info


def apply_row(info: WorkerInfo, row: Worker) -> None:
    """Take a worker's live state from its row (written by the replica that polls it)."""
    try:
        info.set_state(WorkerState(row.state))
    except ValueError:
        info.set_state(WorkerState.UNKNOWN)
    info.set_models(models_from_row(row.models))
    info.queue_length = row.queue_length or 0
    info.last_seen_at = row.last_seen_at
    info.grpc_url, info.metrics_url = row.grpc_url, row.metrics_url
    info.labels = dict(row.labels or {})
    info.speed = row.speed
    info.source = row.source


def models_json(models: dict[str, ModelStatus]) -> dict[str, Any]:
    """The ``workers.models`` column: each model's readiness, state and served name."""
    return {n: {"ready": m.ready, "state": m.state, "served_name": m.served_name} for n, m in models.items()}
