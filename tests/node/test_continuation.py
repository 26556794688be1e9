"""Continuations (``prior_token_ids``): a generation resumed from the tokens another node
streamed before it failed gives exactly what the uninterrupted stream would have sent
next: the same token ids, the same text deltas (stop strings and partial characters held
back across the break as before), the same counts; seeded sampling too on the batching
engine. Engines on the CPU (tiny model, float32) and the preprocessing's checks."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from transformers import AutoProcessor

from llava_node.engine import GenerationRequest
from llava_node.engine.batching import BatchingEngine
from llava_node.engine.hf_generate import HFGenerateEngine
from llava_node.engine.loading import load_llava
from llava_node.engine.runner import LlavaRunner, RunnerConfig
from llava_node.preprocess import InvalidRequest, Preprocessor, RawRequest
from llava_wire.protocol import FinishReason
from tests.node.test_prefix_cache import encode, image, make_engine


@dataclass
class Response:
    text: str
    ids: list[int]
    completion_tokens: int
    prompt_tokens: int


@dataclass
class ResponseSink:
    """Every response of one request, as the control plane sees them."""

    responses: list[Response] = field(default_factory=list)
    reason: FinishReason | None = None
    error: str | None = None
    client_error: bool | None = None
    done: threading.Event = field(default_factory=threading.Event)
    done_hook: Callable[[], None] = lambda: None
    hold: threading.Event | None = None  # set: each send waits for it (the engine thread waits)
    sending: threading.Event = field(default_factory=threading.Event)  # a send began

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
        self.sending.set()
        if self.hold is not None:
            assert self.hold.wait(30)
        self.responses.append(Response(text, list(token_ids), completion_tokens, prompt_tokens))
        if finish_reason is not None:
            self.reason = finish_reason
            self.done_hook()
            self.done.set()

    def fail(self, message: str, client_error: bool = False) -> None:
        self.error, self.client_error = message, client_error
        self.done.set()

    def is_cancelled(self) -> bool:
        return False

    @property
    def ids(self) -> list[int]:
        return [i for r in self.responses for i in r.ids]

    @property
    def text(self) -> str:
        return "".join(r.text for r in self.responses)


def generate(
    engine: object,
    x: dict[str, torch.Tensor],
    prior: list[int] | None = None,
    *,
    max_tokens: int = 40,
    temperature: float = 0.0,
    seed: int = 0,
    stop: list[str] | None = None,
) -> ResponseSink:
    sink = ResponseSink()
    ids = x["input_ids"][0]
    if prior:
        ids = torch.cat([ids, torch.tensor(prior, dtype=torch.int64)])
    req = GenerationRequest(
        "r", ids, x.get("pixel_values"), max_tokens, temperature, 1.0, seed, list(stop or []), sink
    )
    req.prior_tokens = len(prior or [])
    engine.submit(req)  # type: ignore[attr-defined]
    assert sink.done.wait(60)
    return sink


def breaks(full: ResponseSink) -> list[int]:
    """Where a stream can break: after each response but the last (what a client has)."""
    out, n = [], 0
    for r in full.responses[:-1]:
        n += len(r.ids)
        if r.ids:
            out.append(n)
    return out


def check_resumes(engine: object, x: dict[str, torch.Tensor], full: ResponseSink, **kw: object) -> int:
    """Break ``full`` at several points and resume: the continuation's responses join
    what was sent before into the uninterrupted stream. How many breaks were tried."""
    points = breaks(full)
    assert len(points) >= 3, points
    tried = [points[0], points[len(points) // 2], points[-1]]
    for k in tried:
        sent_text = "".join(r.text for r in full.responses if r.completion_tokens <= k)
        resumed = generate(engine, x, full.ids[:k], **kw)  # type: ignore[arg-type]
        assert resumed.error is None, resumed.error
        assert full.ids[:k] + resumed.ids == full.ids, k
        assert sent_text + resumed.text == full.text, k
        assert resumed.reason == full.reason
        last = resumed.responses[-1]
        assert (
            last.completion_tokens == len(full.ids) and last.prompt_tokens == full.responses[-1].prompt_tokens
        )
    return len(tried)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint: Path):
    return AutoProcessor.from_pretrained(tiny_checkpoint)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: Path) -> Iterator[BatchingEngine]:
    eng = make_engine(tiny_checkpoint, prefix_cache=True)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def prompt(processor) -> dict[str, torch.Tensor]:
    return encode(processor, "USER: <image>\nTell me a long story. ASSISTANT:", [image(2)])


def test_a_greedy_continuation_is_the_rest_of_the_stream(engine, prompt) -> None:
    full = generate(engine, prompt)
    assert full.error is None and len(full.ids) == 40
    check_resumes(engine, prompt, full)


def test_a_seeded_sampled_continuation_is_the_rest_of_the_seeded_stream(engine, prompt) -> None:
    """The batching engine's randomness is a hash of (seed, step): resumed at step k, the
    later tokens draw the same numbers (identical here, where the logits of a prefill of
    the prior tokens and of their decode steps agree to the sampled token)."""
    full = generate(engine, prompt, temperature=1.0, seed=1234)
    assert full.error is None and len(full.ids) >= 8
    check_resumes(engine, prompt, full, temperature=1.0, seed=1234)
    other = generate(engine, prompt, temperature=1.0, seed=99)
    assert other.ids != full.ids  # (the seed is what makes them equal)


def test_a_stop_string_across_the_break_is_found_and_never_sent(engine, prompt, processor) -> None:
    plain = generate(engine, prompt)
    # a stop string made of the text around the middle of the stream: the uninterrupted
    # stream holds back its first part, then ends there
    mid = len(plain.text) // 2
    stop = plain.text[mid : mid + 6]
    assert len(stop.strip()) >= 3, stop
    full = generate(engine, prompt, stop=[stop])
    assert full.reason == FinishReason.STOP and stop not in full.text
    assert full.text == plain.text[: plain.text.index(stop)]
    check_resumes(engine, prompt, full, stop=[stop])


def test_prior_tokens_that_end_the_generation_are_refused(engine, prompt, processor) -> None:
    eos = processor.tokenizer.eos_token_id
    done = generate(engine, prompt, [5, 6, eos])
    assert done.client_error is True and "end-of-sequence token at prior token 2" in (done.error or "")
    over = generate(engine, prompt, [5] * 4, max_tokens=4)
    assert over.client_error is True and "needs max_tokens above" in (over.error or "")
    image_token = processor.tokenizer.convert_tokens_to_ids("<image>")
    img = generate(engine, prompt, [5, image_token])
    assert img.client_error is True and "image token" in (img.error or "")
    outside = generate(engine, prompt, [5, 10**9])
    assert outside.client_error is True and "token id 1000000000" in (outside.error or "")
    # the engine still serves
    assert generate(engine, prompt, max_tokens=4).error is None


def test_the_transformers_engine_resumes_greedy_streams(tiny_checkpoint: Path, prompt) -> None:
    eng = HFGenerateEngine(load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32))
    try:
        full = generate(eng, prompt, max_tokens=24)
        assert full.error is None
        check_resumes(eng, prompt, full, max_tokens=24)
    finally:
        eng.shutdown()


def test_preprocessing_appends_prior_tokens_and_checks_them(tiny_checkpoint: Path) -> None:
    pre = Preprocessor(tiny_checkpoint)
    base = pre.prepare(RawRequest(prompt="USER: hi ASSISTANT:", max_tokens=8))
    cont = pre.prepare(RawRequest(prompt="USER: hi ASSISTANT:", max_tokens=8, prior_token_ids=[7, 8, 9]))
    assert cont.prior_tokens == 3 and base.prior_tokens == 0
    assert cont.input_ids.tolist() == [*base.input_ids.tolist(), 7, 8, 9]
    assert cont.max_tokens == base.max_tokens == 8  # prior tokens count toward it
    with pytest.raises(InvalidRequest, match="needs fewer than max_tokens"):
        pre.prepare(RawRequest(prompt="USER: hi ASSISTANT:", max_tokens=3, prior_token_ids=[7, 8, 9]))
    with pytest.raises(InvalidRequest, match="image token"):
        image_token = pre.tokenizer.convert_tokens_to_ids("<image>")
        pre.prepare(RawRequest(prompt="USER: hi ASSISTANT:", prior_token_ids=[7, image_token]))


def test_a_continuation_waits_before_requests_that_have_not_started(tiny_checkpoint: Path, prompt) -> None:
    """Its client is mid-stream: on a full node it takes the next free slot."""
    loaded = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32)
    runner = LlavaRunner(loaded, RunnerConfig(max_batch=1))
    eng = BatchingEngine(runner, loaded.tokenizer, loaded.eos_token_ids)
    order: list[str] = []
    try:
        sinks = []
        for name, prior, max_tokens in (("running", None, 30), ("new", None, 4), ("continuation", [5, 6], 6)):
            sink = ResponseSink()
            ids = prompt["input_ids"][0]
            if prior:
                ids = torch.cat([ids, torch.tensor(prior)])
            req = GenerationRequest(name, ids, prompt["pixel_values"], max_tokens, 0.0, 1.0, 0, [], sink)
            req.prior_tokens = len(prior or [])
            sink.done_hook = functools.partial(order.append, name)
            if name == "running":  # it holds the only slot, the engine thread held in its first send
                sink.hold = held = threading.Event()
            eng.submit(req)
            sinks.append(sink)
            assert sink.hold is None or sink.sending.wait(30)  # started, before the others come
        held.set()
        for sink in sinks:
            assert sink.done.wait(60) and sink.error is None
    finally:
        eng.shutdown()
    assert order == ["running", "continuation", "new"]
