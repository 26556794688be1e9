"""A loop that runs in the background of the app's event loop, started and stopped by the lifespan."""

from __future__ import annotations

import abc
import asyncio
import contextlib

__all__ = ["BackgroundLoop"]


class BackgroundLoop(abc.ABC):
    """Subclasses implement :meth:`_run` (usually ``while True: ...; await asyncio.sleep(...)``)
    and name the task; :meth:`start` and :meth:`stop` are theirs as they are."""

    task_name = "background"
    _task: asyncio.Task[None] | None = None

    @abc.abstractmethod
    async def _run(self) -> None:
        """The loop."""

    def start(self) -> None:
        """Start the loop as a task of the running event loop."""
        self._task = asyncio.create_task(self._run(), name=self.task_name)

    async def stop(self) -> None:
        """Cancel the loop and wait until it has ended."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
