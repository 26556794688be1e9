"""An in-memory :class:`~control_plane.nodes.client.NodeClient` with scripted nodes, for tests.

Each :class:`FakeNode` answers polls, loads, unloads, streams and cancels as a Triton node
running the ``llava`` ensemble would, and can be told to misbehave: refuse connections,
fail before or after its first token, stall, stream slowly, take time to load or fail to.
It takes continuations (``prior_token_ids``: its own first tokens) and streams on after them.
It records what it was asked (streams with their inputs, cancels, loads, unloads, polls),
so a test can check what the control plane did. Like the engine's prefix KV cache, it keeps
a hash chain over the full 16-token blocks of the prompts it served (text 4 characters a
token, an image ``image_tokens`` tokens keyed by its content hash; bounded, least recently
used first out) and reports as ``cached_tokens`` the leading blocks of a prompt it holds.
Addresses follow Triton's convention: a node at ``http://host:P`` has gRPC at ``host:P+1`` and metrics at ``http://host:P+2/metrics``.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from control_plane.nodes.client import (
    Chunk,
    GenerationInputs,
    ModelStatus,
    NodeCallError,
    NodeStreamError,
    PollResult,
)
from llava_wire.protocol import STEP_SUFFIXES

__all__ = ["FakeNode", "FakeNodeClient", "FakeStream"]


def _steps(model: str) -> list[str]:
    return [model, *(model + s for s in STEP_SUFFIXES)]


CACHE_BLOCK_TOKENS = 16  # the engine's prefix-cache block


def fake_tokens(inputs: GenerationInputs, image_tokens: int) -> list[str]:
    """The prompt as the fake node "tokenizes" it: 4 characters of text a token, an image
    ``image_tokens`` tokens named by its content hash, chat messages behind their roles."""
    out: list[str] = []
    images = iter(hashlib.sha256(i).hexdigest()[:16] for i in inputs.images)

    def text(t: str) -> None:
        out.extend(t[i : i + 4] for i in range(0, len(t), 4))

    def image() -> None:
        digest = next(images, "missing")
        out.extend(f"<img {digest} {k}>" for k in range(image_tokens))

    if inputs.messages is not None:
        for m in inputs.messages:
            out.append(f"<{m.get('role')}>")
            for part in m.get("content") or ():
                if part.get("type") == "image":
                    image()
                else:
                    text(str(part.get("text", "")))
    else:
        pieces = (inputs.prompt or "").split("<image>")
        for i, piece in enumerate(pieces):
            text(piece)
            if i < len(pieces) - 1:
                image()
    return out


def _block_keys(tokens: list[str]) -> list[bytes]:
    keys, prev = [], b""
    for start in range(0, len(tokens) - CACHE_BLOCK_TOKENS + 1, CACHE_BLOCK_TOKENS):
        block = "\x00".join(tokens[start : start + CACHE_BLOCK_TOKENS])
        prev = hashlib.blake2b(prev + block.encode("utf-8", "surrogatepass"), digest_size=16).digest()
        keys.append(prev)
    return keys


@dataclass
class FakeStream:
    """One stream a fake node served."""

    request_id: str
    model: str
    inputs: GenerationInputs
    sent: int = 0  # tokens sent (with a continuation's prior tokens)
    finish_reason: str | None = None
    cancelled: bool = False  # by a cancel call
    closed_early: bool = False  # the control plane closed it before its end
    error: str | None = None


@dataclass
class FakeNode:
    """A scripted node. Change its fields at any time; the next call sees them."""

    http_url: str
    models: dict[str, str] = field(default_factory=lambda: dict.fromkeys(_steps("llava"), "READY"))
    tokens: list[str] = field(default_factory=lambda: ["Hello", ",", " world", "!"])
    token_delay_s: float = 0.0
    prompt_tokens: int | None = None  # None: counted from the prompt (see fake_tokens)
    prefix_cache: bool = True  # False: cached_tokens is always 0 (a node without the cache)
    cache_blocks: int = 4096  # prefix-cache blocks it keeps
    image_tokens: int = 576  # as LLaVA-1.5 (24 x 24 patches)
    prefill_s_per_token: float = 0.0  # time before the first token, per prompt token not cached
    up: bool = True  # False: connections are refused (polls fail, streams are unreachable)
    ready: bool = True  # /v2/health/ready
    queued: int = 0
    active: int = 0
    fail_before_first: str | None = None  # "unreachable", "error" or "client": how the stream fails
    fail_after: int | None = None  # fail (node error) after this many tokens
    stall_after: int | None = None  # send nothing more after this many tokens (until cancelled)
    served_names: dict[str, str] = field(default_factory=dict)  # model -> name, reported while READY
    explicit: bool = True  # takes model loads and unloads
    load_delay_s: float = 0.0
    load_error: str | None = None
    poll_delay_s: float = 0.0  # a poll answers this late, with what the node had when it was asked
    cancels_refused: bool = False  # cancel calls fail (as on a node that has not caught up yet)
    # what it was asked
    streams: list[FakeStream] = field(default_factory=list)
    cancels: list[str] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    polls: int = 0
    cache: OrderedDict[bytes, None] = field(default_factory=OrderedDict, repr=False)

    def flush_cache(self) -> None:
        """Forget every cached prefix (a restart, or eviction under memory pressure)."""
        self.cache.clear()

    def _prefill(self, inputs: GenerationInputs) -> tuple[int, int]:
        """The prompt's tokens and those served from the prefix cache; caches its blocks."""
        tokens = fake_tokens(inputs, self.image_tokens)
        if not self.prefix_cache:
            return len(tokens), 0
        keys = _block_keys(tokens)
        hit = 0
        while hit < len(keys) and keys[hit] in self.cache:
            hit += 1
        for key in reversed(keys):  # the chain's head is the most recently used
            self.cache[key] = None
            self.cache.move_to_end(key)
        while len(self.cache) > self.cache_blocks:
            self.cache.popitem(last=False)
        # at least the last token is computed (its logits start the generation)
        return len(tokens), min(hit * CACHE_BLOCK_TOKENS, max(0, len(tokens) - 1))

    @property
    def grpc_url(self) -> str:
        """``host:port+1``, Triton's convention."""
        parts = urlsplit(self.http_url)
        return f"{parts.hostname}:{(parts.port or 80) + 1}"

    @property
    def metrics_url(self) -> str:
        """``http://host:port+2/metrics``."""
        parts = urlsplit(self.http_url)
        return f"{parts.scheme}://{parts.hostname}:{(parts.port or 80) + 2}/metrics"

    def running(self) -> list[FakeStream]:
        """Streams still generating."""
        return [s for s in self.streams if s.finish_reason is None and s.error is None and not s.closed_early]

    def set_models(self, state: str, model: str = "llava") -> None:
        """Put a model and its steps in ``state`` (READY, UNAVAILABLE, UNLOADING, ...)."""
        for name in _steps(model):
            self.models[name] = state


class FakeNodeClient:
    """The nodes of a test, by address."""

    def __init__(self, nodes: Iterable[FakeNode] = ()) -> None:
        self._by_http: dict[str, FakeNode] = {}
        self._by_grpc: dict[str, FakeNode] = {}
        for n in nodes:
            self.add(n)
        self.closed = False

    def add(self, node: FakeNode) -> FakeNode:
        """Make ``node`` reachable at its addresses."""
        self._by_http[node.http_url] = node
        self._by_grpc[node.grpc_url] = node
        return node

    def node(self, url: str) -> FakeNode | None:
        """The node at an HTTP URL or gRPC address."""
        return self._by_http.get(url.rstrip("/")) or self._by_grpc.get(url)

    # -- polls and discovery ---------------------------------------------------------------
    async def poll(self, http_url: str, metrics_url: str, timeout_s: float) -> PollResult:
        """What the node would answer; a node that is down: connection refused."""
        node = self.node(http_url)
        res = PollResult()
        if node is None or not node.up:
            res.error = "connection failed: [Errno 111] Connection refused"
            return res
        node.polls += 1
        res.server_ready = node.ready
        res.ok = True
        res.latency_ms = 0.1
        res.models = {
            name: ModelStatus(ready=state == "READY", state=state) for name, state in node.models.items()
        }
        res.queued, res.active = node.queued, node.active + len(node.running())
        res.served_names = {m: n for m, n in node.served_names.items() if node.models.get(m) == "READY"}
        if node.poll_delay_s:
            await asyncio.sleep(node.poll_delay_s)
        return res

    async def discover(self, http_url: str) -> tuple[str, str]:
        """Triton's convention: gRPC on the next port, metrics on the one after."""
        parts = urlsplit(http_url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        return f"{host}:{port + 1}", f"{parts.scheme}://{host}:{port + 2}/metrics"

    # -- model control -----------------------------------------------------------------------
    async def explicit_mode(self, http_url: str, timeout_s: float) -> bool | None:
        """Whether the node takes loads (None when it is down)."""
        node = self.node(http_url)
        return None if node is None or not node.up else node.explicit

    async def load(self, http_url: str, model: str, timeout_s: float) -> None:
        """Load after ``load_delay_s``, or fail with ``load_error``."""
        node = self._reachable(http_url)
        if not node.explicit:
            raise NodeCallError("explicit model load / unload is not allowed", not_explicit=True)
        node.loads.append(model)
        node.set_models("LOADING", model)
        try:
            await asyncio.wait_for(asyncio.sleep(node.load_delay_s), timeout_s)
        except TimeoutError:
            raise NodeCallError(f"the node did not finish loading within {timeout_s:g} s") from None
        if node.load_error is not None:
            node.set_models("UNAVAILABLE", model)
            raise NodeCallError(node.load_error)
        node.set_models("READY", model)

    async def unload(self, http_url: str, model: str, timeout_s: float) -> None:
        """Unload at once (its running streams are not touched, as Triton's are not)."""
        node = self._reachable(http_url)
        node.unloads.append(model)
        node.set_models("UNAVAILABLE", model)

    def _reachable(self, url: str) -> FakeNode:
        node = self.node(url)
        if node is None or not node.up:
            raise NodeCallError("the node could not be reached: connection refused")
        return node

    # -- generation ------------------------------------------------------------------------
    async def stream(
        self,
        grpc_url: str,
        model: str,
        inputs: GenerationInputs,
        request_id: str,
        *,
        first_token_timeout_s: float,
        stall_timeout_s: float,
    ) -> AsyncIterator[Chunk]:
        """The node's tokens, one response each, then a final one (as the engine sends them)."""
        node = self.node(grpc_url)
        if node is None or not node.up:
            raise NodeStreamError(
                f"the node at {grpc_url} failed: UNAVAILABLE: connection refused", unreachable=True
            )
        if node.models.get(model) != "READY":
            raise NodeStreamError(f"Request for unknown model: '{model}' is not ready")
        s = FakeStream(request_id, model, inputs)
        node.streams.append(s)
        if node.fail_before_first is not None:
            s.error = node.fail_before_first
            if node.fail_before_first == "client":
                raise NodeStreamError("the prompt is empty", client_error=True)
            raise NodeStreamError(
                f"the node failed: {node.fail_before_first}",
                unreachable=node.fail_before_first == "unreachable",
            )
        counted, cached = node._prefill(inputs)
        prompt_tokens = node.prompt_tokens if node.prompt_tokens is not None else counted
        budget = inputs.max_tokens if inputs.max_tokens is not None else len(node.tokens)
        pieces = node.tokens[:budget]
        # a continuation: its prior tokens must be this script's, then it goes on after them
        prior = list(inputs.prior_token_ids)
        if prior and (prior != [100 + i for i in range(len(prior))] or len(prior) >= len(pieces)):
            s.error = "client"
            raise NodeStreamError(
                f"invalid request: prior_token_ids {prior[:8]} are not a prefix of this node's tokens",
                client_error=True,
            )
        s.sent = len(prior)
        try:
            if node.prefill_s_per_token:
                await asyncio.sleep(node.prefill_s_per_token * (counted + len(prior) - cached))
            for i, text in enumerate(pieces):
                if i < len(prior):
                    continue
                timeout = first_token_timeout_s if i == 0 else stall_timeout_s
                if node.stall_after is not None and i >= node.stall_after:
                    await self._stall(s, timeout)
                if s.cancelled:
                    break
                if node.fail_after is not None and i >= node.fail_after:
                    s.error = "failed"
                    raise NodeStreamError("the node failed: generation failed on the node")
                if node.token_delay_s:
                    await asyncio.sleep(node.token_delay_s)
                s.sent += 1
                yield Chunk(text, [100 + i], None, prompt_tokens, s.sent, cached)
            s.finish_reason = (
                "cancelled" if s.cancelled else ("length" if budget < len(node.tokens) else "stop")
            )
            yield Chunk("", [], s.finish_reason, prompt_tokens, s.sent, cached)
        finally:
            if s.finish_reason is None and s.error is None:
                s.closed_early = True

    @staticmethod
    async def _stall(s: FakeStream, timeout_s: float) -> None:
        """Send nothing: a cancel ends the wait; the stall timeout ends the stream."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not s.cancelled:
            if asyncio.get_running_loop().time() >= deadline:
                raise NodeStreamError(
                    f"the node sent nothing for {timeout_s:g} s", unreachable=True, stalled=True
                )
            await asyncio.sleep(0.01)

    async def cancel(self, grpc_url: str, model: str, request_id: str, timeout_s: float = 5.0) -> int:
        """Cancel the node's running streams with ``request_id``."""
        node = self.node(grpc_url)
        if node is None or not node.up or node.cancels_refused:
            raise ConnectionError(f"{grpc_url}: connection refused")
        node.cancels.append(request_id)
        hits = [s for s in node.streams if s.request_id == request_id and s.finish_reason is None]
        for s in hits:
            s.cancelled = True
        return len(hits)

    async def forget(self, grpc_url: str) -> None:
        """Nothing is kept per node."""

    async def close(self) -> None:
        """Nothing to close."""
        self.closed = True
