"""The lifecycle's pure parts: label matching, a placement's state in words, failures."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from control_plane.fleet.workers import ModelStatus

__all__ = ["Failure", "Key", "labels_match", "load_failed", "placement_state"]

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
