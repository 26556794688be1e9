"""The engines in-process on the CPU: token-exact against transformers' generate."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_node.engine import GenerationRequest
from llava_node.engine.batching import MAX_CHUNK_BACKLOG_STEPS, BatchingEngine
from llava_node.engine.hf_generate import HFGenerateEngine
from llava_node.engine.loading import LoadedModel, load_llava
from llava_node.engine.runner import LlavaRunner, RunnerConfig
from llava_wire.protocol import CLIENT_ERROR_PREFIX, FinishReason


class CollectingSink:
    """Collects one request's streamed output, as a Triton response sender would."""

    def __init__(self, cancel_after: int | None = None) -> None:
        self.ids: list[int] = []
        self.text = ""
        self.reason: FinishReason | None = None
        self.error: str | None = None
        self.client_error: bool | None = None
        self.responses = 0
        self.sizes: list[int] = []
        self.done = threading.Event()
        self.cancel_after = cancel_after
        self.cached_tokens = 0

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: FinishReason | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        assert not self.done.is_set(), "response after the final one"
        assert 0 <= cached_tokens < prompt_tokens
        self.cached_tokens = cached_tokens
        self.ids += list(token_ids)
        self.sizes.append(len(token_ids))
        self.text += text
        self.responses += 1
        assert completion_tokens == len(self.ids)
        if finish_reason is not None:
            self.reason = finish_reason
            self.done.set()

    def fail(self, message: str, client_error: bool = False) -> None:
        assert self.error is None, "fail after fail"
        self.error = message
        self.client_error = client_error
        self.done.set()

    def is_cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.ids) >= self.cancel_after

    def wait(self) -> CollectingSink:
        assert self.done.wait(120), "stream did not end"
        return self


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def reference(tiny_checkpoint: Path) -> LoadedModel:
    return load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[BatchingEngine]:
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    eng = BatchingEngine(
        LlavaRunner(loaded, RunnerConfig(max_batch=8)), loaded.tokenizer, loaded.eos_token_ids
    )
    yield eng
    eng.shutdown()


def make_inputs(processor, i: int):
    img = Image.new("RGB", (300 + 17 * i, 280), (30 * i % 255, 200 - 20 * i, 60))
    prompt = "USER: <image>\n" + "Describe it " * (1 + 3 * i) + "please. ASSISTANT:"
    return processor(images=[img], text=prompt, return_tensors="pt")


def request(inputs, sink, *, max_tokens=64, temperature=0.0, top_p=1.0, seed=0, stop=(), rid="r"):
    return GenerationRequest(
        rid,
        inputs["input_ids"][0],
        inputs["pixel_values"],
        max_tokens,
        temperature,
        top_p,
        seed,
        list(stop),
        sink,
    )


def hf_greedy(reference: LoadedModel, inputs, n: int) -> list[int]:
    out = reference.model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, inputs["input_ids"].shape[1] :].tolist()


def chunked_engine(checkpoint: Path, chunk: int, chunk_block: int = 64, chunk_max: int = 0) -> BatchingEngine:
    """A CPU engine with prompts prefilled in chunks of ``chunk`` rows (0: whole), up to
    ``chunk_max`` under a backlog."""
    loaded = load_llava(checkpoint, torch.device("cpu"), torch.float32)
    runner = LlavaRunner(loaded, RunnerConfig(max_batch=8, chunk_block=chunk_block))
    return BatchingEngine(
        runner, loaded.tokenizer, loaded.eos_token_ids, prefill_chunk=chunk, prefill_chunk_max=chunk_max
    )


def check_staggered(engine: BatchingEngine, processor, reference) -> None:
    """Eight requests joining the batch at different steps each get transformers' tokens."""
    inputs = [make_inputs(processor, i) for i in range(8)]
    expected = [hf_greedy(reference, x, 64) for x in inputs]
    sinks = [CollectingSink() for _ in inputs]
    for i, (x, sink) in enumerate(zip(inputs, sinks, strict=True)):
        engine.submit(request(x, sink, rid=f"r{i}"))
        time.sleep(0.02 * i)  # join the batch at different steps
    for sink, exp in zip(sinks, expected, strict=True):
        sink.wait()
        assert sink.error is None
        assert sink.reason is FinishReason.LENGTH
        assert sink.ids == exp
    assert len({tuple(s.ids) for s in sinks}) > 4  # different prompts, different outputs


def test_eight_staggered_requests_match_transformers_token_for_token(engine, processor, reference) -> None:
    before = engine.stats.snapshot()["mixed_steps"]
    check_staggered(engine, processor, reference)
    # the later prompts were prefilled in chunks carried by the running requests' steps
    assert engine.stats.snapshot()["mixed_steps"] > before


@pytest.mark.parametrize("chunk", [0, 64])
def test_staggered_requests_with_whole_or_small_prompt_chunks(
    tiny_checkpoint: Path, processor, reference, chunk: int
) -> None:
    # 0: every prompt prefilled whole between steps; 64: chunk edges fall inside the
    # image's rows, and the end of one prompt shares a step with the next one's start.
    eng = chunked_engine(tiny_checkpoint, chunk)
    try:
        check_staggered(eng, processor, reference)
        mixed = eng.stats.snapshot()["mixed_steps"]
        assert (mixed == 0) if chunk == 0 else (mixed > 590 // chunk)
    finally:
        eng.shutdown()


def test_cancelling_one_request_leaves_the_others_unchanged(engine, processor, reference) -> None:
    inputs = [make_inputs(processor, i) for i in range(3)]
    expected = [hf_greedy(reference, x, 48) for x in inputs]
    sinks = [CollectingSink(), CollectingSink(cancel_after=5), CollectingSink()]
    before = engine.stats.snapshot()["requests_cancelled"]
    for x, sink in zip(inputs, sinks, strict=True):
        engine.submit(request(x, sink, max_tokens=48))
    for s in sinks:
        s.wait()
    assert sinks[1].reason is FinishReason.CANCELLED
    assert 5 <= len(sinks[1].ids) <= 6  # stops within one token of the cancel
    assert sinks[1].ids == expected[1][: len(sinks[1].ids)]
    assert sinks[0].ids == expected[0] and sinks[2].ids == expected[2]
    assert engine.stats.snapshot()["requests_cancelled"] == before + 1


def test_seeded_sampling_does_not_depend_on_the_batch(engine, processor) -> None:
    x = make_inputs(processor, 1)
    alone = CollectingSink()
    engine.submit(request(x, alone, temperature=0.9, top_p=0.9, seed=1234, max_tokens=32))
    alone.wait()
    crowd = [CollectingSink() for _ in range(4)]
    for i, s in enumerate(crowd):
        engine.submit(request(make_inputs(processor, i + 2), s, temperature=0.7, seed=i, max_tokens=32))
    again = CollectingSink()
    engine.submit(request(x, again, temperature=0.9, top_p=0.9, seed=1234, max_tokens=32))
    other_seed = CollectingSink()
    engine.submit(request(x, other_seed, temperature=0.9, top_p=0.9, seed=99, max_tokens=32))
    for s in [*crowd, again, other_seed]:
        s.wait()
    assert again.ids == alone.ids
    assert other_seed.ids != alone.ids


def test_top_p_near_zero_is_greedy(engine, processor, reference) -> None:
    x = make_inputs(processor, 4)
    sink = CollectingSink()
    engine.submit(request(x, sink, temperature=1.0, top_p=1e-6, seed=7, max_tokens=16))
    assert sink.wait().ids == hf_greedy(reference, x, 16)


def test_stop_string_ends_generation_early(engine, processor, reference) -> None:
    x = make_inputs(processor, 0)
    full = CollectingSink()
    engine.submit(request(x, full, max_tokens=40))
    full.wait()
    stop = full.text[len(full.text) // 2 : len(full.text) // 2 + 3]
    assert stop.strip()
    sink = CollectingSink()
    engine.submit(request(x, sink, max_tokens=40, stop=[stop]))
    sink.wait()
    assert sink.reason is FinishReason.STOP
    assert stop not in sink.text
    assert full.text.startswith(sink.text) and len(sink.ids) < 40


def test_tokens_per_response_rule() -> None:
    from llava_node.engine.batching import AUTO_STREAM_BATCH, MAX_STREAM_INTERVAL

    auto = BatchingEngine.tokens_per_response
    fake = type("E", (), {"stream_interval": 0})()
    assert [auto(fake, n) for n in (1, AUTO_STREAM_BATCH)] == [1, 1]  # type: ignore[arg-type]
    assert auto(fake, AUTO_STREAM_BATCH + 1) == 2  # type: ignore[arg-type]
    assert auto(fake, 2 * AUTO_STREAM_BATCH + 1) == 3  # type: ignore[arg-type]
    assert auto(fake, 10_000) == MAX_STREAM_INTERVAL  # type: ignore[arg-type]
    fake.stream_interval = 5
    assert auto(fake, 1) == 5  # type: ignore[arg-type]


def test_grouped_responses_carry_the_same_tokens(tiny_checkpoint: Path, processor, reference) -> None:
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    eng = BatchingEngine(
        LlavaRunner(loaded, RunnerConfig(max_batch=4)),
        loaded.tokenizer,
        loaded.eos_token_ids,
        stream_interval=3,
    )
    try:
        x = make_inputs(processor, 2)
        sink = CollectingSink()
        eng.submit(request(x, sink, max_tokens=20))
        sink.wait()
    finally:
        eng.shutdown()
    assert sink.ids == hf_greedy(reference, x, 20)
    assert sink.text == loaded.tokenizer.decode(sink.ids, skip_special_tokens=True)
    # the first token alone (time to first token), then groups of up to three
    assert sink.sizes[0] == 1 and max(sink.sizes) == 3 and sum(sink.sizes) == 20
    assert sink.responses <= 1 + -(-19 // 3) + 1


def test_request_larger_than_the_cache_fails_clearly(tiny_checkpoint: Path, processor) -> None:
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    runner = LlavaRunner(loaded, RunnerConfig(max_batch=2, num_pages=60, page_size=16))
    eng = BatchingEngine(runner, loaded.tokenizer, loaded.eos_token_ids)
    try:
        x = make_inputs(processor, 0)  # ~590 prompt tokens: 59 pages hold 944 tokens
        big = CollectingSink()
        eng.submit(request(x, big, max_tokens=1000))
        assert "KV-cache tokens" in (big.wait().error or "")
        # Two requests that fit one at a time: the second waits for the first's pages.
        a, b = CollectingSink(), CollectingSink()
        eng.submit(request(x, a, max_tokens=200))
        eng.submit(request(x, b, max_tokens=200))
        assert a.wait().error is None and b.wait().error is None
        assert a.ids == b.ids and len(a.ids) == 200
    finally:
        eng.shutdown()


def test_hf_generate_engine_matches_transformers(tiny_checkpoint: Path, processor, reference) -> None:
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    eng = HFGenerateEngine(loaded)
    try:
        x = make_inputs(processor, 2)
        sink = CollectingSink()
        eng.submit(request(x, sink, max_tokens=32))
        assert sink.wait().ids == hf_greedy(reference, x, 32)
        assert sink.reason is FinishReason.LENGTH
        cancelled = CollectingSink(cancel_after=3)
        eng.submit(request(x, cancelled, max_tokens=200))
        assert cancelled.wait().reason is FinishReason.CANCELLED
        assert len(cancelled.ids) <= 4
    finally:
        eng.shutdown()


def test_prompts_beyond_the_chunk_backlog_are_prefilled_whole(
    tiny_checkpoint: Path, processor, reference
) -> None:
    # Five requests at once with chunks of 16 rows: the first runs alone (whole), the
    # second waits for chunks, and the rest would wait behind more than
    # MAX_CHUNK_BACKLOG_STEPS steps of chunks, so they are prefilled whole.
    eng = chunked_engine(tiny_checkpoint, 16, chunk_block=16)
    try:
        inputs = [make_inputs(processor, i) for i in range(5)]
        sinks = [CollectingSink() for _ in inputs]
        for i, (x, sink) in enumerate(zip(inputs, sinks, strict=True)):
            eng.submit(request(x, sink, max_tokens=16, rid=f"b{i}"))
        for x, sink in zip(inputs, sinks, strict=True):
            assert sink.wait().error is None
            assert sink.ids == hf_greedy(reference, x, 16)
        assert int(inputs[1]["input_ids"].shape[1]) > MAX_CHUNK_BACKLOG_STEPS * 16
        one_prompt = -(-int(inputs[1]["input_ids"].shape[1]) // 16)
        assert 0 < eng.stats.snapshot()["mixed_steps"] <= one_prompt + 1
    finally:
        eng.shutdown()


def test_on_the_cpu_a_request_arriving_while_tokens_go_out_starts_before_the_next_step(
    tiny_checkpoint: Path, processor, reference
) -> None:
    # A ends while C still decodes; A's client sends B as soon as A's last token arrives,
    # which is in the middle of handling a step's tokens (A's come before C's). B is
    # admitted right there: C has taken no token of that step yet when B's first goes out.
    eng = chunked_engine(tiny_checkpoint, 0)
    x_a, x_b, x_c = (make_inputs(processor, i) for i in (1, 2, 3))
    seen: dict[str, int] = {}

    def c_tokens() -> int:  # taken by the engine (a response may hold some back)
        return next(r.text.count for r in eng._running.values() if r.request.request_id == "c")

    class Client(CollectingSink):
        def __init__(self, name: str) -> None:
            super().__init__()
            self.name = name

        def send(
            self, text, token_ids, finish_reason, prompt_tokens, completion_tokens, cached_tokens=0
        ) -> None:
            if self.name == "b" and self.responses == 0:
                seen["c_at_b_first"] = c_tokens()
            super().send(text, token_ids, finish_reason, prompt_tokens, completion_tokens, cached_tokens)
            if self.name == "a" and finish_reason is not None:
                seen["c_at_a_last"] = c_tokens()
                eng.submit(request(x_b, sink_b, max_tokens=8, rid="b"))

    sink_a, sink_b, sink_c = Client("a"), Client("b"), Client("c")
    try:
        eng.submit(request(x_a, sink_a, max_tokens=6, rid="a"))
        eng.submit(request(x_c, sink_c, max_tokens=40, rid="c"))
        for sink, x, n in ((sink_a, x_a, 6), (sink_b, x_b, 8), (sink_c, x_c, 40)):
            assert sink.wait().error is None
            assert sink.ids == hf_greedy(reference, x, n)
    finally:
        eng.shutdown()
    assert 0 < seen["c_at_a_last"] < 40
    assert seen["c_at_b_first"] == seen["c_at_a_last"], seen


# -- one bad request fails alone -------------------------------------------------------------
def wait_for_tokens(sinks: Sequence[CollectingSink], n: int = 2, timeout_s: float = 60) -> None:
    """Until every sink has ``n`` tokens (the requests are decoding)."""
    deadline = time.monotonic() + timeout_s
    while not all(len(s.ids) >= n for s in sinks):
        assert time.monotonic() < deadline, "the requests never started"
        time.sleep(0.005)


def malformed(processor, vocab: int) -> dict[str, GenerationRequest]:
    """Requests a direct llava_engine call could send, each wrong in one way."""
    x = make_inputs(processor, 0)
    ids, pv = x["input_ids"][0], x["pixel_values"]
    text_ids = processor(text="USER: hi ASSISTANT:", return_tensors="pt")["input_ids"][0]
    one = CollectingSink  # a fresh sink per request

    def req(**kw) -> GenerationRequest:
        base = {"input_ids": ids, "pixel_values": pv, "max_tokens": 16, "temperature": 0.0}
        base.update(kw)
        return GenerationRequest(
            "bad", base["input_ids"], base["pixel_values"], base["max_tokens"], base["temperature"],
            base.get("top_p", 1.0), base.get("seed", 0), base.get("stop", []), one(),
        )  # fmt: skip

    return {
        "token id past the vocabulary": req(input_ids=torch.cat([ids, torch.tensor([vocab + 5])])),
        "negative token id": req(input_ids=torch.cat([ids, torch.tensor([-1])])),
        "ids of two dimensions": req(input_ids=ids[None]),
        "float ids": req(input_ids=ids.float()),
        "no ids": req(input_ids=ids[:0], pixel_values=None),
        "image tokens without pixels": req(pixel_values=None),
        "pixels without image tokens": req(input_ids=text_ids),
        "pixels of another size": req(pixel_values=torch.zeros(1, 3, 224, 224)),
        "two images for one": req(pixel_values=torch.cat([pv, pv])),
        "NaN pixels": req(pixel_values=torch.full_like(pv, float("nan"))),
        "huge pixels": req(pixel_values=torch.full_like(pv, 1e30)),
        "prompt as long as the context": req(
            input_ids=torch.ones(2048, dtype=torch.int64), pixel_values=None
        ),
        "max_tokens 0": req(max_tokens=0),
        "temperature NaN": req(temperature=float("nan")),
        "temperature 5": req(temperature=5.0),
        "top_p 0": req(top_p=0.0),
        "top_p inf": req(top_p=float("inf")),
        "negative seed": req(seed=-1),
        "seed past 63 bits": req(seed=1 << 64),
        "too many stop strings": req(stop=[f"s{i}" for i in range(17)]),
        "a long stop string": req(stop=["x" * 300]),
        "a lone surrogate in a stop string": req(stop=["\ud800"]),
    }


def test_a_malformed_request_fails_alone_while_others_run(engine, processor, reference) -> None:
    inputs = [make_inputs(processor, i) for i in range(3)]
    expected = [hf_greedy(reference, x, 40) for x in inputs]
    good = [CollectingSink() for _ in inputs]
    for i, (x, sink) in enumerate(zip(inputs, good, strict=True)):
        engine.submit(request(x, sink, max_tokens=40, rid=f"good{i}"))
    wait_for_tokens(good)  # they decode together now
    bad = malformed(processor, engine.runner.vocab)
    for r in bad.values():
        engine.submit(r)
    for name, r in bad.items():
        bad_sink = r.sink
        assert isinstance(bad_sink, CollectingSink)
        assert bad_sink.done.wait(10), name
        assert bad_sink.error is not None and bad_sink.error.startswith(CLIENT_ERROR_PREFIX), (
            name,
            bad_sink.error,
        )
        assert bad_sink.client_error is True, name
        assert bad_sink.ids == [], name
    for sink, exp in zip(good, expected, strict=True):
        sink.wait()
        assert sink.error is None, sink.error
        assert sink.ids == exp  # exactly what they generate alone


def test_the_engine_names_what_was_wrong(engine, processor) -> None:
    bad = malformed(processor, engine.runner.vocab)
    for r in bad.values():
        engine.submit(r)
    errors = {name: r.sink.wait().error for name, r in bad.items()}  # type: ignore[attr-defined]
    assert errors["token id past the vocabulary"] == (
        f"{CLIENT_ERROR_PREFIX}input_ids holds the token id {engine.runner.vocab + 5}; "
        f"ids must be in [0, {engine.runner.vocab})"
    )
    assert "[images, 3, 336, 336]" in (errors["pixels of another size"] or "")
    assert "holds 576 image tokens (id" in (errors["image tokens without pixels"] or "")
    assert "for 2 image(s); each image takes 576" in (errors["two images for one"] or "")
    assert "temperature is nan" in (errors["temperature NaN"] or "")


def test_max_tokens_past_the_context_is_capped_not_a_failure(engine, processor) -> None:
    # A direct call may ask for more than the context holds: it ends with "length" there.
    ids = torch.ones(2040, dtype=torch.int64)
    sink = CollectingSink()
    engine.submit(GenerationRequest("long", ids, None, 1000, 0.0, 1.0, 0, [], sink))
    assert sink.wait().error is None
    assert len(sink.ids) == 2048 - 2040 and sink.reason is FinishReason.LENGTH


def test_a_prompt_that_fails_on_the_node_fails_only_its_request(
    tiny_checkpoint: Path, processor, reference, monkeypatch: pytest.MonkeyPatch
) -> None:
    eng = chunked_engine(tiny_checkpoint, 0)
    prefill = eng.runner.prefill

    def failing_prefill(
        slot: int, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, keys=None
    ) -> int:
        if int(input_ids[-1]) == 7:  # the poisoned request
            raise RuntimeError("boom in the prompt")
        return prefill(slot, input_ids, pixel_values, keys)

    monkeypatch.setattr(eng.runner, "prefill", failing_prefill)
    try:
        inputs = [make_inputs(processor, i) for i in range(2)]
        expected = [hf_greedy(reference, x, 40) for x in inputs]
        good = [CollectingSink() for _ in inputs]
        for x, sink in zip(inputs, good, strict=True):
            eng.submit(request(x, sink, max_tokens=40))
        wait_for_tokens(good)
        poisoned = CollectingSink()
        eng.submit(GenerationRequest("poisoned", torch.tensor([1, 5, 7]), None, 8, 0.0, 1.0, 0, [], poisoned))
        assert poisoned.done.wait(10)
        assert poisoned.error == "the prompt failed on the node: boom in the prompt"
        assert poisoned.client_error is False  # a node fault, though only this request's
        for sink, exp in zip(good, expected, strict=True):
            assert sink.wait().error is None
            assert sink.ids == exp
        assert eng.stats.snapshot()["requests_failed"] == 1
    finally:
        eng.shutdown()


class RaisingSink(CollectingSink):
    """A client that is gone after its ``fails_at``-th response: sending raises."""

    def __init__(self, fails_at: int) -> None:
        super().__init__()
        self.fails_at = fails_at

    def send(self, text, token_ids, finish_reason, prompt_tokens, completion_tokens, cached_tokens=0) -> None:
        if self.responses + 1 >= self.fails_at:
            self.responses += 1
            raise RuntimeError("the stream is gone")
        super().send(text, token_ids, finish_reason, prompt_tokens, completion_tokens, cached_tokens)


def test_a_request_whose_send_fails_is_still_ended_and_the_others_are_not(
    engine, processor, reference
) -> None:
    # Triton releases a request only once its stream was ended: a send that raised must
    # be followed by fail() (which closes it), or an unload waits for it forever.
    inputs = [make_inputs(processor, i) for i in range(2)]
    expected = [hf_greedy(reference, x, 30) for x in inputs]
    good = CollectingSink()
    gone = RaisingSink(fails_at=3)
    engine.submit(request(inputs[0], good, max_tokens=30))
    engine.submit(request(inputs[1], gone, max_tokens=30))
    assert gone.done.wait(10), "the engine never ended the request whose send failed"
    assert gone.error is not None and "the stream is gone" in gone.error
    assert good.wait().ids == expected[0]
    first = RaisingSink(fails_at=1)  # the very first response (after the prefill) fails
    engine.submit(request(inputs[1], first, max_tokens=30))
    assert first.done.wait(10) and first.error is not None


def test_the_hf_generate_engine_refuses_malformed_requests(tiny_checkpoint: Path, processor) -> None:
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    eng = HFGenerateEngine(loaded)
    try:
        bad = malformed(processor, int(loaded.model.config.text_config.vocab_size))
        for r in bad.values():
            eng.submit(r)
        for name, r in bad.items():
            sink = r.sink
            assert isinstance(sink, CollectingSink)
            assert sink.done.wait(10), name
            assert (sink.error or "").startswith(CLIENT_ERROR_PREFIX) and sink.client_error, (
                name,
                sink.error,
            )
    finally:
        eng.shutdown()


def test_shutdown_ends_every_request_at_once(tiny_checkpoint: Path, processor) -> None:
    x = make_inputs(processor, 1)
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    hf = HFGenerateEngine(loaded)
    batching = chunked_engine(tiny_checkpoint, 0)
    for eng in (hf, batching):
        sinks = [CollectingSink() for _ in range(3)]
        for s in sinks:
            eng.submit(request(x, s, max_tokens=1400, temperature=0.0))
        wait_for_tokens(sinks[:1])
        started = time.monotonic()
        eng.shutdown()
        assert time.monotonic() - started < 3, type(eng).__name__  # not the rest of 1400 tokens
        for s in sinks:
            assert s.done.is_set(), type(eng).__name__
            assert s.error == "the model is shutting down" or s.reason is not None
        assert any(s.error == "the model is shutting down" for s in sinks)
        late = CollectingSink()
        eng.submit(request(x, late))
        assert late.done.is_set() and late.error == "the model is shutting down"


def test_the_image_token_is_never_generated_even_where_the_model_prefers_it(
    tiny_checkpoint: Path, processor
) -> None:
    """The image token is an input placeholder (LLaVA's own checkpoints cannot emit it):
    with its LM-head row made the first step's clear favourite, both engines and
    transformers' generate() pass it over, greedy or sampled, and agree on what follows."""
    x = make_inputs(processor, 3)

    def favouring_the_image_token() -> LoadedModel:
        loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
        with torch.no_grad():
            head = loaded.model.lm_head.weight
            head[loaded.image_token_id] = 10 * head[int(loaded.model(**x).logits[0, -1].argmax())]
        return loaded

    reference = favouring_the_image_token()
    image_id = reference.image_token_id
    unsuppressed = reference.model.generate(**x, max_new_tokens=1, do_sample=False, suppress_tokens=[])
    assert int(unsuppressed[0, -1]) == image_id  # what the model itself would say
    expected = hf_greedy(reference, x, 24)  # its generation_config suppresses it
    assert image_id not in expected

    # (the runner takes the model's layers: each engine gets its own copy)
    batching = favouring_the_image_token()
    engines = [
        BatchingEngine(
            LlavaRunner(batching, RunnerConfig(max_batch=2)), batching.tokenizer, batching.eos_token_ids
        ),
        HFGenerateEngine(favouring_the_image_token()),
    ]
    try:
        for eng in engines:
            greedy, sampled = CollectingSink(), CollectingSink()
            eng.submit(request(x, greedy, max_tokens=24, rid="greedy"))
            eng.submit(request(x, sampled, max_tokens=24, temperature=1.0, seed=7, rid="sampled"))
            assert greedy.wait().ids == expected, type(eng).__name__
            assert sampled.wait().error is None and len(sampled.ids) == 24
            assert image_id not in sampled.ids, type(eng).__name__
    finally:
        for eng in engines:
            eng.shutdown()


def test_a_backlog_of_prompts_rides_in_bigger_chunks_with_the_same_tokens(
    tiny_checkpoint: Path, processor, reference
) -> None:
    """Prompts arriving together while one request decodes: while more than two chunks'
    rows wait, steps carry up to ``prefill_chunk_max`` rows (128 here), then ``prefill_chunk``
    (64) again; every request still gets transformers' tokens."""
    eng = chunked_engine(tiny_checkpoint, 64, chunk_block=32, chunk_max=128)
    steps: list[int] = []
    launch = eng.runner.mixed_launch

    def recording(slots, chunks, all_greedy):  # type: ignore[no-untyped-def]
        steps.append(sum(c.end - c.start for c in chunks))
        return launch(slots, chunks, all_greedy)

    eng.runner.mixed_launch = recording  # type: ignore[method-assign]
    try:
        inputs = [make_inputs(processor, i) for i in range(5)]
        expected = [hf_greedy(reference, x, 48) for x in inputs]
        sinks = [CollectingSink() for _ in inputs]
        eng.submit(request(inputs[0], sinks[0], max_tokens=48, rid="r0"))
        wait_for_tokens(sinks[:1])
        for i in range(1, 5):
            eng.submit(request(inputs[i], sinks[i], max_tokens=48, rid=f"r{i}"))
        for sink, exp in zip(sinks, expected, strict=True):
            assert sink.wait().error is None
            assert sink.ids == exp
        assert max(steps) == 128 and steps.count(128) > 4, steps  # the backlog
        assert steps[-1] <= 64, steps  # the last rows, once two chunks hold what waits
    finally:
        eng.shutdown()
