"""Node discovery from DNS: every A record of a name is a Triton node.

Meant for a Kubernetes headless Service (``clusterIP: None``), whose name resolves to
the addresses of its pods: ``LLAVA_CP_DISCOVERY_DNS=triton-nodes.llava.svc.cluster.local:8000``.
Every interval the name is resolved (through the event loop's ``getaddrinfo``, in a
thread, never blocking the loop); addresses that appear are registered as workers
(source ``dns``) and ``dns`` workers whose address is gone are removed. A failed
lookup changes nothing: a DNS outage must not empty the fleet (the health poller
takes dead nodes out of routing anyway). Workers registered any other way are never
touched. Discovery works beside static registration and the admin API.

With several control-plane replicas each one resolves the name; registration and
removal are idempotent in the database, so they agree without coordination.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from control_plane.background import BackgroundLoop
from control_plane.fleet.registry import Fleet
from control_plane.fleet.workers import WorkerState

__all__ = ["DnsDiscovery", "parse_target"]

log = logging.getLogger(__name__)

SOURCE = "dns"

Resolver = Callable[[str, int], Awaitable[list[str]]]


def parse_target(target: str) -> tuple[str, int]:
    """``host:port`` (port required) as a pair; raises ValueError when malformed."""
    host, sep, port = target.strip().rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"discovery target {target!r} must be host:port")
    return host.strip("[]"), int(port)


async def resolve_ipv4(host: str, port: int) -> list[str]:
    """Every IPv4 address (A record) of ``host``, sorted, via the loop's resolver."""
    infos = await asyncio.get_running_loop().getaddrinfo(
        host, port, family=socket.AF_INET, type=socket.SOCK_STREAM
    )
    return sorted({str(info[4][0]) for info in infos})


class DnsDiscovery(BackgroundLoop):
    """Keeps the ``dns`` workers equal to the addresses a name resolves to."""

    task_name = "dns-discovery"

    def __init__(
        self,
        fleet: Fleet,
        target: str,
        interval_s: float = 10.0,
        resolver: Resolver = resolve_ipv4,
        scheme: str = "http",
    ) -> None:
        self.fleet = fleet
        self.host, self.port = parse_target(target)
        self.interval_s = interval_s
        self.resolver = resolver
        self.scheme = scheme
        self.rounds = 0
        self.last_addresses: list[str] = []
        self.last_error = ""

    def url(self, address: str) -> str:
        """A worker URL for one resolved address."""
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"

    async def _run(self) -> None:
        while True:
            try:
                await self.discover()
            except Exception:  # one bad round must not stop discovery
                log.exception("DNS discovery round failed")
            await asyncio.sleep(self.interval_s)

    async def discover(self) -> tuple[list[str], list[str]]:
        """One round: resolve, register new addresses, remove vanished ones.

        Returns the URLs added and removed; a failed lookup adds and removes nothing.
        """
        self.rounds += 1
        try:
            addresses = await self.resolver(self.host, self.port)
        except (OSError, UnicodeError) as exc:  # socket.gaierror is an OSError
            self.last_error = f"{self.host}: {exc}"
            log.warning("DNS discovery: cannot resolve %s (%s); the fleet is left as it is", self.host, exc)
            return [], []
        self.last_error = ""
        self.last_addresses = addresses
        wanted = {self.url(a) for a in addresses}
        current = {w.name: w for w in self.fleet.store.all() if w.source == SOURCE}
        added, removed = [], []
        for url in sorted(wanted):
            known = self.fleet.store.by_name(url)
            if known is not None and known.state is not WorkerState.REMOVED:
                continue
            try:
                await self.fleet.register(url, source=SOURCE)
                added.append(url)
            except Exception as exc:
                log.warning("DNS discovery: could not register %s: %s", url, exc)
        for name, info in current.items():
            if name in wanted:
                continue
            if await self.fleet.remove(info.id, reason=f"no longer in DNS ({self.host})") is not None:
                removed.append(name)
        if added or removed:
            log.info("DNS discovery %s: added %s, removed %s", self.host, added, removed)
        return added, removed

    def describe(self) -> dict[str, Any]:
        """Discovery statistics, for the admin API."""
        return {
            "target": f"{self.host}:{self.port}",
            "rounds": self.rounds,
            "addresses": self.last_addresses,
            "error": self.last_error,
        }
