"""Token sampling on the device, per row: greedy, temperature, top_p, seed.

Randomness comes from a counter-based hash of (seed, step, token index), not from a
generator's state, so a request's sampled tokens depend only on its own seed and
position: not on which other requests share the batch, nor on the device. It is
plain tensor arithmetic, so it runs inside a CUDA graph.
"""

from __future__ import annotations

import torch

from llava_wire.protocol import GREEDY_TEMPERATURE

__all__ = ["hash_uniform", "sample_tokens", "split_seed"]

_M31 = (1 << 31) - 1
_MUL = 0x45D9F3B  # from the well-known 32-bit integer hash; < 2**31 so products fit int64


def _mix(x: torch.Tensor) -> torch.Tensor:
    """Integer hash on non-negative int64 values below 2**31 (stays below 2**31)."""
    x = ((x >> 16) ^ x) * _MUL & _M31
    x = ((x >> 16) ^ x) * _MUL & _M31
    return (x >> 16) ^ x


def split_seed(seed: int) -> tuple[int, int]:
    """A 63-bit seed as two 31-bit halves (what the hash takes)."""
    return seed & _M31, (seed >> 31) & _M31


def hash_uniform(
    seed_lo: torch.Tensor, seed_hi: torch.Tensor, step: torch.Tensor, vocab: int
) -> torch.Tensor:
    """Uniform numbers in (0, 1) of shape [rows, vocab], one stream per (seed, step)."""
    base = _mix(_mix(seed_lo ^ _mix(seed_hi)) ^ (step & _M31))  # [rows]
    idx = torch.arange(vocab, device=seed_lo.device, dtype=torch.int64)
    h = _mix((base[:, None] + idx[None, :] * 2654435761) & _M31)
    return (h.to(torch.float32) + 0.5) * (1.0 / 2147483648.0)


def sample_tokens(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    seed_lo: torch.Tensor,
    seed_hi: torch.Tensor,
    step: torch.Tensor,
    all_greedy: bool,
) -> torch.Tensor:
    """Next token per row of ``logits`` [rows, vocab] (float32).

    Rows with ``temperature <= 0.001`` take the argmax. Others sample from the
    temperature-scaled distribution cut to the smallest set of tokens whose mass
    reaches ``top_p``, by the exponential race (argmax of p / E, E ~ Exp(1)), which
    draws exactly from p.
    """
    greedy = logits.argmax(dim=-1)
    if all_greedy:
        return greedy
    temp = torch.where(temperature > GREEDY_TEMPERATURE, temperature, torch.ones_like(temperature))
    probs = torch.softmax(logits / temp[:, None], dim=-1)
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the tokens ranked above each
    keep_sorted = before < top_p[:, None]
    keep = torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)
    probs = probs * keep
    u = hash_uniform(seed_lo, seed_hi, step, logits.shape[-1])
    sampled = (probs / -torch.log(u)).argmax(dim=-1)
    return torch.where(temperature > GREEDY_TEMPERATURE, sampled, greedy)
