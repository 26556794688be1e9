"""A decode step's bookkeeping in two launches: what it reads of each slot, and how it
moves each slot on.

In torch ops, a decode step starts with ~13 small kernels (each slot's position, its last
token's embedding row, its cache row, cos/sin at its position, its block table, the
attention lengths) and ends with ~6 (the slots' last tokens, step counters and lengths).
Each is a node of the captured step on its critical path, ~2 us on an H200 (issue 18).

* :func:`decode_inputs`: one program per batch row gathers all of the first;
* :func:`advance_slots`: one program per batch row writes all of the second.

Both give exactly what the torch ops give (copies and integer arithmetic), depend on
shapes only (CUDA graphs capture them) and run under Triton's CPU interpreter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

__all__ = ["advance_slots", "decode_inputs"]


@triton.jit  # type: ignore[misc,untyped-decorator]
def _copy_row(src, dst, n, BLOCK: tl.constexpr):  # type: ignore[no-untyped-def]
    for start in range(0, n, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n
        tl.store(dst + cols, tl.load(src + cols, mask=mask), mask=mask)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _decode_inputs_kernel(  # type: ignore[no-untyped-def]
    slots_ptr,
    seq_lens_ptr,
    last_ptr,
    embed_ptr,
    cos_ptr,
    sin_ptr,
    tables_ptr,
    pos_out,
    x_out,
    cos_out,
    sin_out,
    rows_out,
    tables_out,
    lens_out,
    D,
    HD,
    PAGES,
    stride_embed,
    stride_rope,
    stride_tables,
    max_pos,
    page_size,
    BLOCK_D: tl.constexpr,
    BLOCK_HD: tl.constexpr,
    BLOCK_P: tl.constexpr,
):
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    p = tl.minimum(tl.load(seq_lens_ptr + slot), max_pos)
    tl.store(pos_out + b, p)
    tl.store(lens_out + b, p + 1)
    token = tl.load(last_ptr + slot)
    _copy_row(embed_ptr + token * stride_embed, x_out + b * D, D, BLOCK_D)
    _copy_row(cos_ptr + p * stride_rope, cos_out + b * HD, HD, BLOCK_HD)
    _copy_row(sin_ptr + p * stride_rope, sin_out + b * HD, HD, BLOCK_HD)
    table = tables_ptr + slot * stride_tables
    page = tl.load(table + p // page_size)
    tl.store(rows_out + b, page * page_size + p % page_size)
    _copy_row(table, tables_out + b * PAGES, PAGES, BLOCK_P)


def decode_inputs(
    slots: torch.Tensor,
    seq_lens: torch.Tensor,
    last_tokens: torch.Tensor,
    embed: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    block_tables: torch.Tensor,
    page_size: int,
) -> tuple[torch.Tensor, ...]:
    """What a decode step reads of ``slots`` [B], in one launch: ``(pos, x, cos, sin,
    rows, tables, lens)``, each with a row per slot ``s``: its position ``p = min(seq_lens[s],
    len(cos) - 1)``, ``embed[last_tokens[s]]``, ``cos``/``sin`` [max_seq_len, hd] at
    ``p``, its row in the paged cache (``block_tables[s, p // page_size] * page_size + p
    % page_size``), ``block_tables[s]`` and ``p + 1`` (the runner's ``DecodeInputs``)."""
    for name, t in (("embed", embed), ("cos", cos), ("sin", sin), ("block_tables", block_tables)):
        if t.dim() != 2 or t.stride(1) != 1:
            raise ValueError(f"{name} must be 2-D with unit column stride, got {tuple(t.shape)}")
    if cos.shape != sin.shape or cos.stride() != sin.stride():
        raise ValueError(f"cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must have one layout")
    b, d, (max_len, hd), pages = slots.shape[0], embed.shape[1], cos.shape, block_tables.shape[1]
    dev = embed.device
    pos = torch.empty(b, dtype=seq_lens.dtype, device=dev)
    out = (
        pos,
        torch.empty((b, d), dtype=embed.dtype, device=dev),
        torch.empty((b, hd), dtype=cos.dtype, device=dev),
        torch.empty((b, hd), dtype=sin.dtype, device=dev),
        torch.empty(b, dtype=torch.promote_types(block_tables.dtype, seq_lens.dtype), device=dev),
        torch.empty((b, pages), dtype=block_tables.dtype, device=dev),
        torch.empty_like(pos),
    )
    _decode_inputs_kernel[(b,)](
        slots,
        seq_lens,
        last_tokens,
        embed,
        cos,
        sin,
        block_tables,
        *out,
        d,
        hd,
        pages,
        embed.stride(0),
        cos.stride(0),
        block_tables.stride(0),
        max_len - 1,
        page_size,
        BLOCK_D=min(1024, triton.next_power_of_2(d)),
        BLOCK_HD=triton.next_power_of_2(hd),
        BLOCK_P=min(1024, triton.next_power_of_2(pages)),
    )
    return out


@triton.jit  # type: ignore[misc,untyped-decorator]
def _advance_kernel(  # type: ignore[no-untyped-def]
    slots_ptr, tokens_ptr, pos_ptr, last_ptr, steps_ptr, seq_lens_ptr, first_dummy
):
    b = tl.program_id(0)
    slot = tl.load(slots_ptr + b)
    if slot < first_dummy:
        tl.store(last_ptr + slot, tl.load(tokens_ptr + b))
        tl.store(steps_ptr + slot, tl.load(steps_ptr + slot) + 1)
        tl.store(seq_lens_ptr + slot, tl.load(pos_ptr + b) + 1)
    else:  # a padding row: its slot stays empty
        tl.store(seq_lens_ptr + slot, tl.zeros_like(tl.load(seq_lens_ptr + slot)))


def advance_slots(
    slots: torch.Tensor,
    tokens: torch.Tensor,
    pos: torch.Tensor,
    last_tokens: torch.Tensor,
    steps: torch.Tensor,
    seq_lens: torch.Tensor,
    first_dummy: int,
) -> None:
    """After a decode step: each slot ``s = slots[b]`` below ``first_dummy`` takes
    ``tokens[b]`` as its last token, one more step and length ``pos[b] + 1``; a padding
    row's slot (``first_dummy`` or above, named by any number of rows) keeps length 0.
    One launch (slots below ``first_dummy`` appear once in a step)."""
    _advance_kernel[(slots.shape[0],)](slots, tokens, pos, last_tokens, steps, seq_lens, first_dummy)
