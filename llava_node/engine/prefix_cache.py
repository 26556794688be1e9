"""Prefix reuse over the paged KV cache: full pages keyed by what led up to them.

A page holds the keys and values of ``page_size`` consecutive positions. Its *key* is a
hash chained from the start of the sequence: BLAKE2b over the previous page's key, the
page's token ids and, where the page holds image positions, the content hash of each
image they belong to (:func:`image_key`). Two requests share a page only if everything
before and in it is the same, image pixels included: the same text with another image
never matches, nor do two images swapped. The hash is cryptographic (128 bits), so a
client cannot craft a prompt whose key collides with another user's and read their
cached keys and values.

:class:`PrefixCache` owns the allocator's pages on the engine's behalf:

- :meth:`~PrefixCache.match` finds a new request's longest cached prefix and takes a
  reference on those pages (a page shared by running requests is never written: a
  request writes only past its matched prefix, which ends on a page boundary);
- :meth:`~PrefixCache.allocate` hands out fresh pages, evicting the least recently used
  cached pages that no running request holds when the free list runs short: cached pages
  never make a request wait or fail (they are free memory with contents);
- :meth:`~PrefixCache.insert` publishes a request's full pages once their keys and
  values are computed (its prompt once launched, its generated tokens when it ends);
- :meth:`~PrefixCache.release` drops a request's references: cached pages become
  evictable (the last page of a sequence first), the others go back to the free list.

With the cache disabled it is a thin layer over the allocator: nothing is matched or
published. :class:`ImageFeatureCache` keeps the vision tower's output per image content
hash, so an image sent again skips the tower. Both are used from the engine thread only.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from llava_node.engine.kv_cache import PageAllocator

__all__ = ["ImageFeatureCache", "PrefixCache", "PrefixCacheStats", "block_keys", "image_key"]

KEY_BYTES = 16


def image_key(pixels: torch.Tensor) -> bytes:
    """The content hash of one image's pixel values [3, H, W] (their bytes and shape):
    SHA-256, which x86's SHA extensions run at ~1 GB/s (a 336-pixel image in ~1 ms)."""
    data = pixels.detach().to("cpu", torch.float32).contiguous()
    h = hashlib.sha256(b"llava-image" + repr(tuple(data.shape)).encode())
    h.update(data.numpy().data)  # the tensor's own bytes, not a copy
    return h.digest()[:KEY_BYTES]


def block_keys(
    ids: Sequence[int],
    page_size: int,
    *,
    image_token_id: int = -1,
    images: Sequence[bytes] = (),
    parent: bytes = b"",
    image_tokens_before: int = 0,
) -> list[bytes]:
    """The chained key of each full page of ``ids``.

    ``images`` are the content hashes of the prompt's images, in order; image token ``j``
    (counting from the sequence's start) belongs to image ``j // tokens_per_image``.
    ``parent`` and ``image_tokens_before`` continue a chain: the key of the page before
    ``ids[0]`` and the image tokens the sequence held before it.
    """
    n_image = sum(1 for t in ids if t == image_token_id) + image_tokens_before
    per_image = n_image // len(images) if images else 0
    keys: list[bytes] = []
    seen_images = image_tokens_before
    for start in range(0, len(ids) - page_size + 1, page_size):
        block = ids[start : start + page_size]
        h = hashlib.blake2b(parent, digest_size=KEY_BYTES, person=b"llava-kv-page")
        h.update(array("q", block).tobytes())
        touched: list[int] = []
        for t in block:
            if t == image_token_id:
                index = seen_images // per_image if per_image else -1
                if not touched or touched[-1] != index:
                    touched.append(index)
                seen_images += 1
        for index in touched:
            h.update(images[index] if 0 <= index < len(images) else b"\0" * KEY_BYTES)
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass
class PrefixCacheStats:
    """What the cache did, cumulative (exported as the engine's metrics)."""

    hit_tokens: int = 0  # prompt tokens whose keys and values came from the cache
    miss_tokens: int = 0  # prompt tokens computed
    hit_requests: int = 0  # requests that reused at least one page
    evicted_pages: int = 0


class PrefixCache:
    """Cached KV pages by chained key, with reference counts and an LRU of idle pages."""

    def __init__(self, allocator: PageAllocator, page_size: int, *, enabled: bool = True) -> None:
        self.allocator = allocator
        self.page_size = page_size
        self.enabled = enabled
        self.stats = PrefixCacheStats()
        self._page_of: dict[bytes, int] = {}  # key -> page holding it
        self._key_of: dict[int, bytes] = {}  # page -> its key (cached pages only)
        self._refs: dict[int, int] = {}  # cached page -> running requests holding it
        self._idle: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced: LRU first

    @property
    def cached_pages(self) -> int:
        """Pages whose contents are published (held by a request or idle)."""
        return len(self._key_of)

    @property
    def idle_pages(self) -> int:
        """Cached pages no running request holds (evicted first when memory is needed)."""
        return len(self._idle)

    @property
    def available(self) -> int:
        """Pages a new request could get: free ones plus idle cached ones."""
        return self.allocator.free + len(self._idle)

    def match(self, keys: Sequence[bytes]) -> list[int]:
        """The pages of the longest cached prefix of ``keys``, with a reference taken on each."""
        if not self.enabled:
            return []
        pages: list[int] = []
        for key in keys:
            page = self._page_of.get(key)
            if page is None:
                break
            pages.append(page)
        for page in pages:
            self._refs[page] = self._refs.get(page, 0) + 1
            self._idle.pop(page, None)
        return pages

    def allocate(self, n: int) -> list[int] | None:
        """``n`` fresh pages, evicting idle cached pages (least recently used first) if
        the free list is short; None, and nothing taken or evicted, if even that is not
        enough."""
        short = n - self.allocator.free
        if short > len(self._idle):
            return None
        for _ in range(max(0, short)):
            page, _ = self._idle.popitem(last=False)
            del self._page_of[self._key_of.pop(page)]
            self._refs.pop(page, None)
            self.allocator.release([page])
            self.stats.evicted_pages += 1
        return self.allocator.allocate(n)

    def insert(self, keys: Sequence[bytes], pages: Sequence[int]) -> None:
        """Publish ``pages[i]`` as holding ``keys[i]`` (their keys and values are computed,
        or their computation is queued on the device ahead of any later reader). A key
        already cached keeps its page; the duplicate stays private to its request."""
        if not self.enabled:
            return
        for key, page in zip(keys, pages, strict=False):
            if page in self._key_of or key in self._page_of:
                continue
            self._page_of[key] = page
            self._key_of[page] = key
            self._refs[page] = 1  # held by the request that computed it

    def release(self, pages: Sequence[int]) -> None:
        """A request is done with ``pages`` (its whole block table, in order)."""
        private: list[int] = []
        # Last page first: the end of a sequence is evicted before its (more shared) start.
        for page in reversed(pages):
            if page not in self._key_of:
                private.append(page)
                continue
            left = self._refs.get(page, 1) - 1
            if left > 0:
                self._refs[page] = left
            else:
                self._refs.pop(page, None)
                self._idle[page] = None
        self.allocator.release(private)

    def count_prompt(self, prompt_tokens: int, cached_tokens: int) -> None:
        """Count one started request's prompt: ``cached_tokens`` of it reused."""
        self.stats.hit_tokens += cached_tokens
        self.stats.miss_tokens += prompt_tokens - cached_tokens
        self.stats.hit_requests += cached_tokens > 0


class ImageFeatureCache:
    """The vision tower's output per image content hash, the ``capacity`` most recent."""

    def __init__(self, capacity: int) -> None:
        self.capacity = max(0, capacity)
        self._features: OrderedDict[bytes, torch.Tensor] = OrderedDict()
        self.hits = 0  # images whose features came from here
        self.misses = 0  # images that went through the vision tower

    def __len__(self) -> int:
        return len(self._features)

    def get(self, key: bytes) -> torch.Tensor | None:
        """The features of image ``key``, or None (a hit makes it the most recent)."""
        feats = self._features.get(key)
        if feats is None:
            self.misses += 1
        else:
            self.hits += 1
            self._features.move_to_end(key)
        return feats

    def put(self, key: bytes, features: torch.Tensor) -> None:
        """Keep ``features`` [tokens, D] of image ``key``, dropping the least recent."""
        if not self.capacity:
            return
        self._features[key] = features
        self._features.move_to_end(key)
        while len(self._features) > self.capacity:
            self._features.popitem(last=False)
