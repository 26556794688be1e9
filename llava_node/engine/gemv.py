"""Batch-1 linear layers (GEMV), with the decode step's small ops fused in front.

At batch 1 a decode step is the language model's weights streaming through the device
once (13.2 GB for the 7B shape): each projection is ``y = x @ w.T`` for one row ``x``.
:func:`gemv` streams ``w`` [N, K] along K, ``BLOCK_N`` output rows per program, and can
compute its input on the fly from what the previous kernel wrote:

* ``gemv_norm``: ``rms_norm(x + residual) @ w.T`` (the layer's input norm, or the one
  after attention): each program accumulates ``sum_k w[n, k] * s[k] * g[k]`` and
  ``sum_k s[k]**2`` over the same loop (``s = x + residual``, rounded to the model's dtype
  as torch rounds it) and scales its outputs by ``rsqrt(mean(s**2) + eps)`` at the end;
  program 0 also writes ``s``, the new residual. This replaces the add + RMSNorm kernel.
* ``gemv(..., silu=True)``: ``(silu(gate) * up) @ w.T`` for ``x = [gate | up]`` (the
  MLP's down projection), rounded as torch's ``F.silu(gate) * up``; this replaces the
  SiLU*up kernel.
* ``gemv_glu``: ``silu(gate) * up`` of ``[gate | up] = x @ w.T`` (the MLP's gate/up
  projection, ``w = [w_gate; w_up]``): each program streams ``BLOCK_N / 2`` gate rows and
  the up rows of the same outputs, and applies SiLU*up to its sums before it stores them,
  with the roundings of a GEMV's output followed by the SiLU*up kernel (the same bits).
  This also replaces the SiLU*up kernel, and the down projection reads half the input.

With PDL (:mod:`~llava_node.engine.launch`) a program loads its first tile of weights
before it waits for the previous kernel. Every launch depends on shapes only (CUDA
graphs capture it); the kernels also run under Triton's CPU interpreter.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from llava_node.engine.launch import num_sms, pdl_enter, pdl_options

__all__ = [
    "CANDIDATES",
    "GEMV_FP8_CONFIG",
    "SHAPE_CONFIGS",
    "GemvConfig",
    "gemv",
    "gemv_glu",
    "gemv_norm",
    "replay_ms",
    "tune",
]

log = logging.getLogger(__name__)

# what a program computes its input from (the kernel's PROLOGUE)
_PLAIN, _NORM, _ADD_NORM, _SILU = 0, 1, 2, 3


@dataclass(frozen=True)
class GemvConfig:
    """Launch parameters of the batch-1 linear kernel.

    The default was the fastest of eight tried on an H100 (bf16, the 7B shape's four
    projections of 32 layers, 12.95 GB, CUDA graphs): 4.75 ms (2.73 TB/s) against
    cuBLAS's 4.94 ms (2.62 TB/s); `scripts/bench_engine.py --gemv`.
    """

    block_n: int = 4  # 0: from the shape (enough programs to fill the device)
    block_k: int = 1024
    num_warps: int = 4
    num_stages: int = 3
    evict_first: bool = False  # weights loaded with L2's evict-first policy (each read once)
    # columns of each program's first load of weights, the one made before the wait for
    # the previous kernel under PDL (0: block_k). More keeps more bytes in flight while a
    # long stretch of small kernels runs before this one (the attention before O).
    first_k: int = 0


# Over float8 weights: twice the columns per load, so that each thread still loads 16
# bytes (see GEMV_FP8_CONFIG's measurement in docs/performance.md, issue 18).
GEMV_FP8_CONFIG = GemvConfig(block_n=4, block_k=2048, num_warps=4, num_stages=3)

# Launch parameters per weight shape, (N, K, float8) -> GemvConfig, where they differ from
# the defaults above: :func:`tune` sets them at the runner's start, on the card it runs on.
SHAPE_CONFIGS: dict[tuple[int, int, bool], GemvConfig] = {}

# What :func:`tune` tries: the five fastest of twelve on an H200 (7B shape, PDL on, issue
# 18's sweep in docs/performance.md), which differ by shape: 4 x 2048 columns with 8 warps
# for the wide projections (QKV, gate/up), evict-first loads for the narrow ones.
CANDIDATES = (
    GemvConfig(),
    GemvConfig(evict_first=True),
    GemvConfig(block_n=2),
    GemvConfig(block_n=4, block_k=2048, num_warps=8),
    GemvConfig(block_n=8),
    # not in that sweep: the wide loads with evict-first (the fastest for the wide
    # projections and the LM head on an H200, 2026-12-02), and variants of it and of the
    # narrow projections' choice
    GemvConfig(block_n=4, block_k=2048, num_warps=8, evict_first=True),
    GemvConfig(block_n=8, block_k=2048, num_warps=8),
    GemvConfig(block_n=4, block_k=1024, num_warps=4, num_stages=4, evict_first=True),
    GemvConfig(block_n=4, block_k=2048, num_warps=8, num_stages=2, evict_first=True),
)
CANDIDATES_FP8 = (
    GEMV_FP8_CONFIG,
    GemvConfig(block_n=4, block_k=2048, evict_first=True),
    GemvConfig(block_n=2, block_k=2048),
    GemvConfig(block_n=4, block_k=4096, num_warps=8),
    GemvConfig(block_n=8, block_k=2048),
)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _load_weights(ptrs, mask, EVICT_FIRST: tl.constexpr):  # type: ignore[no-untyped-def]
    if EVICT_FIRST:
        return tl.load(ptrs, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit  # type: ignore[misc,untyped-decorator]
def silu_times(gate, up, dt):  # type: ignore[no-untyped-def]
    # torch's eager F.silu(gate) * up in dtype dt (float32 in): silu(gate) rounded, then the
    # product, so the fused paths compute exactly what transformers computes (kernels.py too)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    return (act * up).to(dt)


@triton.jit  # type: ignore[misc,untyped-decorator]
def _gemv_input(x_ptr, res_ptr, g_ptr, res_out_ptr, cols, col_mask, K, res_end, PROLOGUE: tl.constexpr):  # type: ignore[no-untyped-def]
    # The input columns `cols` of the product (float32) and, for the norms, the values
    # whose squares make the norm's statistics.
    dt = x_ptr.dtype.element_ty
    if PROLOGUE == 3:  # x = [gate | up]
        gate = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + cols, mask=col_mask, other=0.0).to(tl.float32)
        v = silu_times(gate, up, dt).to(tl.float32)
        s = v
    else:
        s = tl.load(x_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
        if PROLOGUE == 2:  # the residual add, rounded to the model's dtype as torch's
            s = (s + tl.load(res_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)).to(dt)
            tl.store(res_out_ptr + cols, s, mask=cols < res_end)  # program 0's columns
            s = s.to(tl.float32)
        v = s
        if PROLOGUE != 0:  # the norm's weight; its 1/rms scales the sums at the end
            v = s * tl.load(g_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)
    return v, s


@triton.jit  # type: ignore[misc,untyped-decorator]
def _gemv_kernel(  # type: ignore[no-untyped-def]
    x_ptr,
    res_ptr,
    g_ptr,
    res_out_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    N,
    K,
    stride_wn,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SCALED: tl.constexpr,
    PROLOGUE: tl.constexpr,
    EVICT_FIRST: tl.constexpr,
    FIRST_K: tl.constexpr,
    GLU: tl.constexpr,
    USE_GDC: tl.constexpr,
):
    # One program per BLOCK_N output rows, streaming their weights along K once. SCALED:
    # w holds float8 e4m3 (fp8_weights.py), each row's sum times its scale s_ptr[row].
    # FIRST_K (a multiple of BLOCK_K): the columns of the first load, before the wait.
    # GLU: w = [w_gate; w_up] of N rows; the program's rows alternate gate and up rows of
    # BLOCK_N / 2 outputs, and it stores silu(gate) * up of them (y has N / 2 values).
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK_N)
    if GLU:
        outs = pid * (BLOCK_N // 2) + r // 2
        rows = outs + (r % 2) * (N // 2)
        row_mask = outs < N // 2
    else:
        rows = pid * BLOCK_N + r
        row_mask = rows < N
    w_rows = w_ptr + rows[:, None].to(tl.int64) * stride_wn
    res_end = tl.where(pid == 0, K, 0)  # the new residual: written by program 0
    cols0 = tl.arange(0, FIRST_K)
    mask0 = cols0 < K
    # The first tile of weights, before waiting for the previous kernel (no kernel
    # writes weights): with PDL its load overlaps that kernel's last programs.
    w0 = _load_weights(w_rows + cols0[None, :], row_mask[:, None] & mask0[None, :], EVICT_FIRST)
    pdl_enter(USE_GDC)
    v0, s0 = _gemv_input(x_ptr, res_ptr, g_ptr, res_out_ptr, cols0, mask0, K, res_end, PROLOGUE)
    if FIRST_K == BLOCK_K:
        acc = w0.to(tl.float32) * v0[None, :]
        sq = s0 * s0
    else:  # a wider first tile, summed at once (its products are not kept)
        acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
        sq = tl.zeros([BLOCK_K], tl.float32)
        y0 = tl.sum(w0.to(tl.float32) * v0[None, :], axis=1)
        sq0 = tl.sum(s0 * s0, axis=0)
    for k0 in range(FIRST_K, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        col_mask = cols < K
        w = _load_weights(w_rows + cols[None, :], row_mask[:, None] & col_mask[None, :], EVICT_FIRST)
        v, s = _gemv_input(x_ptr, res_ptr, g_ptr, res_out_ptr, cols, col_mask, K, res_end, PROLOGUE)
        acc += w.to(tl.float32) * v[None, :]
        sq += s * s
    y = tl.sum(acc, axis=1)
    if FIRST_K != BLOCK_K:
        y += y0
    if PROLOGUE == 1 or PROLOGUE == 2:
        ss = tl.sum(sq, axis=0)
        if FIRST_K != BLOCK_K:
            ss += sq0
        y = y * tl.rsqrt(ss / K + eps)
    if SCALED:
        y = y * tl.load(s_ptr + rows, mask=row_mask, other=0.0)
    dt = y_ptr.dtype.element_ty
    if GLU:  # the output's rounding, then SiLU*up's (as a GEMV followed by the SiLU*up kernel)
        gate, up = tl.split(tl.reshape(y.to(dt).to(tl.float32), [BLOCK_N // 2, 2]))
        outs = pid * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
        tl.store(y_ptr + outs, silu_times(gate, up, dt), mask=outs < N // 2)
    else:
        tl.store(y_ptr + rows, y.to(dt), mask=row_mask)


def _launch(
    prologue: int,
    x: torch.Tensor,
    w: torch.Tensor,
    k: int,
    config: GemvConfig | None,
    scale: torch.Tensor | None,
    residual: torch.Tensor | None = None,
    norm_weight: torch.Tensor | None = None,
    res_out: torch.Tensor | None = None,
    eps: float = 0.0,
    pdl: bool = False,
    first_k: int = 0,
    glu: bool = False,
) -> torch.Tensor:
    n, kw = w.shape
    fp8 = scale is not None
    cfg = config or SHAPE_CONFIGS.get((n, kw, fp8)) or (GEMV_FP8_CONFIG if fp8 else GemvConfig())
    if first_k:
        cfg = dataclasses.replace(cfg, first_k=first_k)
    if cfg.first_k and (cfg.first_k % cfg.block_k or cfg.first_k & (cfg.first_k - 1)):
        raise ValueError(
            f"first_k {cfg.first_k} must be a power of two and a multiple of block_k {cfg.block_k}"
        )
    if w.stride(1) != 1:
        raise ValueError("w must have unit column stride")
    if kw != k:
        raise ValueError(f"the input has {k} values; w expects {kw}")
    if scale is not None and scale.shape != (n,):
        raise ValueError(f"scale has shape {tuple(scale.shape)}; w expects ({n},)")
    if glu and n % 2:
        raise ValueError(f"w = [w_gate; w_up] must have an even number of rows, not {n}")
    y = torch.empty((1, n // 2 if glu else n), dtype=x.dtype, device=x.device)
    block_n = cfg.block_n
    if not block_n:
        per_program = max(1, n // (4 * num_sms(x.device)))
        block_n = min(16, 1 << (per_program.bit_length() - 1))
    if glu:
        block_n = max(2, block_n)  # a gate row and its up row at least
    _gemv_kernel[(triton.cdiv(n, block_n),)](
        x,
        residual if residual is not None else x,
        norm_weight if norm_weight is not None else x,
        res_out if res_out is not None else y,
        w,
        scale if scale is not None else y,
        y,
        n,
        k,
        w.stride(0),
        float(eps),
        BLOCK_N=block_n,
        BLOCK_K=cfg.block_k,
        SCALED=scale is not None,
        PROLOGUE=prologue,
        EVICT_FIRST=cfg.evict_first,
        FIRST_K=max(min(cfg.first_k, triton.next_power_of_2(k)), cfg.block_k),
        GLU=glu,
        num_warps=cfg.num_warps,
        num_stages=cfg.num_stages,
        **pdl_options(pdl),
    )
    return y


def _row(x: torch.Tensor, name: str = "x") -> torch.Tensor:
    xv = x.reshape(-1)
    if x.dim() > 2 or (x.dim() == 2 and x.shape[0] != 1):
        raise ValueError(f"{name} must be one row ([1, K] or [K]), not {tuple(x.shape)}")
    return xv.contiguous()


def gemv(
    x: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    *,
    silu: bool = False,
    pdl: bool = False,
    first_k: int = 0,
) -> torch.Tensor:
    """``x @ w.T`` for one row: ``x`` ``[1, K]`` (or ``[K]``), ``w`` ``[N, K]`` with unit
    column stride; returns ``[1, N]`` in ``x``'s dtype, accumulated in float32.

    With ``scale`` [N] (float32), ``w`` is float8 e4m3 (:class:`~llava_node.engine.
    fp8_weights.Fp8Weight`'s values) and output ``n`` is multiplied by ``scale[n]``.
    With ``silu``, ``x`` is ``[gate | up]`` of ``2K`` values and the product's input is
    ``silu(gate) * up``, rounded to ``x``'s dtype as torch rounds it. ``pdl``: launched
    with programmatic dependent launch (:func:`~llava_node.engine.launch.pdl_available`).
    ``first_k``: the columns each program loads before it waits (:attr:`GemvConfig.
    first_k`; 0: the configuration's).
    """
    xv = _row(x)
    k = xv.shape[0] // 2 if silu else xv.shape[0]
    if silu and xv.shape[0] % 2:
        raise ValueError(f"x = [gate | up] must have an even number of values, not {xv.shape[0]}")
    return _launch(_SILU if silu else _PLAIN, xv, w, k, config, scale, pdl=pdl, first_k=first_k)


def gemv_glu(
    x: torch.Tensor,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> torch.Tensor:
    """``silu(gate) * up`` for ``[gate | up] = x @ w.T`` of one row, ``w`` ``[2F, K]``
    (``[w_gate; w_up]``, ``scale`` [2F] over float8): returns ``[1, F]``, the same bits
    as :func:`gemv` followed by the SiLU*up kernel (``kernels.silu_mul``), in one launch.
    """
    xv = _row(x)
    return _launch(_PLAIN, xv, w, xv.shape[0], config, scale, pdl=pdl, glu=True)


def gemv_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor,
    eps: float,
    w: torch.Tensor,
    config: GemvConfig | None = None,
    scale: torch.Tensor | None = None,
    *,
    pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``rms_norm(h) @ w.T`` for one row, with ``h = x + residual`` (rounded to ``x``'s
    dtype, as torch's add) or ``h = x`` when ``residual`` is None; returns ``(y, h)``:
    ``y`` ``[1, N]`` as :func:`gemv` returns it and ``h`` ``[1, K]``, the next residual.

    The norm is LlamaRMSNorm's (``norm_weight * h * rsqrt(mean(h**2) + eps)``), computed
    in float32 inside the product instead of rounded to the model's dtype first.
    """
    xv = _row(x)
    k = xv.shape[0]
    if norm_weight.shape != (k,) or not norm_weight.is_contiguous():
        raise ValueError(f"norm_weight must be contiguous [{k}], got {tuple(norm_weight.shape)}")
    if residual is None:
        y = _launch(_NORM, xv, w, k, config, scale, norm_weight=norm_weight, eps=eps, pdl=pdl)
        return y, xv.view(1, k)
    rv = _row(residual, "residual")
    if rv.shape != xv.shape or rv.dtype != xv.dtype:
        raise ValueError(
            f"residual {tuple(residual.shape)}/{residual.dtype} does not match x {tuple(x.shape)}/{x.dtype}"
        )
    h = torch.empty((1, k), dtype=x.dtype, device=x.device)
    y = _launch(_ADD_NORM, xv, w, k, config, scale, rv, norm_weight, h, eps, pdl)
    return y, h


def replay_ms(fn: Callable[..., object], reps: int = 10) -> float:
    """Milliseconds per replay of ``fn()`` captured in a CUDA graph (run once, captured,
    replayed three times before ``reps`` timed replays)."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    end.synchronize()
    return float(start.elapsed_time(end)) / reps


def tune(
    weights: Sequence[tuple[torch.Tensor, torch.Tensor | None]], dtype: torch.dtype, pdl: bool
) -> dict[tuple[int, int, bool], dict[str, float]]:
    """Choose each weight shape's launch parameters on this card, at start-up.

    ``weights``: the model's ``(w, scale)`` pairs of one-row products (``scale`` None for
    bf16 weights, else ``w`` is float8), e.g. every layer's four projections. For each
    shape, every candidate streams all of that shape's weights (so that they come from
    memory, as in a decode step) in a CUDA graph; the fastest goes into
    :data:`SHAPE_CONFIGS`. Returns the milliseconds of each candidate per shape, by the
    candidate's position in :data:`CANDIDATES` (``CANDIDATES_FP8``).
    """
    by_shape: dict[tuple[int, int, bool], list[tuple[torch.Tensor, torch.Tensor | None]]] = {}
    for w, scale in weights:
        by_shape.setdefault((int(w.shape[0]), int(w.shape[1]), scale is not None), []).append((w, scale))
    timings: dict[tuple[int, int, bool], dict[str, float]] = {}
    for key, ws in by_shape.items():
        n, k, fp8 = key
        x = torch.randn(1, k, device=ws[0][0].device, dtype=dtype)
        ms: dict[str, float] = {}
        best: tuple[float, GemvConfig] | None = None
        for i, cfg in enumerate(CANDIDATES_FP8 if fp8 else CANDIDATES):

            def run(
                cfg: GemvConfig = cfg,
                ws: list[tuple[torch.Tensor, torch.Tensor | None]] = ws,
                x: torch.Tensor = x,
                k: int = k,
            ) -> None:
                for w, scale in ws:
                    _launch(_PLAIN, x, w, k, cfg, scale, pdl=pdl)

            t = replay_ms(run)
            ms[str(i)] = round(t, 4)
            if best is None or t < best[0]:
                best = (t, cfg)
        assert best is not None
        SHAPE_CONFIGS[key] = best[1]
        timings[key] = ms
        log.info(
            "GEMV %dx%d%s: %s (%.3f ms for %d weights)",
            n,
            k,
            " fp8" if fp8 else "",
            best[1],
            best[0],
            len(ws),
        )
    return timings
