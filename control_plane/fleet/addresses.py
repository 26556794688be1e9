"""Node addresses: their canonical form, and which hosts the control plane may send requests to.

Every address the control plane polls, streams to or loads models on came from an admin,
a credentialed worker, the static ``--worker`` flags or DNS discovery, and passes the
allow-list ``worker_allowed_hosts`` (``LLAVA_CP_WORKER_ALLOWED_HOSTS``). An entry is:

* ``loopback`` (127.0.0.0/8, ::1) or ``private`` (10/8, 172.16/12, 192.168/16, fc00::/7:
  the networks a company's or a cluster's nodes live on; link-local 169.254/16, where
  cloud metadata services answer, is in neither);
* a network or an address (``10.20.0.0/16``, ``10.0.0.5``, ``fd00::/8``);
* a host name (``triton-0.example``), or every name under a domain (``*.svc.cluster.local``);
* ``*``: any host (only for networks where every peer is trusted).

A host name that no name entry allows is resolved once, at registration, and allowed
when every address it resolves to is in an allowed network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from control_plane.errors import BadRequest, Forbidden

__all__ = [
    "AddressPolicy",
    "check_host",
    "host_of",
    "normalize_grpc_url",
    "normalize_metrics_url",
    "normalize_worker_url",
]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

NAMED_NETWORKS: dict[str, tuple[str, ...]] = {
    "loopback": ("127.0.0.0/8", "::1/128"),
    "private": ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"),
}
_LABEL = re.compile(r"^(?!-)[a-z0-9_-]{1,63}(?<!-)$")


def _ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_host(host: str, what: str) -> str:
    """``host`` in lower case if it is an IP address or a valid DNS name (labels of 1 to 63
    letters, digits, ``-`` or ``_``; 253 characters in all); else a 400 naming the rule."""
    host = host.lower()
    if _ip(host) is not None:
        return host
    name = host.removesuffix(".")
    if not name or len(name) > 253:
        raise BadRequest(f"{what}: host {host[:80]!r} is not a valid host name (1 to 253 characters)")
    for label in name.split("."):
        if not _LABEL.match(label):
            raise BadRequest(
                f"{what}: host {host[:80]!r} is not a valid host name (each dot-separated label is 1 to "
                "63 letters, digits, '-' or '_', not starting or ending with '-')"
            )
    return name


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def normalize_worker_url(url: str) -> str:
    """Check a node's base URL and return it in canonical form (``http://host:port``).

    Refuses other schemes, credentials, paths beyond ``/``, queries, fragments and hosts
    that are neither an IP address nor a valid DNS name.
    """
    text = (url or "").strip()
    if not text:
        raise BadRequest("the worker URL is empty")
    if "://" not in text:
        raise BadRequest(f"worker URL {text[:200]!r} has no scheme; expected http://host:port")
    try:
        parts = urlsplit(text)
    except ValueError:
        raise BadRequest(f"worker URL {text[:200]!r} is not a valid URL") from None
    try:
        port = parts.port
    except ValueError:
        raise BadRequest(f"worker URL {text[:200]!r} has an invalid port") from None
    if parts.scheme not in ("http", "https"):
        raise BadRequest(f"worker URL {text[:200]!r}: scheme must be http or https")
    if parts.username or parts.password:
        raise BadRequest("worker URLs must not carry credentials")
    if not parts.hostname:
        raise BadRequest(f"worker URL {text[:200]!r} has no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise BadRequest(f"worker URL {text[:200]!r}: give only scheme, host and port")
    host = check_host(parts.hostname, "worker URL")
    netloc = f"{_bracketed(host)}:{port}" if port else _bracketed(host)
    return urlunsplit((parts.scheme, netloc, "", "", ""))


def normalize_grpc_url(grpc_url: str) -> str:
    """Check a node's gRPC address and return it as ``host:port``."""
    text = grpc_url.strip()
    for prefix in ("grpc://", "http://"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise BadRequest(f"gRPC address {grpc_url[:200]!r} must be host:port")
    if "@" in host or "/" in host:
        raise BadRequest(f"gRPC address {grpc_url[:200]!r} must be host:port")
    bracketed = host.startswith("[") and host.endswith("]")
    if host.startswith("[") != host.endswith("]") or (":" in host and not bracketed):
        raise BadRequest(f"gRPC address {grpc_url[:200]!r} must be host:port ([address]:port for IPv6)")
    checked = check_host(host.strip("[]"), "gRPC address")
    if bracketed and _ip(checked) is None:
        raise BadRequest(f"gRPC address {grpc_url[:200]!r}: only an IPv6 address goes in brackets")
    return f"{_bracketed(checked)}:{int(port)}"


def normalize_metrics_url(url: str) -> str:
    """Check a node's metrics URL: ``http(s)://host:port/metrics``, no credentials or query."""
    text = url.strip()
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise BadRequest(f"metrics URL {text[:200]!r} has an invalid host or port") from None
    if (
        parts.scheme not in ("http", "https")
        or not parts.hostname
        or parts.username
        or parts.password
        or parts.query
        or parts.fragment
        or parts.path != "/metrics"
    ):
        raise BadRequest(
            f"metrics URL {text[:200]!r} must be http(s)://host:port/metrics (no credentials, no query)"
        )
    host = check_host(parts.hostname, "metrics URL")
    netloc = f"{_bracketed(host)}:{port}" if port else _bracketed(host)
    return urlunsplit((parts.scheme, netloc, "/metrics", "", ""))


def host_of(address: str) -> str:
    """The host of a URL (``http://h:1/x``) or of a ``host:port`` pair, without brackets."""
    if "://" in address:
        return (urlsplit(address).hostname or "").lower()
    return address.rpartition(":")[0].strip("[]").lower()


@dataclass(frozen=True)
class _Rules:
    any_host: bool
    networks: tuple[IPNetwork, ...]
    names: frozenset[str]
    suffixes: tuple[str, ...]  # ".svc.cluster.local" for "*.svc.cluster.local"


def _parse(entries: Iterable[str]) -> _Rules:
    any_host = False
    networks: list[IPNetwork] = []
    names: set[str] = set()
    suffixes: list[str] = []
    for raw in entries:
        entry = raw.strip().lower()
        if not entry:
            continue
        if entry == "*":
            any_host = True
        elif entry in NAMED_NETWORKS:
            networks += [ipaddress.ip_network(n) for n in NAMED_NETWORKS[entry]]
        elif entry.startswith("*."):
            suffixes.append("." + check_host(entry[2:], "worker_allowed_hosts"))
        else:
            try:
                networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                try:
                    names.add(check_host(entry, "worker_allowed_hosts"))
                except BadRequest as exc:
                    raise ValueError(exc.message) from None
    return _Rules(any_host, tuple(networks), frozenset(names), tuple(suffixes))


class AddressPolicy:
    """Which node hosts the control plane may talk to (see the module docstring)."""

    def __init__(self, entries: Iterable[str]) -> None:
        self.entries = [e.strip() for e in entries if e.strip()]
        self._rules = _parse(self.entries)

    def describe(self) -> str:
        """The allow-list in words, for error messages."""
        return ", ".join(self.entries) or "(empty: no host)"

    def _ip_allowed(self, ip: IPAddress) -> bool:
        mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:10.0.0.5 is 10.0.0.5
        candidates = [ip] if mapped is None else [ip, mapped]
        return any(c in net for c in candidates for net in self._rules.networks)

    def _name_allowed(self, host: str) -> bool:
        r = self._rules
        return host in r.names or any(host.endswith(s) for s in r.suffixes)

    async def check(self, host: str, what: str) -> None:
        """Raise :class:`Forbidden` unless ``host`` is allowed (a name no name entry allows
        is resolved, and allowed when all its addresses are in allowed networks)."""
        r = self._rules
        if r.any_host:
            return
        host = host.lower().strip("[]").removesuffix(".")
        ip = _ip(host)
        if ip is not None:
            if self._ip_allowed(ip):
                return
            raise self._refusal(what, host)
        if self._name_allowed(host):
            return
        if not r.networks:
            raise self._refusal(what, host)
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
        except (OSError, UnicodeError) as exc:
            raise BadRequest(f"{what}: host {host!r} could not be resolved ({exc})") from None
        addresses = {str(info[4][0]) for info in infos}
        bad = sorted(a for a in addresses if not self._ip_allowed(ipaddress.ip_address(a.split("%")[0])))
        if not addresses or bad:
            raise self._refusal(what, f"{host} ({', '.join(bad) or 'no address'})")

    def _refusal(self, what: str, host: str) -> Forbidden:
        return Forbidden(
            f"{what}: host {host} is not in the allowed worker hosts ({self.describe()}); an admin "
            "can allow it with LLAVA_CP_WORKER_ALLOWED_HOSTS"
        )
