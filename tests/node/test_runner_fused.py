"""The runner's fused path (Triton kernels for prefill and decode) against its torch path.

On the GPU the fused path is the default; here it runs under Triton's CPU interpreter
(``TRITON_INTERPRET=1``, set by the test suite's conftest), in float32 on the tiny
checkpoint, so CI checks the same code the GPU runs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_node.engine.loading import load_llava
from llava_node.engine.runner import LlavaRunner, PromptChunk, RunnerConfig

pytest.importorskip("triton")


def runner(checkpoint: Path, fused: bool) -> LlavaRunner:
    loaded = load_llava(checkpoint, torch.device("cpu"), torch.float32)
    r = LlavaRunner(loaded, RunnerConfig(max_batch=2, fused_kernels=fused))
    assert (r.fused is not None) == fused
    return r


def test_fused_prefill_and_decode_match_the_torch_path(tiny_checkpoint: Path) -> None:
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    img = Image.new("RGB", (320, 240), (40, 180, 90))
    enc = processor(images=[img], text="USER: <image>\nWhat is it? ASSISTANT:", return_tensors="pt")
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    tokens: dict[bool, list[int]] = {}
    first: dict[bool, torch.Tensor] = {}
    for fused in (False, True):
        r = runner(tiny_checkpoint, fused)
        pages = list(range(1, 1 + r.cache.pages_for(int(ids.shape[0]) + 8)))
        r.assign(0, pages, 0.0, 1.0, 0)
        first[fused] = r.prefill_logits(0, ids, pixels)
        r.assign(0, pages, 0.0, 1.0, 0)
        out = [r.prefill(0, ids, pixels)]
        for _ in range(7):
            out += r.decode_launch([0], True).tokens()
        tokens[fused] = out
    rel = float((first[True] - first[False]).norm() / first[False].norm())
    assert rel < 1e-4, rel
    assert tokens[True] == tokens[False]


def test_padded_prefill_computes_what_the_prompt_alone_computes(tiny_checkpoint: Path) -> None:
    # What a captured prefill (GPU) runs: the prompt padded to a fixed length at its end,
    # the padding's keys and values sent to the reserved page 0.
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    img = Image.new("RGB", (300, 260), (200, 40, 90))
    enc = processor(images=[img], text="USER: <image>\nAnd this one? ASSISTANT:", return_tensors="pt")
    ids, pixels = enc["input_ids"][0], enc["pixel_values"]
    r = runner(tiny_checkpoint, fused=True)
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


@pytest.mark.parametrize("fused", [False, True])
def test_prompt_in_chunks_beside_a_decoding_request_matches_both_alone(
    tiny_checkpoint: Path, fused: bool
) -> None:
    # The mixed step: request A decodes while request B's prompt goes through in chunks
    # riding on A's steps. Both get the tokens they get alone, and the chunks leave the
    # keys a whole prefill leaves.
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    prompts = [
        processor(images=[Image.new("RGB", (320, 240), c)], text=t, return_tensors="pt")
        for c, t in (
            ((40, 180, 90), "USER: <image>\nWhat is it? ASSISTANT:"),
            ((9, 9, 200), "USER: <image>\nAnd now? ASSISTANT:"),
        )
    ]
    r = runner(tiny_checkpoint, fused)
    pages = [
        list(range(1 + 50 * i, 1 + 50 * i + r.cache.pages_for(int(p["input_ids"].shape[1]) + 12)))
        for i, p in enumerate(prompts)
    ]

    def alone(i: int) -> list[int]:
        r.assign(i, pages[i], 0.0, 1.0, 0)
        out = [r.prefill(i, prompts[i]["input_ids"][0], prompts[i]["pixel_values"])]
        for _ in range(8):
            out += r.decode_launch([i], True).tokens()
        return out

    expected = [alone(0), alone(1)]

    r.cache.k.zero_()
    r.cache.v.zero_()
    r.assign(0, pages[0], 0.0, 1.0, 0)
    a = [r.prefill(0, prompts[0]["input_ids"][0], prompts[0]["pixel_values"])]
    r.assign(1, pages[1], 0.0, 1.0, 0)
    embeds = r.prompt_embeddings(prompts[1]["input_ids"][0], prompts[1]["pixel_values"])
    n = embeds.shape[0]
    b: list[int] = []
    for start in range(0, n, 100):  # chunk edges inside the image rows and at odd offsets
        chunk = PromptChunk(1, embeds, start, min(start + 100, n))
        tokens = r.mixed_launch([0], chunk, True).tokens()
        a.append(tokens[0])
        if chunk.last:
            b.append(tokens[1])
    assert len(b) == 1
    while len(b) < 9:
        t0, t1 = r.decode_launch([0, 1], True).tokens()
        if len(a) < 9:
            a.append(t0)
        b.append(t1)
    assert a[:9] == expected[0]
    assert b == expected[1]

    # the last chunk's logits: what the whole prompt's prefill gives
    r.assign(1, pages[1], 0.0, 1.0, 0)
    last = PromptChunk(1, embeds, n - 7, n)
    for c in (PromptChunk(1, embeds, 0, n - 7), last):
        x = r.mixed_step(torch.zeros(0, dtype=torch.int64), c, True)
    assert x.shape == (1,) and int(x[0]) == expected[1][0]
    rows = r.cache.flat_positions(1, n)
    k_chunked = r.cache.layer(r.n_layers - 1)[0][rows].clone()
    r.prefill_logits(1, prompts[1]["input_ids"][0], prompts[1]["pixel_values"])
    assert torch.allclose(r.cache.layer(r.n_layers - 1)[0][rows], k_chunked, atol=1e-5)
