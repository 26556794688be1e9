"""The circuit breaker: failing workers leave routing at once, without waiting for polls.

A worker whose requests fail ``threshold`` times in a row (failures on the node's side:
a client's own mistakes are never counted) is taken out of routing (circuit open)
through the store; after ``cooldown_s`` a successful poll brings it back half-open: one
more failure opens the circuit again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import WorkerInfo, WorkerState

__all__ = ["CircuitBreaker"]


@dataclass
class _Circuit:
    failures: int = 0  # failed requests in a row
    open_until: float = 0.0  # monotonic time before which polls may not restore the worker


class CircuitBreaker:
    """Takes a worker out of routing after consecutive request failures."""

    def __init__(self, store: WorkerStore, threshold: int, cooldown_s: float) -> None:
        self.store = store
        self.threshold = max(1, threshold)
        self.cooldown_s = cooldown_s
        self.opened = 0
        self._circuits: dict[int, _Circuit] = {}

    def failures(self, worker: WorkerInfo) -> int:
        """Failed requests in a row on ``worker``."""
        circuit = self._circuits.get(worker.id)
        return circuit.failures if circuit else 0

    def success(self, worker: WorkerInfo) -> None:
        """A request to ``worker`` streamed."""
        circuit = self._circuits.get(worker.id)
        if circuit is not None:
            circuit.failures = 0

    def failure(self, worker: WorkerInfo, reason: str) -> None:
        """A request to ``worker`` failed on the node's side."""
        circuit = self._circuits.setdefault(worker.id, _Circuit())
        circuit.failures += 1
        if circuit.failures >= self.threshold and worker.state is WorkerState.HEALTHY:
            self.opened += 1
            circuit.open_until = time.monotonic() + self.cooldown_s
            self.store.set_state(
                worker,
                WorkerState.UNHEALTHY,
                f"circuit open: {circuit.failures} requests in a row failed ({reason})",
            )

    def may_close(self, worker: WorkerInfo) -> bool:
        """Whether a successful poll may bring ``worker`` back (the cooldown has passed).

        It comes back half-open: one more failure opens the circuit again.
        """
        circuit = self._circuits.get(worker.id)
        if circuit is None:
            return True
        if time.monotonic() < circuit.open_until:
            return False
        if circuit.failures >= self.threshold:
            circuit.failures = self.threshold - 1
        return True

    def forget(self, worker: WorkerInfo) -> None:
        """Drop the circuit of a removed worker."""
        self._circuits.pop(worker.id, None)
