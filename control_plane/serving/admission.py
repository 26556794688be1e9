"""Backpressure: what keeps the fleet serving under overload.

Each worker takes at most ``max_inflight_per_worker`` streams from this control plane.
A request that finds every worker for its model full waits in one bounded FIFO queue,
up to a timeout; a full queue or a timeout is an immediate "overloaded" answer (HTTP 429
with ``Retry-After``, or LLaVA error code 4). Memory stays bounded under any load. (The
circuit breaker, which takes failing workers out of routing, is in
:mod:`control_plane.fleet.breaker`.)
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Callable
from typing import TypeVar

from control_plane.errors import Overloaded
from control_plane.fleet.workers import WorkerInfo

__all__ = ["Admission"]

log = logging.getLogger(__name__)

T = TypeVar("T")


class Admission:
    """Per-worker in-flight limit plus a bounded wait queue with a timeout."""

    def __init__(self, max_inflight_per_worker: int, max_waiting: int, wait_timeout_s: float) -> None:
        self.max_inflight = max_inflight_per_worker
        self.max_waiting = max_waiting
        self.wait_timeout_s = wait_timeout_s
        self._waiters: collections.deque[asyncio.Event] = collections.deque()
        self.rejected = 0

    @property
    def waiting(self) -> int:
        """Requests waiting for capacity now."""
        return len(self._waiters)

    def has_room(self, worker: WorkerInfo) -> bool:
        """Whether ``worker`` can take one more stream."""
        return worker.inflight < self.max_inflight

    async def wait_for_room(self, pick: Callable[[], T | None], model: str) -> T:
        """What ``pick`` returns (a worker, or a decision naming one; None while all are
        full), waiting in line.

        The caller must count the stream on the worker before its next await.
        """
        worker = pick() if not self._waiters else None  # first come, first served
        if worker is not None:
            return worker
        if len(self._waiters) >= self.max_waiting:
            self.rejected += 1
            raise Overloaded(
                f"every worker for model {model!r} is at capacity and {len(self._waiters)} requests "
                "are already waiting; retry later",
                retry_after_s=2.0,
            )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_timeout_s
        entry = asyncio.Event()
        self._waiters.append(entry)
        try:
            while True:
                if self._waiters[0] is entry:
                    worker = pick()
                    if worker is not None:
                        return worker
                remaining = deadline - loop.time()
                if remaining <= 0:
                    self.rejected += 1
                    raise Overloaded(
                        f"no capacity for model {model!r} within {self.wait_timeout_s:g} s; retry later",
                        retry_after_s=max(1.0, self.wait_timeout_s / 4),
                    )
                entry.clear()
                # Woken when a stream ends; also looks again periodically (workers come back).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(entry.wait(), min(remaining, 0.25))
        finally:
            self._waiters.remove(entry)
            self._wake()

    def release(self) -> None:
        """A stream ended: let the first waiter look again."""
        self._wake()

    def _wake(self) -> None:
        if self._waiters:
            self._waiters[0].set()
