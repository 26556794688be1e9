"""Generation engines for ``llava_engine``.

``batching`` (default where supported): continuous batching over a paged KV cache,
CUDA graphs on a GPU. ``hf_generate``: transformers' ``generate``, the baseline.
"""

from __future__ import annotations

import logging
from pathlib import Path

from llava_node.engine.base import Engine, EngineStats, GenerationRequest, OutputSink
from llava_node.engine.loading import load_llava, pick_device
from llava_node.engine.options import ENGINE_KINDS, EngineOptions

__all__ = [
    "Engine",
    "EngineOptions",
    "EngineStats",
    "GenerationRequest",
    "OutputSink",
    "build_engine",
]

log = logging.getLogger(__name__)


def build_engine(checkpoint: Path, options: EngineOptions) -> Engine:
    """Load ``checkpoint`` and start the engine ``options.kind`` asks for."""
    from llava_node.engine.fp8_weights import weight_dtype
    from llava_node.engine.kv_cache import kv_cache_dtype
    from llava_node.engine.runner import LlavaRunner, RunnerConfig, mixed_row_sizes, supports

    if options.kind not in ENGINE_KINDS:
        raise ValueError(f"unknown engine {options.kind!r}; expected one of {ENGINE_KINDS}")
    kv_dtype = kv_cache_dtype(options.kv_cache_dtype)  # a bad value fails before loading
    w_dtype = weight_dtype(options.weight_dtype)
    device, dtype = pick_device(options.device)
    loaded = load_llava(checkpoint, device, dtype)
    kind = options.kind
    if kind == "auto":
        reason = supports(loaded.model.config)
        kind = "batching" if reason is None else "hf_generate"
        if reason is not None:
            log.warning("batching engine does not support %s; using hf_generate", reason)
    if kind == "hf_generate":
        from llava_node.engine.hf_generate import HFGenerateEngine

        if w_dtype is not None:
            log.warning("weight_dtype %s applies to the batching engine only; hf_generate runs bf16", w_dtype)
        return HFGenerateEngine(loaded, workers=options.hf_workers)
    from llava_node.engine.batching import BatchingEngine

    max_batch = options.max_batch or (64 if device.type == "cuda" else 8)
    prefill_chunk = options.prefill_chunk
    if prefill_chunk < 0:
        from llava_node.engine.batching import DEFAULT_PREFILL_CHUNK

        prefill_chunk = DEFAULT_PREFILL_CHUNK if device.type == "cuda" else 0
    chunk_max = options.prefill_chunk_max
    chunk_max = max(prefill_chunk, 2 * prefill_chunk if chunk_max < 0 else chunk_max) if prefill_chunk else 0
    runner = LlavaRunner(
        loaded,
        RunnerConfig(
            max_batch=max_batch,
            max_seq_len=options.max_seq_len,
            page_size=options.page_size,
            kv_cache_fraction=options.kv_cache_fraction,
            kv_cache_dtype=kv_dtype,
            weight_dtype=w_dtype,
            cuda_graphs=options.cuda_graphs,
            fused_kernels=options.fused_kernels,
            pdl=options.pdl,
            mixed_rows=chunk_max,
            mixed_row_sizes=mixed_row_sizes(prefill_chunk, chunk_max),
        ),
    )
    runner.warmup()
    return BatchingEngine(
        runner,
        loaded.tokenizer,
        loaded.eos_token_ids,
        stream_interval=options.stream_interval,
        prefill_chunk=prefill_chunk,
        prefill_chunk_max=chunk_max,
        prefix_cache=options.prefix_cache,
    )
