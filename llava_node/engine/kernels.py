"""Triton kernels of the fused decode step: paged attention, RMSNorm, SiLU*up, RoPE + cache store.

The batch-1 GEMV lives in :mod:`~llava_node.engine.gemv`, a decode step's slot
bookkeeping in :mod:`~llava_node.engine.step_state` (both re-exported here). The decode
step's kernels take ``pdl``: launched with programmatic dependent launch
(:mod:`~llava_node.engine.launch`), each program waits for the previous kernel first.

Every wrapper here is CUDA-graph capturable: it launches kernels whose grids depend on
tensor *shapes* only, allocates its outputs with ``torch.empty`` and never reads a
tensor's values on the host. Values that vary from step to step (sequence lengths,
block tables, cache rows) are read inside the kernels.

The kernels also run under Triton's CPU interpreter (``TRITON_INTERPRET=1``) on CPU
tensors, which is how the tests check them against pure-torch references.

Paged KV cache layout (see ``kv_cache.py``): ``k_cache``/``v_cache`` are
``[num_pages * page_size, n_kv_heads, head_dim]``; position ``p`` of batch row ``b``
lives at cache row ``block_tables[b, p // page_size] * page_size + p % page_size``.
The cache holds the model's dtype or float8 e4m3 (``LLAVA_KV_CACHE_DTYPE=fp8``): the
attention kernels convert what they read to the queries' dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from llava_node.engine.gemv import GEMV_FP8_CONFIG, GemvConfig, gemv, gemv_glu, gemv_norm, silu_times
from llava_node.engine.launch import num_sms, pdl_enter, pdl_options
from llava_node.engine.step_state import advance_slots, decode_inputs

__all__ = [
    "GEMV_FP8_CONFIG",
    "GemvConfig",
    "NewRow",
    "add_rms_norm",
    "advance_slots",
    "decode_inputs",
    "decode_num_splits",
    "decode_semaphores",
    "fp8_matmul",
    "gemv",
    "gemv_glu",
    "gemv_norm",
    "paged_decode_attention",
    "paged_prefill_attention",
    "rms_norm",
    "rope_decode_attention",
    "rope_store",
    "silu_mul",
    "uses_group_kernel",
]

# Programs the split-K decode attention aims to launch, per streaming multiprocessor.
# Measured on an H100 (CUDA graphs, bf16, D=128): with uniform lengths (600-750) 2-3 was
# best (each extra partition costs ~3-5 us: the reduction launch and the partials), while
# batches whose lengths differ a lot gain from more partitions (B=8, one row of 4000 and
# seven of 20: 71 us at 3, 56 us at 4, 48 us at 6). 3 is the compromise.
PROGRAMS_PER_SM = 3
# ... for one row (batch-1 decode), where no row's length differs from another's: 2 took
# 3.73 ms a 7B decode step on an H200, against 3.78 with 3 and 3.75 with 1 (issue 18).
PROGRAMS_PER_SM_ONE_ROW = 2
# Upper bound on the split-K partitions of one (row, head).
MAX_SPLITS = 32


@dataclass(frozen=True)
class DecodeConfig:
    """Launch parameters of one decode attention kernel."""

    block_n: int  # key/value positions per loop iteration
    num_warps: int
    num_stages: int | None = None  # None: Triton's default


# Chosen on an H100 (Triton 3.6, bf16, D=128, page_size 16), timed in CUDA graphs over
# per-layer caches (cold L2). The group kernel is the default for every head layout: with
# KVH = H = 32 it reached 2.85 TB/s at B=32 and 2.93 TB/s at B=64 (lens 600-750), at least
# as fast as the heads kernel at every batch size tried, and faster with GQA.
# One program per (row, KV head, split): the group's query heads on the tensor cores.
GROUPS_CONFIG = DecodeConfig(block_n=64, num_warps=4, num_stages=2)
# Over a float8 cache (LLAVA_KV_CACHE_DTYPE=fp8; H100, B=32, lens 680, H = KVH = 32, by
# scripts/tune_decode_attention.py): the heads kernel with HEADS_CONFIG took 84 us a layer,
# the best group kernel (this config, 2 splits) 101 us, the bf16 cache's best 124 us.
# Without grouped heads (H = KVH) the heads kernel is therefore the default over float8.
GROUPS_CONFIG_FP8 = DecodeConfig(block_n=128, num_warps=4, num_stages=2)
# One program per (row, query head, split), elementwise on the CUDA cores (the alternative).
HEADS_CONFIG = DecodeConfig(block_n=32, num_warps=4)
# Finite "minus infinity" for running maxima: keeps exp2(m_old - m_new) free of NaN
# when nothing has been seen yet (exp2(-inf - -inf) would be NaN).
_NEG_BIG = tl.constexpr(-1.0e30)
_LOG2E = 1.4426950408889634


@triton.jit  # type: ignore[misc,untyped-decorator]
def _round_e4m3(x):  # type: ignore[no-untyped-def]
    # float32 x rounded to the nearest float8 e4m3 value (ties to even), saturating at
    # +-448 (kv_cache.FP8_MAX), so that the conversion to the cache's float8 that follows is exact. Rounding
    # here, not in the conversion: Triton's CPU interpreter rounds float8 conversions
    # wrongly (carries into the exponent are lost), and with the rounding done here the
    # GPU and the interpreter store the same bits, those torch's conversion stores.
    a = tl.minimum(tl.abs(x), 448.0)
    bits = a.to(tl.int32, bitcast=True)
    # normal range: keep 3 mantissa bits, round half to even (a carry moves the exponent)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)
    # below 2**-6 (subnormal in e4m3) the step is 2**-9: adding 2**14 rounds there
    tiny = (a + 16384.0) - 16384.0
    r = tl.where(a < 0.015625, tiny, normal)
    # x's sign bit on the result, so that what rounds to zero keeps it (-0.0), as torch
    # rounds (a negation compiles to 0 - r on the GPU, which gives +0.0)
    sign = x.to(tl.int32, bitcast=True) & -2147483648
    return (r.to(tl.int32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _cache_value(x, cache_ptr, KV_FP8: tl.constexpr):  # type: ignore[no-untyped-def]
    # x (any float dtype) as stored in the KV cache at cache_ptr.
    if KV_FP8:
        return _round_e4m3(x.to(tl.float32)).to(cache_ptr.dtype.element_ty)
    return x.to(cache_ptr.dtype.element_ty)


# --------------------------------------------------------------------------------------
# Decode attention over a paged KV cache (flash decoding: split-K + reduction)
# --------------------------------------------------------------------------------------
@triton.jit  # type: ignore[misc,untyped-decorator]
def _split_range(lens_ptr, b, split, num_splits, max_len, BLOCK_N: tl.constexpr):  # type: ignore[no-untyped-def]
    # Positions [start, end) of batch row b handled by partition `split`: the row's valid
    # length is cut into num_splits chunks of whole BLOCK_Ns; chunks past the end are empty.
    seq_len = tl.load(lens_ptr + b).to(tl.int64)
    seq_len = tl.minimum(tl.maximum(seq_len, 0), max_len)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)
    return start, end


@triton.jit  # type: ignore[misc,untyped-decorator]
def _decode_heads_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    qk_scale,
    max_len,
    H,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kr,
    stride_kh,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_od,
    GROUP: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    # One program per (batch row, query head, split). The online softmax runs per key
    # *lane*: each of the BLOCK_N lanes keeps its own running max, sum and [HEAD_DIM]
    # accumulator, so the loop body is elementwise apart from the q.k dot over HEAD_DIM
    # (within a warp); the lanes are merged once, after the loop.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(1)
    b = pid // H
    h = pid % H
    kvh = h // GROUP
    pdl_enter(USE_GDC)
    start, end = _split_range(lens_ptr, b, split, num_splits, max_len, BLOCK_N)

    d = tl.arange(0, HEAD_DIM)
    lane = tl.arange(0, BLOCK_N)
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + d * stride_qd).to(tl.float32) * qk_scale
    k_base = k_ptr + kvh * stride_kh + d[None, :] * stride_kd
    v_base = v_ptr + kvh * stride_vh + d[None, :] * stride_vd
    bt_row = bt_ptr + b * stride_btb

    m_i = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, HEAD_DIM], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + lane
        valid = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0)
        row = page * PAGE_SIZE + pos % PAGE_SIZE
        k = tl.load(k_base + row[:, None] * stride_kr, mask=valid[:, None], other=0.0)
        v = tl.load(v_base + row[:, None] * stride_vr, mask=valid[:, None], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], axis=1)  # log2 domain (scale * log2 e)
        s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p[:, None] * v.to(tl.float32)
        m_i = m_new

    # Merge the lanes. Lanes that saw nothing have m = _NEG_BIG, l = 0, acc = 0.
    m = tl.max(m_i, axis=0)
    w = tl.exp2(m_i - m)
    l_sum = tl.sum(l_i * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0)
    if not SPLIT:
        o = o / tl.where(l_sum > 0.0, l_sum, 1.0)
        tl.store(out_ptr + b * stride_ob + h * stride_oh + d * stride_od, o.to(out_ptr.dtype.element_ty))
    else:
        part = (b * H + h) * num_splits + split
        tl.store(part_acc_ptr + part * HEAD_DIM + d, o)
        tl.store(part_m_ptr + part, m)
        tl.store(part_l_ptr + part, l_sum)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _group_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):  # type: ignore[no-untyped-def]
    # One tile of keys/values (BLOCK_N positions, `valid` where real) into a group's
    # online softmax: the running max m_i, sum l_i and output accumulator acc.
    s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(valid[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit  # type: ignore[misc,untyped-decorator]
def _rotate(x_ptrs, partner_ptrs, mask, c, s, sign):  # type: ignore[no-untyped-def]
    # x * cos + rotate_half(x) * sin over whole heads (float32): `partner_ptrs` point at
    # x[(d + D/2) % D], `sign` is -1 on the first half and +1 on the second; each product
    # is rounded to x's dtype, as torch rounds it (the same values as _rope_tile's).
    dt = x_ptrs.dtype.element_ty
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    xp = tl.load(partner_ptrs, mask=mask, other=0.0).to(tl.float32)
    return (x * c).to(dt).to(tl.float32) + sign * (xp * s).to(dt).to(tl.float32)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _merge_partials(  # type: ignore[no-untyped-def]
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    first,
    num_splits,
    out_ptrs,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    # One head's output from its num_splits partitions' (max, sum, acc), stored at
    # partials first .. first + num_splits - 1; read from L2 (.cg): other programs wrote
    # them during this kernel.
    s = tl.arange(0, BLOCK_S)
    d = tl.arange(0, HEAD_DIM)
    s_mask = s < num_splits
    part = first + s
    m = tl.load(part_m_ptr + part, mask=s_mask, other=_NEG_BIG, cache_modifier=".cg")
    l_part = tl.load(part_l_ptr + part, mask=s_mask, other=0.0, cache_modifier=".cg")
    acc = tl.load(
        part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :],
        mask=s_mask[:, None],
        other=0.0,
        cache_modifier=".cg",
    )
    m_max = tl.max(m, axis=0)
    w = tl.exp2(m - m_max)
    l_sum = tl.sum(l_part * w, axis=0)
    o = tl.sum(acc * w[:, None], axis=0) / tl.where(l_sum > 0.0, l_sum, 1.0)
    tl.store(out_ptrs, o.to(out_ptrs.dtype.element_ty))


@triton.jit  # type: ignore[misc,untyped-decorator]
def _decode_groups_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    lens_ptr,
    out_ptr,
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    sem_ptr,
    k_new_ptr,
    v_new_ptr,
    cos_ptr,
    sin_ptr,
    rows_ptr,
    qk_scale,
    max_len,
    H,
    KVH,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kr,
    stride_kh,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_ob,
    stride_oh,
    stride_od,
    stride_knb,
    stride_knh,
    stride_knd,
    stride_vnb,
    stride_vnh,
    stride_vnd,
    stride_cb,
    stride_cd,
    stride_sb,
    stride_sd,
    GROUP: tl.constexpr,
    BLOCK_G: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    MERGE: tl.constexpr,
    BLOCK_S: tl.constexpr,
    ROPE: tl.constexpr,
    KV_FP8: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    # One program per (batch row, KV head, split): the GROUP query heads that share a KV
    # head are padded to BLOCK_G (>= 16) rows so that q.K^T and p.V run on the tensor
    # cores, and each K/V tile is read once for the whole group.
    # ROPE: q_ptr, k_new_ptr, v_new_ptr hold the new row's raw q, k, v (the QKV
    # projection's output); the program rotates q and k itself (rope_store's arithmetic),
    # uses the new key and value for the newest position, and the program whose partition
    # holds that position writes them to the cache at rows_ptr[b].
    # MERGE (with SPLIT): the last partition of (row, KV head) to finish merges all of
    # them (in split order) into the output: sem_ptr[pid] counts arrivals and is reset.
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    num_splits = tl.num_programs(1)
    b = pid // KVH
    kvh = pid % KVH
    # Before the wait for the previous kernel (PDL): the lengths and block tables (written
    # at the step's start) and the first tile's keys and values, all but the newest
    # position's, which the previous kernel (RoPE + store), or this one, writes.
    start, end = _split_range(lens_ptr, b, split, num_splits, max_len, BLOCK_N)
    newest = tl.minimum(tl.maximum(tl.load(lens_ptr + b).to(tl.int64), 0), max_len) - 1

    d = tl.arange(0, HEAD_DIM)
    g = tl.arange(0, BLOCK_G)
    lane = tl.arange(0, BLOCK_N)
    g_mask = g < GROUP
    h = kvh * GROUP + g
    k_base = k_ptr + kvh * stride_kh + d[None, :] * stride_kd
    v_base = v_ptr + kvh * stride_vh + d[None, :] * stride_vd
    bt_row = bt_ptr + b * stride_btb
    dt = q_ptr.dtype.element_ty
    pos = start + lane
    valid = pos < end
    page = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0)
    rows = (page * PAGE_SIZE + pos % PAGE_SIZE)[:, None]
    old = (valid & (pos != newest))[:, None]
    k = tl.load(k_base + rows * stride_kr, mask=old, other=0.0).to(dt)
    v = tl.load(v_base + rows * stride_vr, mask=old, other=0.0).to(dt)
    pdl_enter(USE_GDC)
    fresh = (valid & (pos == newest))[:, None]
    q_row = q_ptr + b * stride_qb + h[:, None] * stride_qh
    if ROPE:
        # the rotary tables at the new row's position; partner dims (d + D/2) % D
        half = HEAD_DIM // 2
        dp = (d + half) % HEAD_DIM
        sign = tl.where(d < half, -1.0, 1.0)
        c = tl.load(cos_ptr + b * stride_cb + d * stride_cd).to(tl.float32)
        sn = tl.load(sin_ptr + b * stride_sb + d * stride_sd).to(tl.float32)
        q = _rotate(
            q_row + d[None, :] * stride_qd,
            q_row + dp[None, :] * stride_qd,
            g_mask[:, None],
            c[None, :],
            sn[None, :],
            sign[None, :],
        ).to(dt)
        kn_row = k_new_ptr + b * stride_knb + kvh * stride_knh
        k_new = _rotate(kn_row + d * stride_knd, kn_row + dp * stride_knd, d < HEAD_DIM, c, sn, sign)
        # rounded to k's dtype (as torch computes it), then to the cache's, as stored
        k_new = _cache_value(k_new.to(k_new_ptr.dtype.element_ty), k_ptr, KV_FP8)
        v_new = _cache_value(
            tl.load(v_new_ptr + b * stride_vnb + kvh * stride_vnh + d * stride_vnd), v_ptr, KV_FP8
        )
        # this program's partition holds the newest position: it writes (a [HEAD_DIM] mask)
        writes = (newest - start >= d * 0) & (end - newest > d * 0)
        new_row = tl.load(rows_ptr + b).to(tl.int64)
        tl.store(k_ptr + new_row * stride_kr + kvh * stride_kh + d * stride_kd, k_new, mask=writes)
        tl.store(v_ptr + new_row * stride_vr + kvh * stride_vh + d * stride_vd, v_new, mask=writes)
        k_new = k_new.to(dt)
        v_new = v_new.to(dt)
        k = tl.where(fresh, k_new[None, :], k)
        v = tl.where(fresh, v_new[None, :], v)
    else:
        k = tl.where(fresh, tl.load(k_base + rows * stride_kr, mask=fresh, other=0.0).to(dt), k)
        v = tl.where(fresh, tl.load(v_base + rows * stride_vr, mask=fresh, other=0.0).to(dt), v)
        # q in its own dtype (the model's); keys and values are converted to it as they
        # are read (a no-op unless the cache holds float8)
        q = tl.load(q_row + d[None, :] * stride_qd, mask=g_mask[:, None], other=0.0)
    m_i = tl.full([BLOCK_G], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, HEAD_DIM], tl.float32)
    m_i, l_i, acc = _group_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    for n0 in range(start + BLOCK_N, end, BLOCK_N):
        pos = n0 + lane
        valid = pos < end
        page = tl.load(bt_row + pos // PAGE_SIZE, mask=valid, other=0)
        row = (page * PAGE_SIZE + pos % PAGE_SIZE)[:, None]
        if ROPE:  # the newest position from registers (this kernel writes it)
            old = (valid & (pos != newest))[:, None]
            fresh = (valid & (pos == newest))[:, None]
            k = tl.where(fresh, k_new[None, :], tl.load(k_base + row * stride_kr, mask=old, other=0.0).to(dt))
            v = tl.where(fresh, v_new[None, :], tl.load(v_base + row * stride_vr, mask=old, other=0.0).to(dt))
        else:
            k = tl.load(k_base + row * stride_kr, mask=valid[:, None], other=0.0).to(dt)
            v = tl.load(v_base + row * stride_vr, mask=valid[:, None], other=0.0).to(dt)
        m_i, l_i, acc = _group_tile(q, k, v, valid, m_i, l_i, acc, qk_scale, DOT_PRECISION)

    if not SPLIT:
        o = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
        tl.store(
            out_ptr + b * stride_ob + h[:, None] * stride_oh + d[None, :] * stride_od,
            o.to(out_ptr.dtype.element_ty),
            mask=g_mask[:, None],
        )
    else:
        part = (b * H + h) * num_splits + split
        tl.store(part_acc_ptr + part[:, None] * HEAD_DIM + d[None, :], acc, mask=g_mask[:, None])
        tl.store(part_m_ptr + part, m_i, mask=g_mask)
        tl.store(part_l_ptr + part, l_i, mask=g_mask)
        if MERGE:
            # Every thread's partials are stored before the arrival is counted (the
            # barrier, then a release at GPU scope); the last arrival acquires them all.
            tl.debug_barrier()
            arrived = tl.atomic_add(sem_ptr + pid, 1, sem="acq_rel", scope="gpu")
            if arrived == num_splits - 1:
                tl.atomic_xchg(sem_ptr + pid, 0, sem="relaxed", scope="gpu")  # for the next launch
                for gi in tl.static_range(GROUP):
                    head = kvh * GROUP + gi
                    _merge_partials(
                        part_acc_ptr,
                        part_m_ptr,
                        part_l_ptr,
                        (b * H + head) * num_splits,
                        num_splits,
                        out_ptr + b * stride_ob + head * stride_oh + d * stride_od,
                        BLOCK_S,
                        HEAD_DIM,
                    )


@triton.jit  # type: ignore[misc,untyped-decorator]
def _decode_reduce_kernel(  # type: ignore[no-untyped-def]
    part_acc_ptr,
    part_m_ptr,
    part_l_ptr,
    out_ptr,
    H,
    num_splits,
    stride_ob,
    stride_oh,
    stride_od,
    BLOCK_S: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    # One program per (batch row, query head): merge the partitions' (max, sum, acc).
    pid = tl.program_id(0).to(tl.int64)
    b = pid // H
    h = pid % H
    pdl_enter(USE_GDC)
    d = tl.arange(0, HEAD_DIM)
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + d * stride_od
    _merge_partials(
        part_acc_ptr, part_m_ptr, part_l_ptr, pid * num_splits, num_splits, out_ptrs, BLOCK_S, HEAD_DIM
    )


def _num_sms(device: torch.device) -> int:
    return num_sms(device)


def decode_num_splits(
    batch: int, heads_per_row: int, max_len: int, device: torch.device, block_n: int = 64
) -> int:
    """Split-K partitions per (row, head) for the decode attention, from shapes only.

    Aims at ``PROGRAMS_PER_SM * SMs`` programs in all (``PROGRAMS_PER_SM_ONE_ROW`` for
    one row): a batch that already launches that
    many programs per partition (``batch * heads_per_row``; ``heads_per_row`` is the KV
    heads for the group kernel) gets 1 partition and no reduction pass; a smaller one gets
    enough partitions to fill the GPU, at most one per ``block_n`` positions of the longest
    possible sequence (``max_len``) and at most ``MAX_SPLITS``. Each row's *valid* length
    is then cut into that many equal parts (whole ``block_n`` blocks) inside the kernel,
    so every row spreads over the partitions; partitions past a row's end exit at once
    with neutral results (max = -1e30, sum = 0, acc = 0).
    """
    programs = max(1, batch * heads_per_row)
    target = (PROGRAMS_PER_SM_ONE_ROW if batch == 1 else PROGRAMS_PER_SM) * _num_sms(device)
    splits = triton.cdiv(target, programs)
    return int(max(1, min(splits, MAX_SPLITS, triton.cdiv(max(max_len, 1), block_n))))


@dataclass(frozen=True)
class NewRow:
    """The new row's raw (not yet rotated) q, k, v of a decode step, as
    :func:`rope_decode_attention` takes them: q ``[B, H, D]``, k and v ``[B, KVH, D]`` (views
    of the QKV projection's output are fine), the rotary tables ``cos``/``sin`` ``[B, D]``
    at each row's position, and ``rows`` ``[B]`` (int64), the cache row of that position."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    rows: torch.Tensor


def uses_group_kernel(cache_dtype: torch.dtype, n_heads: int, n_kv_heads: int) -> bool:
    """Whether the decode attention runs the group kernel by default (``group_kernel=None``):
    always, but over a float8 cache without grouped heads (``H == KVH``) the heads kernel,
    which was faster there; :func:`rope_decode_attention` is the group kernel's."""
    return not (torch.empty((), dtype=cache_dtype).element_size() == 1 and n_heads == n_kv_heads)


def decode_semaphores(batch: int, n_kv_heads: int, device: torch.device) -> torch.Tensor:
    """Arrival counters for the decode attention's in-kernel merge (``semaphores`` of
    :func:`paged_decode_attention`): zeros, one per (row, KV head) of a batch of up to
    ``batch`` rows. Each launch leaves them at zero; launches that share them must run
    one after another (one stream)."""
    return torch.zeros(max(1, batch * n_kv_heads), dtype=torch.int32, device=device)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    page_size: int,
    *,
    num_splits: int | None = None,
    group_kernel: bool | None = None,
    semaphores: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """Attention of one query token per batch row over that row's paged KV cache.

    Args:
        q: ``[B, H, D]`` queries (any strides).
        k_cache, v_cache: ``[num_pages * page_size, KVH, D]``; ``H`` is a multiple of ``KVH``
            and query head ``h`` reads KV head ``h // (H // KVH)``.
        block_tables: ``[B, max_pages_per_seq]`` int64 page ids of each row.
        lens: ``[B]`` int64 valid positions of each row (``0 .. lens[b] - 1`` are read; a row
            with ``lens == 0`` gets zeros).
        scale: softmax scale (usually ``1 / sqrt(D)``).
        page_size: positions per page.
        num_splits: split-K partitions; ``None`` chooses from the shapes
            (:func:`decode_num_splits`).
        group_kernel: True: one program per (row, KV head, split) handles all the query
            heads of that KV head with tensor-core dots (padded to 16 rows), reading each K/V
            tile once. False: one program per (row, query head, split), elementwise. None
            (default): the group kernel, but over a float8 cache without grouped heads
            (``H == KVH``) the heads kernel, which was faster there.
        semaphores: with the group kernel and several partitions, counters from
            :func:`decode_semaphores` (at least ``B * KVH``): the partitions are merged inside the
            kernel, by the last one of each (row, KV head) to finish, instead of by a
            second kernel. The same arithmetic in the same order: the same bits.
        pdl: launched with programmatic dependent launch (:mod:`~llava_node.engine.launch`).

    Returns:
        ``[B, H, D]`` in ``q``'s dtype. Softmax statistics and accumulation are float32.
    """
    return _decode_attention(
        q,
        k_cache,
        v_cache,
        block_tables,
        lens,
        scale,
        page_size,
        num_splits,
        group_kernel,
        semaphores,
        None,
        pdl,
    )


def rope_decode_attention(
    new: NewRow,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    page_size: int,
    *,
    num_splits: int | None = None,
    semaphores: torch.Tensor | None = None,
    pdl: bool = False,
) -> torch.Tensor:
    """:func:`rope_store` then :func:`paged_decode_attention`, in one launch (the group
    kernel): a decode step's attention from the QKV projection's raw output.

    Each program rotates its heads' queries and the new key itself; the new key and value
    are written to the cache at ``new.rows[b]``, which must be the cache row of position
    ``lens[b] - 1`` (rows with ``lens == 0`` write nothing), and the attention reads that
    position from registers. The results, and the cache, are those of the two calls.
    ``new.q`` is not modified (``rope_store`` rotates it in place).
    """
    batch, _, head_dim = new.q.shape
    n_kv_heads = k_cache.shape[1]
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, not {head_dim}")
    if new.k.shape != (batch, n_kv_heads, head_dim) or new.v.shape != new.k.shape:
        raise ValueError(f"k {tuple(new.k.shape)} / v {tuple(new.v.shape)} do not fit q {tuple(new.q.shape)}")
    if new.cos.shape != (batch, head_dim) or new.sin.shape != new.cos.shape:
        raise ValueError(
            f"cos/sin must be [{batch}, {head_dim}], got {tuple(new.cos.shape)}/{tuple(new.sin.shape)}"
        )
    if new.rows.shape != (batch,):
        raise ValueError(f"rows must be [{batch}], got {tuple(new.rows.shape)}")
    return _decode_attention(
        new.q, k_cache, v_cache, block_tables, lens, scale, page_size, num_splits, True, semaphores, new, pdl
    )


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    page_size: int,
    num_splits: int | None,
    group_kernel: bool | None,
    sems: torch.Tensor | None,
    new: NewRow | None,
    pdl: bool,
) -> torch.Tensor:
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not divide into {n_kv_heads} KV heads")
    if k_cache.shape[2] != head_dim or v_cache.shape != k_cache.shape:
        raise ValueError(
            f"cache shapes {tuple(k_cache.shape)}/{tuple(v_cache.shape)} do not fit q {tuple(q.shape)}"
        )
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, not {head_dim}")
    group = n_heads // n_kv_heads
    if group_kernel is None:
        group_kernel = uses_group_kernel(k_cache.dtype, n_heads, n_kv_heads)
    max_len = block_tables.shape[1] * page_size
    cfg = (
        (GROUPS_CONFIG_FP8 if k_cache.element_size() == 1 else GROUPS_CONFIG)
        if group_kernel
        else HEADS_CONFIG
    )
    block_n = cfg.block_n
    launch: dict[str, Any] = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        launch["num_stages"] = cfg.num_stages
    if num_splits is None:
        heads_per_row = n_kv_heads if group_kernel else n_heads
        num_splits = decode_num_splits(batch, heads_per_row, max_len, q.device, block_n)
    merge = bool(group_kernel and num_splits > 1 and sems is not None)
    if merge:
        assert sems is not None
        if sems.dtype != torch.int32 or sems.numel() < batch * n_kv_heads:
            raise ValueError(f"semaphores must be int32 of at least {batch * n_kv_heads}, got {sems.numel()}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if batch == 0:
        return out
    if num_splits > 1:
        part_acc = torch.empty((batch * n_heads * num_splits, head_dim), dtype=torch.float32, device=q.device)
        part_m = torch.empty((batch * n_heads * num_splits,), dtype=torch.float32, device=q.device)
        part_l = torch.empty_like(part_m)
    else:  # unused by the kernel (the constexpr branch that stores them is not compiled)
        part_acc = part_m = part_l = out
    qk_scale = float(scale) * _LOG2E
    common: tuple[Any, ...] = (
        q.stride(0),
        q.stride(1),
        q.stride(2),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        out.stride(2),
    )
    if group_kernel:
        precision = "ieee" if q.dtype == torch.float32 else "tf32"
        rope: tuple[Any, ...] = (out,) * 5 + (0,) * 10  # unused without ROPE
        if new is not None:
            rope = (
                new.k,
                new.v,
                new.cos,
                new.sin,
                new.rows,
                *new.k.stride(),
                *new.v.stride(),
                *new.cos.stride(),
                *new.sin.stride(),
            )
        _decode_groups_kernel[(batch * n_kv_heads, num_splits)](
            q,
            k_cache,
            v_cache,
            block_tables,
            lens,
            out,
            part_acc,
            part_m,
            part_l,
            sems if merge else out,
            *rope[:5],
            qk_scale,
            max_len,
            n_heads,
            n_kv_heads,
            *common,
            *rope[5:],
            GROUP=group,
            BLOCK_G=max(16, triton.next_power_of_2(group)),
            PAGE_SIZE=page_size,
            HEAD_DIM=head_dim,
            BLOCK_N=block_n,
            SPLIT=num_splits > 1,
            MERGE=merge,
            BLOCK_S=triton.next_power_of_2(num_splits),
            ROPE=new is not None,
            KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
            DOT_PRECISION=precision,
            **launch,
            **pdl_options(pdl),
        )
    else:
        _decode_heads_kernel[(batch * n_heads, num_splits)](
            q,
            k_cache,
            v_cache,
            block_tables,
            lens,
            out,
            part_acc,
            part_m,
            part_l,
            qk_scale,
            max_len,
            n_heads,
            *common,
            GROUP=group,
            PAGE_SIZE=page_size,
            HEAD_DIM=head_dim,
            BLOCK_N=block_n,
            SPLIT=num_splits > 1,
            **launch,
            **pdl_options(pdl),
        )
    if num_splits > 1 and not merge:
        _decode_reduce_kernel[(batch * n_heads,)](
            part_acc,
            part_m,
            part_l,
            out,
            n_heads,
            num_splits,
            out.stride(0),
            out.stride(1),
            out.stride(2),
            BLOCK_S=triton.next_power_of_2(num_splits),
            HEAD_DIM=head_dim,
            num_warps=4,
            **pdl_options(pdl),
        )
    return out


# --------------------------------------------------------------------------------------
# Prompt attention over a paged KV cache (a chunk of one or more prompts, flash-style)
# --------------------------------------------------------------------------------------
# Query rows per program of the prompt attention (a prompt's rows are padded to it).
PREFILL_BLOCK_M = 64
PREFILL_CONFIG = DecodeConfig(block_n=64, num_warps=4, num_stages=2)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _prefill_attention_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    bt_ptr,
    block_slot_ptr,
    pos_ptr,
    out_ptr,
    qk_scale,
    GROUP,
    stride_qm,
    stride_qh,
    stride_qd,
    stride_kr,
    stride_kh,
    stride_kd,
    stride_vr,
    stride_vh,
    stride_vd,
    stride_btb,
    stride_om,
    stride_oh,
    stride_od,
    PAGE_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # One program per (block of BLOCK_M query rows, query head). Every row of a block
    # belongs to the same sequence (its slot: block_slot[block]); row m sits at position
    # pos[m] and sees positions 0..pos[m] of that sequence, whose keys and values (its
    # own included) are already in the cache. Rows with pos < 0 are padding: zeros out.
    blk = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    kvh = h // GROUP
    m = blk * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    lane = tl.arange(0, BLOCK_N)
    pos = tl.load(pos_ptr + m)
    real = pos >= 0
    q = tl.load(q_ptr + m[:, None] * stride_qm + h * stride_qh + d[None, :] * stride_qd)
    slot = tl.load(block_slot_ptr + blk)
    bt_row = bt_ptr + slot * stride_btb
    k_base = k_ptr + kvh * stride_kh + d[None, :] * stride_kd
    v_base = v_ptr + kvh * stride_vh + d[None, :] * stride_vd
    end = tl.max(pos, axis=0) + 1  # keys the block's last row sees

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    for n0 in range(0, end, BLOCK_N):
        n = n0 + lane
        valid = n < end
        page = tl.load(bt_row + n // PAGE_SIZE, mask=valid, other=0)
        row = page * PAGE_SIZE + n % PAGE_SIZE
        k = tl.load(k_base + row[:, None] * stride_kr, mask=valid[:, None], other=0.0).to(q.dtype)
        v = tl.load(v_base + row[:, None] * stride_vr, mask=valid[:, None], other=0.0).to(q.dtype)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n[None, :] <= pos[:, None], s, _NEG_BIG)
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    o = tl.where(real[:, None], acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None], 0.0)
    tl.store(
        out_ptr + m[:, None] * stride_om + h * stride_oh + d[None, :] * stride_od,
        o.to(out_ptr.dtype.element_ty),
    )


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    block_slots: torch.Tensor,
    pos: torch.Tensor,
    scale: float,
    page_size: int,
    *,
    block_m: int = PREFILL_BLOCK_M,
) -> torch.Tensor:
    """Causal attention of prompt rows over their sequences' paged KV caches.

    Args:
        q: ``[M, H, D]`` queries (any strides), ``M`` a multiple of ``block_m``; each block
            of ``block_m`` rows belongs to one sequence.
        k_cache, v_cache: ``[num_pages * page_size, KVH, D]``, the rows' own keys and
            values already stored.
        block_tables: ``[slots, max_pages_per_seq]`` int64 page ids of each slot.
        block_slots: ``[M // block_m]`` int64 slot of each block of rows.
        pos: ``[M]`` int64 position of each row (it sees positions ``0..pos``); ``-1``
            marks a padding row, whose output is zeros.
        scale: softmax scale (usually ``1 / sqrt(D)``).
        page_size: positions per page.

    Returns:
        ``[M, H, D]`` in ``q``'s dtype. Softmax statistics and accumulation are float32.
    """
    rows, n_heads, head_dim = q.shape
    n_kv_heads = k_cache.shape[1]
    if n_heads % n_kv_heads:
        raise ValueError(f"{n_heads} query heads do not divide into {n_kv_heads} KV heads")
    if rows % block_m or block_slots.shape != (rows // block_m,) or pos.shape != (rows,):
        raise ValueError(
            f"{rows} rows must be whole blocks of {block_m}, with a slot per block and a position per row"
        )
    if head_dim & (head_dim - 1) or head_dim < 16:
        raise ValueError(f"head_dim must be a power of two >= 16, not {head_dim}")
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if rows == 0:
        return out
    cfg = PREFILL_CONFIG
    launch: dict[str, Any] = {"num_warps": cfg.num_warps}
    if cfg.num_stages is not None:
        launch["num_stages"] = cfg.num_stages
    _prefill_attention_kernel[(rows // block_m, n_heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        block_slots,
        pos,
        out,
        float(scale) * _LOG2E,
        n_heads // n_kv_heads,
        *q.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        block_tables.stride(0),
        *out.stride(),
        PAGE_SIZE=page_size,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=cfg.block_n,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        **launch,
    )
    return out


# --------------------------------------------------------------------------------------
# RMSNorm, with and without the residual add
# --------------------------------------------------------------------------------------
@triton.jit  # type: ignore[misc,untyped-decorator]
def _rms_norm_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    w_ptr,
    y_ptr,
    res_out_ptr,
    n_cols,
    eps,
    stride_x,
    stride_res,
    stride_y,
    stride_res_out,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    pdl_enter(USE_GDC)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0)
        summed = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * stride_res_out + cols, summed, mask=mask)
        h = summed.to(tl.float32)
    else:
        h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n_cols
    normed = (h * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # weight * normed in the promoted dtype, rounded once, as torch computes it.
    y = w.to(tl.float32) * normed.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _norm_warps(block: int) -> int:
    return max(1, min(8, block // 512))


def _check_norm_args(x: torch.Tensor, weight: torch.Tensor) -> None:
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"x must be [N, hidden] with unit column stride, got {tuple(x.shape)}/{x.stride()}")
    if weight.shape != (x.shape[1],) or not weight.is_contiguous():
        raise ValueError(f"weight must be contiguous [{x.shape[1]}], got {tuple(weight.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False) -> torch.Tensor:
    """LlamaRMSNorm of each row of ``x`` ``[N, hidden]``.

    ``weight * (x32 * rsqrt(mean(x32**2) + eps)).to(x.dtype)``, with ``x32 = x.float()``;
    the result has the dtype torch would give (``weight``'s and ``x``'s promoted).
    """
    _check_norm_args(x, weight)
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    if n_rows == 0:
        return y
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(n_rows,)](
        x,
        x,
        weight,
        y,
        y,
        n_cols,
        float(eps),
        x.stride(0),
        x.stride(0),
        y.stride(0),
        y.stride(0),
        HAS_RESIDUAL=False,
        BLOCK=block,
        num_warps=_norm_warps(block),
        **pdl_options(pdl),
    )
    return y


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add then RMSNorm: ``h = x + residual``; returns ``(rms_norm(h), h)``.

    ``h`` is rounded to ``x``'s dtype (as ``x + residual`` in torch) before the norm's
    float32 statistics are taken. Inputs are not modified.
    """
    _check_norm_args(x, weight)
    if residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)}/{residual.dtype} does not match x {tuple(x.shape)}/{x.dtype}"
        )
    n_rows, n_cols = x.shape
    y = torch.empty((n_rows, n_cols), dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    new_residual = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows == 0:
        return y, new_residual
    block = triton.next_power_of_2(n_cols)
    _rms_norm_kernel[(n_rows,)](
        x,
        residual,
        weight,
        y,
        new_residual,
        n_cols,
        float(eps),
        x.stride(0),
        residual.stride(0),
        y.stride(0),
        new_residual.stride(0),
        HAS_RESIDUAL=True,
        BLOCK=block,
        num_warps=_norm_warps(block),
        **pdl_options(pdl),
    )
    return y, new_residual


# --------------------------------------------------------------------------------------
# SiLU(gate) * up
# --------------------------------------------------------------------------------------
@triton.jit  # type: ignore[misc,untyped-decorator]
def _silu_mul_kernel(  # type: ignore[no-untyped-def]
    gu_ptr,
    out_ptr,
    n_cols,
    stride_gu,
    stride_out,
    BLOCK: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    pdl_enter(USE_GDC)
    gate = tl.load(gu_ptr + row * stride_gu + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(gu_ptr + row * stride_gu + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = silu_times(gate, up, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


SILU_BLOCK = 1024


def silu_mul(gate_up: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` of shape ``[N, 2F]``; returns ``[N, F]``.

    Computed in float32, rounding ``silu(gate)`` and the product to ``gate_up``'s dtype,
    as torch's ``F.silu(gate) * up`` does: the same numbers as transformers' MLP.
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2 or gate_up.stride(1) != 1:
        raise ValueError(f"gate_up must be [N, 2F] with unit column stride, got {tuple(gate_up.shape)}")
    n_rows, width = gate_up.shape
    n_cols = width // 2
    out = torch.empty((n_rows, n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if n_rows == 0 or n_cols == 0:
        return out
    block = min(SILU_BLOCK, triton.next_power_of_2(n_cols))
    _silu_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
        gate_up,
        out,
        n_cols,
        gate_up.stride(0),
        out.stride(0),
        BLOCK=block,
        num_warps=4,
        **pdl_options(pdl),
    )
    return out


# --------------------------------------------------------------------------------------
# RoPE on q and k, and the KV-cache store, in one launch
# --------------------------------------------------------------------------------------
@triton.jit  # type: ignore[misc,untyped-decorator]
def _rope_tile(x_ptr, n_heads, stride_h, stride_d, c1, c2, s1, s2, BLOCK_H: tl.constexpr, HALF: tl.constexpr):  # type: ignore[no-untyped-def]
    # Rotated halves of a [n_heads, 2 * HALF] tile: x * cos + rotate_half(x) * sin, with
    # torch's roundings in x's dtype (each product rounded, then the sum), as transformers'
    # apply_rotary_pos_emb rounds.
    dt = x_ptr.dtype.element_ty
    hh = tl.arange(0, BLOCK_H)
    j = tl.arange(0, HALF)
    mask = (hh < n_heads)[:, None]
    base = x_ptr + hh[:, None] * stride_h + j[None, :] * stride_d
    x1 = tl.load(base, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF * stride_d, mask=mask, other=0.0).to(tl.float32)
    o1 = (x1 * c1[None, :]).to(dt).to(tl.float32) - (x2 * s1[None, :]).to(dt).to(tl.float32)
    o2 = (x2 * c2[None, :]).to(dt).to(tl.float32) + (x1 * s2[None, :]).to(dt).to(tl.float32)
    return o1, o2


@triton.jit  # type: ignore[misc,untyped-decorator]
def _rope_store_kernel(  # type: ignore[no-untyped-def]
    q_ptr,
    k_ptr,
    v_ptr,
    cos_ptr,
    sin_ptr,
    kc_ptr,
    vc_ptr,
    rows_ptr,
    H,
    KVH,
    stride_qb,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vh,
    stride_vd,
    stride_cb,
    stride_cd,
    stride_sb,
    stride_sd,
    stride_kcr,
    stride_kch,
    stride_kcd,
    stride_vcr,
    stride_vch,
    stride_vcd,
    HALF: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_KVH: tl.constexpr,
    KV_FP8: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    # One program per batch row: rotate q in place, rotate k into the cache, copy v.
    b = tl.program_id(0).to(tl.int64)
    pdl_enter(USE_GDC)
    j = tl.arange(0, HALF)
    c1 = tl.load(cos_ptr + b * stride_cb + j * stride_cd).to(tl.float32)
    c2 = tl.load(cos_ptr + b * stride_cb + (j + HALF) * stride_cd).to(tl.float32)
    s1 = tl.load(sin_ptr + b * stride_sb + j * stride_sd).to(tl.float32)
    s2 = tl.load(sin_ptr + b * stride_sb + (j + HALF) * stride_sd).to(tl.float32)

    hq = tl.arange(0, BLOCK_H)
    q_row = q_ptr + b * stride_qb
    q1, q2 = _rope_tile(q_row, H, stride_qh, stride_qd, c1, c2, s1, s2, BLOCK_H, HALF)
    q_dst = q_row + hq[:, None] * stride_qh + j[None, :] * stride_qd
    q_mask = (hq < H)[:, None]
    tl.store(q_dst, q1.to(q_ptr.dtype.element_ty), mask=q_mask)
    tl.store(q_dst + HALF * stride_qd, q2.to(q_ptr.dtype.element_ty), mask=q_mask)

    row = tl.load(rows_ptr + b).to(tl.int64)
    hk = tl.arange(0, BLOCK_KVH)
    kv_mask = (hk < KVH)[:, None]
    k1, k2 = _rope_tile(k_ptr + b * stride_kb, KVH, stride_kh, stride_kd, c1, c2, s1, s2, BLOCK_KVH, HALF)
    # k is rounded to its own dtype first (as torch computes it), then to the cache's
    kdt = k_ptr.dtype.element_ty
    kc_dst = kc_ptr + row * stride_kcr + hk[:, None] * stride_kch + j[None, :] * stride_kcd
    tl.store(kc_dst, _cache_value(k1.to(kdt), kc_ptr, KV_FP8), mask=kv_mask)
    tl.store(kc_dst + HALF * stride_kcd, _cache_value(k2.to(kdt), kc_ptr, KV_FP8), mask=kv_mask)

    d = tl.arange(0, 2 * HALF)
    v = tl.load(v_ptr + b * stride_vb + hk[:, None] * stride_vh + d[None, :] * stride_vd, mask=kv_mask)
    vc_dst = vc_ptr + row * stride_vcr + hk[:, None] * stride_vch + d[None, :] * stride_vcd
    tl.store(vc_dst, _cache_value(v, vc_ptr, KV_FP8), mask=kv_mask)


def rope_store(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """Rotary embedding of q and k, and the KV-cache write, in one launch.

    Args:
        q: ``[B, H, D]``, rotated **in place** (views, e.g. of a fused QKV output, are fine).
        k, v: ``[B, KVH, D]``; not modified.
        cos, sin: ``[B, D]``, each row's rotary table at that row's position.
        k_cache, v_cache: ``[num_pages * page_size, KVH, D]``; rotated k and raw v are
            written at cache row ``rows[b]``, in the cache's dtype (float8 e4m3: rounded to
            nearest, saturating at +-448, as :func:`~llava_node.engine.kv_cache.to_cache_dtype` rounds).
        rows: ``[B]`` int64 cache rows.

    Returns:
        ``q`` (rotated): ``x * cos + rotate_half(x) * sin`` with
        ``rotate_half(x) = cat(-x[..., D/2:], x[..., :D/2])``, rounded as torch rounds it
        in ``q``'s dtype (each product, then the sum), as transformers does.
    """
    batch, n_heads, head_dim = q.shape
    n_kv_heads = k.shape[1]
    if head_dim % 2 or (head_dim // 2) & (head_dim // 2 - 1):
        raise ValueError(f"head_dim must be twice a power of two, not {head_dim}")
    if k.shape != (batch, n_kv_heads, head_dim) or v.shape != k.shape:
        raise ValueError(f"k {tuple(k.shape)} / v {tuple(v.shape)} do not fit q {tuple(q.shape)}")
    if cos.shape != (batch, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{batch}, {head_dim}], got {tuple(cos.shape)}/{tuple(sin.shape)}")
    if k_cache.shape[1:] != (n_kv_heads, head_dim) or v_cache.shape != k_cache.shape:
        raise ValueError(f"caches {tuple(k_cache.shape)} do not fit k {tuple(k.shape)}")
    if batch == 0:
        return q
    _rope_store_kernel[(batch,)](
        q,
        k,
        v,
        cos,
        sin,
        k_cache,
        v_cache,
        rows,
        n_heads,
        n_kv_heads,
        *q.stride(),
        *k.stride(),
        *v.stride(),
        *cos.stride(),
        *sin.stride(),
        *k_cache.stride(),
        *v_cache.stride(),
        HALF=head_dim // 2,
        BLOCK_H=triton.next_power_of_2(n_heads),
        BLOCK_KVH=triton.next_power_of_2(n_kv_heads),
        KV_FP8=k_cache.dtype == torch.float8_e4m3fn,
        num_warps=4,
        **pdl_options(pdl),
    )
    return q


# --------------------------------------------------------------------------------------
# Linear layer over float8 weights for several rows: y = (x @ q.T) * scale
# --------------------------------------------------------------------------------------
@triton.jit  # type: ignore[misc,untyped-decorator]
def _fp8_matmul_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_ym,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    EVEN_K: tl.constexpr,
    IEEE: tl.constexpr,
):
    # Tiles of y [M, N]; the float8 tile of w converted to x's dtype (exact) before the
    # dot, float32 accumulation, each column times its scale at the end. Programs in
    # groups of GROUP_M row tiles, so that a weight tile is reused from L2.
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    in_group = GROUP_M * num_n
    first_m = (pid // in_group) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % group_rows
    pid_n = (pid % in_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    a_ptrs = x_ptr + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    b_ptrs = w_ptr + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=m_mask[:, None], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :], other=0.0)
        else:
            k_mask = (k0 + rk) < K
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=n_mask[None, :] & k_mask[:, None], other=0.0)
        if IEEE:  # noqa: SIM108 - a constexpr branch, compiled away
            acc = tl.dot(a, b.to(a.dtype), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    acc = acc * tl.load(s_ptr + rn, mask=n_mask, other=0.0)[None, :]
    y_ptrs = y_ptr + rm[:, None].to(tl.int64) * stride_ym + rn[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@dataclass(frozen=True)
class Fp8MatmulConfig:
    """Launch parameters of :func:`fp8_matmul` (0 for ``block_n``: from the shape)."""

    block_m: int = 64
    block_n: int = 64
    block_k: int = 128
    num_warps: int = 4
    num_stages: int = 4
    group_m: int = 8


def fp8_matmul_config(m: int, n: int, device: torch.device) -> Fp8MatmulConfig:
    """The launch parameters for ``m`` rows and ``n`` outputs: small row tiles for decode
    batches (memory-bound: the weights' bytes), square tiles for prompts (compute-bound);
    narrower column tiles when too few programs would fill the device."""
    if m <= 16:
        cfg = Fp8MatmulConfig(block_m=16, block_n=64, block_k=256, num_warps=4, num_stages=4)
    elif m <= 32:
        cfg = Fp8MatmulConfig(block_m=32, block_n=64, block_k=256, num_warps=4, num_stages=4)
    elif m <= 64:
        cfg = Fp8MatmulConfig(block_m=64, block_n=64, block_k=128, num_warps=4, num_stages=4)
    else:
        return Fp8MatmulConfig(block_m=128, block_n=128, block_k=64, num_warps=8, num_stages=3)
    if triton.cdiv(n, cfg.block_n) * triton.cdiv(m, cfg.block_m) < _num_sms(device):
        cfg = Fp8MatmulConfig(cfg.block_m, 32, cfg.block_k, cfg.num_warps, cfg.num_stages, cfg.group_m)
    return cfg


def fp8_matmul(
    x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, config: Fp8MatmulConfig | None = None
) -> torch.Tensor:
    """``(x @ w.T) * scale`` for ``x`` [M, K] (bf16, or float32 under the interpreter),
    ``w`` [N, K] float8 e4m3 with unit column stride and ``scale`` [N] float32: the
    weight-only float8 linear layer (fp8_weights.py) for more than one row. Returns
    [M, N] in ``x``'s dtype, accumulated in float32. Graph-capturable (shapes only)."""
    if x.dim() != 2:
        raise ValueError(f"x must be [M, K], not {tuple(x.shape)}")
    m, k = x.shape
    n, kw = w.shape
    if kw != k:
        raise ValueError(f"x has {k} columns; w expects {kw}")
    if w.stride(1) != 1:
        raise ValueError("w must have unit column stride")
    if x.stride(1) != 1:
        x = x.contiguous()
    cfg = config or fp8_matmul_config(m, n, x.device)
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0:
        return y
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n),)
    _fp8_matmul_kernel[grid](
        x,
        w,
        scale,
        y,
        m,
        n,
        k,
        x.stride(0),
        w.stride(0),
        y.stride(0),
        BLOCK_M=cfg.block_m,
        BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m,
        EVEN_K=k % cfg.block_k == 0,
        IEEE=x.dtype == torch.float32,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
    )
    return y
