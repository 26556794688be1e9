"""A paged KV cache: fixed-size pages in one preallocated tensor, and who owns which.

Each running request (a *slot*) owns a list of pages, written in its row of the
block table; token position ``p`` of a slot lives in page ``table[p // page_size]``
at offset ``p % page_size``. Page 0 is never handed out: unused table entries and
padded batch rows point at it, so a stray write lands there and harms no one.

The pages hold the model's dtype, or float8 e4m3 (``torch.float8_e4m3fn``), which halves
the bytes a decode step reads per cached token: values are rounded to nearest and
saturate at +-448 (no per-tensor scale, as vLLM's ``--kv-cache-dtype fp8`` without
calibration), and are converted back to the model's dtype as they are read.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["FP8_MAX", "KV_CACHE_DTYPES", "PageAllocator", "PagedKVCache", "kv_cache_dtype", "to_cache_dtype"]

FP8_MAX = 448.0  # the largest finite torch.float8_e4m3fn value
# LLAVA_KV_CACHE_DTYPE values: "auto" is the model's dtype
KV_CACHE_DTYPES = {"auto": None, "fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn}


def kv_cache_dtype(name: str) -> torch.dtype | None:
    """The cache dtype a ``kv_cache_dtype`` setting names (None: the model's dtype)."""
    key = name.strip().lower()
    if key not in KV_CACHE_DTYPES:
        raise ValueError(f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, not {name!r}")
    return KV_CACHE_DTYPES[key]


def to_cache_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` as a cache of ``dtype`` stores it: float8 e4m3 rounded to nearest (ties to
    even), saturating at +-448, as the fused store kernel rounds."""
    if x.dtype == dtype:
        return x
    if dtype == torch.float8_e4m3fn:
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(dtype)
    return x.to(dtype)


class PageAllocator:
    """Free list of page ids (thread-safe). Page 0 is reserved."""

    def __init__(self, num_pages: int) -> None:
        if num_pages < 2:
            raise ValueError("the KV cache needs at least 2 pages")
        self.num_pages = num_pages
        self._free = list(range(num_pages - 1, 0, -1))
        self._lock = threading.Lock()

    @property
    def free(self) -> int:
        """Pages not owned by any request."""
        return len(self._free)

    @property
    def capacity(self) -> int:
        """Pages that can be handed out at all."""
        return self.num_pages - 1

    def allocate(self, n: int) -> list[int] | None:
        """``n`` pages, or None if fewer are free (nothing is taken then)."""
        with self._lock:
            if n > len(self._free):
                return None
            pages = self._free[-n:] if n else []
            del self._free[len(self._free) - n :]
            return pages

    def release(self, pages: Sequence[int]) -> None:
        """Give pages back."""
        with self._lock:
            self._free.extend(pages)


@dataclass
class PagedKVCache:
    """Keys and values of every layer, in pages, plus each slot's block table."""

    k: torch.Tensor  # [layers, pages * page_size, kv_heads, head_dim]
    v: torch.Tensor
    block_tables: torch.Tensor  # [slots + 1, pages per sequence] int64
    page_size: int
    allocator: PageAllocator

    @staticmethod
    def page_bytes(n_layers: int, n_kv_heads: int, head_dim: int, page_size: int, dtype: torch.dtype) -> int:
        """Bytes one page takes across all layers, keys and values."""
        elem = torch.empty((), dtype=dtype).element_size()
        return 2 * n_layers * page_size * n_kv_heads * head_dim * elem

    @classmethod
    def create(
        cls,
        *,
        n_layers: int,
        n_kv_heads: int,
        head_dim: int,
        page_size: int,
        num_pages: int,
        max_slots: int,
        max_seq_len: int,
        device: torch.device,
        dtype: torch.dtype,
    ) -> PagedKVCache:
        """Allocate the whole cache up front."""
        shape = (n_layers, num_pages * page_size, n_kv_heads, head_dim)
        per_seq = math.ceil(max_seq_len / page_size)
        return cls(
            k=torch.zeros(shape, device=device, dtype=dtype),
            v=torch.zeros(shape, device=device, dtype=dtype),
            block_tables=torch.zeros((max_slots + 1, per_seq), dtype=torch.int64, device=device),
            page_size=page_size,
            allocator=PageAllocator(num_pages),
        )

    def pages_for(self, tokens: int) -> int:
        """Pages a sequence of ``tokens`` tokens needs."""
        return math.ceil(tokens / self.page_size)

    def set_block_table(self, slot: int, pages: Sequence[int]) -> None:
        """Point ``slot``'s table at ``pages`` (the rest at the reserved page 0)."""
        cuda = self.block_tables.device.type == "cuda"
        row = torch.zeros(self.block_tables.shape[1], dtype=torch.int64, pin_memory=cuda)
        row[: len(pages)] = torch.tensor(list(pages), dtype=torch.int64)
        # pinned and non-blocking: a blocking copy would wait for the steps already launched
        self.block_tables[slot].copy_(row, non_blocking=True)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer ``i``: [pages * page_size, kv_heads, head_dim]."""
        return self.k[i], self.v[i]

    def flat_positions(self, slot: int, n: int) -> torch.Tensor:
        """Cache rows of positions 0..n-1 of ``slot``."""
        pos = torch.arange(n, device=self.k.device)
        return self.block_tables[slot, pos // self.page_size] * self.page_size + pos % self.page_size

    def flat_slot_positions(self, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Cache row of position ``pos[b]`` of slot ``slots[b]``, per batch row."""
        return self.block_tables[slots, pos // self.page_size] * self.page_size + pos % self.page_size

    def write(self, layer: int, rows: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store keys and values [tokens, kv_heads, head_dim] at cache ``rows``."""
        for cache, x in ((self.k[layer], k), (self.v[layer], v)):
            x = to_cache_dtype(x, cache.dtype)
            if cache.element_size() == 1:  # float8: torch has no index_copy_ for it on the CPU
                cache, x = cache.view(torch.uint8), x.view(torch.uint8)
            cache.index_copy_(0, rows, x)

    @staticmethod
    def read(cache: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Rows ``rows`` of one layer's keys or values (``cache``), as ``dtype``."""
        return cache[rows].to(dtype)
