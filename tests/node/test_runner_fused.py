"""The runner's fused path (Triton kernels for prefill and decode) against its torch path.

On the GPU the fused path is the default; here it runs under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by the test suite's conftest), in float32 on a tiny
checkpoint, so CI checks the same code the GPU runs. The interpreter runs a grid one
program at a time in Python, and the row-wise kernels (RoPE and the KV store, RMSNorm)
launch a program per prompt row: these tests use a tiny checkpoint with 112-pixel images
(64 image tokens, prompts of 70-90 rows) rather than the suite's 336-pixel one (576 image
tokens), which made them 17 minutes of CI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_node.engine.loading import load_llava
from llava_node.engine.runner import LlavaRunner, PromptChunk, RunnerConfig
from llava_node.tiny_checkpoint import build_tiny_checkpoint

pytest.importorskip("triton")


FP8 = torch.float8_e4m3fn
# Prompt rows a mixed step carries (the test's packing, as the engine's): less than one
# prompt, so a prompt spans steps and one step holds the end of one and the start of another.
CHUNK_ROWS = 48


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's model on 112-pixel images: 64 image tokens a prompt."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-112", seed=0, image_size=112)


def runner(
    checkpoint: Path, fused: bool, max_batch: int = 2, kv_dtype: torch.dtype | None = None
) -> LlavaRunner:
    loaded = load_llava(checkpoint, torch.device("cpu"), torch.float32)
    r = LlavaRunner(loaded, RunnerConfig(max_batch=max_batch, fused_kernels=fused, kv_cache_dtype=kv_dtype))
    assert (r.fused is not None) == fused
    assert r.cache.k.dtype == (kv_dtype or torch.float32)
    return r


@pytest.mark.parametrize("kv_dtype", [None, FP8], ids=["model-dtype-cache", "fp8-cache"])
def test_fused_prefill_and_decode_match_the_torch_path(
    small_checkpoint: Path, kv_dtype: torch.dtype | None
) -> None:
    processor = AutoProcessor.from_pretrained(small_checkpoint)
    img = Image.new("RGB", (320, 240), (40, 180, 90))
    enc = processor(images=[img], text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    tokens: dict[bool, list[int]] = {}
    first: dict[bool, torch.Tensor] = {}
    for fused in (False, True):
        r = runner(small_checkpoint, fused, kv_dtype=kv_dtype)
        pages = list(range(1, 1 + r.cache.pages_for(int(ids.shape[0]) + 8)))
        r.assign(0, pages, 0.0, 1.0, 0)
        first[fused] = r.prefill_logits(0, ids, pixels)
        r.assign(0, pages, 0.0, 1.0, 0)
        out = [r.prefill(0, ids, pixels)]
        for _ in range(7):
            out += r.decode_launch([0], True).tokens()
        tokens[fused] = out
    rel = float((first[True] - first[False]).norm() / first[False].norm())
    # float8: a float32 difference of 1e-7 in a key may round it to the neighbouring float8
    # value (6 % away), so the two paths agree less closely there
    assert rel < (1e-4 if kv_dtype is None else 1e-2), rel
    assert tokens[True] == tokens[False]


def test_one_row_decode_fusions_match_a_kernel_per_op(
    small_checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batch-1 decode can run each norm (with its residual add) and SiLU*up inside the GEMV
    # that reads it (batch1_fused), runs RoPE + the cache store inside the decode
    # attention (decode_rope, the default), with or without the partitions merged there,
    # and SiLU*up inside the gate/up GEMV (glu_gemv, the default):
    # each step's logits must be those of the layer loop that runs them as kernels of their
    # own (float32: the roundings' order does not show), and writes the same cache.
    r = runner(small_checkpoint, True)
    assert r.decode_rope and r.decode_semaphores is None and r.glu_gemv  # the defaults
    processor = AutoProcessor.from_pretrained(small_checkpoint)
    img = Image.new("RGB", (64, 64), (9, 99, 199))
    enc = processor(images=[img], text="USER: <image>\nHi ASSISTANT:", return_tensors="pt")
    pages = list(range(1, 1 + r.cache.pages_for(int(enc["input_ids"].shape[1]) + 8)))
    r.assign(0, pages, 0.0, 1.0, 0)
    r.prefill(0, enc["input_ids"][0], enc["pixel_values"])
    slots = torch.tensor([0])
    names = ("add_rms_norm", "silu_mul", "gemv_glu", "gemv_norm", "rope_store", "rope_decode_attention")
    calls: list[str] = []

    def counting(name: str) -> Any:
        fn = getattr(r.fused, name)

        def call(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        return call

    for name in names:
        monkeypatch.setattr(r.fused, name, counting(name))
    layers = r.n_layers
    sems = r.fused.decode_semaphores(1, r.n_kv_heads, r.device)
    per_op = {"add_rms_norm": 2 * layers, "silu_mul": layers, "gemv_norm": 0, "rope_store": layers}
    glu = {"silu_mul": 0, "gemv_glu": layers}  # SiLU*up inside the gate/up GEMV (the default)
    variants = {  # (batch1_fused, decode_rope, semaphores, glu_gemv): the calls each makes
        (False, False, None, False): {**per_op, "rope_decode_attention": 0},
        (True, False, None, False): {**per_op, "add_rms_norm": 1, "silu_mul": 0, "gemv_norm": 2 * layers},
        (False, True, None, False): {**per_op, "rope_store": 0, "rope_decode_attention": layers},
        (False, True, sems, False): {**per_op, "rope_store": 0, "rope_decode_attention": layers},
        (False, False, None, True): {**per_op, **glu},
        (False, True, None, True): {**per_op, **glu, "rope_store": 0, "rope_decode_attention": layers},
    }
    logits, caches = {}, {}
    for i, (key, want) in enumerate(variants.items()):
        r.batch1_fused, r.decode_rope, r.decode_semaphores, r.glu_gemv = key
        calls.clear()
        logits[i] = r.step_logits(slots, r.seq_lens[slots])
        caches[i] = torch.cat([torch.stack(r.cache.layer(j)) for j in range(layers)])
        assert {n: calls.count(n) for n in names} == {n: want.get(n, 0) for n in names}, key
    assert (sems == 0).all()
    for i in range(1, len(variants)):
        rel = float((logits[i] - logits[0]).norm() / logits[0].norm())
        assert rel < 1e-5, (list(variants)[i], rel)
        torch.testing.assert_close(caches[i], caches[0], rtol=1e-4, atol=1e-5)


def test_decode_steps_with_the_slot_bookkeeping_kernels_match_the_torch_ops(small_checkpoint: Path) -> None:
    # Two slots decoding, one greedy and one sampled: the steps whose slot reads and
    # writes are the two step_state kernels give the tokens, cache and slot state of the
    # steps that do them in torch ops (the same layers: the same bits)
    r = runner(small_checkpoint, True)
    processor = AutoProcessor.from_pretrained(small_checkpoint)
    img = Image.new("RGB", (64, 64), (200, 20, 60))
    for slot, (text, temperature) in enumerate([("Hi", 0.0), ("Describe it at length", 0.9)]):
        enc = processor(images=[img], text=f"USER: <image>\n{text} ASSISTANT:", return_tensors="pt")
        first = 1 + slot * 16
        r.assign(
            slot,
            list(range(first, first + r.cache.pages_for(int(enc["input_ids"].shape[1]) + 8))),
            temperature,
            0.9,
            7,
        )
        r.prefill(slot, enc["input_ids"][0], enc["pixel_values"])
    state = ("seq_lens", "last_tokens", "steps")
    start = {n: getattr(r, n).clone() for n in state}
    cache = [t.clone() for t in (r.cache.k, r.cache.v)]
    results = {}
    for kernels_on in (True, False):
        r.step_state_kernels = kernels_on
        for n in state:
            getattr(r, n).copy_(start[n])
        r.cache.k.copy_(cache[0])
        r.cache.v.copy_(cache[1])
        tokens = [r.decode_launch([0, 1], False).tokens() for _ in range(4)]
        results[kernels_on] = (tokens, {n: getattr(r, n).clone() for n in state}, r.cache.k.clone())
    (tokens_k, state_k, cache_k), (tokens_t, state_t, cache_t) = results[True], results[False]
    assert tokens_k == tokens_t
    for n in state:
        assert torch.equal(state_k[n][:2], state_t[n][:2]), n
    assert torch.equal(state_k["seq_lens"][:2], start["seq_lens"][:2] + 4)
    assert torch.equal(cache_k, cache_t)


def test_fp8_cache_stays_close_to_the_model_dtype_cache(tiny_checkpoint: Path) -> None:
    # The same prompt and teacher-forced steps with a float32 cache and a float8 one: the
    # logits move by the cache's rounding only, and the cache holds 4x the pages per byte.
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    img = Image.new("RGB", (320, 240), (90, 30, 160))
    enc = processor(images=[img], text="USER: <image>\nDescribe it. ASSISTANT:", return_tensors="pt")
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    logits: dict[object, list[torch.Tensor]] = {}
    forced = [5, 17, 300, 42]
    for kv in (None, FP8):
        r = runner(tiny_checkpoint, fused=False, kv_dtype=kv)
        r.assign(0, list(range(1, 1 + r.cache.pages_for(int(ids.shape[0]) + 8))), 0.0, 1.0, 0)
        out = [r.prefill_logits(0, ids, pixels)]
        n = int(ids.shape[0])
        with torch.inference_mode():
            for t, token in enumerate(forced):
                r.last_tokens[0] = token
                out.append(r.step_logits(torch.tensor([0]), torch.tensor([n + t]))[0])
        logits[kv] = out
        assert r.cache.k.element_size() == (4 if kv is None else 1)
    for ref, got in zip(logits[None], logits[FP8], strict=True):
        rel = float((got - ref).norm() / ref.norm())
        # rounded, not bit-equal; 4-5 % on this random tiny model, where a cache read
        # wrongly (zeros, raw bytes) moves the logits by their whole size
        assert 0 < rel < 0.1, rel


def test_padded_prefill_computes_what_the_prompt_alone_computes(small_checkpoint: Path) -> None:
    # What a captured prefill (GPU) runs: the prompt padded to a fixed length at its end,
    # the padding's keys and values sent to the reserved page 0.
    processor = AutoProcessor.from_pretrained(small_checkpoint)
    img = Image.new("RGB", (300, 260), (200, 40, 90))
    enc = processor(images=[img], text="USER: <image>\nAnd this one? ASSISTANT:", return_tensors="pt")
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    r = runner(small_checkpoint, fused=True)
    n = int(ids.shape[0])
    pages = list(range(1, 1 + r.cache.pages_for(n + 8)))
    r.assign(0, pages, 0.0, 1.0, 0)
    plain = r.prefill_logits(0, ids, pixels)
    flat = r.cache.flat_positions(0, n)
    k0, v0 = (t.clone() for t in r.cache.layer(0))
    r.cache.k.zero_()
    r.cache.v.zero_()
    padded = n + 37
    x = torch.zeros(padded, r.hidden)
    x[:n] = r.prompt_embeddings(ids, pixels)
    rows = torch.zeros(padded, dtype=torch.int64)
    rows[:n] = flat
    logits = r.padded_prefill_logits(x, rows, torch.tensor([n - 1]))[0]
    assert float((logits - plain).norm() / plain.norm()) < 1e-5
    k1, v1 = r.cache.layer(0)
    assert torch.allclose(k1[flat], k0[flat], atol=1e-5) and torch.allclose(v1[flat], v0[flat], atol=1e-5)
    owned = torch.ones(k1.shape[0], dtype=torch.bool)
    owned[: r.cache.page_size] = False  # the reserved page
    owned[flat] = False
    assert (k1[owned] == 0).all() and (v1[owned] == 0).all()  # nothing else was written


@pytest.mark.parametrize(
    ("fused", "kv_dtype"),
    [(False, None), (True, None), (True, FP8)],
    ids=["torch", "fused", "fused-fp8-cache"],
)
def test_prompts_in_chunks_beside_a_decoding_request_match_each_alone(
    small_checkpoint: Path, fused: bool, kv_dtype: torch.dtype | None
) -> None:
    # Mixed steps as the engine packs them: request 0 decodes while the prompts of 1 and 2
    # go through in chunks of at most CHUNK_ROWS rows a step, the end of one prompt and the start
    # of the next in the same step. Each request gets the tokens it gets alone, and the
    # chunks leave the keys a whole prefill leaves.
    processor = AutoProcessor.from_pretrained(small_checkpoint)
    prompts = [
        processor(images=[Image.new("RGB", (320, 240), c)], text=t, return_tensors="pt")
        for c, t in (
            ((40, 180, 90), "USER: <image>\nWhat is it? ASSISTANT:"),
            ((9, 9, 200), "USER: <image>\nAnd now? ASSISTANT:"),
            ((200, 9, 9), "USER: <image>\nOne more, with a longer question this time? ASSISTANT:"),
        )
    ]
    r = runner(small_checkpoint, fused, max_batch=3, kv_dtype=kv_dtype)
    pages = [
        list(range(1 + 50 * i, 1 + 50 * i + r.cache.pages_for(int(p["input_ids"].shape[1]) + 12)))
        for i, p in enumerate(prompts)
    ]

    def args(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return prompts[i]["input_ids"][0], prompts[i]["pixel_values"]

    def alone(i: int) -> list[int]:
        r.assign(i, pages[i], 0.0, 1.0, 0)
        out = [r.prefill(i, *args(i))]
        for _ in range(8):
            out += r.decode_launch([i], True).tokens()
        return out

    expected = [alone(i) for i in range(3)]
    keys = [
        r.cache.layer(r.n_layers - 1)[0][r.cache.flat_positions(i, len(args(i)[0]))].float() for i in (1, 2)
    ]

    r.cache.k.zero_()
    r.cache.v.zero_()
    got: list[list[int]] = [[], [], []]
    for i in range(3):
        r.assign(i, pages[i], 0.0, 1.0, 0)
    got[0].append(r.prefill(0, *args(0)))
    embeds = {i: r.prompt_embeddings(*args(i)) for i in (1, 2)}
    done = {1: 0, 2: 0}
    steps = 0
    while any(done[i] < embeds[i].shape[0] for i in (1, 2)):
        budget, chunks = CHUNK_ROWS, []
        for i in (1, 2):
            end = min(done[i] + budget, embeds[i].shape[0])
            if end > done[i] and budget > 0:
                chunks.append(PromptChunk(i, embeds[i], done[i], end))
                budget -= end - done[i]
                done[i] = end
        tokens = r.mixed_launch([0], chunks, True).tokens()
        assert len(tokens) == 1 + sum(c.last for c in chunks)
        got[0].append(tokens[0])
        for c, t in zip([c for c in chunks if c.last], tokens[1:], strict=True):
            got[c.slot].append(t)
        steps += 1
    assert steps == -(-sum(e.shape[0] for e in embeds.values()) // CHUNK_ROWS)  # every step full but the last
    while min(len(g) for g in got) < 9:
        for i, t in enumerate(r.decode_launch([0, 1, 2], True).tokens()):
            got[i].append(t)
    assert [g[:9] for g in got] == expected
    for i, k in zip((1, 2), keys, strict=True):
        rows = r.cache.flat_positions(i, len(args(i)[0]))
        # float8: a key may round to the neighbouring value (one step: 1/8 of its binade)
        rtol, atol = (1e-5, 1e-5) if kv_dtype is None else (0.13, 2.0**-9)
        assert torch.allclose(r.cache.layer(r.n_layers - 1)[0][rows].float(), k, rtol=rtol, atol=atol)


def test_mixed_step_padded_to_a_captured_shape_gives_the_same_tokens(tiny_checkpoint: Path) -> None:
    # What a captured mixed step replays (GPU): the layout padded with dummy decode rows,
    # padding blocks of prompt rows and unused sample rows. The real tokens are the same
    # as the unpadded step's, and the padding leaves the real slots' state alone.
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    enc = processor(
        images=[Image.new("RGB", (320, 240), (1, 90, 9))],
        text="USER: <image>\nHm? ASSISTANT:",
        return_tensors="pt",
    )
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    n = int(ids.shape[0])
    results = []
    for padded in (False, True):
        r = runner(tiny_checkpoint, fused=False, max_batch=4)
        r.assign(0, list(range(1, 60)), 0.0, 1.0, 0)
        r.assign(1, list(range(60, 120)), 0.0, 1.0, 0)
        first = r.prefill(0, ids, pixels)
        embeds = r.prompt_embeddings(ids, pixels)
        chunk = PromptChunk(1, embeds, n - 100, n)
        r.mixed_launch([], [PromptChunk(1, embeds, 0, n - 100)], True).tokens()
        sizes = {"batch": 3, "rows": 4 * r.cfg.chunk_block, "ends": 4} if padded else {}
        lay = r.mixed_layout([0], [chunk], **sizes)
        x = torch.zeros(len(lay.positions), r.hidden)
        x[: chunk.end - chunk.start] = embeds[chunk.start :]

        def t(v: list[int]) -> torch.Tensor:
            return torch.tensor(v, dtype=torch.int64)

        out = r.mixed_step(
            t(lay.decode_slots),
            x,
            t(lay.positions),
            t(lay.block_slots),
            t(lay.pick_rows),
            t(lay.pick_slots),
            t(lay.end_slots),
            t(lay.end_lens),
            True,
        )
        assert lay.tokens == 2
        more = r.decode_launch([0, 1], True).tokens()
        results.append((first, out[: lay.tokens].tolist(), more, r.seq_lens[:2].tolist()))
    assert results[0] == results[1]
    assert results[0][3] == [n + 2, n + 1]


def test_fused_prefill_from_a_reused_prefix_matches_a_whole_prefill(small_checkpoint: Path) -> None:
    """The fused path's prompt-chunk kernel over a prefix another slot computed: what the
    GPU runs for a conversation's next turn."""
    processor = AutoProcessor.from_pretrained(small_checkpoint)
    img = Image.new("RGB", (300, 260), (120, 60, 200))
    enc = processor(
        images=[img], text="USER: <image>\nWhat colour is it, and why? ASSISTANT:", return_tensors="pt"
    )
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    n = int(ids.shape[0])
    r = runner(small_checkpoint, True)
    need = r.cache.pages_for(n + 4)
    own = list(range(1, 1 + need))
    r.assign(0, own, 0.0, 1.0, 0)
    whole = r.prefill_logits(0, ids, pixels)
    k = (n - 1) // r.cache.page_size
    r.assign(1, own[:k] + list(range(1 + need, 1 + 2 * need - k)), 0.0, 1.0, 0)
    embeds = r.prompt_embeddings(ids, pixels)
    part = r.prefill_logits_from(1, embeds, k * r.cache.page_size)
    assert float((part - whole).norm() / whole.norm()) < 1e-4
    assert r.prefill(0, ids, pixels) == int(whole.argmax())  # slot 0's state for decoding
    first = r.prefill_from(1, embeds, k * r.cache.page_size, True)  # the engine's call: a token
    assert first == int(whole.argmax())
    for _ in range(3):  # both slots decode the same tokens, one from its own pages, one sharing
        a, b = r.decode_launch([0, 1], True).tokens()
        assert a == b
