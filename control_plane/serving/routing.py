"""Dispatch policies: which healthy node, with the model ready, takes a request.

All read the live in-memory view only; none touches the database.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from control_plane.config import DispatchPolicy
from control_plane.fleet.workers import WorkerInfo

__all__ = ["Router"]


def _load(w: WorkerInfo) -> float:
    # This control plane's own open streams to the node, per unit of speed.
    return w.inflight / max(1, w.speed)


class Router:
    """Chooses a worker by the configured policy."""

    def __init__(self, policy: DispatchPolicy, rng: random.Random | None = None) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self._rr = itertools.count()

    def choose(
        self, candidates: Sequence[WorkerInfo], exclude: set[int] | frozenset[int] = frozenset()
    ) -> WorkerInfo | None:
        """One of ``candidates`` (minus ``exclude``), or None if there is none."""
        pool = [w for w in candidates if w.id not in exclude]
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        policy = self.policy
        if policy is DispatchPolicy.LOTTERY:
            return self.rng.choices(pool, weights=[max(1, w.speed) for w in pool])[0]
        if policy is DispatchPolicy.ROUND_ROBIN:
            ordered = sorted(pool, key=lambda w: w.id)
            return ordered[next(self._rr) % len(ordered)]
        if policy is DispatchPolicy.POWER_OF_TWO:
            a, b = self.rng.sample(pool, 2)
            return a if _load(a) <= _load(b) else b
        # shortest_queue: least loaded; ties broken at random so equal nodes share work
        best = min(_load(w) for w in pool)
        return self.rng.choice([w for w in pool if _load(w) == best])
