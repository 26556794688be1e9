"""Fleet membership: registering and removing nodes, refreshing their health."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp

from control_plane.errors import BadRequest
from control_plane.health import HealthPoller, discover_endpoints
from control_plane.proxy import TritonPool
from control_plane.store import WorkerInfo, WorkerStore, normalize_worker_url

__all__ = ["Fleet"]

log = logging.getLogger(__name__)


def _normalize_grpc(grpc_url: str) -> str:
    text = grpc_url.strip()
    for prefix in ("grpc://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"gRPC address {grpc_url!r} must be host:port")
    if "@" in host or "/" in host:
        raise BadRequest(f"gRPC address {grpc_url!r} must be host:port")
    return text


class Fleet:
    """Adds and removes workers; every addition is polled at once."""

    def __init__(
        self, store: WorkerStore, poller: HealthPoller, pool: TritonPool, session: aiohttp.ClientSession
    ) -> None:
        self.store = store
        self.poller = poller
        self.pool = pool
        self.session = session

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
    ) -> tuple[WorkerInfo, bool]:
        """Register a node by its HTTP base URL; discover gRPC and metrics if not given."""
        name = normalize_worker_url(url)
        if speed < 1:
            raise BadRequest("speed must be at least 1")
        if grpc_url is None or metrics_url is None:
            found_grpc, found_metrics = await discover_endpoints(self.session, name)
            grpc_url = grpc_url or found_grpc
            metrics_url = metrics_url if metrics_url is not None else found_metrics
        grpc_url = _normalize_grpc(grpc_url)
        if metrics_url:
            metrics_url = normalize_metrics_url(metrics_url)
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

    async def remove(self, worker_id: int, reason: str = "removed by admin") -> WorkerInfo | None:
        """Remove a worker; its history stays in the database."""
        info = await asyncio.to_thread(self.store.remove, worker_id, reason)
        if info is not None:
            await self.forget(info)
        return info

    async def forget(self, info: WorkerInfo) -> None:
        """Let go of what this replica keeps for a removed worker (its lease, its channel)."""
        leases = self.poller.leases
        if leases is not None:
            try:
                await asyncio.to_thread(leases.release, [info.id])
            except Exception as exc:  # it lapses on its own
                log.warning("could not release the poll lease of worker %s: %s", info.id, exc)
        await self.pool.drop(info.grpc_url)

    async def refresh(self) -> None:
        """Poll every worker now (LLaVA's /refresh_all_workers)."""
        await self.poller.poll_all()


def normalize_metrics_url(url: str) -> str:
    """Check a metrics URL (``http://host:port/metrics``)."""
    from urllib.parse import urlsplit

    parts = urlsplit(url.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.username or parts.password:
        raise BadRequest(f"metrics URL {url!r} must be http(s)://host:port/metrics without credentials")
    return url.strip()
