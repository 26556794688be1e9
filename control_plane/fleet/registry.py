"""Fleet membership: registering and removing nodes, refreshing their health.

Every address a registration names (the node's URL, its gRPC address, its metrics URL)
is checked against the allow-list of worker hosts before anything is sent to it; only
registrations that may change a worker (admins, static flags, DNS discovery) change the
addresses of one that is registered already.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from control_plane.errors import BadRequest, Conflict
from control_plane.fleet.addresses import (
    AddressPolicy,
    host_of,
    normalize_grpc_url,
    normalize_metrics_url,
    normalize_worker_url,
)
from control_plane.fleet.health import HealthPoller
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import WorkerInfo
from control_plane.nodes.client import NodeClient

__all__ = ["MAX_SPEED", "Fleet"]

log = logging.getLogger(__name__)

MAX_SPEED = 1_000_000  # a worker's relative speed (routing weight), as the admin API bounds it


class Fleet:
    """Adds and removes workers; every addition is polled at once."""

    def __init__(
        self, store: WorkerStore, poller: HealthPoller, nodes: NodeClient, policy: AddressPolicy
    ) -> None:
        self.store = store
        self.poller = poller
        self.nodes = nodes
        self.policy = policy
        self._refresh: asyncio.Task[list[WorkerInfo]] | None = None

    async def register(
        self,
        url: str,
        *,
        grpc_url: str | None = None,
        metrics_url: str | None = None,
        labels: dict[str, Any] | None = None,
        speed: int = 1,
        source: str = "admin",
        poll: bool = True,
        may_change: bool = True,
    ) -> tuple[WorkerInfo, bool]:
        """Register a node by its HTTP base URL; discover gRPC and metrics if not given.

        ``may_change``: whether this registration may change a registered worker's
        addresses, speed or labels (admins may; a worker's own registration may not:
        it gets a 409 when it names other values than those registered).
        """
        name = normalize_worker_url(url)
        if not 1 <= speed <= MAX_SPEED:
            raise BadRequest(f"speed is {speed}; it must be from 1 to {MAX_SPEED}", param="speed")
        grpc_url = normalize_grpc_url(grpc_url) if grpc_url is not None else None
        metrics_url = normalize_metrics_url(metrics_url) if metrics_url else metrics_url
        existing = self.store.by_name(name)
        if existing is not None and not may_change:
            self._check_unchanged(existing, grpc_url, metrics_url, labels, speed)
            return existing, False
        await self.policy.check(host_of(name), "worker URL")
        if grpc_url is None or metrics_url is None:
            found_grpc, found_metrics = await self.nodes.discover(name)
            grpc_url = grpc_url or found_grpc
            metrics_url = metrics_url if metrics_url is not None else found_metrics
        await self.policy.check(host_of(grpc_url), "gRPC address")
        if metrics_url:
            await self.policy.check(host_of(metrics_url), "metrics URL")
        info, created = await asyncio.to_thread(
            self.store.register,
            name,
            grpc_url=grpc_url,
            metrics_url=metrics_url,
            labels=labels,
            speed=speed,
            source=source,
        )
        if poll:
            await self.poller.poll_worker(info)
        return info, created

    @staticmethod
    def _check_unchanged(
        info: WorkerInfo,
        grpc_url: str | None,
        metrics_url: str | None,
        labels: dict[str, Any] | None,
        speed: int,
    ) -> None:
        changed = [
            field
            for field, given, current in (
                ("grpc_url", grpc_url, info.grpc_url),
                ("metrics_url", metrics_url, info.metrics_url),
                ("labels", labels, info.labels),
                ("speed", speed, info.speed),
            )
            if given is not None and given != current
        ]
        if changed:
            raise Conflict(
                f"worker {info.name} is registered already with other {', '.join(changed)}; only an admin "
                "can change a registered worker (POST /admin/workers with the admin token)"
            )

    async def remove(self, worker_id: int, reason: str = "removed by admin") -> WorkerInfo | None:
        """Remove a worker; its history stays in the database."""
        info = await asyncio.to_thread(self.store.remove, worker_id, reason)
        if info is not None:
            await self.poller.forget(info)
        return info

    async def refresh(self) -> list[WorkerInfo]:
        """Probe every worker now (LLaVA's /refresh_all_workers, see
        :meth:`HealthPoller.refresh`); returns those removed. Callers that come while a
        refresh runs share it, so clients cannot multiply the polls sent to the nodes."""
        task = self._refresh
        if task is None or task.done():
            task = self._refresh = asyncio.create_task(self.poller.refresh(), name="refresh-all-workers")
        return await asyncio.shield(task)
