"""The admin API's views of the model lifecycle: each model's state on every node."""

from __future__ import annotations

import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

from control_plane.fleet.workers import STEP_SUFFIXES
from control_plane.lifecycle.manager import ModelManager
from control_plane.lifecycle.placement import load_failed, placement_state
from control_plane.nodes.parsing import clean_node_error

__all__ = ["ModelViews"]


class ModelViews:
    """Read-only views of a :class:`ModelManager` (placements, states, settings)."""

    def __init__(self, manager: ModelManager) -> None:
        self.manager = manager

    def model_state(self, model: str) -> str:
        """``loaded`` (ready somewhere), ``loading``, ``failed`` (last load failed) or ``unloaded``."""
        m = self.manager
        states = [p["state"] for p in self.placements(model)]
        if "loaded" in states:
            return "loaded"
        if "loading" in states or model in m._cold:
            return "loading"
        if "failed" in states:
            return "failed"
        return "unloaded"

    def placements(self, model: str) -> list[dict[str, Any]]:
        m = self.manager
        now, wall = time.monotonic(), datetime.now(UTC)
        out = []
        for w in sorted(m.store.all(), key=lambda w: w.id):
            status = w.models.get(model)
            if status is None:
                continue
            key = (model, w.id)
            steps = [w.models[model + x] for x in STEP_SUFFIXES if model + x in w.models]
            failure = m._failed.get(key)
            state = placement_state(
                status,
                steps,
                loading=key in m._loads,
                unloading=key in m._unloading,
                failed=failure is not None,
            )
            last_used = w.model_last_used.get(model)
            since = max(m._ready_since.get(key, now), last_used or 0.0)
            reason = next((st.reason for st in (status, *steps) if load_failed(st)), "")
            if state == "failed" and failure is not None:
                reason = failure.message
            out.append(
                {
                    "worker_id": w.id,
                    "worker": w.name,
                    "worker_state": w.state.value,
                    "state": state,
                    "triton_state": status.state,
                    "reason": clean_node_error(reason) if state == "failed" and reason else "",
                    "inflight": w.model_inflight.get(model, 0),
                    "last_used_at": _iso(wall - timedelta(seconds=now - last_used)) if last_used else None,
                    "idle_s": round(now - since, 1) if state == "loaded" else None,
                    "explicit": m._explicit.get(w.id),
                }
            )
        return out

    def describe_model(self, model: str) -> dict[str, Any]:
        """One model: its settings and its state on every node (the admin API's view)."""
        m = self.manager
        placements = self.placements(model)
        used = [p["last_used_at"] for p in placements if p["last_used_at"]]
        failures = [f for (m, _), f in m._failed.items() if m == model]
        last = max(failures, key=lambda f: f.at, default=None)
        return {
            "model": model,
            "servable": model in m.store.servable_models(),
            "state": self.model_state(model),
            "pinned": model in m.pinned,
            "default": model == m.settings.default_model,
            "min_replicas": m.min_replicas(model),
            "max_replicas": m.max_replicas(model),
            "required_labels": m.required_labels(model),
            "replicas": sum(p["state"] == "loaded" for p in placements),
            "loading": sum(p["state"] == "loading" for p in placements),
            "inflight": sum(p["inflight"] for p in placements),
            "last_used_at": max(used) if used else None,
            "last_load_error": (
                {
                    "worker_id": last.worker_id,
                    "message": last.message,
                    "age_s": round(time.monotonic() - last.at, 1),
                }
                if last
                else None
            ),
            "placements": placements,
        }

    def describe(self) -> list[dict[str, Any]]:
        """Every model any node lists (and every pinned one)."""
        m = self.manager
        names: Iterable[str] = sorted(set(m.store.known_models()) | m.pinned)
        return [self.describe_model(m) for m in names]


def _iso(t: datetime) -> str:
    return t.replace(tzinfo=None).isoformat() + "Z"
