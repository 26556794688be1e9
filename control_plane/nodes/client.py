"""What the control plane asks a node, as one interface: :class:`NodeClient`.

Every conversation with a Triton node goes through it: a poll (readiness, repository
index, load metrics), endpoint discovery, the model-control mode, loads and unloads,
generation streams and cancels. :class:`~control_plane.nodes.triton.TritonNodeClient`
implements it over HTTP (aiohttp) and gRPC (tritonclient.grpc.aio), the default;
:class:`~control_plane.nodes.fake.FakeNodeClient` in memory, for the fast tests. The
app takes one (``create_app(settings, node_client=...)``): nothing else in the control
plane builds a URL of a node's API.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from llava_wire.messages import Chunk

__all__ = [
    "Chunk",
    "GenerationInputs",
    "ModelStatus",
    "NodeCallError",
    "NodeClient",
    "NodeStreamError",
    "PollResult",
]


@dataclass
class ModelStatus:
    """One model on one node, as its repository index reports it."""

    ready: bool
    state: str = ""  # READY, LOADING, UNLOADING, UNAVAILABLE, "" (never loaded), UNREACHABLE (ours)
    reason: str = ""
    served_name: str = ""  # the name the node serves it under ("": not reported)


@dataclass(slots=True)
class PollResult:
    """What one poll of a node found."""

    ok: bool = False  # live and answering (see control_plane.fleet.health)
    server_ready: bool = False  # /v2/health/ready answered 200
    models: dict[str, ModelStatus] | None = None  # None: the index could not be read
    queued: int | None = None  # None: no metrics
    active: int | None = None
    served_names: dict[str, str] | None = None  # model -> served name, from the metrics
    latency_ms: float | None = None
    error: str = ""


@dataclass(frozen=True)
class GenerationInputs:
    """One generation in the terms of the ``llava`` ensemble's inputs (None: the node's default)."""

    prompt: str | None = None
    messages: Sequence[dict[str, Any]] | None = None
    images: Sequence[bytes] = field(default_factory=tuple)
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] = field(default_factory=tuple)
    seed: int | None = None
    # a continuation: the token ids the stream had sent when its node failed
    prior_token_ids: Sequence[int] = field(default_factory=tuple)


class NodeStreamError(Exception):
    """A stream from a node failed.

    ``unreachable``: the node could not be reached or stopped answering (worth trying
    another node); ``client_error``: the node rejected the request itself (the client's
    mistake, never counted against the node); ``stalled``: nothing came for the stall
    timeout (the node may still be generating: cancel it there); ``left``: the stream was
    given up because the poller took the node out of routing (stalled too).
    """

    def __init__(
        self,
        message: str,
        *,
        unreachable: bool = False,
        client_error: bool = False,
        stalled: bool = False,
        left: bool = False,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.unreachable = unreachable
        self.client_error = client_error
        self.stalled = stalled or left
        self.left = left

    @property
    def kind(self) -> str:
        """In a word: ``client``, ``node_left``, ``stalled``, ``unreachable`` or ``node_error``."""
        if self.client_error:
            return "client"
        if self.left:
            return "node_left"
        if self.stalled:
            return "stalled"
        return "unreachable" if self.unreachable else "node_error"


class NodeCallError(Exception):
    """A model-control call (load, unload) failed; ``message`` is the node's reason.

    ``not_explicit``: the node does not take loads and unloads (Triton's ``none`` mode).
    """

    def __init__(self, message: str, *, not_explicit: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.not_explicit = not_explicit


class NodeClient(Protocol):
    """Everything the control plane asks a node. Nodes are named by the addresses a
    worker was registered with: its HTTP base URL, its gRPC ``host:port``, its metrics URL."""

    async def poll(self, http_url: str, metrics_url: str, timeout_s: float) -> PollResult:
        """Readiness, repository index and load (queued, active) of one node; never raises."""
        ...

    async def discover(self, http_url: str) -> tuple[str, str]:
        """The gRPC address and metrics URL of a node, from its HTTP base URL."""
        ...

    async def explicit_mode(self, http_url: str, timeout_s: float) -> bool | None:
        """Whether the node takes model loads and unloads; None when it did not say."""
        ...

    async def load(self, http_url: str, model: str, timeout_s: float) -> None:
        """Load ``model`` (and its steps); returns once it is ready; raises :class:`NodeCallError`."""
        ...

    async def unload(self, http_url: str, model: str, timeout_s: float) -> None:
        """Unload ``model`` and its steps; raises :class:`NodeCallError`."""
        ...

    def stream(
        self,
        grpc_url: str,
        model: str,
        inputs: GenerationInputs,
        request_id: str,
        *,
        first_token_timeout_s: float,
        stall_timeout_s: float,
    ) -> AsyncIterator[Chunk]:
        """Stream ``model``'s responses; raises :class:`NodeStreamError`. Closing the
        iterator early ends the stream; :meth:`cancel` stops the generation on the node."""
        ...

    async def cancel(self, grpc_url: str, model: str, request_id: str, timeout_s: float = 5.0) -> int:
        """Stop the generation with ``request_id``; returns how many were running; raises
        when the node cannot be asked."""
        ...

    async def forget(self, grpc_url: str) -> None:
        """Let go of what is kept for a node that left (its channel)."""
        ...

    async def close(self) -> None:
        """Close every connection."""
        ...
