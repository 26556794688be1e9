"""The baseline engine: transformers' own ``generate``, one request at a time per worker.

This is what LLaVA's model worker does. It serves checkpoints the batching engine
does not implement, and it is the baseline the benchmark compares against. Requests
are checked at submit as the batching engine checks them; each ends with exactly one
final call to its sink, shutdown included (a running generation stops at its next
token).
"""

from __future__ import annotations

import logging
import queue
import threading
from typing import Any

import torch

from llava_node.engine.base import Engine, GenerationRequest, RequestLimits, safe_fail
from llava_node.engine.loading import LoadedModel
from llava_node.textstream import SequenceText
from llava_wire.protocol import CLIENT_ERROR_PREFIX, FinishReason, InvalidRequest

__all__ = ["HFGenerateEngine"]

log = logging.getLogger(__name__)


class _Streamer:
    """transformers streamer that turns each new token into a response."""

    def __init__(self, engine: HFGenerateEngine, request: GenerationRequest, text: SequenceText) -> None:
        self.engine = engine
        self.request = request
        self.text = text
        self.prompt_seen = False
        self.pending: list[int] = []
        self.prompt_tokens = request.prompt_tokens
        self.done = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() first passes the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            if self.done:
                with self.engine.stats.lock:
                    self.engine.stats.tokens_after_cancel += 1
                return
            piece = self.text.add(int(token))
            self.pending.append(int(token))
            with self.engine.stats.lock:
                self.engine.stats.tokens_generated += 1
            finished = self.text.finish_reason is not None
            if piece or finished:
                ids, self.pending = self.pending, []
                self.request.sink.send(
                    piece, ids, self.text.finish_reason, self.prompt_tokens, self.text.count
                )
            if finished:
                self.done = True

    def end(self) -> None:
        pass


class _StopWhenDone:
    """Stopping criterion: the streamer finished (stop string, length) or the client cancelled."""

    def __init__(self, streamer: _Streamer) -> None:
        self.streamer = streamer

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        s = self.streamer
        if not s.done and s.engine.stopping:
            s.done = True  # shutdown: _generate ends the request with an error
        if not s.done and s.request.sink.is_cancelled():
            s.text.cancel()
            s.done = True
            log.info("request %s cancelled after %d tokens", s.request.request_id, s.text.count)
        return torch.full((input_ids.shape[0],), s.done, dtype=torch.bool, device=input_ids.device)


class HFGenerateEngine(Engine):
    """Runs ``model.generate`` with a streamer, on ``workers`` threads."""

    def __init__(self, loaded: LoadedModel, workers: int = 1) -> None:
        super().__init__()
        self.loaded = loaded
        self.limits = RequestLimits.from_config(loaded.model.config, loaded.context_length)
        self.stopping = False
        self._queue: queue.Queue[GenerationRequest | None] = queue.Queue()
        self._active = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._work, name=f"hf-generate-{i}", daemon=True)
            for i in range(max(1, workers))
        ]
        for t in self._threads:
            t.start()

    @property
    def queue_length(self) -> int:
        """Requests waiting for a worker."""
        return self._queue.qsize()

    @property
    def active(self) -> int:
        """Requests generating now."""
        return self._active

    def describe(self) -> dict[str, object]:
        """Engine kind, for the node's log."""
        return {
            "engine": "hf_generate",
            "device": str(self.loaded.device),
            "dtype": str(self.loaded.dtype).removeprefix("torch."),
            "workers": len(self._threads),
        }

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request for the next free worker; an invalid one fails at once, alone."""
        if self.refuse_invalid(request, self.limits):
            return
        if self.stopping:
            safe_fail(request, "the model is shutting down")
            return
        self._queue.put(request)

    def shutdown(self) -> None:
        """Stop the workers: a running generation stops at its next token; every request
        still running or waiting ends with an error."""
        self.stopping = True
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join(timeout=30)
        while True:
            try:
                req = self._queue.get_nowait()
            except queue.Empty:
                return
            if req is not None:
                safe_fail(req, "the model is shutting down")

    def _work(self) -> None:
        while True:
            req = self._queue.get()
            if req is None:
                return
            with self._lock:
                self._active += 1
            try:
                self._generate(req)
            except Exception as exc:
                log.exception("generate failed")
                with self.stats.lock:
                    self.stats.requests_failed += 1
                safe_fail(req, f"generation failed on the node: {exc}")
            finally:
                with self._lock:
                    self._active -= 1

    @torch.inference_mode()
    def _generate(self, req: GenerationRequest) -> None:
        from transformers import StoppingCriteriaList

        with self.stats.lock:
            self.stats.requests_started += 1
        if req.sink.is_cancelled():
            with self.stats.lock:
                self.stats.requests_cancelled += 1
            req.sink.send("", [], FinishReason.CANCELLED, req.prompt_tokens, 0)
            return
        lm = self.loaded
        text = SequenceText(lm.tokenizer, req.stop, lm.eos_token_ids, req.max_tokens)
        try:
            # A continuation's prior tokens are in input_ids already; generate() keeps
            # its own random state, so a seeded sampled continuation is not the stream
            # it continues (the batching engine's is).
            text.resume(req.prior_ids)
        except InvalidRequest as exc:
            with self.stats.lock:
                self.stats.requests_failed += 1
            safe_fail(req, CLIENT_ERROR_PREFIX + str(exc), client_error=True)
            return
        streamer = _Streamer(self, req, text)
        inputs: dict[str, Any] = {"input_ids": req.input_ids[None].to(lm.device)}
        inputs["attention_mask"] = torch.ones_like(inputs["input_ids"])
        if req.pixel_values is not None and req.pixel_values.shape[0] > 0:
            inputs["pixel_values"] = req.pixel_values.to(lm.device, lm.dtype)
        sampling: dict[str, Any] = {"do_sample": False}
        if not req.greedy:
            torch.manual_seed(req.seed)
            sampling = {"do_sample": True, "temperature": req.temperature, "top_p": req.top_p, "top_k": 0}
        lm.model.generate(
            **inputs,
            max_new_tokens=req.max_tokens - req.prior_tokens,
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_StopWhenDone(streamer)]),
            pad_token_id=lm.tokenizer.pad_token_id,
            **sampling,
        )
        if self.stopping and text.finish_reason is None:
            with self.stats.lock:
                self.stats.requests_failed += 1
            safe_fail(req, "the model is shutting down")
            return
        if text.finish_reason is None:  # generate ended on its own (e.g. its own eos handling)
            text.finish_reason = FinishReason.STOP
            req.sink.send("", streamer.pending, text.finish_reason, streamer.prompt_tokens, text.count)
        elif text.finish_reason is FinishReason.CANCELLED:
            with self.stats.lock:
                self.stats.requests_cancelled += 1
            req.sink.send("", streamer.pending, text.finish_reason, streamer.prompt_tokens, text.count)
            return
        with self.stats.lock:
            self.stats.requests_finished += 1
