"""Prefix affinity, for the ``cache_aware`` dispatch policy: which node likely holds the
start of a request in its prefix KV cache.

A node's prefix cache is keyed by a hash chain over its sequence's leading blocks, so it
hits only on a request that starts with content it served before (the next turn of a
conversation resends the whole history and the same images). This module keys requests
the same way, approximately, without tokenizing: a request's leading content (text, and
each image by the SHA-256 of its bytes) is cut into blocks of ``block_chars`` characters
(an image closes a block of its own), and block k's key hashes block k and the key of
block k-1, so that two requests share key k exactly when they share blocks 0..k. The model
seeds the chain: keys of different models never meet.

:class:`AffinityIndex` maps block keys to the nodes they were sent to (bounded, least
recently used first out), and answers, for each candidate node, the expected hit: the
estimated tokens of the longest leading run of the request's blocks that node holds. It is
fed by what this control plane routed and corrected by the ``cached_tokens`` the nodes
report. What it knows of a node is dropped when the node leaves routing or one of its
models stops being ready (:attr:`WorkerInfo.cache_epoch` changes), and when the node
reports no hit where a large one was expected (it restarted or evicted).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from control_plane.fleet.workers import WorkerInfo

__all__ = [
    "CHARS_PER_TOKEN",
    "IMAGE_TOKENS",
    "MAX_BLOCKS",
    "AffinityIndex",
    "Prefix",
    "prefix_of",
    "request_prefix",
]

# Token estimates of the blocks (the node's own counts calibrate them, per model): English
# text runs about 4 characters a token; LLaVA-1.5 turns an image into 24 x 24 patch tokens.
CHARS_PER_TOKEN = 4
IMAGE_TOKENS = 576
# Blocks keyed per request, at most: the leading 64 KiB of text at the default block size,
# more than a LLaVA context holds; bounds the hashing and the index updates of one request.
MAX_BLOCKS = 1024
# Nodes remembered per block (the most recent first): a prefix every node serves, such as a
# shared system prompt, costs this many entries, not one per node.
MAX_HOLDERS = 8
# A node that reports 0 cached tokens where this many (or more) were expected has lost
# what it held (restarted, or evicted it): everything the index knows of it is dropped.
EVICTED_MIN_TOKENS = 64
# Images hashed off the event loop from this many bytes (hashlib releases the GIL).
_HASH_IN_THREAD_BYTES = 256 * 1024
_IMAGE_MARK = b"\x00img\x00"


def _digest(prev: bytes, payload: bytes) -> bytes:
    return hashlib.blake2b(prev + payload, digest_size=8).digest()


@dataclass(frozen=True, slots=True)
class Prefix:
    """A request's leading content as block keys.

    ``upto[k]`` is the estimated prompt tokens up to the end of block ``k``; ``total`` the
    estimate for the whole prompt (the last, partial block included)."""

    model: str
    keys: tuple[int, ...]
    upto: tuple[int, ...]
    total: int

    @property
    def empty(self) -> bool:
        """No full block: nothing to be affine to."""
        return not self.keys


def _units(
    prompt: str | None, messages: Sequence[Mapping[str, Any]] | None, images: Sequence[bytes]
) -> Iterable[str | int]:
    """The request's content in order: text (``str``) and image indices (``int``)."""
    if messages is not None:
        next_image = 0
        for m in messages:
            yield f"\x1e{m.get('role', '')}\x1f"
            for part in m.get("content") or ():
                if part.get("type") == "image":
                    if next_image < len(images):
                        yield next_image
                    next_image += 1
                else:
                    yield str(part.get("text", ""))
        return
    pieces = (prompt or "").split("<image>")
    for i, text in enumerate(pieces):
        yield text
        if i < len(pieces) - 1 and i < len(images):
            yield i
    yield from range(len(pieces) - 1, len(images))  # images without a placeholder


def prefix_of(
    model: str,
    prompt: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    image_digests: Sequence[bytes],
    block_chars: int,
) -> Prefix:
    """The block keys of a request (images given by their content hashes): at most
    :data:`MAX_BLOCKS`, each character of text looked at once at most."""
    prev = _digest(b"", model.encode())
    keys: list[int] = []
    upto: list[int] = []
    tokens = 0.0
    pending = ""  # text of the block being filled (shorter than block_chars)
    rest = 0.0  # estimated tokens past the last block keyed

    def close(payload: str, digest: bytes, estimate: float) -> None:
        nonlocal prev, tokens
        prev = _digest(prev, payload.encode("utf-8", "surrogatepass") + digest)
        tokens += estimate
        keys.append(int.from_bytes(prev, "big"))
        upto.append(round(tokens))

    for unit in _units(prompt, messages, image_digests):
        room = MAX_BLOCKS - len(keys)
        if isinstance(unit, int):
            if room > 0:  # the image closes a block with the text before it
                close(
                    pending, _IMAGE_MARK + image_digests[unit], len(pending) / CHARS_PER_TOKEN + IMAGE_TOKENS
                )
                pending = ""
            else:
                rest += IMAGE_TOKENS
            continue
        take = max(0, room * block_chars - len(pending))
        rest += max(0, len(unit) - take) / CHARS_PER_TOKEN
        text = pending + unit[:take]
        full = min(room, len(text) // block_chars)
        for i in range(full):
            close(text[i * block_chars : (i + 1) * block_chars], b"", block_chars / CHARS_PER_TOKEN)
        pending = text[full * block_chars :]
    total = tokens + len(pending) / CHARS_PER_TOKEN + rest
    return Prefix(model, tuple(keys), tuple(upto), round(total))


async def request_prefix(
    model: str,
    prompt: str | None,
    messages: Sequence[Mapping[str, Any]] | None,
    images: Sequence[bytes],
    block_chars: int,
) -> Prefix:
    """:func:`prefix_of` a request, its images hashed (SHA-256) in a thread when large."""

    def digests() -> list[bytes]:
        return [hashlib.sha256(image).digest() for image in images]

    if sum(len(i) for i in images) >= _HASH_IN_THREAD_BYTES:
        hashed = await asyncio.to_thread(digests)
    else:
        hashed = digests()
    return prefix_of(model, prompt, messages, hashed, block_chars)


class AffinityIndex:
    """Block key -> the nodes it was sent to, bounded to ``max_blocks`` keys (the least
    recently routed go first). Not thread-safe: the event loop owns it."""

    def __init__(self, max_blocks: int) -> None:
        self.max_blocks = max(1, max_blocks)
        # key -> (worker id, cache epoch, worker id, cache epoch, ...), most recent first
        self._blocks: OrderedDict[int, tuple[int, ...]] = OrderedDict()
        self._scale: dict[str, float] = {}  # model -> node's prompt tokens / our estimate
        self.evicted_blocks = 0
        self.forgotten_nodes = 0

    def __len__(self) -> int:
        return len(self._blocks)

    def describe(self) -> dict[str, Any]:
        """Counts for ``/admin/status``."""
        return {
            "blocks": len(self._blocks),
            "max_blocks": self.max_blocks,
            "evicted_blocks": self.evicted_blocks,
            "forgotten_nodes": self.forgotten_nodes,
            "token_scale": {m: round(s, 3) for m, s in self._scale.items()},
        }

    def expected_hits(self, prefix: Prefix, workers: Sequence[WorkerInfo]) -> dict[int, int]:
        """Per worker id: the estimated prompt tokens it holds of ``prefix`` (the longest
        leading run of its blocks that was sent to it since it last entered routing)."""
        live = {w.id: w.cache_epoch for w in workers}
        reached = dict.fromkeys(live, 0)
        running = set(live)
        for key, upto in zip(prefix.keys, prefix.upto, strict=True):
            holders = self._blocks.get(key)
            if holders is None:
                break
            running &= {
                holders[i] for i in range(0, len(holders), 2) if live.get(holders[i]) == holders[i + 1]
            }
            if not running:
                break
            for wid in running:
                reached[wid] = upto
        scale = self._scale.get(prefix.model, 1.0)
        return {wid: round(tokens * scale) for wid, tokens in reached.items()}

    def expected_total(self, prefix: Prefix) -> int:
        """The estimated prompt tokens of the whole request, on the scale of :meth:`expected_hits`."""
        return round(prefix.total * self._scale.get(prefix.model, 1.0))

    def record(self, prefix: Prefix, worker: WorkerInfo) -> None:
        """``prefix`` was sent to ``worker``: the node will hold its blocks."""
        pair = (worker.id, worker.cache_epoch)
        # The last block first, so that the first block is the most recently used: under
        # pressure a chain loses its tail before its head, as a node's cache does.
        for key in reversed(prefix.keys):
            holders = self._blocks.get(key, ())
            kept = tuple(
                x for i in range(0, len(holders), 2) if holders[i] != worker.id for x in holders[i : i + 2]
            )
            self._blocks[key] = (pair + kept)[: 2 * MAX_HOLDERS]
            self._blocks.move_to_end(key)
        while len(self._blocks) > self.max_blocks:
            self._blocks.popitem(last=False)
            self.evicted_blocks += 1

    def report(
        self, prefix: Prefix, worker: WorkerInfo, expected: int, cached: int, prompt_tokens: int | None
    ) -> bool:
        """What the node said it served from its cache; True when that shows it lost what
        the index thought it held (everything the index knows of it is then dropped)."""
        if prompt_tokens and prefix.total > 0:
            ratio = min(20.0, max(0.05, prompt_tokens / prefix.total))
            old = self._scale.get(prefix.model)
            self._scale[prefix.model] = ratio if old is None else 0.8 * old + 0.2 * ratio
        if cached > 0 or expected < EVICTED_MIN_TOKENS:
            return False
        worker.forget_prefixes()
        self.forgotten_nodes += 1
        self.record(prefix, worker)  # it holds this request's prompt now
        return True
