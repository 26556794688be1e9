"""The model math of the batching engine: prefill and batched decode over a paged KV cache.

The language model is a Llama-family decoder run from the checkpoint's own weights
(fused into one QKV and one gate/up matrix per layer); the vision tower and the
projector are the checkpoint's own modules. Decode state lives on the device, per
slot (one slot per running request): its block table, length, last token and
sampling settings. A decode step reads only a list of slots, so the same step can be
replayed from a CUDA graph whatever the batch's make-up; on the CPU it runs eagerly.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from llava_node.engine.fp8_weights import Fp8Weight, Weight, quantize_fp8
from llava_node.engine.fp8_weights import linear as weight_linear
from llava_node.engine.kv_cache import PagedKVCache
from llava_node.engine.launch import pdl_available
from llava_node.engine.loading import LoadedModel
from llava_node.engine.prefix_cache import ImageFeatureCache
from llava_node.engine.sampling import sample_tokens, split_seed

__all__ = [
    "DecodeAttention",
    "LayerWeights",
    "LlavaRunner",
    "MixedLayout",
    "PendingTokens",
    "PromptChunk",
    "RunnerConfig",
    "UnsupportedModel",
    "mixed_row_sizes",
    "supports",
]

log = logging.getLogger(__name__)

SUPPORTED_TEXT_MODELS = ("llama", "mistral")
# The LM head's rows are padded to a multiple of this: with an odd vocabulary (32001 is
# common: 32000 + <image>) each output row is misaligned and cuBLAS falls back to a slow
# GEMM kernel for batches above one (a third of a millisecond per decode step on an H200).
LM_HEAD_ROW_MULTIPLE = 64


# attend(q, k_cache, v_cache, v): the attention output [N, H * hd] of rotated queries
# q [N, H, hd] whose keys and values are already in the layer's caches (v: their values).
Attend = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class DecodeAttention:
    """A decode step's attention over the paged cache (an :data:`Attend`); with
    ``kernels`` set, :meth:`from_qkv` does the same from the QKV projection's raw output,
    with RoPE and the cache store inside the attention kernel
    (:func:`~llava_node.engine.kernels.rope_decode_attention`)."""

    paged: Callable[..., torch.Tensor]
    tables: torch.Tensor
    lens: torch.Tensor
    scale: float
    page_size: int
    pdl: bool
    kernels: Any = None
    semaphores: torch.Tensor | None = None

    def __call__(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = self.paged(q, kc, vc, self.tables, self.lens, self.scale, self.page_size, pdl=self.pdl)
        return out.reshape(q.shape[0], -1)

    def from_qkv(self, new: Any, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
        """The attention output [N, H * hd] of the new rows ``new`` (a ``kernels.NewRow``);
        their rotated keys and values are written to ``kc``/``vc``."""
        assert self.kernels is not None
        out = self.kernels.rope_decode_attention(
            new,
            kc,
            vc,
            self.tables,
            self.lens,
            self.scale,
            self.page_size,
            semaphores=self.semaphores,
            pdl=self.pdl,
        )
        return out.reshape(new.q.shape[0], -1)


@dataclass(frozen=True)
class DecodeInputs:
    """What a decode step reads of its slots, a row per batch row (``step_state.
    decode_inputs`` gathers them in one launch)."""

    pos: torch.Tensor  # [B] the new token's position (the slot's length, clamped)
    x: torch.Tensor  # [B, D] the slot's last token's embedding
    cos: torch.Tensor  # [B, hd] RoPE at pos
    sin: torch.Tensor  # [B, hd]
    rows: torch.Tensor  # [B] the cache row of position pos
    tables: torch.Tensor  # [B, pages] the slot's block table
    lens: torch.Tensor  # [B] positions attended: pos + 1


class UnsupportedModel(ValueError):
    """The checkpoint's language model is not one this engine implements."""


def supports(config: Any) -> str | None:
    """None if the batching engine can run this LlavaConfig, else the reason it cannot."""
    text = config.text_config
    if text.model_type not in SUPPORTED_TEXT_MODELS:
        return f"language model type {text.model_type!r} (supported: {SUPPORTED_TEXT_MODELS})"
    if getattr(text, "hidden_act", "silu") != "silu":
        return f"activation {text.hidden_act!r}"
    window = getattr(text, "sliding_window", None)
    if window is not None and window < text.max_position_embeddings:
        return "sliding-window attention"
    return None


@dataclass
class RunnerConfig:
    """Sizes of the engine's state."""

    max_batch: int = 8
    max_seq_len: int = 0  # 0: the model's context length
    page_size: int = 16
    num_pages: int = 0  # 0: sized from memory (GPU) or max_batch full sequences (CPU)
    kv_cache_fraction: float = 0.9  # share of free GPU memory for the KV cache
    kv_cache_dtype: torch.dtype | None = None  # None: the model's; torch.float8_e4m3fn: 8-bit
    # None: the model's; torch.float8_e4m3fn: the language model's linear layers (not the
    # LM head, the embeddings or the vision tower) as float8 with per-row scales
    weight_dtype: torch.dtype | None = None
    cuda_graphs: bool = True
    fused_kernels: bool | None = None  # None: on CUDA when Triton is importable
    batch1_gemv: bool = True  # with the fused kernels: batch-1 decode GEMMs as a Triton GEMV
    # with the batch-1 GEMV: the norms (and their residual adds) and SiLU*up computed
    # inside the GEMVs that read them (gemv.py), not as kernels of their own. Off: on an
    # H200 with PDL the GEMVs' extra loads cost more than the kernels they replace
    # (docs/performance.md, issue 18)
    batch1_fused: bool = False
    # the Triton kernels of one-row steps (batch-1 decode) launched with programmatic
    # dependent launch where the device and Triton have it (launch.py): each overlaps the
    # previous one's end. Not for more rows: at 8 to 64 streams it cost 10-16 % (H200)
    pdl: bool = True
    # on a GPU, with the batch-1 GEMV: its launch parameters chosen per weight shape at
    # start-up, on the card itself (gemv.tune: a few milliseconds of timing per shape)
    tune_gemv: bool = True
    # with the fused kernels, for one-row decode steps: RoPE and the KV-cache store inside
    # the decode attention (rope_decode_attention: one launch where there were two; 3.77
    # -> 3.72 ms a 7B step on an H200). Not over a float8 cache without grouped heads,
    # whose attention is the heads kernel
    fused_decode_attention: bool = True
    # ... and its partitions merged in the same kernel, by the last to finish, instead of
    # by a kernel of their own. Off: on the H200 it made the step slower (3.72 -> 3.77 ms)
    merge_decode_partitions: bool = False
    # with the batch-1 GEMV: the columns of weights each program of the O projection loads
    # before it waits for the attention (GemvConfig.first_k; 0: the tuned configuration's
    # first tile), to keep more bytes in flight while the attention runs. 0: on an H200,
    # 2,048 and 4,096 made the 7B step slower (3.72 -> 3.79 and 3.77 ms, issue 18)
    o_first_k: int = 0
    # with the batch-1 GEMV: SiLU*up applied by the gate/up GEMV to its own sums before it
    # stores them (gemv_glu: the same bits, one launch where there were two, and the down
    # projection reads half the input)
    glu_gemv: bool = True
    prefill_graphs: bool = True  # with CUDA graphs and the fused kernels: captured prefills
    prefill_bucket: int = 16  # captured prefills pad the prompt to a multiple of this
    mixed_rows: int = 256  # prompt rows a captured mixed step holds (a multiple of chunk_block)
    # the prompt-row counts mixed steps are captured at, up to mixed_rows (a step replays
    # the smallest that holds its rows); empty: mixed_rows only
    mixed_row_sizes: tuple[int, ...] = ()
    chunk_block: int = 64  # a prompt's rows in a mixed step are padded to a multiple of this
    graph_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128)
    image_cache_entries: int = 64  # images whose vision-tower output is kept (0: none)


def mixed_row_sizes(chunk: int, chunk_max: int) -> tuple[int, ...]:
    """The prompt-row counts to capture mixed steps at, for a budget of ``chunk`` rows a
    step that grows to ``chunk_max`` under a backlog: half a chunk (a prompt's tail, or
    a short prompt, is not padded to a whole chunk), the chunk, and the most."""
    return tuple(sorted({r for r in (chunk // 2, chunk, chunk_max) if r > 0}))


@dataclass
class PromptChunk:
    """Rows ``start:end`` of the prompt of the request in ``slot``, for a mixed step."""

    slot: int
    embeds: torch.Tensor  # [n, D] the whole prompt's input embeddings, on the device
    start: int
    end: int

    @property
    def last(self) -> bool:
        """Whether this chunk ends the prompt (its step samples the first token)."""
        return self.end == self.embeds.shape[0]


@dataclass
class MixedLayout:
    """Where everything goes in a mixed step, worked out on the host.

    The prompt rows follow the decode rows; each chunk's rows are padded to whole blocks
    of ``chunk_block`` rows (position -1), so that every block belongs to one prompt.
    The tokens sampled are the decode rows', then each ended prompt's first token.
    """

    decode_slots: list[int]  # padded with the dummy slot to the step's batch
    positions: list[int]  # per prompt row; -1: padding
    block_slots: list[int]  # per block of prompt rows
    pick_rows: list[int]  # rows whose logits are sampled
    pick_slots: list[int]  # the slot each sampled row's token belongs to
    end_slots: list[int]  # slots whose prompt this step ends ...
    end_lens: list[int]  # ... and their lengths after it
    offsets: list[int]  # first prompt row of each chunk
    tokens: int  # real tokens the step returns (decode rows, then ended prompts)

    def _parts(self) -> tuple[list[int], ...]:
        return (
            self.decode_slots,
            self.positions,
            self.block_slots,
            self.pick_rows,
            self.pick_slots,
            self.end_slots,
            self.end_lens,
        )

    def flat(self) -> list[int]:
        """The step's integer inputs in one list, in :meth:`LlavaRunner.mixed_step`'s order
        (one copy to the device)."""
        return [v for part in self._parts() for v in part]

    def sizes(self) -> list[int]:
        """The length of each input in :meth:`flat`, to split it on the device."""
        return [len(part) for part in self._parts()]


@dataclass
class LayerWeights:
    """One decoder layer's weights, fused for fewer, larger matrix products (the four
    matrices float8 with per-row scales under ``weight_dtype`` fp8: fp8_weights.py)."""

    wqkv: Weight  # [(H + 2*KVH) * hd, D]
    bqkv: torch.Tensor | None
    wo: Weight  # [D, H * hd]
    wgu: Weight  # [2F, D]
    wdown: Weight  # [D, F]
    ln1: torch.Tensor
    ln2: torch.Tensor


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # Same arithmetic as transformers' LlamaRMSNorm: float32 statistics, cast back.
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


def _pad_rows(w: torch.Tensor, multiple: int) -> torch.Tensor:
    """``w`` with zero rows appended up to a multiple of ``multiple`` rows (``w`` itself if none are needed)."""
    extra = -w.shape[0] % multiple
    if not extra:
        return w
    return torch.cat([w, w.new_zeros(extra, *w.shape[1:])])


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlavaRunner:
    """Prefill and decode for a LLaVA model whose language model is Llama-family."""

    def __init__(self, loaded: LoadedModel, config: RunnerConfig) -> None:
        reason = supports(loaded.model.config)
        if reason is not None:
            raise UnsupportedModel(f"the batching engine does not support {reason}")
        self.loaded = loaded
        self.cfg = config
        self.device = loaded.device
        self.dtype = loaded.dtype
        hf = loaded.model
        text = hf.config.text_config
        self.n_layers = int(text.num_hidden_layers)
        self.hidden = int(text.hidden_size)
        self.n_heads = int(text.num_attention_heads)
        self.n_kv_heads = int(getattr(text, "num_key_value_heads", None) or self.n_heads)
        self.head_dim = int(getattr(text, "head_dim", None) or self.hidden // self.n_heads)
        self.eps = float(text.rms_norm_eps)
        self.vocab = int(text.vocab_size)
        self.max_seq_len = min(config.max_seq_len or loaded.context_length, loaded.context_length)
        self.image_token_id = loaded.image_token_id
        self.vision_feature_layer = hf.config.vision_feature_layer
        self.vision_feature_select_strategy = hf.config.vision_feature_select_strategy

        lm = hf.model.language_model
        self.embed = lm.embed_tokens.weight
        self.norm = lm.norm.weight
        self.lm_head = _pad_rows(hf.lm_head.weight, LM_HEAD_ROW_MULTIPLE)
        if config.weight_dtype not in (None, torch.float8_e4m3fn):
            raise ValueError(f"unsupported weight dtype {config.weight_dtype}")
        self.weight_dtype = config.weight_dtype
        self.layers = [self._fuse(layer) for layer in lm.layers]
        # The HF layers are no longer needed: free them (the fused copies replace them).
        lm.layers = torch.nn.ModuleList()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        positions = torch.arange(self.max_seq_len, device=self.device)[None]
        probe = torch.zeros(1, device=self.device, dtype=self.dtype)
        cos, sin = lm.rotary_emb(probe, positions)
        self.cos = cos[0].to(self.dtype).contiguous()  # [max_seq_len, hd]
        self.sin = sin[0].to(self.dtype).contiguous()

        self.max_batch = config.max_batch
        self.kv_dtype = config.kv_cache_dtype or self.dtype
        self.image_cache = ImageFeatureCache(config.image_cache_entries)
        self.cache = PagedKVCache.create(
            n_layers=self.n_layers,
            n_kv_heads=self.n_kv_heads,
            head_dim=self.head_dim,
            page_size=config.page_size,
            num_pages=self._num_pages(),
            max_slots=self.max_batch,
            max_seq_len=self.max_seq_len,
            device=self.device,
            dtype=self.kv_dtype,
        )
        s = self.max_batch + 1  # one extra slot, the target of padded batch rows
        self.dummy_slot = self.max_batch
        dev = self.device
        self.seq_lens = torch.zeros(s, dtype=torch.int64, device=dev)
        self.last_tokens = torch.zeros(s, dtype=torch.int64, device=dev)
        self.steps = torch.zeros(s, dtype=torch.int64, device=dev)
        self.temperature = torch.zeros(s, dtype=torch.float32, device=dev)
        self.top_p = torch.ones(s, dtype=torch.float32, device=dev)
        self.seed_lo = torch.zeros(s, dtype=torch.int64, device=dev)
        self.seed_hi = torch.zeros(s, dtype=torch.int64, device=dev)
        self.fused: Any = _fused_kernels(self.device, config.fused_kernels)
        self.paged_attention: Any = _paged_attention(self.device, self.fused)
        self.gemv: Any = self.fused.gemv if self.fused is not None and config.batch1_gemv else None
        self.batch1_fused = config.batch1_fused
        self.pdl = bool(config.pdl and self.fused is not None and pdl_available(self.device))
        self.o_first_k = config.o_first_k
        self.glu_gemv = config.glu_gemv
        # a decode step's slot bookkeeping as two kernels (step_state.py), not torch ops
        self.step_state_kernels = self.fused is not None
        self.gemv_timings: dict[Any, Any] = {}
        # one-row decode: RoPE + store in the attention (and its partitions merged there)
        self.decode_rope = bool(
            config.fused_decode_attention
            and self.fused is not None
            and self.fused.uses_group_kernel(self.kv_dtype, self.n_heads, self.n_kv_heads)
        )
        self.decode_semaphores = (
            self.fused.decode_semaphores(1, self.n_kv_heads, self.device)
            if self.decode_rope and config.merge_decode_partitions
            else None
        )
        self.graphs: Any = None
        self.vision_graph: Any = None
        self.prefill_graphs: Any = None
        self.mixed_graphs: Any = None
        # prompt rows alone (no decode rows) at fewer rows than a mixed step's: the rows
        # after a reused prefix, while nothing else runs (see prefill_from)
        self.prompt_graphs: list[Any] = []
        if dev.type == "cuda" and config.cuda_graphs:
            from llava_node.engine.cuda_graphs import (
                DecodeGraphs,
                ImageFeatureGraph,
                MixedGraphs,
                MixedGraphSet,
                PrefillGraphs,
            )

            self.graphs = DecodeGraphs(self, [b for b in config.graph_batch_sizes if b <= self.max_batch])
            self.vision_graph = ImageFeatureGraph(self)
            if config.prefill_graphs and self.fused is not None:
                self.prefill_graphs = PrefillGraphs(self, config.prefill_bucket)
            if config.mixed_rows and self.paged_attention is not None:
                sizes = [r for r in config.mixed_row_sizes if r < config.mixed_rows] + [config.mixed_rows]
                self.mixed_graphs = MixedGraphSet(self, sizes, self.graphs.batch_sizes)
                block = config.chunk_block
                self.prompt_graphs = [
                    MixedGraphs(self, r, [1]) for r in range(block, self.mixed_graphs.rows, block)
                ]

    # -- set-up ----------------------------------------------------------------------
    def _fuse(self, layer: Any) -> LayerWeights:
        attn, mlp = layer.self_attn, layer.mlp
        wqkv = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight], dim=0)
        bqkv = None
        if attn.q_proj.bias is not None:
            bqkv = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias], dim=0)
        wgu = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)
        # float8 (weight_dtype fp8): each matrix quantized per output row (fp8_weights.py)
        store: Callable[[torch.Tensor], Weight] = (
            quantize_fp8 if self.weight_dtype == torch.float8_e4m3fn else lambda t: t
        )
        weights = LayerWeights(
            wqkv=store(wqkv.contiguous()),
            bqkv=bqkv,
            wo=store(attn.o_proj.weight),
            wgu=store(wgu.contiguous()),
            wdown=store(mlp.down_proj.weight),
            ln1=layer.input_layernorm.weight,
            ln2=layer.post_attention_layernorm.weight,
        )
        # Drop the originals of what was copied, one layer at a time, to cap peak memory.
        copied = [attn.q_proj, attn.k_proj, attn.v_proj, mlp.gate_proj, mlp.up_proj]
        if self.weight_dtype is not None:
            copied += [attn.o_proj, mlp.down_proj]
        for m in copied:
            m.weight = None
        return weights

    def _num_pages(self) -> int:
        cfg = self.cfg
        if cfg.num_pages:
            return cfg.num_pages
        per_seq = math.ceil(self.max_seq_len / cfg.page_size)
        if self.device.type != "cuda":
            return self.max_batch * per_seq + 1
        free, _total = torch.cuda.mem_get_info(self.device)
        page_bytes = PagedKVCache.page_bytes(
            self.n_layers, self.n_kv_heads, self.head_dim, cfg.page_size, self.kv_dtype
        )
        # Leave room for activations, sampling buffers, CUDA graphs and the image cache.
        vision = self.loaded.model.config.vision_config
        image_bytes = (
            ((vision.image_size // vision.patch_size) ** 2 + 1) * self.hidden * self.embed.element_size()
        )
        reserve = 2 * 1024**3 + self.max_batch * self.vocab * 64 + cfg.image_cache_entries * image_bytes
        budget = max(0, int((free - reserve) * cfg.kv_cache_fraction))
        pages = budget // page_bytes
        if pages < per_seq // 4:
            raise MemoryError(f"only {budget / 1e9:.1f} GB free for the KV cache: not enough for one request")
        return int(min(pages, self.max_batch * per_seq + 1))

    def warmup(self) -> None:
        """Run the first steps (and capture CUDA graphs) before serving."""
        if self.gemv is not None and self.device.type == "cuda" and self.cfg.tune_gemv:
            self.gemv_timings = self._tune_gemv()
        if self.graphs is not None:
            self.graphs.capture()
        if self.vision_graph is not None:
            self.vision_graph.capture()
        if self.mixed_graphs is not None:
            self.mixed_graphs.capture()
        for g in self.prompt_graphs:
            g.capture()

    def _tune_gemv(self) -> dict[Any, Any]:
        """Each one-row product's launch parameters, timed on this card (gemv.tune)."""
        from llava_node.engine import gemv

        pairs: list[tuple[torch.Tensor, torch.Tensor | None]] = [(self.lm_head, None)]
        for layer in self.layers:
            for w in (layer.wqkv, layer.wo, layer.wgu, layer.wdown):
                pairs.append((w.q, w.scale) if isinstance(w, Fp8Weight) else (w, None))
        return gemv.tune(pairs, self.dtype, self.pdl)

    # -- per-slot state --------------------------------------------------------------
    def assign(
        self, slot: int, pages: Sequence[int], temperature: float, top_p: float, seed: int, step: int = 0
    ) -> None:
        """Give ``slot`` its pages and sampling settings before its prefill; its first
        token is sampled at ``step`` (0, or a continuation's prior tokens)."""
        self.cache.set_block_table(slot, pages)
        lo, hi = split_seed(seed)
        # One upload per dtype, then copies on the device: a Python number assigned into a
        # CUDA tensor (t[slot] = x) waits for every step already launched (profiled at 32
        # streams: ~10 ms per new request, the device idle behind it).
        floats = self.upload(torch.tensor([temperature, top_p], dtype=torch.float32))
        ints = self.upload(torch.tensor([lo, hi, step], dtype=torch.int64))
        s = slice(slot, slot + 1)
        self.temperature[s].copy_(floats[0:1])
        self.top_p[s].copy_(floats[1:2])
        self.seed_lo[s].copy_(ints[0:1])
        self.seed_hi[s].copy_(ints[1:2])
        self.steps[s].copy_(ints[2:3])

    # -- model pieces ----------------------------------------------------------------
    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Vision tower + projector: [images, 3, H, W] -> [image tokens, D] (replayed from
        a CUDA graph when one was captured for this shape)."""
        if self.vision_graph is not None:
            feats = self.vision_graph.run(pixel_values)
            if feats is not None:
                return feats
        return self.image_features_eager(pixel_values)

    def image_features_eager(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """:meth:`image_features` through the checkpoint's own modules, op by op."""
        hf = self.loaded.model
        out = hf.model.get_image_features(
            pixel_values=self.upload(pixel_values).to(self.dtype),
            vision_feature_layer=self.vision_feature_layer,
            vision_feature_select_strategy=self.vision_feature_select_strategy,
        )
        feats = out.pooler_output if hasattr(out, "pooler_output") else out
        if isinstance(feats, (list, tuple)):
            feats = torch.cat([f.reshape(-1, f.shape[-1]) for f in feats], dim=0)
        return feats.reshape(-1, feats.shape[-1]).to(self.dtype)

    def _qkv(self, x: torch.Tensor, w: LayerWeights) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = _rms_norm(x, w.ln1, self.eps)
        qkv = weight_linear(h, w.wqkv, w.bqkv)
        hd, nh, nkv = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        return q.unflatten(-1, (nh, hd)), k.unflatten(-1, (nkv, hd)), v.unflatten(-1, (nkv, hd))

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [tokens, heads, hd]; cos/sin [tokens, hd]
        return x * cos[:, None, :] + _rotate_half(x) * sin[:, None, :]

    def _mlp(self, x: torch.Tensor, w: LayerWeights) -> torch.Tensor:
        h = _rms_norm(x, w.ln2, self.eps)
        gate, up = weight_linear(h, w.wgu).chunk(2, dim=-1)
        return weight_linear(F.silu(gate) * up, w.wdown)

    # -- prefill ---------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(
        self,
        slot: int,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_keys: Sequence[bytes] | None = None,
    ) -> int:
        """Run the prompt of the request in ``slot``, fill its KV cache, return its first token."""
        logits = self.prefill_logits(slot, input_ids, pixel_values, image_keys)
        token = self._sample(logits[None], self._index([slot]), all_greedy=False)
        self.seq_lens[slot] = int(input_ids.shape[0])
        return int(token[0])

    @torch.inference_mode()
    def prefill_logits(
        self,
        slot: int,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_keys: Sequence[bytes] | None = None,
    ) -> torch.Tensor:
        """Run the prompt through the model, filling ``slot``'s KV cache; the logits
        (float32, [vocab]) of its last position."""
        x = self.prompt_embeddings(input_ids, pixel_values, image_keys)
        n = x.shape[0]
        flat = self.cache.flat_positions(slot, n)
        if self.prefill_graphs is not None and self.fused is not None:
            logits = self.prefill_graphs.run(x, flat)
            if logits is not None:
                return logits
        h = self._layers(x, self.cos[:n], self.sin[:n], flat, self._prompt_attend(flat))
        return self._vocab_logits(h[-1:])[0]

    @torch.inference_mode()
    def prefill_from(self, slot: int, embeds: torch.Tensor, start: int, all_greedy: bool) -> int:
        """Run prompt rows ``start:`` of ``embeds`` [n, D] for ``slot``, whose rows before
        ``start`` are in its KV cache already (a reused prefix); return its first token.

        Steps of prompt rows and no decode rows, each as many rows as a mixed step holds
        (the last one in the smallest captured step that holds it): replays, where a
        whole prompt's captured prefill could not attend to the cached rows, and an
        eager step of several hundred kernels would cost more host time than device time.
        """
        n = int(embeds.shape[0])
        step = self.mixed_graphs.rows if self.mixed_graphs is not None else (self.cfg.mixed_rows or n)
        pending: PendingTokens | None = None
        for s in range(start, n, step):
            chunk = PromptChunk(slot, embeds, s, min(s + step, n))
            fits = [
                g
                for g in self.prompt_graphs
                if g.rows >= -(-(chunk.end - s) // self.cfg.chunk_block) * self.cfg.chunk_block
            ]
            out = fits[0].launch([], [chunk], all_greedy) if fits else None
            pending = PendingTokens(out) if out is not None else self.mixed_launch([], [chunk], all_greedy)
        assert pending is not None, "prefill_from needs at least one row to run"
        return pending.tokens()[0]

    @torch.inference_mode()
    def prompt_embeddings(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        image_keys: Sequence[bytes] | None = None,
        start: int = 0,
    ) -> torch.Tensor:
        """The prompt's input embeddings [n, D]: token embeddings, with the image features
        in place of the image tokens. Nothing waits for the device: the image tokens are
        found in the host's copy of the ids, so a step already launched keeps running.

        ``image_keys`` (the images' content hashes) let repeated images skip the vision
        tower (:attr:`image_cache`). Rows before ``start`` are not computed (their keys
        and values are cached): when every image token lies there, no image is looked at.
        """
        ids = input_ids.cpu()
        x = F.embedding(self.upload(ids), self.embed)
        where = (ids == self.image_token_id).nonzero().squeeze(1)
        n_image = int(where.shape[0])
        if n_image:
            if pixel_values is None or pixel_values.shape[0] == 0:
                raise ValueError(f"the prompt has {n_image} image tokens but no image was given")
            if int(where[-1]) < start:
                return x
            feats = self._image_features_cached(pixel_values, image_keys)
            if feats.shape[0] != n_image:
                raise ValueError(
                    f"the prompt has {n_image} image tokens but the images give {feats.shape[0]} features"
                )
            x = x.index_copy(0, self.upload(where), feats.to(x.dtype))
        return x

    def _image_features_cached(
        self, pixel_values: torch.Tensor, keys: Sequence[bytes] | None
    ) -> torch.Tensor:
        """:meth:`image_features` of every image, the vision tower run only on those the
        image cache does not hold (all of them at once)."""
        cache = self.image_cache
        if keys is None or not cache.capacity or len(keys) != pixel_values.shape[0]:
            return self.image_features(pixel_values)
        found = [cache.get(k) for k in keys]
        missing = [i for i, f in enumerate(found) if f is None]
        if missing:
            fresh = self.image_features(pixel_values[missing])
            # a copy: a captured vision graph returns its own output buffer
            for i, f in zip(missing, fresh.chunk(len(missing)), strict=True):
                kept = f.clone()
                cache.put(keys[i], kept)
                found[i] = kept
        return torch.cat([f for f in found if f is not None])

    def padded_prefill_logits(self, x: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """The fused prefill of a prompt padded at its end: ``x`` [P, D] embeddings, ``rows``
        [P] cache rows (padding rows point into the reserved page 0), ``last`` [1] the
        index of the prompt's last real token; returns float32 logits [1, vocab] there.

        Causal attention keeps the real tokens blind to the padding after them, so they
        compute what the unpadded prompt computes; the padding's keys and values land in
        page 0, which no request owns. A fixed shape per padded length: what
        :class:`~llava_node.engine.cuda_graphs.PrefillGraphs` captures.
        """
        p = x.shape[0]
        h = self._layers(x, self.cos[:p], self.sin[:p], rows, self._prompt_attend(rows))
        return self._vocab_logits(h.index_select(0, last))

    def _prompt_attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Attention of a prompt's rows q [n, H, hd] over keys/values [L, KVH, hd] of that
        prompt: causal when ``mask`` is None (L == n), else ``mask`` [n, L] (True: seen)."""
        a = F.scaled_dot_product_attention(
            q.transpose(0, 1)[None],
            k.transpose(0, 1)[None],
            v.transpose(0, 1)[None],
            attn_mask=mask,
            is_causal=mask is None,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )
        return a[0].transpose(0, 1).reshape(q.shape[0], -1)

    def _prompt_attend(self, rows: torch.Tensor) -> Attend:
        """Causal attention of a whole prompt stored at cache ``rows`` (SDPA: flash on the GPU).
        The keys come from the cache (rotated there); the values too when the cache rounds
        them (float8), so that a prompt attends what its later tokens and chunks see."""
        read = self.cache.read

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            values = v if vc.dtype == v.dtype else read(vc, rows, q.dtype)
            return self._prompt_attention(q, read(kc, rows, q.dtype), values)

        return attend

    # -- decode ----------------------------------------------------------------------
    def decode_step(self, slots: torch.Tensor, all_greedy: bool) -> torch.Tensor:
        """One token for each slot in ``slots`` (a device tensor); updates slot state.

        Padding rows name ``dummy_slot``. Graph-capturable: no host synchronisation. On
        the fused kernels, what the step reads of its slots and what it writes back are
        one launch each (step_state.py).
        """
        if self.step_state_kernels:
            c = self.cache
            inputs = DecodeInputs(
                *self.fused.decode_inputs(
                    slots,
                    self.seq_lens,
                    self.last_tokens,
                    self.embed,
                    self.cos,
                    self.sin,
                    c.block_tables,
                    c.page_size,
                )
            )
            nxt = self._next_tokens(self._decode_logits(slots, inputs), slots, all_greedy)
            self.fused.advance_slots(
                slots, nxt, inputs.pos, self.last_tokens, self.steps, self.seq_lens, self.dummy_slot
            )
            return nxt
        pos = self.seq_lens[slots].clamp(max=self.max_seq_len - 1)
        nxt = self._sample(self.step_logits(slots, pos), slots, all_greedy)
        self.seq_lens[slots] = pos + 1
        self.seq_lens[self.dummy_slot :].zero_()  # a kernel, not a host copy: graph-safe
        return nxt

    def _next_tokens(self, logits: torch.Tensor, slots: torch.Tensor, all_greedy: bool) -> torch.Tensor:
        """Each slot's next token from its logits row. The image token is never one (an
        input placeholder: see :func:`~llava_node.engine.loading.load_llava`)."""
        logits[:, self.image_token_id] = float("-inf")  # (in place: graph-safe, no copy)
        if all_greedy:  # (the sampling state is not even gathered)
            return logits.argmax(dim=-1)
        return sample_tokens(
            logits,
            self.temperature[slots],
            self.top_p[slots],
            self.seed_lo[slots],
            self.seed_hi[slots],
            self.steps[slots],
            all_greedy=False,
        )

    def _sample(self, logits: torch.Tensor, slots: torch.Tensor, all_greedy: bool) -> torch.Tensor:
        """:meth:`_next_tokens`, which become the slots' last tokens (one step more each)."""
        nxt = self._next_tokens(logits, slots, all_greedy)
        self.last_tokens[slots] = nxt
        self.steps[slots] += 1
        return nxt

    def step_logits(self, slots: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits (float32, [B, vocab]) of each slot's last token at position ``pos``;
        writes that token's keys and values into the cache."""
        inputs = DecodeInputs(
            pos=pos,
            x=F.embedding(self.last_tokens[slots], self.embed),  # [B, D]
            cos=self.cos[pos],
            sin=self.sin[pos],
            rows=self.cache.flat_slot_positions(slots, pos),
            tables=self.cache.block_tables[slots],
            lens=pos + 1,
        )
        return self._decode_logits(slots, inputs)

    def _decode_logits(self, slots: torch.Tensor, inputs: DecodeInputs) -> torch.Tensor:
        """:meth:`step_logits` from what the step reads of its slots."""
        attend = self._decode_attend(slots, inputs.lens, inputs.tables)
        return self._vocab_logits(self._layers(inputs.x, inputs.cos, inputs.sin, inputs.rows, attend))

    def _decode_attend(
        self, slots: torch.Tensor, lens: torch.Tensor, tables: torch.Tensor | None = None
    ) -> Attend:
        """Attention of one new row per slot over that slot's first ``lens`` positions
        (``tables``: the slots' block tables, when gathered already)."""
        cache = self.cache
        tables = cache.block_tables[slots] if tables is None else tables
        if self.paged_attention is not None:
            scale = 1.0 / math.sqrt(self.head_dim)
            paged = self.paged_attention

            one_row = self.decode_rope and slots.shape[0] == 1
            return DecodeAttention(
                paged,
                tables,
                lens,
                scale,
                cache.page_size,
                self._pdl(slots.shape[0]),
                self.fused if one_row else None,
                self.decode_semaphores if one_row else None,
            )
        # torch: gather each slot's keys (to the longest length; all of max_seq_len on a
        # GPU, where reading the length back would stop graph capture) and mask the rest.
        length = self.max_seq_len if self.device.type == "cuda" else int(lens.max())
        pos = torch.arange(length, device=self.device)
        rows = tables[:, pos // cache.page_size] * cache.page_size + pos % cache.page_size
        mask = (pos[None, :] < lens[:, None])[:, None, None, :]
        gqa = self.n_kv_heads != self.n_heads

        def attend_torch(
            q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, v: torch.Tensor
        ) -> torch.Tensor:
            k = cache.read(kc, rows, q.dtype).transpose(1, 2)  # [B, KVH, L, hd]
            vv = cache.read(vc, rows, q.dtype).transpose(1, 2)
            out = F.scaled_dot_product_attention(q[:, :, None, :], k, vv, attn_mask=mask, enable_gqa=gqa)
            return out[:, :, 0, :].reshape(q.shape[0], -1)

        return attend_torch

    # -- mixed steps: decode rows and a chunk of a prompt in one pass ------------------
    def mixed_layout(
        self,
        slots: Sequence[int],
        chunks: Sequence[PromptChunk],
        *,
        batch: int | None = None,
        rows: int | None = None,
        ends: int | None = None,
    ) -> MixedLayout:
        """The :class:`MixedLayout` of decoding ``slots`` with ``chunks``; ``batch``,
        ``rows`` and ``ends`` pad it to a captured step's fixed sizes (decode rows, prompt
        rows, prompts that may end)."""
        bm = self.cfg.chunk_block
        b = len(slots) if batch is None else batch
        dummy = self.dummy_slot
        positions: list[int] = []
        block_slots: list[int] = []
        offsets: list[int] = []
        ended: list[tuple[int, int, int]] = []  # (row, slot, length)
        for c in chunks:
            n = c.end - c.start
            padded = -(-n // bm) * bm
            offsets.append(len(positions))
            if c.last:
                ended.append((b + len(positions) + n - 1, c.slot, c.end))
            positions += [*range(c.start, c.end), *([-1] * (padded - n))]
            block_slots += [c.slot] * (padded // bm)
        if rows is not None:
            if len(positions) > rows:
                raise ValueError(f"{len(positions)} prompt rows (padded) exceed the step's {rows}")
            block_slots += [dummy] * ((rows - len(positions)) // bm)
            positions += [-1] * (rows - len(positions))
        n_ends = len(ended) if ends is None else ends
        if len(ended) > n_ends:
            raise ValueError(f"{len(ended)} prompts end in one step; at most {n_ends} can")
        fill = n_ends - len(ended)
        real = list(slots)
        return MixedLayout(
            decode_slots=real + [dummy] * (b - len(real)),
            positions=positions,
            block_slots=block_slots,
            pick_rows=[*range(len(real)), *(r for r, _, _ in ended), *range(b - len(real) + fill)],
            pick_slots=[*real, *(s for _, s, _ in ended), *([dummy] * (b - len(real) + fill))],
            end_slots=[*(s for _, s, _ in ended), *([dummy] * fill)],
            end_lens=[*(n for _, _, n in ended), *([0] * fill)],
            offsets=offsets,
            tokens=len(real) + len(ended),
        )

    @torch.inference_mode()
    def mixed_step(
        self,
        slots: torch.Tensor,
        x_prompt: torch.Tensor,
        positions: torch.Tensor,
        block_slots: torch.Tensor,
        pick_rows: torch.Tensor,
        pick_slots: torch.Tensor,
        end_slots: torch.Tensor,
        end_lens: torch.Tensor,
        all_greedy: bool,
    ) -> torch.Tensor:
        """A decode step for ``slots`` that also runs prompt rows ``x_prompt`` [R, D] at
        ``positions`` (blocks of rows, one prompt each: ``block_slots``) through the
        layers: the weights are read once for all rows, so the prompts' rows ride on a
        step that the decode rows alone leave memory-bound.

        Samples the rows ``pick_rows`` for ``pick_slots`` (the decode rows, and the last
        row of each prompt this step ends) and returns those tokens; sets the lengths of
        ``end_slots`` to ``end_lens``. Fixed shapes and no host synchronisation: a CUDA
        graph captures it (see :class:`~llava_node.engine.cuda_graphs.MixedGraphs`).
        """
        pos = self.seq_lens[slots].clamp(max=self.max_seq_len - 1)
        h = self._mixed_hidden(slots, pos, x_prompt, positions, block_slots)
        nxt = h.new_zeros(0, dtype=torch.int64)
        if pick_rows.shape[0]:
            nxt = self._sample(self._vocab_logits(h.index_select(0, pick_rows)), pick_slots, all_greedy)
        self.seq_lens[slots] = pos + 1
        self.seq_lens[end_slots] = end_lens
        self.seq_lens[self.dummy_slot :].zero_()
        return nxt

    def _mixed_hidden(
        self,
        slots: torch.Tensor,
        pos: torch.Tensor,
        x_prompt: torch.Tensor,
        positions: torch.Tensor,
        block_slots: torch.Tensor,
    ) -> torch.Tensor:
        """The final hidden states of a mixed step's rows: decode rows of ``slots`` at
        ``pos``, then prompt rows ``x_prompt`` at ``positions`` (see :meth:`mixed_step`)."""
        b = int(slots.shape[0])
        prompt_pos = positions.clamp(min=0)
        bm = positions.shape[0] // max(1, block_slots.shape[0])
        row_slots = block_slots.repeat_interleave(bm)
        prompt_rows = torch.where(positions >= 0, self.cache.flat_slot_positions(row_slots, prompt_pos), 0)
        x = torch.cat([F.embedding(self.last_tokens[slots], self.embed), x_prompt])
        cos = torch.cat([self.cos[pos], self.cos[prompt_pos]])
        sin = torch.cat([self.sin[pos], self.sin[prompt_pos]])
        rows = torch.cat([self.cache.flat_slot_positions(slots, pos), prompt_rows])
        decode = self._decode_attend(slots, pos + 1) if b else None
        prompt = self._chunk_attend(block_slots, positions)

        def attend(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = prompt(q[b:], kc, vc)
            return out if decode is None else torch.cat([decode(q[:b], kc, vc, v[:b]), out])

        return self._layers(x, cos, sin, rows, attend)

    @torch.inference_mode()
    def prefill_logits_from(self, slot: int, embeds: torch.Tensor, start: int) -> torch.Tensor:
        """:meth:`prefill_logits` of a prompt whose rows before ``start`` are in ``slot``'s
        KV cache already (a reused prefix): only rows ``start:`` of ``embeds`` [n, D] run.
        The logits (float32, [vocab]) of its last position."""
        n = int(embeds.shape[0])
        lay = self.mixed_layout([], [PromptChunk(slot, embeds, start, n)])
        x = torch.zeros(len(lay.positions), self.hidden, dtype=self.dtype, device=self.device)
        x[: n - start] = embeds[start:]
        _d, p, bs, pr, _ps, _es, _el = self._index(lay.flat()).split(lay.sizes())
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        h = self._mixed_hidden(empty, empty, x, p, bs)
        return self._vocab_logits(h.index_select(0, pr))[0]

    def _chunk_attend(self, block_slots: torch.Tensor, positions: torch.Tensor) -> Any:
        """Attention of prompt rows in blocks (see :meth:`mixed_step`): the Triton kernel
        where the decode kernel runs, else SDPA per block (reads positions on the host)."""
        cache = self.cache
        if self.paged_attention is not None:
            from llava_node.engine.kernels import paged_prefill_attention

            scale = 1.0 / math.sqrt(self.head_dim)
            bm = positions.shape[0] // max(1, block_slots.shape[0])

            def kernel(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
                out = paged_prefill_attention(
                    q, kc, vc, cache.block_tables, block_slots, positions, scale, cache.page_size, block_m=bm
                )
                return out.reshape(q.shape[0], -1)

            return kernel

        def per_block(q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor) -> torch.Tensor:
            out = q.new_zeros(q.shape[0], q.shape[1] * q.shape[2])
            bm = positions.shape[0] // max(1, block_slots.shape[0])
            for i, slot in enumerate(block_slots.tolist()):
                p = positions[i * bm : (i + 1) * bm]
                real = (p >= 0).nonzero().squeeze(1)
                if real.numel() == 0:
                    continue
                p = p[real]
                end = int(p.max()) + 1
                seen = cache.flat_positions(slot, end)
                mask = torch.arange(end, device=p.device)[None, :] <= p[:, None]
                rows = i * bm + real
                k, v = cache.read(kc, seen, q.dtype), cache.read(vc, seen, q.dtype)
                out[rows] = self._prompt_attention(q[rows], k, v, mask)
            return out

        return per_block

    @torch.inference_mode()
    def mixed_launch(
        self, slots: Sequence[int], chunks: Sequence[PromptChunk], all_greedy: bool
    ) -> PendingTokens:
        """Start a :meth:`mixed_step` for decoding ``slots`` with ``chunks`` of prompts:
        replayed from a CUDA graph when one holds it, else eagerly."""
        if self.mixed_graphs is not None:
            out = self.mixed_graphs.launch(slots, chunks, all_greedy)
            if out is not None:
                return PendingTokens(out)
        lay = self.mixed_layout(slots, chunks)
        x = torch.zeros(len(lay.positions), self.hidden, dtype=self.dtype, device=self.device)
        for c, off in zip(chunks, lay.offsets, strict=True):
            x[off : off + c.end - c.start] = c.embeds[c.start : c.end]
        ints = self._index(lay.flat())
        d, p, bs, pr, ps, es, el = ints.split(lay.sizes())
        return PendingTokens(self.mixed_step(d, x, p, bs, pr, ps, es, el, all_greedy))

    def _index(self, values: Sequence[int]) -> torch.Tensor:
        """An int64 device tensor of ``values``, copied without waiting for the device."""
        return self.upload(torch.tensor(list(values), dtype=torch.int64))

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device, copied without waiting for the device: from pageable host
        memory, or without ``non_blocking``, a copy first waits for every step already
        launched, and the device then idles while the host catches up."""
        if self.device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
            t = t.pin_memory()
        return t.to(self.device, non_blocking=True)

    # -- the layers ------------------------------------------------------------------
    def _vocab_logits(self, h: torch.Tensor) -> torch.Tensor:
        """Float32 logits [N, vocab] of final hidden states [N, D] (the padding rows of the
        LM head, if any, dropped)."""
        return self._linear(h, self.lm_head)[:, : self.vocab].float()

    def _linear(
        self, x: torch.Tensor, w: Weight, bias: torch.Tensor | None = None, first_k: int = 0
    ) -> torch.Tensor:
        """``F.linear``; for one row, the Triton GEMV when enabled (it streams the weights
        faster than cuBLAS's batch-1 kernels; ``first_k``: its GemvConfig.first_k). A
        float8 weight (:class:`Fp8Weight`): the GEMV over its bytes for one row,
        :func:`kernels.fp8_matmul` for more."""
        if self.gemv is not None and self.fused is not None and x.shape[0] == 1 and x.dim() == 2:
            y = self._gemv(x, w, first_k=first_k)
        elif isinstance(w, Fp8Weight) and self.fused is not None and x.dim() == 2:
            y = self.fused.fp8_matmul(x, w.q, w.scale)
        elif isinstance(w, Fp8Weight):
            return weight_linear(x, w, bias)
        else:
            return F.linear(x, w, bias)
        return y if bias is None else y + bias

    def _pdl(self, rows: int) -> bool:
        """Whether a step of ``rows`` rows launches its kernels with PDL: one row only (at
        8 to 64 streams it made the node slower; see RunnerConfig.pdl)."""
        return self.pdl and rows == 1

    def _gemv(self, x: torch.Tensor, w: Weight, silu: bool = False, first_k: int = 0) -> torch.Tensor:
        """The batch-1 GEMV of ``x`` by ``w`` (bf16 or :class:`Fp8Weight`); ``silu``:
        ``x`` is ``[gate | up]`` and the product's input ``silu(gate) * up``."""
        assert self.fused is not None
        if isinstance(w, Fp8Weight):
            return self.fused.gemv(x, w.q, scale=w.scale, silu=silu, pdl=self.pdl, first_k=first_k)
        return self.fused.gemv(x, w, silu=silu, pdl=self.pdl, first_k=first_k)

    def _gate_up(self, h: torch.Tensor, wgu: Weight, pdl: bool) -> torch.Tensor:
        """``silu(gate) * up`` of the MLP's gate/up projection of ``h``, on the fused
        kernels: for one row in the GEMV itself (:attr:`RunnerConfig.glu_gemv`), else the
        product and then the SiLU*up kernel."""
        assert self.fused is not None
        if self.glu_gemv and self.gemv is not None and h.shape[0] == 1 and h.dim() == 2:
            if isinstance(wgu, Fp8Weight):
                return self.fused.gemv_glu(h, wgu.q, scale=wgu.scale, pdl=self.pdl)
            return self.fused.gemv_glu(h, wgu, pdl=self.pdl)
        return self.fused.silu_mul(self._linear(h, wgu), pdl=pdl)

    def _gemv_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, norm: torch.Tensor, w: Weight
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``rms_norm(x + residual) @ w.T`` for one row and the new residual (gemv.py)."""
        assert self.fused is not None
        if isinstance(w, Fp8Weight):
            return self.fused.gemv_norm(x, residual, norm, self.eps, w.q, scale=w.scale, pdl=self.pdl)
        return self.fused.gemv_norm(x, residual, norm, self.eps, w, pdl=self.pdl)

    def _layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """The decoder layers for rows ``x`` [N, D] whose keys and values go to cache
        ``rows``, rotated at ``cos``/``sin`` [N, hd]: on the fused kernels when loaded,
        else torch ops. Returns the final-normed hidden states [N, D]."""
        if self.fused is not None:
            return self._fused_layers(x, cos, sin, rows, attend)
        return self._torch_layers(x, cos, sin, rows, attend)

    def _torch_layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """:meth:`_layers` in torch ops, as transformers computes them."""
        for i, w in enumerate(self.layers):
            q, k, v = self._qkv(x, w)
            q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
            self.cache.write(i, rows, k, v)
            kc, vc = self.cache.layer(i)
            x = x + weight_linear(attend(q, kc, vc, v), w.wo)
            x = x + self._mlp(x, w)
        return _rms_norm(x, self.norm, self.eps)

    def _fused_layers(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        """:meth:`_layers` on the fused kernels (residual add + RMSNorm, RoPE + KV-cache
        write, SiLU*up): the same arithmetic in fewer launches."""
        k = self.fused
        assert k is not None
        n = x.shape[0]
        if n == 1 and x.dim() == 2 and self.gemv is not None and self.batch1_fused:
            return self._one_row_layers(x, cos, sin, rows, attend)
        pdl, linear = self._pdl(n), self._linear
        residual = x
        h = k.rms_norm(x, self.layers[0].ln1, self.eps, pdl=pdl)
        for i, w in enumerate(self.layers):
            att = self._attention(i, linear(h, w.wqkv, w.bqkv), cos, sin, rows, attend)
            o = linear(att, w.wo, first_k=self.o_first_k)
            h, residual = k.add_rms_norm(o, residual, w.ln2, self.eps, pdl=pdl)
            down = linear(self._gate_up(h, w.wgu, pdl), w.wdown)
            weight = self.layers[i + 1].ln1 if i + 1 < len(self.layers) else self.norm
            h, residual = k.add_rms_norm(down, residual, weight, self.eps, pdl=pdl)
        return h

    def _one_row_layers(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor, attend: Attend
    ) -> torch.Tensor:
        """:meth:`_fused_layers` for one row (batch-1 decode): each norm, with its residual
        add, runs inside the GEMV that reads it, and SiLU*up inside the down projection's,
        so a layer is 5 to 6 kernels (QKV, RoPE + store, attention and its reduction, O,
        gate/up, down)."""
        k = self.fused
        assert k is not None
        residual: torch.Tensor | None = None
        for i, w in enumerate(self.layers):
            qkv, residual = self._gemv_norm(x, residual, w.ln1, w.wqkv)
            if w.bqkv is not None:
                qkv = qkv + w.bqkv
            o = self._gemv(self._attention(i, qkv, cos, sin, rows, attend), w.wo, first_k=self.o_first_k)
            gate_up, residual = self._gemv_norm(o, residual, w.ln2, w.wgu)
            x = self._gemv(gate_up, w.wdown, silu=True)
        h, _ = k.add_rms_norm(x, residual, self.norm, self.eps, pdl=self.pdl)
        return h

    def _attention(
        self,
        layer: int,
        qkv: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        rows: torch.Tensor,
        attend: Attend,
    ) -> torch.Tensor:
        """Layer ``layer``'s attention output [N, H * hd] from its QKV output: RoPE + the
        cache store, then ``attend``; in one kernel where ``attend`` is a
        :class:`DecodeAttention` that can (:attr:`RunnerConfig.fused_decode_attention`)."""
        if isinstance(attend, DecodeAttention) and attend.kernels is not None:
            new = attend.kernels.NewRow(*self._split_qkv(qkv), cos, sin, rows)
            return attend.from_qkv(new, *self.cache.layer(layer))
        q, kc, vc, v = self._attention_input(layer, qkv, cos, sin, rows)
        return attend(q, kc, vc, v)

    def _split_qkv(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of a fused QKV output [N, (H + 2 KVH) hd]: q [N, H, hd], k and v [N, KVH, hd]."""
        n, hd, nh, nkv = qkv.shape[0], self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = qkv.split([nh * hd, nkv * hd, nkv * hd], dim=-1)
        return q.reshape(n, nh, hd), k.reshape(n, nkv, hd), v.reshape(n, nkv, hd)

    def _attention_input(
        self, layer: int, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotated queries of a fused QKV output [N, (H + 2 KVH) hd], with the rotated keys
        and the values written to layer ``layer``'s cache at ``rows``: ``(q, k_cache,
        v_cache, v)``, what :data:`Attend` takes."""
        assert self.fused is not None
        q, kk, v = self._split_qkv(qkv)
        kc, vc = self.cache.layer(layer)
        q = self.fused.rope_store(q, kk, v, cos, sin, kc, vc, rows, pdl=self._pdl(qkv.shape[0]))
        return q, kc, vc, v

    @torch.inference_mode()
    def decode_launch(self, slots: Sequence[int], all_greedy: bool) -> PendingTokens:
        """Start a decode step for ``slots``; its tokens are read later (the GPU runs on
        while the host handles the previous step's tokens)."""
        if self.graphs is not None:
            out = self.graphs.launch(slots, all_greedy)
        else:
            out = self.decode_step(self._index(slots), all_greedy)
        return PendingTokens(out)


class PendingTokens:
    """Tokens of a launched decode step, copied to the host without blocking it."""

    def __init__(self, device_tokens: torch.Tensor) -> None:
        if device_tokens.device.type == "cuda":
            self._host = torch.empty(device_tokens.shape, dtype=torch.int64, pin_memory=True)
            self._host.copy_(device_tokens, non_blocking=True)
            self._event: torch.cuda.Event | None = torch.cuda.Event()
            self._event.record()
        else:
            self._host = device_tokens
            self._event = None

    def tokens(self) -> list[int]:
        """Wait for the step and return its tokens."""
        if self._event is not None:
            self._event.synchronize()
        return [int(t) for t in self._host.tolist()]


def _fused_kernels(device: torch.device, wanted: bool | None) -> Any:
    """The Triton kernels module, or None: by default on a GPU only (on the CPU they run
    only under Triton's interpreter, which the tests use to check the fused path)."""
    if wanted is False or (wanted is None and device.type != "cuda"):
        return None
    try:
        from llava_node.engine import kernels
    except ImportError as exc:  # pragma: no cover - GPU hosts only
        log.warning("fused Triton kernels unavailable (%s); decoding with torch ops", exc)
        return None
    return kernels


def _paged_attention(device: torch.device, fused: Any) -> Any:
    """The paged decode-attention kernel (Triton), or None for torch attention: with the
    fused kernels, and on CUDA whenever Triton imports."""
    kernels = fused if fused is not None or device.type != "cuda" else _fused_kernels(device, True)
    return kernels.paged_decode_attention if kernels is not None else None
