"""Cancel calls to nodes, in the background: a request's node may be stopped or
restarting when its client goes away or its stream is moved elsewhere, so it is asked again
for a while. Requests reach their nodes under ids of their own
(:func:`~control_plane.serving.records.node_request_id`), so a late cancel stops only the
request it was for."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from control_plane.fleet.workers import WorkerInfo
from control_plane.nodes.client import NodeClient

__all__ = ["NodeCancels"]

log = logging.getLogger(__name__)


class NodeCancels:
    """The cancel calls in flight, retried every second for ``retry_s`` at most."""

    def __init__(self, nodes: NodeClient, retry_s: float) -> None:
        self.nodes = nodes
        self.retry_s = retry_s
        self._tasks: set[asyncio.Task[Any]] = set()

    def send(self, worker: WorkerInfo, model: str, node_request_id: str) -> None:
        """Tell ``worker`` to stop generating ``node_request_id`` of ``model``."""

        async def cancel() -> None:
            deadline = time.monotonic() + self.retry_s
            while True:
                try:
                    n = await self.nodes.cancel(worker.grpc_url, model, node_request_id)
                    log.info("cancelled %s on %s (%d running)", node_request_id, worker.name, n)
                    return
                except Exception as exc:
                    if time.monotonic() >= deadline:
                        log.warning("could not cancel %s on %s: %s", node_request_id, worker.name, exc)
                        return
                await asyncio.sleep(1.0)

        task = asyncio.get_running_loop().create_task(cancel())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def drain(self, timeout_s: float = 5.0) -> None:
        """Wait for the cancels in flight (at shutdown), ``timeout_s`` at most."""
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=timeout_s)
            for task in pending:
                task.cancel()
