"""The engine's settings (``EngineOptions``) and how a node's model config and environment
spell them (``auto``, booleans, counts), parsed with errors that name the bad value."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["ENGINE_KINDS", "EngineOptions"]

ENGINE_KINDS = ("auto", "batching", "hf_generate")


@dataclass
class EngineOptions:
    """Engine settings, from the model's config parameters or environment."""

    kind: str = "auto"
    device: str = "auto"
    max_batch: int = 0  # 0: 8 on the CPU, 64 on a GPU
    max_seq_len: int = 0
    kv_cache_fraction: float = 0.9
    kv_cache_dtype: str = "auto"  # auto: the model's dtype; fp8: float8 e4m3 (see kv_cache.py)
    # auto: the model's dtype; fp8: the language model's linear layers as float8 e4m3 with
    # a scale per output channel, activations in bf16 (see fp8_weights.py)
    weight_dtype: str = "auto"
    page_size: int = 16
    cuda_graphs: bool = True
    hf_workers: int = 1
    stream_interval: int = 0  # 0: auto (see BatchingEngine); n: a response every n tokens
    fused_kernels: bool | None = None  # None: on a GPU (Triton kernels for prefill and decode)
    # the fused kernels of one-row steps (batch-1 decode) launched with programmatic
    # dependent launch where the GPU (compute capability 9.0+) and Triton have it: each
    # kernel overlaps the previous one's end
    pdl: bool = True
    # prompt tokens per mixed step while others decode; 0: whole prompts; -1: auto (256 on
    # a GPU, where a decode step is bound by reading the weights; 0 on the CPU, where it
    # is not, so chunks would only delay first tokens)
    prefill_chunk: int = -1
    # prompt tokens a mixed step may carry when more prompt rows wait than two steps of
    # prefill_chunk hold; -1: auto (twice prefill_chunk); at most prefill_chunk: no more
    prefill_chunk_max: int = -1
    # reuse the KV pages of cached prompt prefixes, and the vision tower's output for a
    # repeated image (see prefix_cache.py); false: every request computes its whole prompt
    prefix_cache: bool = True

    @classmethod
    def from_model_config(cls, opt: Callable[[str, str, str], str]) -> EngineOptions:
        """Options from ``opt(parameter, environment variable, default)``: a model-config
        parameter of ``llava_engine``, else the node's environment variable, else the
        default (``llava_node.triton_io.param``). Raises ValueError naming a bad value."""
        return cls(
            kind=opt("engine", "LLAVA_ENGINE", "auto"),
            device=opt("device", "LLAVA_DEVICE", "auto"),
            max_batch=_count(opt("max_batch", "LLAVA_MAX_BATCH", "0"), "max_batch"),
            max_seq_len=_count(opt("max_seq_len", "LLAVA_MAX_SEQ_LEN", "0"), "max_seq_len"),
            kv_cache_fraction=_fraction(opt("kv_cache_fraction", "LLAVA_KV_CACHE_FRACTION", "0.9")),
            kv_cache_dtype=opt("kv_cache_dtype", "LLAVA_KV_CACHE_DTYPE", "auto"),
            weight_dtype=opt("weight_dtype", "LLAVA_WEIGHT_DTYPE", "auto"),
            cuda_graphs=_boolean(opt("cuda_graphs", "LLAVA_CUDA_GRAPHS", "true"), "cuda_graphs"),
            stream_interval=_stream_interval(opt("stream_interval", "LLAVA_STREAM_INTERVAL", "auto")),
            fused_kernels=_tristate(opt("fused_kernels", "LLAVA_FUSED_KERNELS", "auto")),
            pdl=_boolean(opt("pdl", "LLAVA_PDL", "true"), "pdl"),
            prefill_chunk=_prefill_chunk(opt("prefill_chunk", "LLAVA_PREFILL_CHUNK", "auto")),
            prefill_chunk_max=_prefill_chunk(
                opt("prefill_chunk_max", "LLAVA_PREFILL_CHUNK_MAX", "auto"), "prefill_chunk_max"
            ),
            prefix_cache=_boolean(opt("prefix_cache", "LLAVA_PREFIX_CACHE", "true"), "prefix_cache"),
        )


def _tristate(value: str) -> bool | None:
    """``auto`` (None), or a boolean."""
    v = value.strip().lower()
    if v == "auto":
        return None
    if v in ("1", "true", "yes", "0", "false", "no"):
        return v in ("1", "true", "yes")
    raise ValueError(f"expected auto, true or false, not {value!r}")


def _prefill_chunk(value: str, name: str = "prefill_chunk") -> int:
    """``auto`` (-1) or a number of prompt tokens per step (0: off)."""
    if value.strip().lower() == "auto":
        return -1
    try:
        tokens = int(value)
    except ValueError:
        tokens = -1
    if tokens < 0:
        raise ValueError(f"{name} must be 'auto' or a number of tokens (0: off), not {value!r}")
    return tokens


def _stream_interval(value: str) -> int:
    """``auto`` (0) or a number of tokens per response."""
    if value.strip().lower() == "auto":
        return 0
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"stream_interval must be 'auto' or a positive number of tokens, not {value!r}")
    return n


def _boolean(value: str, name: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "0", "false", "no"):
        return v in ("1", "true", "yes")
    raise ValueError(f"{name} must be true or false, not {value!r}")


def _count(value: str, name: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise ValueError(f"{name} must be a number of 0 or more (0: automatic), not {value!r}")
    return n


def _fraction(value: str) -> float:
    try:
        f = float(value)
    except ValueError:
        f = -1.0
    if not 0.0 < f <= 1.0:
        raise ValueError(f"kv_cache_fraction must be in (0, 1], not {value!r}")
    return f
