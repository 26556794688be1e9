"""The Triton kernels of the fused decode step against pure-torch references.

Run under Triton's CPU interpreter (``TRITON_INTERPRET=1``, set below before Triton is
imported) on CPU tensors; skipped where Triton is not installed. On a CUDA host the same
tests can run on the GPU with ``KERNELS_TEST_DEVICE=cuda`` (then the interpreter is off).
"""

from __future__ import annotations

import os

# The interpreter must be on before Triton is first imported: CPU tensors, no GPU needed.
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("KERNELS_TEST_DEVICE") == "cuda" else "1")

import math

import pytest
import torch
import torch.nn.functional as F

triton = pytest.importorskip("triton")

from llava_node.engine import kernels  # noqa: E402
from llava_node.engine.kv_cache import to_cache_dtype  # noqa: E402
from llava_node.engine.launch import pdl_available  # noqa: E402

DEVICE = torch.device(os.environ.get("KERNELS_TEST_DEVICE", "cpu"))
# Triton's interpreter rounds float32 -> bfloat16 casts toward zero; GPUs round to nearest.
# So bf16 results are compared exactly on a GPU and to within an ulp under the interpreter.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


# --------------------------------------------------------------------------------------
# references
# --------------------------------------------------------------------------------------
def ref_paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    lens: torch.Tensor,
    scale: float,
    page_size: int,
) -> torch.Tensor:
    """Float64 attention of each row's query over positions 0..lens[b]-1 of its pages."""
    batch, n_heads, head_dim = q.shape
    group = n_heads // k_cache.shape[1]
    out = torch.zeros(batch, n_heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        n = int(lens[b])
        if n == 0:
            continue
        pos = torch.arange(n)
        rows = block_tables[b, pos // page_size].cpu() * page_size + pos % page_size
        k = k_cache.cpu()[rows].double().repeat_interleave(group, dim=1)  # [n, H, D]
        v = v_cache.cpu()[rows].double().repeat_interleave(group, dim=1)
        s = torch.einsum("hd,nhd->hn", q[b].cpu().double(), k) * scale
        out[b] = torch.einsum("hn,nhd->hd", torch.softmax(s, dim=-1), v)
    return out


def ref_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # transformers' LlamaRMSNorm (and runner._rms_norm).
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def ref_rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def ref_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Torch's arithmetic in x's dtype (transformers' apply_rotary_pos_emb), on the CPU.
    x, c, s = x.cpu(), cos.cpu()[:, None, :], sin.cpu()[:, None, :]
    return x * c + ref_rotate_half(x) * s


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out64, ref64 = out.cpu().double(), ref.cpu().double()
    assert not torch.isnan(out64).any()
    return float((out64 - ref64).norm() / ref64.norm().clamp_min(1e-30))


# --------------------------------------------------------------------------------------
# paged decode attention
# --------------------------------------------------------------------------------------
def make_paged(
    gen: torch.Generator,
    lens: list[int],
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A paged cache whose only finite entries are the rows' valid positions.

    Pages are handed out shuffled (page 0 never); unused table entries point at page 0.
    Every other cache entry is NaN, so a kernel that reads past a row's length, or a
    page it does not own, produces NaN.
    """
    batch = len(lens)
    needed = [math.ceil(n / page_size) for n in lens]
    num_pages = sum(needed) + 3
    perm = (torch.randperm(num_pages - 1, generator=gen) + 1).tolist()
    tables = torch.zeros(batch, pages_per_seq, dtype=torch.int64)
    rows_k = torch.full((num_pages * page_size, n_kv_heads, head_dim), float("nan"))
    rows_v = rows_k.clone()
    for b, n in enumerate(lens):
        assert n <= pages_per_seq * page_size
        own = [perm.pop() for _ in range(needed[b])]
        tables[b, : len(own)] = torch.tensor(own, dtype=torch.int64)
        pos = torch.arange(n)
        rows = tables[b, pos // page_size] * page_size + pos % page_size
        rows_k[rows] = torch.randn(n, n_kv_heads, head_dim, generator=gen)
        rows_v[rows] = torch.randn(n, n_kv_heads, head_dim, generator=gen)
    lens_t = torch.tensor(lens, dtype=torch.int64)
    return (
        rows_k.to(DEVICE, dtype),
        rows_v.to(DEVICE, dtype),
        tables.to(DEVICE),
        lens_t.to(DEVICE),
    )


ATTENTION_CASES = [
    # (lens, H, KVH, D, page_size, pages_per_seq, num_splits); None: chosen from the shapes
    pytest.param([1, 7, 33, 70], 4, 4, 32, 4, 20, None, id="mha-auto-splits"),
    pytest.param([1, 7, 33, 70], 4, 4, 32, 4, 20, 1, id="mha-one-split"),
    pytest.param([130, 5, 64], 2, 2, 16, 16, 10, 3, id="mha-three-splits-page16"),
    pytest.param([65, 1], 8, 2, 16, 8, 9, None, id="gqa-auto-splits"),
    pytest.param([65, 1], 8, 2, 16, 8, 9, 1, id="gqa-one-split"),
    pytest.param([3, 40], 6, 2, 16, 4, 10, 2, id="gqa-group-of-3"),
    pytest.param([100, 2], 2, 2, 64, 16, 8, 2, id="d64"),
    pytest.param([77], 2, 1, 128, 16, 5, 3, id="d128-gqa"),
    pytest.param([90, 12], 2, 2, 128, 128, 1, 2, id="d128-page128"),
    pytest.param([0, 9, 0], 2, 2, 16, 4, 4, 2, id="empty-rows"),
]


@pytest.mark.parametrize("group_kernel", [True, False], ids=["group-kernel", "heads-kernel"])
@pytest.mark.parametrize(
    ("lens", "n_heads", "n_kv_heads", "head_dim", "page_size", "pages_per_seq", "num_splits"),
    ATTENTION_CASES,
)
def test_paged_decode_attention(
    lens: list[int],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    num_splits: int | None,
    group_kernel: bool,
) -> None:
    gen = torch.Generator().manual_seed(sum(lens) + 31 * n_heads + head_dim)
    k_cache, v_cache, tables, lens_t = make_paged(gen, lens, n_kv_heads, head_dim, page_size, pages_per_seq)
    # A non-contiguous q, as the engine passes a view of the fused QKV projection.
    qkv = torch.randn(len(lens), n_heads + 1, head_dim, generator=gen).to(DEVICE)
    q = qkv[:, :n_heads]
    scale = 1.0 / math.sqrt(head_dim)
    out = kernels.paged_decode_attention(
        q,
        k_cache,
        v_cache,
        tables,
        lens_t,
        scale,
        page_size,
        num_splits=num_splits,
        group_kernel=group_kernel,
    )
    assert out.shape == q.shape and out.dtype == q.dtype
    ref = ref_paged_attention(q, k_cache, v_cache, tables, lens_t, scale, page_size)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


MERGE_CASES = [
    # (lens, H, KVH, D, page_size, pages_per_seq, num_splits)
    pytest.param([1, 7, 33, 70], 4, 4, 32, 4, 20, 3, id="mha-three-splits"),
    pytest.param([65, 1], 8, 2, 16, 8, 9, 4, id="gqa-four-splits"),
    pytest.param([3, 40], 6, 2, 16, 4, 10, 2, id="gqa-group-of-3"),
    pytest.param([77], 2, 1, 128, 16, 5, 5, id="d128-gqa-five-splits"),
    pytest.param([90, 12], 2, 2, 128, 128, 1, 1, id="one-split"),
]


@pytest.mark.parametrize(
    ("lens", "n_heads", "n_kv_heads", "head_dim", "page_size", "pages_per_seq", "num_splits"), MERGE_CASES
)
def test_partitions_merged_in_the_kernel_give_the_reduction_kernels_bits(
    lens: list[int],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    num_splits: int,
) -> None:
    # The last partition of each (row, KV head) to finish merges them all, in split
    # order: the same arithmetic as the separate reduction kernel, and the counters are
    # left at zero for the next launch (twice in a row here).
    gen = torch.Generator().manual_seed(3 * sum(lens) + head_dim)
    k_cache, v_cache, tables, lens_t = make_paged(gen, lens, n_kv_heads, head_dim, page_size, pages_per_seq)
    q = torch.randn(len(lens), n_heads, head_dim, generator=gen).to(DEVICE)
    args = (q, k_cache, v_cache, tables, lens_t, head_dim**-0.5, page_size)
    ref = kernels.paged_decode_attention(*args, num_splits=num_splits, group_kernel=True)
    sems = kernels.decode_semaphores(len(lens), n_kv_heads, DEVICE)
    for _ in range(2):
        out = kernels.paged_decode_attention(*args, num_splits=num_splits, group_kernel=True, semaphores=sems)
        assert torch.equal(out, ref)
        assert (sems == 0).all()
    with pytest.raises(ValueError, match="semaphores"):
        kernels.paged_decode_attention(*args, num_splits=2, group_kernel=True, semaphores=sems[:0])


ROPE_ATTENTION_CASES = [
    # (lens, H, KVH, D, page_size, pages_per_seq, num_splits, merged in the kernel)
    pytest.param([1, 7, 33, 70], 4, 4, 32, 4, 20, 3, True, id="mha-splits-merged"),
    pytest.param([1, 7, 33, 70], 4, 4, 32, 4, 20, 3, False, id="mha-splits-reduction-kernel"),
    pytest.param([65, 2], 8, 2, 16, 8, 9, 1, False, id="gqa-one-split"),
    pytest.param([3, 40], 6, 2, 16, 4, 10, 2, True, id="gqa-group-of-3"),
    # one partition of 2 tiles: the newest position in the loop's tile, not the first
    pytest.param([100, 70], 2, 2, 64, 16, 8, 1, False, id="newest-in-a-later-tile"),
    pytest.param([77], 2, 1, 128, 16, 5, 5, True, id="d128-gqa"),
]


@pytest.mark.parametrize("kv_fp8", [False, True], ids=["cache-f32", "cache-fp8"])
@pytest.mark.parametrize(
    ("lens", "n_heads", "n_kv_heads", "head_dim", "page_size", "pages_per_seq", "num_splits", "merge"),
    ROPE_ATTENTION_CASES,
)
def test_rope_decode_attention_is_rope_store_then_the_attention(
    lens: list[int],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    page_size: int,
    pages_per_seq: int,
    num_splits: int,
    merge: bool,
    kv_fp8: bool,
) -> None:
    # One launch from the QKV projection's raw output: the same output and the same cache
    # (the new key rotated and the value written at each row's newest position) as
    # rope_store followed by the attention: bit for bit under the interpreter; on a GPU
    # to within float32 rounding (the compiler may fuse a rotation's multiply and add
    # differently, and lays the dots' operands out differently when q comes from
    # registers).
    gen = torch.Generator().manual_seed(5 * sum(lens) + n_heads + int(kv_fp8))
    k_cache, v_cache, tables, lens_t = make_paged(gen, lens, n_kv_heads, head_dim, page_size, pages_per_seq)
    if kv_fp8:
        k_cache, v_cache = k_cache.to(FP8), v_cache.to(FP8)
    batch = len(lens)
    qkv = torch.randn(batch, (n_heads + 2 * n_kv_heads) * head_dim, generator=gen).to(DEVICE)
    q, k, v = (
        t.reshape(batch, -1, head_dim)
        for t in qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    )
    pos = lens_t.cpu() - 1
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = pos[:, None].float() * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE), emb.sin().to(DEVICE)
    rows = (tables.cpu()[torch.arange(batch), pos // page_size] * page_size + pos % page_size).to(DEVICE)
    scale = head_dim**-0.5

    kc_ref, vc_ref, q_ref = k_cache.clone(), v_cache.clone(), q.clone()
    kernels.rope_store(q_ref, k, v, cos, sin, kc_ref, vc_ref, rows)
    ref = kernels.paged_decode_attention(
        q_ref, kc_ref, vc_ref, tables, lens_t, scale, page_size, num_splits=num_splits, group_kernel=True
    )
    q_before = q.clone()
    sems = kernels.decode_semaphores(batch, n_kv_heads, DEVICE) if merge else None
    out = kernels.rope_decode_attention(
        kernels.NewRow(q, k, v, cos, sin, rows),
        k_cache,
        v_cache,
        tables,
        lens_t,
        scale,
        page_size,
        num_splits=num_splits,
        semaphores=sems,
    )
    assert not torch.isnan(out).any()
    torch.testing.assert_close(v_cache.float(), vc_ref.float(), rtol=0, atol=0, equal_nan=True)
    if INTERPRETED:
        assert torch.equal(out, ref)
        torch.testing.assert_close(k_cache.float(), kc_ref.float(), rtol=0, atol=0, equal_nan=True)
    else:
        assert rel_err(out, ref) < 1e-5, rel_err(out, ref)
        # float8: a last-bit difference may move a key to the neighbouring e4m3 value
        tol = 0.13 if kv_fp8 else 1e-6
        torch.testing.assert_close(k_cache.float(), kc_ref.float(), rtol=tol, atol=tol, equal_nan=True)
    assert torch.equal(q, q_before)  # (rope_store rotates q in place; this does not)
    if sems is not None:
        assert (sems == 0).all()


def test_rope_decode_attention_refuses_inputs_that_do_not_fit() -> None:
    k_cache = torch.zeros(32, 2, 16, device=DEVICE)
    tables = torch.ones(1, 2, dtype=torch.int64, device=DEVICE)
    lens = torch.tensor([5], device=DEVICE)
    q, kv = torch.zeros(1, 4, 16, device=DEVICE), torch.zeros(1, 2, 16, device=DEVICE)
    table = torch.zeros(1, 16, device=DEVICE)
    rows = torch.tensor([20], device=DEVICE)
    cases = [
        (kernels.NewRow(q, kv[:, :1], kv, table, table, rows), "do not fit"),
        (kernels.NewRow(q, kv, kv, table[:, :8], table, rows), "cos/sin"),
        (kernels.NewRow(q, kv, kv, table, table, rows[:0]), "rows"),
    ]
    for new, match in cases:
        with pytest.raises(ValueError, match=match):
            kernels.rope_decode_attention(new, k_cache, k_cache, tables, lens, 0.25, 16)


@pytest.mark.parametrize("group_kernel", [False, True])
def test_paged_decode_attention_bf16(group_kernel: bool) -> None:
    if group_kernel and INTERPRETED:
        # Triton's interpreter multiplies bf16 tl.dot operands as their raw uint16 bits.
        pytest.skip("the Triton interpreter cannot run tl.dot on bfloat16")
    gen = torch.Generator().manual_seed(7)
    lens = [70, 3]
    k_cache, v_cache, tables, lens_t = make_paged(gen, lens, 2, 32, 16, 5, dtype=torch.bfloat16)
    q = torch.randn(2, 4, 32, generator=gen).to(DEVICE, torch.bfloat16)
    out = kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens_t, 0.2, 16, num_splits=2, group_kernel=group_kernel
    )
    assert out.dtype == torch.bfloat16
    ref = ref_paged_attention(q, k_cache, v_cache, tables, lens_t, 0.2, 16)
    assert rel_err(out, ref) < 1e-2


@pytest.mark.parametrize(
    ("lens", "spans", "n_heads", "n_kv_heads", "head_dim", "block_m"),
    [
        ([40], [(0, 40)], 2, 2, 16, 16),  # a whole prompt, its last block padded
        ([100, 37], [(32, 100), (0, 37)], 4, 2, 32, 16),  # a later chunk, then a new prompt (GQA)
        ([300], [(5, 70)], 2, 1, 16, 32),  # a chunk starting mid-page; keys span many pages
        ([64, 50, 9], [(48, 64), (0, 50), (8, 9)], 2, 2, 64, 16),  # one-row chunk at the end
    ],
)
def test_paged_prefill_attention(
    lens: list[int],
    spans: list[tuple[int, int]],
    n_heads: int,
    n_kv_heads: int,
    head_dim: int,
    block_m: int,
) -> None:
    # Chunks of several sequences' prompts packed into blocks of rows (each sequence's rows
    # padded to whole blocks); every row sees its sequence's positions up to its own.
    gen = torch.Generator().manual_seed(sum(lens) + head_dim)
    page_size = 16
    k_cache, v_cache, tables, _ = make_paged(gen, lens, n_kv_heads, head_dim, page_size, 20)
    pos_list: list[int] = []
    block_slots: list[int] = []
    row_seq: list[int] = []
    for seq, (a, b) in enumerate(spans):
        n = -(-(b - a) // block_m) * block_m
        pos_list += list(range(a, b)) + [-1] * (n - (b - a))
        row_seq += [seq] * n
        block_slots += [seq] * (n // block_m)
    block_slots += [len(lens)] * 1  # a whole block of padding, on a slot of page 0 only
    pos_list += [-1] * block_m
    row_seq += [0] * block_m
    tables = torch.cat([tables.cpu(), torch.zeros(1, tables.shape[1], dtype=torch.int64)])
    pos = torch.tensor(pos_list, dtype=torch.int64)
    qkv = torch.randn(len(pos_list), n_heads + 2, head_dim, generator=gen)
    q = qkv[:, 1 : n_heads + 1]  # a view with strides, as the engine passes
    k_cache[:page_size] = 0.0  # page 0: what padding rows would write
    v_cache[:page_size] = 0.0
    out = kernels.paged_prefill_attention(
        q.to(DEVICE),
        k_cache.to(DEVICE),
        v_cache.to(DEVICE),
        tables.to(DEVICE),
        torch.tensor(block_slots, dtype=torch.int64, device=DEVICE),
        pos.to(DEVICE),
        1.0 / math.sqrt(head_dim),
        page_size,
        block_m=block_m,
    )
    assert out.shape == q.shape and not torch.isnan(out.cpu()).any()
    ref = ref_paged_attention(
        q,
        k_cache,
        v_cache,
        tables[torch.tensor(row_seq)],
        (pos + 1).clamp(min=0),
        1.0 / math.sqrt(head_dim),
        page_size,
    )
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    assert (out.cpu()[pos < 0] == 0).all()


@pytest.mark.skipif(DEVICE.type != "cuda", reason="CUDA graphs need a GPU")
def test_paged_decode_attention_cuda_graph() -> None:
    # Captured once, replayed after the lengths, block tables and cache change in place.
    gen = torch.Generator().manual_seed(11)
    lens_a, lens_b = [1, 30, 100, 128], [128, 5, 100, 17]
    first = make_paged(gen, lens_a, 2, 64, 16, 8, dtype=torch.bfloat16)
    second = make_paged(gen, lens_b, 2, 64, 16, 8, dtype=torch.bfloat16)
    assert all(a.shape == b.shape for a, b in zip(first, second, strict=True))
    k_cache, v_cache, tables, lens_t = (t.clone() for t in first)
    q = torch.randn(4, 8, 64, generator=gen).to(DEVICE, torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # compile outside the capture
        kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, 0.125, 16)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.paged_decode_attention(q, k_cache, v_cache, tables, lens_t, 0.125, 16)
    for k_new, v_new, t_new, l_new in (first, second):
        k_cache.copy_(k_new)
        v_cache.copy_(v_new)
        tables.copy_(t_new)
        lens_t.copy_(l_new)
        graph.replay()
        ref = ref_paged_attention(q, k_cache, v_cache, tables, lens_t, 0.125, 16)
        assert rel_err(out, ref) < 1e-2


def test_decode_num_splits_from_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    # On the interpreter's small count the tiny model's batch-1 decode (4 heads) still
    # splits, so the runner's tests take the partition and reduction path.
    assert kernels.decode_num_splits(1, 4, 2048, cpu) > 1
    assert kernels.decode_num_splits(3, 4, 2048, cpu) == 1
    # The rules on a GPU's count (an H100 SXM's 132 multiprocessors).
    sms = 132
    monkeypatch.setattr(kernels, "_num_sms", lambda device: sms)
    # A batch that already fills the GPU: no split (no reduction pass).
    assert kernels.decode_num_splits(64, 32, 4096, cpu) == 1
    assert kernels.decode_num_splits(32, 32, 4096, cpu) == 1
    # Small batches split up to the target number of programs.
    one = kernels.decode_num_splits(1, 32, 4096, cpu)
    assert one == math.ceil(kernels.PROGRAMS_PER_SM_ONE_ROW * sms / 32)  # one row: one length
    assert kernels.decode_num_splits(2, 32, 4096, cpu) == math.ceil(kernels.PROGRAMS_PER_SM * sms / 64)
    assert 1 < kernels.decode_num_splits(8, 32, 4096, cpu) < one
    # Never more partitions than blocks of the longest possible sequence, nor MAX_SPLITS.
    assert kernels.decode_num_splits(1, 1, 4096, cpu) == kernels.MAX_SPLITS
    assert kernels.decode_num_splits(1, 1, 100, cpu) == 2


# --------------------------------------------------------------------------------------
# RMSNorm
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 96), (3, 1000), (2, 8192)])
def test_rms_norm(shape: tuple[int, int], dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(shape[1])
    x = (torch.randn(shape, generator=gen) * 3).to(DEVICE, dtype)
    weight = (1 + 0.1 * torch.randn(shape[1], generator=gen)).to(DEVICE, dtype)
    y = kernels.rms_norm(x, weight, 1e-5)
    ref = ref_rms_norm(x, weight, 1e-5)
    assert y.dtype == ref.dtype and y.shape == ref.shape
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    else:  # one bf16 ulp, where the float32 statistics round differently
        torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 200, generator=gen).to(DEVICE, dtype)
    # A strided residual, and inputs that must stay untouched.
    residual_full = torch.randn(4, 256, generator=gen).to(DEVICE, dtype)
    residual = residual_full[:, :200]
    before = (x.clone(), residual_full.clone())
    weight = (1 + 0.1 * torch.randn(200, generator=gen)).to(DEVICE, dtype)
    y, new_res = kernels.add_rms_norm(x, residual, weight, 1e-6)
    ref_res = x + residual
    assert new_res.dtype == dtype
    if INTERPRETED and dtype == torch.bfloat16:
        torch.testing.assert_close(new_res, ref_res, rtol=8e-3, atol=0)
    else:  # the same single rounding as torch's x + residual
        torch.testing.assert_close(new_res, ref_res, rtol=0, atol=0)
    ref = ref_rms_norm(ref_res, weight, 1e-6)
    if dtype == torch.float32:
        torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=1.6e-2, atol=1e-2)
    assert torch.equal(x, before[0]) and torch.equal(residual_full, before[1])


def test_rms_norm_float32_weight_promotes() -> None:
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, 64, generator=gen).to(DEVICE, torch.bfloat16)
    weight = torch.randn(64, generator=gen).to(DEVICE)
    y = kernels.rms_norm(x, weight, 1e-5)
    ref = ref_rms_norm(x, weight, 1e-5)
    assert y.dtype == torch.float32
    # The normalised value is rounded to bf16 before the float32 weight multiplies it.
    torch.testing.assert_close(y, ref, rtol=1e-5 if not INTERPRETED else 8e-3, atol=1e-5)


# --------------------------------------------------------------------------------------
# SiLU * up
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("width", [40, 1500])
def test_silu_mul(width: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(width)
    gate_up = (torch.randn(3, 2 * width, generator=gen) * 4).to(DEVICE, dtype)
    out = kernels.silu_mul(gate_up)
    gate, up = gate_up.float().chunk(2, dim=-1)
    ref32 = F.silu(gate) * up
    assert out.shape == (3, width) and out.dtype == dtype
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref32, rtol=1e-5, atol=1e-6)
    else:
        # torch's own bf16 arithmetic (silu rounded, then the product): exact on a GPU;
        # the interpreter truncates float32 -> bf16 where the GPU rounds: 2 ulp there.
        g, u = gate_up.chunk(2, dim=-1)
        torch.testing.assert_close(out.float(), (F.silu(g) * u).float(), rtol=1.6e-2, atol=1e-3)
        torch.testing.assert_close(out.float(), ref32, rtol=2e-2, atol=2e-2)


# --------------------------------------------------------------------------------------
# RoPE + KV-cache store
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("n_heads", "n_kv_heads", "head_dim"), [(4, 4, 32), (6, 2, 16)])
def test_rope_store(n_heads: int, n_kv_heads: int, head_dim: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n_heads * head_dim)
    batch, cache_rows = 3, 20
    # q, k, v as views of one fused projection output, like the engine's.
    qkv = torch.randn(batch, (n_heads + 2 * n_kv_heads) * head_dim, generator=gen).to(DEVICE, dtype)
    q, k, v = qkv.split([n_heads * head_dim, n_kv_heads * head_dim, n_kv_heads * head_dim], dim=-1)
    q, k, v = (t.reshape(batch, -1, head_dim) for t in (q, k, v))
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    # Per-row tables at arbitrary positions, HF-style (both halves equal).
    pos = torch.tensor([0, 5, 17], dtype=torch.float32)
    inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = pos[:, None] * inv[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos().to(DEVICE, dtype), emb.sin().to(DEVICE, dtype)
    k_cache = torch.full((cache_rows, n_kv_heads, head_dim), 7.0).to(DEVICE, dtype)
    v_cache = torch.full((cache_rows, n_kv_heads, head_dim), 7.0).to(DEVICE, dtype)
    rows = torch.tensor([4, 13, 0], dtype=torch.int64, device=DEVICE)

    out = kernels.rope_store(q, k, v, cos, sin, k_cache, v_cache, rows)

    assert out.data_ptr() == q.data_ptr()
    # bf16: within an ulp or two (the interpreter rounds float32 -> bf16 toward zero; a GPU
    # may order or contract the float32 arithmetic differently from the CPU reference)
    tol = 1e-5 if dtype == torch.float32 else 1.6e-2
    torch.testing.assert_close(out.cpu(), ref_rope(q0, cos, sin), rtol=tol, atol=tol)
    torch.testing.assert_close(k_cache[rows].cpu(), ref_rope(k0, cos, sin), rtol=tol, atol=tol)
    assert torch.equal(v_cache[rows], v0)
    assert torch.equal(k, k0) and torch.equal(v, v0)
    untouched = torch.ones(cache_rows, dtype=torch.bool)
    untouched[rows.cpu()] = False
    assert (k_cache[untouched.to(DEVICE)] == 7).all() and (v_cache[untouched.to(DEVICE)] == 7).all()


@pytest.mark.parametrize("n,k", [(48, 96), (33, 200), (8, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv(n: int, k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    x = torch.randn(1, k, generator=gen).to(DEVICE, dtype)
    out = kernels.gemv(x, w, kernels.GemvConfig(block_k=64))
    ref = x.double().cpu() @ w.double().cpu().T
    assert out.shape == (1, n) and out.dtype == dtype
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("first_k", [128, 256, 1024], ids=["two-tiles-first", "four-tiles-first", "past-k"])
@pytest.mark.parametrize("k", [200, 520])
def test_gemv_with_a_wider_first_load_computes_the_same_product(k: int, first_k: int) -> None:
    # GemvConfig.first_k: more columns loaded before the wait (a tail after it, or none,
    # or a first tile wider than the row), the norm's statistics summed over both parts.
    gen = torch.Generator().manual_seed(k + first_k)
    w = torch.randn(40, k, generator=gen).to(DEVICE)
    x = torch.randn(1, k, generator=gen).to(DEVICE)
    g = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE)
    cfg = kernels.GemvConfig(block_n=4, block_k=64, first_k=first_k)
    ref = x.double().cpu() @ w.double().cpu().T
    assert rel_err(kernels.gemv(x, w, cfg), ref) < 1e-6
    assert rel_err(kernels.gemv(x, w, kernels.GemvConfig(block_k=64), first_k=first_k), ref) < 1e-6
    y, _ = kernels.gemv_norm(x, None, g, 1e-5, w, cfg)
    x64 = x.double().cpu()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + 1e-5) * g.double().cpu()
    assert rel_err(y, normed @ w.double().cpu().T) < 1e-6
    with pytest.raises(ValueError, match="first_k"):
        kernels.gemv(x, w, kernels.GemvConfig(block_k=64), first_k=96)


@pytest.mark.parametrize("with_residual", [False, True], ids=["norm", "add-norm"])
@pytest.mark.parametrize("n,k", [(48, 96), (33, 200)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_norm_is_the_norm_then_the_product(
    n: int, k: int, dtype: torch.dtype, with_residual: bool
) -> None:
    # Several programs and K tiles (block_k 64 against K 96/200: a masked tail), so the
    # norm's statistics are summed across tiles and only program 0 writes the residual.
    gen = torch.Generator().manual_seed(n + k)
    x = (torch.randn(1, k, generator=gen) * 3).to(DEVICE, dtype)
    residual = torch.randn(1, k, generator=gen).to(DEVICE, dtype) if with_residual else None
    g = (1 + 0.1 * torch.randn(k, generator=gen)).to(DEVICE, dtype)
    w = torch.randn(n, k, generator=gen).to(DEVICE, dtype)
    y, h = kernels.gemv_norm(x, residual, g, 1e-5, w, kernels.GemvConfig(block_n=4, block_k=64))
    want_h = x if residual is None else x + residual
    if residual is None:
        assert h.data_ptr() == x.data_ptr()
    elif INTERPRETED and dtype == torch.bfloat16:
        torch.testing.assert_close(h, want_h, rtol=8e-3, atol=0)
    else:  # torch's single rounding of x + residual
        torch.testing.assert_close(h, want_h, rtol=0, atol=0)
    h64 = want_h.double().cpu()
    ref = (
        h64 * torch.rsqrt(h64.pow(2).mean(-1, keepdim=True) + 1e-5) * g.double().cpu()
    ) @ w.double().cpu().T
    assert y.shape == (1, n) and y.dtype == dtype
    assert rel_err(y, ref) < (1e-6 if dtype == torch.float32 else 8e-3)


@pytest.mark.parametrize("k", [96, 200])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gemv_silu_is_silu_mul_then_the_product(k: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(k)
    gate_up = (torch.randn(1, 2 * k, generator=gen) * 4).to(DEVICE, dtype)
    w = torch.randn(40, k, generator=gen).to(DEVICE, dtype)
    y = kernels.gemv(gate_up, w, kernels.GemvConfig(block_k=64), silu=True)
    # against the two kernels it replaces: the same roundings of silu(gate) and the product
    ref = kernels.gemv(kernels.silu_mul(gate_up), w, kernels.GemvConfig(block_k=64))
    torch.testing.assert_close(y, ref, rtol=1e-6 if dtype == torch.float32 else 8e-3, atol=1e-5)
    gate, up = gate_up.double().cpu().chunk(2, dim=-1)
    assert rel_err(y, (F.silu(gate) * up) @ w.double().cpu().T) < (1e-6 if dtype == torch.float32 else 2e-2)


@pytest.mark.parametrize("block_n", [2, 4, 8])
@pytest.mark.parametrize(("f", "k"), [(37, 200), (64, 96)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_gemv_glu_is_the_gate_up_product_then_silu_mul(
    block_n: int, f: int, k: int, dtype: torch.dtype, fp8: bool
) -> None:
    # The gate/up projection with SiLU*up applied to its own sums gives the bits of the
    # GEMV followed by the SiLU*up kernel it replaces, whatever the rows per program (a
    # last program with half its outputs masked where block_n / 2 does not divide F)
    from llava_node.engine.fp8_weights import quantize_fp8

    gen = torch.Generator().manual_seed(f * k + block_n)
    x = torch.randn(1, k, generator=gen).to(DEVICE, dtype)
    w = (torch.randn(2 * f, k, generator=gen) / math.sqrt(k) * 4).to(DEVICE, dtype)
    cfg = kernels.GemvConfig(block_n=block_n, block_k=64)
    qw, scale = (quantize_fp8(w).q, quantize_fp8(w).scale) if fp8 else (w, None)
    y = kernels.gemv_glu(x, qw, cfg, scale)
    want = kernels.silu_mul(kernels.gemv(x, qw, cfg, scale))
    assert y.shape == (1, f) and y.dtype == dtype
    assert torch.equal(y.cpu(), want.cpu())
    w64 = qw.double().cpu() * (scale.double().cpu()[:, None] if scale is not None else 1.0)
    gate, up = (x.double().cpu() @ w64.T).chunk(2, dim=-1)  # the dequantized weights'
    assert rel_err(y, F.silu(gate) * up) < (1e-6 if dtype == torch.float32 else 2e-2)
    with pytest.raises(ValueError, match="even number of rows"):
        kernels.gemv_glu(x, w[1:], cfg)


@pytest.mark.skipif(
    not (DEVICE.type == "cuda" and pdl_available(DEVICE)), reason="PDL needs a GPU of compute capability 9.0+"
)
def test_pdl_launches_compute_exactly_what_plain_launches_compute_in_a_graph() -> None:
    # Decode layers' kernels back to back, captured in a CUDA graph as the engine runs
    # them: with PDL each kernel starts before its predecessor ends (the GEMV loads
    # weights, the attention old keys and values, before they wait), and must still read
    # what that predecessor wrote: the attention the key RoPE + store just wrote. The
    # same with RoPE + store inside the attention and the partitions merged there (one
    # launch instead of three): equal bits with and without PDL, and to within bf16
    # rounding of the three launches (see test_rope_decode_attention_is_...).
    gen = torch.Generator().manual_seed(11)
    heads, hd, inter, layers, page, ctx = 4, 128, 1376, 6, 16, 200
    hidden = heads * hd
    ws = [
        [
            torch.randn(n, k, generator=gen).to(DEVICE, torch.bfloat16) * 0.05
            for n, k in ((3 * hidden, hidden), (hidden, hidden), (2 * inter, hidden), (hidden, inter))
        ]
        for _ in range(layers)
    ]
    g = (1 + 0.1 * torch.randn(hidden, generator=gen)).to(DEVICE, torch.bfloat16)
    x0 = torch.randn(1, hidden, generator=gen).to(DEVICE, torch.bfloat16)
    pages = -(-(ctx + 1) // page)
    tables = torch.arange(1, pages + 1, device=DEVICE)[None]
    lens = torch.tensor([ctx + 1], device=DEVICE)
    rows = torch.tensor([page + ctx], device=DEVICE)  # position ctx of page 1..
    cos = torch.rand(1, hd, generator=gen).to(DEVICE, torch.bfloat16)
    sin = torch.rand(1, hd, generator=gen).to(DEVICE, torch.bfloat16)
    caches = [
        [
            torch.randn((pages + 1) * page, heads, hd, generator=gen).to(DEVICE, torch.bfloat16)
            for _ in range(2)
        ]
        for _ in range(layers)
    ]

    sems = kernels.decode_semaphores(1, heads, DEVICE)

    def run(pdl: bool, fused: bool) -> torch.Tensor:
        x, res = x0, x0
        for i, ((wqkv, wo, wgu, wdown), (kc, vc)) in enumerate(zip(ws, caches, strict=True)):
            if i == 0:
                h = kernels.rms_norm(x, g, 1e-5, pdl=pdl)
            else:
                h, res = kernels.add_rms_norm(x, res, g, 1e-5, pdl=pdl)
            qkv = kernels.gemv(h, wqkv, pdl=pdl)
            q, k, v = (t.reshape(1, heads, hd) for t in qkv.split(hidden, dim=-1))
            if fused:
                new = kernels.NewRow(q, k, v, cos, sin, rows)
                att = kernels.rope_decode_attention(
                    new, kc, vc, tables, lens, hd**-0.5, page, semaphores=sems, pdl=pdl
                )
            else:
                q = kernels.rope_store(q, k, v, cos, sin, kc, vc, rows, pdl=pdl)
                att = kernels.paged_decode_attention(q, kc, vc, tables, lens, hd**-0.5, page, pdl=pdl)
            o = kernels.gemv(att.reshape(1, hidden), wo, pdl=pdl)
            gu, res = kernels.gemv_norm(o, res, g, 1e-5, wgu, pdl=pdl)
            x = kernels.gemv(gu, wdown, silu=True, pdl=pdl)
        return torch.cat([x, res], dim=1)

    outs = []
    for pdl, fused in ((False, False), (True, False), (False, True), (True, True)):
        run(pdl, fused)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run(pdl, fused)
        for _ in range(5):  # (each replay rewrites the newest keys and values alike)
            graph.replay()
            torch.cuda.synchronize()
            outs.append(out.clone())
    three, one = outs[:10], outs[10:]  # three launches for the attention, or one
    assert all(torch.equal(three[0], o) for o in three[1:])
    assert all(torch.equal(one[0], o) for o in one[1:])
    assert rel_err(one[0], three[0]) < 3e-2, rel_err(one[0], three[0])
    assert (sems == 0).all()


def test_gemv_refuses_inputs_that_do_not_fit() -> None:
    w = torch.zeros(8, 64, device=DEVICE)
    with pytest.raises(ValueError, match="one row"):
        kernels.gemv(torch.zeros(2, 64, device=DEVICE), w)
    with pytest.raises(ValueError, match="expects 64"):
        kernels.gemv(torch.zeros(1, 64, device=DEVICE), w, silu=True)  # [gate | up] of 2 x 32
    with pytest.raises(ValueError, match="norm_weight"):
        kernels.gemv_norm(torch.zeros(1, 64, device=DEVICE), None, torch.ones(32, device=DEVICE), 1e-6, w)
    with pytest.raises(ValueError, match="residual"):
        kernels.gemv_norm(
            torch.zeros(1, 64, device=DEVICE),
            torch.zeros(1, 32, device=DEVICE),
            torch.ones(64, device=DEVICE),
            1e-6,
            w,
        )


# --------------------------------------------------------------------------------------
# float8 KV cache (LLAVA_KV_CACHE_DTYPE=fp8)
# --------------------------------------------------------------------------------------
FP8 = torch.float8_e4m3fn


def test_rope_store_rounds_to_fp8_as_torch_does() -> None:
    # Values over the whole e4m3 range and past it: subnormals (below 2**-6), values just
    # under a power of two (rounding carries into the exponent), ties, and beyond 448
    # (saturated). The kernel must store exactly the bits torch's conversion stores.
    gen = torch.Generator().manual_seed(3)
    batch, n_heads, head_dim = 64, 2, 32
    mag = 10 ** (torch.rand(batch, n_heads, head_dim, generator=gen) * 7 - 4)  # 1e-4 .. 1e3
    v = torch.randn(batch, n_heads, head_dim, generator=gen).sign() * mag
    v[0, 0, :8] = torch.tensor([1.98, -7.99, 0.49, 2.0**-7 * 1.999, 1.0625, 1.1875, 500.0, -1e6])
    q = torch.randn(batch, n_heads, head_dim, generator=gen)
    k = torch.randn(batch, n_heads, head_dim, generator=gen) * 4
    cos = torch.ones(batch, head_dim)  # position 0: k is stored as it is
    sin = torch.zeros(batch, head_dim)
    k_cache = torch.zeros(batch + 2, n_heads, head_dim).to(DEVICE, FP8)
    v_cache = torch.zeros(batch + 2, n_heads, head_dim).to(DEVICE, FP8)
    rows = torch.arange(batch, dtype=torch.int64, device=DEVICE) + 1
    kernels.rope_store(
        q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), cos.to(DEVICE), sin.to(DEVICE), k_cache, v_cache, rows
    )
    want_v = to_cache_dtype(v, FP8)
    assert torch.equal(v_cache[rows].cpu().view(torch.uint8), want_v.view(torch.uint8))
    assert torch.equal(k_cache[rows].cpu().view(torch.uint8), to_cache_dtype(k, FP8).view(torch.uint8))
    assert float(want_v.float().abs().max()) == 448.0  # saturated, not NaN or inf
    assert (k_cache[0].float() == 0).all() and (k_cache[-1].float() == 0).all()


@pytest.mark.parametrize("group_kernel", [True, False], ids=["group-kernel", "heads-kernel"])
def test_paged_decode_attention_fp8_cache(group_kernel: bool) -> None:
    # Keys and values read from a float8 cache, converted to the queries' dtype: the same
    # result as attention over the dequantized cache.
    gen = torch.Generator().manual_seed(11)
    lens = [70, 3, 33]
    k32, v32, tables, lens_t = make_paged(gen, lens, 2, 32, 16, 5)
    k_cache, v_cache = k32.to(FP8), v32.to(FP8)  # NaN stays NaN: unowned rows still poison
    q = torch.randn(3, 4, 32, generator=gen).to(DEVICE)
    out = kernels.paged_decode_attention(
        q, k_cache, v_cache, tables, lens_t, 0.2, 16, num_splits=2, group_kernel=group_kernel
    )
    assert out.dtype == q.dtype and not torch.isnan(out).any()
    ref = ref_paged_attention(q, k_cache.double(), v_cache.double(), tables, lens_t, 0.2, 16)
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)


def test_paged_prefill_attention_fp8_cache() -> None:
    gen = torch.Generator().manual_seed(12)
    page_size, block_m = 16, 16
    k32, v32, tables, _ = make_paged(gen, [40], 2, 32, page_size, 4)
    k_cache, v_cache = k32.to(FP8), v32.to(FP8)
    pos = torch.tensor([*range(8, 40), *([-1] * 16)], dtype=torch.int64, device=DEVICE)  # rows 8..39
    q = torch.randn(48, 2, 32, generator=gen).to(DEVICE)
    block_slots = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    out = kernels.paged_prefill_attention(
        q, k_cache, v_cache, tables, block_slots, pos, 0.25, page_size, block_m=block_m
    )
    ref = ref_paged_attention(
        q, k_cache.double(), v_cache.double(), tables[[0] * 48], (pos + 1).clamp(min=0), 0.25, page_size
    )
    torch.testing.assert_close(out.cpu().double(), ref, rtol=1e-4, atol=1e-5)
    assert (out.cpu()[pos.cpu() < 0] == 0).all()


# --------------------------------------------------------------------------------------
# a decode step's slot bookkeeping (step_state.py)
# --------------------------------------------------------------------------------------
def test_decode_inputs_gathers_what_the_torch_ops_gather() -> None:
    gen = torch.Generator().manual_seed(11)
    page_size, pages, slots_n, max_len, d, hd = 4, 6, 5, 24, 200, 16
    seq_lens = torch.tensor([3, 0, 23, 30, 9], dtype=torch.int64).to(DEVICE)  # 30: clamped
    last = torch.tensor([7, 0, 99, 5, 42], dtype=torch.int64).to(DEVICE)
    embed = torch.randn(100, d, generator=gen).to(DEVICE, torch.bfloat16)
    cos = torch.randn(max_len, hd, generator=gen).to(DEVICE, torch.bfloat16)
    sin = torch.randn(max_len, hd, generator=gen).to(DEVICE, torch.bfloat16)
    tables = torch.randint(0, 50, (slots_n, pages), generator=gen, dtype=torch.int64).to(DEVICE)
    slots = torch.tensor([2, 0, 3, 4, 4], dtype=torch.int64).to(DEVICE)  # a slot twice (padding)
    pos, x, c, s, rows, tab, lens = kernels.decode_inputs(
        slots, seq_lens, last, embed, cos, sin, tables, page_size
    )
    want_pos = seq_lens[slots].clamp(max=max_len - 1)
    assert torch.equal(pos, want_pos) and torch.equal(lens, want_pos + 1)
    assert torch.equal(x, F.embedding(last[slots], embed))
    assert torch.equal(c, cos[want_pos]) and torch.equal(s, sin[want_pos])
    want_rows = tables[slots, want_pos // page_size] * page_size + want_pos % page_size
    assert torch.equal(rows, want_rows) and rows.dtype == want_rows.dtype
    assert torch.equal(tab, tables[slots])
    with pytest.raises(ValueError, match="one layout"):
        kernels.decode_inputs(slots, seq_lens, last, embed, cos, sin[:, :8], tables, page_size)


def test_advance_slots_moves_each_slot_on_and_keeps_padding_slots_empty() -> None:
    seq_lens = torch.tensor([3, 0, 7, 0, 5, 2], dtype=torch.int64).to(DEVICE)  # 4, 5: padding
    last = torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.int64).to(DEVICE)
    steps = torch.tensor([10, 0, 4, 0, 0, 0], dtype=torch.int64).to(DEVICE)
    slots = torch.tensor([2, 0, 4, 4, 5], dtype=torch.int64).to(DEVICE)
    tokens = torch.tensor([70, 80, 90, 91, 92], dtype=torch.int64).to(DEVICE)
    pos = torch.tensor([7, 3, 5, 5, 2], dtype=torch.int64).to(DEVICE)
    kernels.advance_slots(slots, tokens, pos, last, steps, seq_lens, 4)
    assert seq_lens.tolist() == [4, 0, 8, 0, 0, 0]
    assert last.tolist() == [80, 2, 70, 4, 5, 6]
    assert steps.tolist() == [11, 0, 5, 0, 0, 0]
