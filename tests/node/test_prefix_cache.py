"""Prefix reuse on the paged KV cache: the keys, the page bookkeeping, and the engine on
the CPU (tiny model, float32, greedy) giving the same tokens with the cache on and off."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_node.engine import GenerationRequest
from llava_node.engine.batching import BatchingEngine
from llava_node.engine.kv_cache import PageAllocator
from llava_node.engine.loading import load_llava
from llava_node.engine.prefix_cache import ImageFeatureCache, PrefixCache, block_keys, image_key
from llava_node.engine.runner import LlavaRunner, RunnerConfig
from tests.node.test_engine import CollectingSink

IMG = 99  # the image token id in the key tests
SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant "
    "gives helpful, detailed, and polite answers to the human's questions."
)


# -- keys and pages -------------------------------------------------------------------
def test_keys_chain_over_text_and_image_content() -> None:
    a, b = b"a" * 16, b"b" * 16
    ids = [1, 2, IMG, IMG, IMG, IMG, 5, 6, 7, 8, 9, 10]  # two images of two tokens each
    keys = block_keys(ids, 4, image_token_id=IMG, images=[a, b])
    assert len(keys) == 3 and len(set(keys)) == 3
    # the same text with another second image: the pages up to it match, none after
    other = block_keys(ids, 4, image_token_id=IMG, images=[a, b"c" * 16])
    assert other[0] == keys[0] and other[1] != keys[1] and other[2] != keys[2]
    # the two images swapped: nothing from the first image on
    swapped = block_keys(ids, 4, image_token_id=IMG, images=[b, a])
    assert swapped[0] != keys[0]
    # text diverging inside the third page: the first two match
    diverged = block_keys([*ids[:9], 42, *ids[10:]], 4, image_token_id=IMG, images=[a, b])
    assert diverged[:2] == keys[:2] and diverged[2] != keys[2]
    # only full pages are keyed; a chain continues where it stopped
    assert block_keys(ids[:11], 4, image_token_id=IMG, images=[a, b]) == keys[:2]
    tail = block_keys(ids[8:], 4, image_token_id=IMG, images=[a, b], parent=keys[1], image_tokens_before=4)
    assert tail == keys[2:]


def test_image_key_is_the_pixels_content() -> None:
    x = torch.rand(3, 8, 8)
    assert image_key(x) == image_key(x.clone())
    y = x.clone()
    y[0, 0, 0] += 1e-3
    assert image_key(y) != image_key(x)


def test_pages_are_shared_by_reference_and_evicted_least_recent_first() -> None:
    alloc = PageAllocator(9)  # 8 usable pages
    cache = PrefixCache(alloc, 4)
    keys = [bytes([i]) * 16 for i in range(4)]
    first = cache.allocate(4)
    assert first is not None
    cache.insert(keys, first)
    # a second request reuses three pages while the first still holds them
    shared = cache.match(keys[:3])
    assert shared == first[:3] and cache.cached_pages == 4
    cache.release(first)
    assert cache.idle_pages == 1  # the last page; the three shared are still held
    cache.release(shared)
    assert cache.idle_pages == 4 and alloc.free == 4
    # a request needing all 8 pages gets them: idle cached pages are free memory
    everything = cache.allocate(8)
    assert everything is not None and len(everything) == 8
    assert cache.stats.evicted_pages == 4 and cache.cached_pages == 0
    assert cache.match(keys) == []
    cache.release(everything)
    assert alloc.free == 8


def test_eviction_takes_the_end_of_a_sequence_first_and_never_a_held_page() -> None:
    alloc = PageAllocator(7)  # 6 usable pages
    cache = PrefixCache(alloc, 4)
    keys = [bytes([i]) * 16 for i in range(3)]
    pages = cache.allocate(3)
    assert pages is not None
    cache.insert(keys, pages)
    cache.release(pages)
    held = cache.match(keys[:1])  # a running request holds the first page
    got = cache.allocate(4)  # 3 free + 1 evicted: the sequence's last page
    assert got is not None and pages[2] in got
    assert cache.match(keys) == pages[:2]  # the first two are still cached (a reference each)
    assert cache.allocate(3) is None  # page 0 is held twice, page 1 once: not enough
    assert alloc.free == 0
    cache.release(got)
    cache.release(held + pages[:2])


def test_a_disabled_cache_matches_and_keeps_nothing() -> None:
    alloc = PageAllocator(5)
    cache = PrefixCache(alloc, 4, enabled=False)
    pages = cache.allocate(2)
    assert pages is not None
    cache.insert([b"k" * 16, b"l" * 16], pages)
    cache.release(pages)
    assert cache.match([b"k" * 16]) == [] and alloc.free == 4


def test_the_image_cache_is_bounded() -> None:
    images = ImageFeatureCache(2)
    for i in range(3):
        images.put(bytes([i]) * 16, torch.full((2, 2), float(i)))
    assert len(images) == 2 and images.get(b"\0" * 16) is None
    feats = images.get(b"\2" * 16)
    assert feats is not None and float(feats[0, 0]) == 2.0
    assert images.hits == 1 and images.misses == 1


# -- the engine -----------------------------------------------------------------------
@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    return AutoProcessor.from_pretrained(tiny_checkpoint)


def make_engine(
    checkpoint: Path, *, prefix_cache: bool, num_pages: int = 0, chunk: int = 0
) -> BatchingEngine:
    loaded = load_llava(checkpoint, torch.device("cpu"), torch.float32)
    runner = LlavaRunner(loaded, RunnerConfig(max_batch=4, num_pages=num_pages))
    return BatchingEngine(
        runner, loaded.tokenizer, loaded.eos_token_ids, prefill_chunk=chunk, prefix_cache=prefix_cache
    )


@pytest.fixture(scope="module")
def cached(tiny_checkpoint: Path) -> Iterator[BatchingEngine]:
    eng = make_engine(tiny_checkpoint, prefix_cache=True)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def uncached(tiny_checkpoint: Path) -> Iterator[BatchingEngine]:
    eng = make_engine(tiny_checkpoint, prefix_cache=False)
    yield eng
    eng.shutdown()


def image(i: int) -> Image.Image:
    return Image.new("RGB", (320 + 11 * i, 300), (40 * i % 255, 180 - 25 * i % 180, 70 + 13 * i))


def encode(processor, prompt: str, images: list[Image.Image]) -> dict[str, torch.Tensor]:
    return processor(images=images or None, text=prompt, return_tensors="pt")


def run(
    engine: BatchingEngine, x: dict[str, torch.Tensor], *, max_tokens: int = 16, rid: str = "r"
) -> CollectingSink:
    sink = CollectingSink()
    engine.submit(
        GenerationRequest(rid, x["input_ids"][0], x.get("pixel_values"), max_tokens, 0.0, 1.0, 0, [], sink)
    )
    sink.wait()
    assert sink.error is None, sink.error
    return sink


def settle(engine: BatchingEngine) -> None:
    """Once every request has left: every page is free or cached and idle (none leaked)."""
    deadline = time.monotonic() + 5
    while engine.pages.available != engine.runner.cache.allocator.capacity:
        assert time.monotonic() < deadline, (engine.pages.available, engine.runner.cache.allocator.capacity)
        time.sleep(0.01)


def same_on_both(
    cached: BatchingEngine, uncached: BatchingEngine, x: dict[str, torch.Tensor], **kw
) -> CollectingSink:
    """Run ``x`` on both engines; they must give the same tokens. The cached run's sink."""
    hit, plain = run(cached, x, **kw), run(uncached, x, **kw)
    assert hit.ids == plain.ids
    assert plain.cached_tokens == 0
    return hit


def test_a_conversation_reuses_its_history_turn_after_turn(cached, uncached, processor) -> None:
    tok = processor.tokenizer
    prompt = f"{SYSTEM} USER: <image>\nWhat is in this picture? ASSISTANT:"
    before = cached.cache_counters()
    hits: list[int] = []
    previous = 0
    for turn, question in enumerate(["What colour is it?", "Is it large?", "Tell me more."]):
        x = encode(processor, prompt, [image(1)])
        sink = same_on_both(cached, uncached, x, max_tokens=12)
        hits.append(sink.cached_tokens)
        n = x["input_ids"].shape[1]
        assert sink.cached_tokens % 16 == 0 and sink.cached_tokens < n
        if turn:  # the whole previous turn, up to its last full page, came from the cache
            assert sink.cached_tokens >= previous // 16 * 16 - 16, (turn, sink.cached_tokens, previous)
        previous = n
        answer = tok.decode(sink.ids, skip_special_tokens=True)
        prompt = f"{prompt} {answer}</s>USER: {question} ASSISTANT:"
    assert hits[0] == 0 and hits[1] > 576 and hits[2] > hits[1]
    after = cached.cache_counters()
    assert after["prefix_cache_hit_tokens"] - before["prefix_cache_hit_tokens"] == sum(hits)
    assert after["prefix_cache_hit_requests"] - before["prefix_cache_hit_requests"] == 2


def test_a_shared_system_prompt_is_reused_by_other_questions(cached, uncached, processor) -> None:
    system = SYSTEM * 3  # a long shared instruction, then different questions
    same_on_both(cached, uncached, encode(processor, f"{system} USER: Name a fruit. ASSISTANT:", []))
    n_system = len(processor.tokenizer(system).input_ids)
    second = same_on_both(
        cached, uncached, encode(processor, f"{system} USER: Why is the sky blue? ASSISTANT:", [])
    )
    assert second.cached_tokens >= (n_system - 1) // 16 * 16 - 16 > 0


def test_prompts_diverging_inside_a_page_share_the_pages_before_it(cached, uncached, processor) -> None:
    base = "USER: " + " ".join(f"word{i}" for i in range(60))
    a = encode(processor, base + " apple ASSISTANT:", [])
    b = encode(processor, base + " pear ASSISTANT:", [])
    ia, ib = a["input_ids"][0].tolist(), b["input_ids"][0].tolist()
    common = next(i for i, (p, q) in enumerate(zip(ia, ib, strict=False)) if p != q)
    same_on_both(cached, uncached, a)
    hit = same_on_both(cached, uncached, b)
    assert hit.cached_tokens == common // 16 * 16


def test_one_image_in_different_prompts_skips_the_vision_tower(cached, uncached, processor) -> None:
    images = cached.runner.image_cache
    same_on_both(cached, uncached, encode(processor, "USER: <image>\nDescribe it. ASSISTANT:", [image(5)]))
    hits = images.hits
    # the text before the image differs: no KV page is shared, but the image features are
    sink = same_on_both(
        cached,
        uncached,
        encode(processor, "Please look closely. USER: <image>\nWhat is it? ASSISTANT:", [image(5)]),
    )
    assert sink.cached_tokens == 0 and images.hits == hits + 1


def test_two_images_swapped_do_not_match(cached, uncached, processor) -> None:
    prompt = "USER: <image>\n<image>\nCompare them. ASSISTANT:"
    same_on_both(cached, uncached, encode(processor, prompt, [image(2), image(3)]))
    again = same_on_both(cached, uncached, encode(processor, prompt, [image(2), image(3)]))
    assert again.cached_tokens >= 2 * 576
    swapped = same_on_both(cached, uncached, encode(processor, prompt, [image(3), image(2)]))
    assert swapped.cached_tokens == 0  # the first image comes right after 3 text tokens


def test_under_memory_pressure_evictions_keep_the_tokens_right(
    tiny_checkpoint: Path, uncached, processor
) -> None:
    # 160 pages hold ~4 of these conversations' prompts: every new image evicts older pages
    eng = make_engine(tiny_checkpoint, prefix_cache=True, num_pages=160)
    try:
        for rep in range(2):
            for i in range(6):
                x = encode(
                    processor, f"USER: <image>\nQuestion {i}, round {rep}. ASSISTANT:", [image(10 + i)]
                )
                sinks = [CollectingSink() for _ in range(3)]
                for k, sink in enumerate(sinks):  # three at once, sharing the pages as they come
                    eng.submit(
                        GenerationRequest(
                            f"p{rep}{i}{k}", x["input_ids"][0], x["pixel_values"], 12, 0.0, 1.0, 0, [], sink
                        )
                    )
                expected = run(uncached, x, max_tokens=12).ids
                for sink in sinks:
                    assert sink.wait().error is None and sink.ids == expected
        assert eng.cache_counters()["prefix_cache_evicted_pages"] > 0
        assert eng.cache_counters()["prefix_cache_hit_requests"] > 0
        settle(eng)
    finally:
        eng.shutdown()


def test_cancelling_a_request_whose_pages_are_shared_leaves_the_others_unchanged(
    tiny_checkpoint: Path, uncached, processor
) -> None:
    eng = make_engine(tiny_checkpoint, prefix_cache=True, chunk=64)
    try:
        prompt = f"{SYSTEM} USER: <image>\nWhat is happening here? ASSISTANT:"
        x = encode(processor, prompt, [image(7)])
        expected = run(uncached, x, max_tokens=40).ids
        first = run(eng, x, max_tokens=40)  # publishes the prompt's pages
        assert first.ids == expected
        victim, other = CollectingSink(cancel_after=3), CollectingSink()
        for rid, sink in (("victim", victim), ("other", other)):
            eng.submit(
                GenerationRequest(rid, x["input_ids"][0], x["pixel_values"], 40, 0.0, 1.0, 0, [], sink)
            )
        victim.wait(), other.wait()
        assert victim.cached_tokens > 576 and other.cached_tokens > 576
        assert other.ids == expected and victim.ids == expected[: len(victim.ids)] and len(victim.ids) < 40
        # and the pages the cancelled one filled did not disturb a later request either
        assert run(eng, x, max_tokens=40).ids == expected
        settle(eng)
    finally:
        eng.shutdown()


def test_chunked_prefill_after_a_reused_prefix(tiny_checkpoint: Path, uncached, processor) -> None:
    """A later turn arriving while others decode: its rows after the reused prefix go in
    chunks carried by the running requests' steps."""
    eng = make_engine(tiny_checkpoint, prefix_cache=True, chunk=64)
    try:
        base = f"{SYSTEM} USER: <image>\nDescribe the scene. ASSISTANT:"
        x = encode(processor, base, [image(8)])
        run(eng, x)
        later = encode(
            processor, base + " A scene.</s>USER: " + "And the colours? " * 12 + "ASSISTANT:", [image(8)]
        )
        expected = run(uncached, later, max_tokens=24).ids
        busy = CollectingSink()  # keeps a request decoding, so the later turn is chunked
        other = encode(processor, "USER: <image>\nSomething else. ASSISTANT:", [image(9)])
        eng.submit(
            GenerationRequest("busy", other["input_ids"][0], other["pixel_values"], 60, 0.0, 1.0, 0, [], busy)
        )
        while len(busy.ids) < 2:
            time.sleep(0.005)
        mixed = eng.stats.snapshot()["mixed_steps"]
        sink = run(eng, later, max_tokens=24)
        assert sink.ids == expected and sink.cached_tokens > 576
        assert eng.stats.snapshot()["mixed_steps"] > mixed
        busy.wait()
    finally:
        eng.shutdown()


def test_first_step_logits_from_a_reused_prefix_match_a_whole_prefill(
    tiny_checkpoint: Path, processor
) -> None:
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    runner = LlavaRunner(loaded, RunnerConfig(max_batch=2))
    x = encode(processor, f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:", [image(4)])
    ids, pixels = x["input_ids"][0], x["pixel_values"]
    n = int(ids.shape[0])
    need = runner.cache.pages_for(n)
    own = list(range(1, 1 + need))
    runner.assign(0, own, 0.0, 1.0, 0)
    whole = runner.prefill_logits(0, ids, pixels)
    k = (n - 1) // 16
    runner.assign(1, own[:k] + list(range(1 + need, 1 + 2 * need - k)), 0.0, 1.0, 0)  # slot 0's first k pages
    part = runner.prefill_logits_from(1, runner.prompt_embeddings(ids, pixels), k * 16)
    assert float((part - whole).norm() / whole.norm()) < 1e-5
    assert int(part.argmax()) == int(whole.argmax())


def test_a_short_reused_prefix_before_a_new_image_runs_the_rest_in_several_steps(
    cached, uncached, processor
) -> None:
    """The system prompt is cached, the image after it is new: the ~600 rows after the
    reused pages run as several steps of prompt rows (a mixed step's 256 at most)."""
    prompt = f"{SYSTEM} USER: <image>\nWhat do you see? ASSISTANT:"
    same_on_both(cached, uncached, encode(processor, prompt, [image(20)]))
    x = encode(processor, prompt, [image(21)])
    sink = same_on_both(cached, uncached, x)
    n_system = len(processor.tokenizer(SYSTEM + " USER:").input_ids)
    assert 0 < sink.cached_tokens <= n_system
    assert x["input_ids"].shape[1] - sink.cached_tokens > 2 * cached.runner.cfg.mixed_rows  # 3 steps


def test_a_short_reused_prefix_is_not_worth_a_prompt_that_runs_alone_on_captured_graphs(
    tiny_checkpoint: Path, uncached, processor
) -> None:
    """Where whole prompts run from captured prefill graphs (a GPU), a prompt prefilled
    alone that could reuse less than a mixed step's rows is prefilled whole instead."""
    from types import SimpleNamespace

    eng = make_engine(tiny_checkpoint, prefix_cache=True)
    try:
        # as on a GPU: captured prefills (unused here: the CPU has no fused kernels) and
        # mixed steps of 256 rows (launched eagerly: the stand-in captures nothing)
        eng.runner.prefill_graphs = object()
        eng.runner.mixed_graphs = SimpleNamespace(rows=256, launch=lambda *a: None)
        prompt = f"{SYSTEM} USER: <image>\nWhat do you see? ASSISTANT:"
        first = encode(processor, prompt, [image(30)])
        run(eng, first)
        other = encode(processor, prompt, [image(31)])  # only the system prompt is shared
        assert run(eng, other).cached_tokens == 0
        again = run(eng, first)  # the whole prompt but its last page is cached
        assert again.cached_tokens > 576 and again.ids == run(uncached, first).ids
    finally:
        eng.shutdown()
