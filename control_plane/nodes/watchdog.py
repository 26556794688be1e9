"""A per-stream timer that cancels a gRPC call whose node answers nothing for a timeout."""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["Watchdog"]


class Watchdog:
    """Cancels a gRPC call whose node answers nothing for a timeout, like wrapping each
    wait in ``asyncio.timeout`` but cheap to re-arm: a stream waits on the node once per
    token, and a timer per wait (what ``asyncio.timeout`` makes) costs more than the rest
    of what the control plane does with a token but parsing it. One timer per stream
    instead: each wait moves a deadline, and the timer, when it fires, re-arms itself for
    the deadline unless the deadline passed during a wait; then it cancels the call (the
    wait raises ``CancelledError``) and sets :attr:`expired`.

    ``arm(timeout)`` before each wait, ``disarm()`` after it, ``close()`` at the end.
    """

    __slots__ = ("_call", "_handle", "_loop", "_when", "deadline", "expired", "waiting")

    def __init__(self, call: Any) -> None:
        self._loop = asyncio.get_running_loop()
        self._call = call
        self._handle: asyncio.TimerHandle | None = None
        self._when = 0.0  # when the timer fires
        self.deadline = 0.0
        self.waiting = False
        self.expired = False

    def arm(self, timeout_s: float) -> None:
        """A wait starts; it may last ``timeout_s``."""
        self.deadline = self._loop.time() + timeout_s
        self.waiting = True
        if self._handle is None or self.deadline < self._when:  # none, or too late (a shorter timeout)
            self._schedule()

    def disarm(self) -> None:
        """The wait is over (the timer stays, to be re-armed cheaply)."""
        self.waiting = False

    def close(self) -> None:
        """Stop the timer."""
        self.waiting = False
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if not self.waiting:
            return  # between waits: the next arm() starts the timer again
        if self._loop.time() >= self.deadline:
            self.expired = True
            self._call.cancel()
        else:
            self._schedule()

    def _schedule(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._when = self.deadline
        self._handle = self._loop.call_at(self.deadline, self._fire)
