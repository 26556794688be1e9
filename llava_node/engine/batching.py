"""Continuous batching: one loop per engine that owns the device.

Requests join between decode steps: each waits until a slot and the KV pages for its
prompt plus its ``max_tokens`` are free (so a running request can never run out of
memory), is prefilled, then decodes together with every other running request, one
token per step. Finished and cancelled requests leave between steps and give their
pages back.

A prompt that arrives while nothing else runs is prefilled whole (from a captured
graph on a GPU): the shortest time to its first token. One that arrives while others
decode is prefilled in chunks of ``prefill_chunk`` tokens, each carried by a decode
step ("mixed step"): a decode step of a 7B model is bound by reading the weights, so
the prompt's rows ride on that read nearly for free, and the running requests keep
getting a token per step instead of waiting out a whole prefill. When prompts arrive
faster than one chunk a step clears them, steps carry bigger chunks (up to
``prefill_chunk_max``, from CUDA graphs captured at several prompt-row counts); beyond
that the excess is prefilled whole (see ``MAX_CHUNK_BACKLOG_STEPS``).

Each response through Triton's Python backend is a round trip between its processes
(0.3-0.7 ms of the engine thread's time on the H100 hosts measured), so with many
requests running the host, not the device, would set the pace. Up to
``AUTO_STREAM_BATCH`` running requests each token is its own response; above that a
request's tokens go out in groups (two tokens at 9-16 running requests, three at
17-24, four at 25-32, ...), keeping the host's share of a step under the device's. A
request's first token, its last, and anything a stop string or cancellation ends, go
out at once.

Where the device is the CPU a step computes synchronously, before its launch returns,
and handling the previous step's tokens (detokenizing, one round trip per response)
takes a large part of the cycle. Requests waiting then are admitted between those
sends, not only at the top of the loop: one that arrives while the tokens go out starts
at once instead of waiting out the next step (on a GPU the step in flight computes
meanwhile, and a newcomer joins the next launch either way).

One request cannot take the others down: each is checked at submit
(:func:`~llava_node.engine.base.check_request`: token ids in the vocabulary, pixels of
the vision tower's size, image tokens matching the images, settings in range), and a
failure while admitting, prefilling or answering one request ends that request alone.
Only a failure of a batched step, which no single request can be blamed for, fails
the requests in it. Every request ends with exactly one final call to its sink.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from llava_node.engine.base import Engine, GenerationRequest, RequestLimits, safe_fail
from llava_node.engine.prefix_cache import PrefixCache, block_keys, image_key
from llava_node.engine.runner import LlavaRunner, PendingTokens, PromptChunk
from llava_node.textstream import SequenceText
from llava_wire.protocol import CLIENT_ERROR_PREFIX, FinishReason, InvalidRequest

__all__ = [
    "AUTO_STREAM_BATCH",
    "DEFAULT_PREFILL_CHUNK",
    "MAX_CHUNK_BACKLOG_STEPS",
    "MAX_STREAM_INTERVAL",
    "BatchingEngine",
]

log = logging.getLogger(__name__)

AUTO_STREAM_BATCH = 8  # running requests up to which every token is its own response
MAX_STREAM_INTERVAL = 8  # the most tokens the automatic rule puts in one response
DEFAULT_PREFILL_CHUNK = 256  # prompt tokens a mixed step carries
# Prompts wait for chunks only while those already waiting fill at most this many mixed
# steps of ``prefill_chunk_max`` rows (what a step carries under a backlog); beyond that
# (arrivals faster than the chunks clear them) a prompt is prefilled whole, as without
# chunks, so that time to first token stays bounded under overload.
MAX_CHUNK_BACKLOG_STEPS = 16


@dataclass
class _Running:
    request: GenerationRequest
    slot: int
    pages: list[int]
    text: SequenceText
    prompt_tokens: int  # rows to prefill: a continuation's prior tokens too
    pending_ids: list[int] = field(default_factory=list)
    pending_text: str = ""
    first_token_at: float = 0.0
    embeds: torch.Tensor | None = None  # while its prompt is prefilled in chunks
    prefilled: int = 0  # prompt rows launched so far (from the end of a reused prefix)
    cached: int = 0  # prompt tokens reused from the prefix cache
    generated: list[int] = field(default_factory=list)  # every token sampled for it

    @property
    def cached_shown(self) -> int:
        """Reused tokens as reported: of the prompt proper (a continuation's prior
        tokens are rows to prefill here, but not prompt)."""
        return min(self.cached, self.request.prompt_tokens)

    @property
    def decoding(self) -> bool:
        """Whether its prompt has been launched whole (it can join decode steps)."""
        return self.embeds is None


@dataclass
class _Step:
    """A launched step: its decode rows, the prompt chunks it carries, its tokens."""

    runs: list[_Running]
    chunks: list[tuple[_Running, PromptChunk]]
    pending: PendingTokens


class BatchingEngine(Engine):
    """Continuous-batching engine over a :class:`LlavaRunner`."""

    def __init__(
        self,
        runner: LlavaRunner,
        tokenizer: object,
        eos_token_ids: list[int],
        *,
        cancel_check_every: int = 1,
        stream_interval: int = 0,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        prefill_chunk_max: int = 0,
        prefix_cache: bool = True,
    ) -> None:
        super().__init__()
        self.runner = runner
        # Owns the KV pages: reuse of cached prefixes, and eviction when memory is needed.
        self.pages = PrefixCache(runner.cache.allocator, runner.cache.page_size, enabled=prefix_cache)
        if not prefix_cache:
            runner.image_cache.capacity = 0
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.cancel_check_every = max(1, cancel_check_every)
        self.stream_interval = max(0, stream_interval)  # 0: automatic
        # 0: prompts are prefilled whole, between steps; else whole blocks of prompt rows
        block = runner.cfg.chunk_block
        self.prefill_chunk = -(-max(0, prefill_chunk) // block) * block
        # under a backlog (more rows waiting than two chunks), a step carries up to this many
        self.prefill_chunk_max = max(self.prefill_chunk, -(-max(0, prefill_chunk_max) // block) * block)
        if not self.prefill_chunk:
            self.prefill_chunk_max = 0
        self._cond = threading.Condition()
        self._waiting: deque[GenerationRequest] = deque()
        self._running: dict[int, _Running] = {}
        self._free_slots = list(range(runner.max_batch - 1, -1, -1))
        self._stopping = False
        self._admit_between_sends = runner.device.type == "cpu"
        self.limits = RequestLimits.from_config(runner.loaded.model.config, runner.max_seq_len)
        self._thread = threading.Thread(target=self._loop, name="llava-engine", daemon=True)
        self._thread.start()

    # -- Engine interface ------------------------------------------------------------
    @property
    def queue_length(self) -> int:
        """Requests waiting for a slot or KV pages."""
        return len(self._waiting)

    @property
    def active(self) -> int:
        """Requests decoding now."""
        return len(self._running)

    def describe(self) -> dict[str, object]:
        """Engine sizes, for the node's log."""
        r = self.runner
        return {
            "engine": "batching",
            "device": str(r.device),
            "dtype": str(r.dtype).removeprefix("torch."),
            "max_batch": r.max_batch,
            "max_seq_len": r.max_seq_len,
            "kv_pages": r.cache.allocator.capacity,
            "page_size": r.cache.page_size,
            "kv_tokens": r.cache.allocator.capacity * r.cache.page_size,
            "kv_cache_dtype": str(r.kv_dtype).removeprefix("torch."),
            "weight_dtype": str(r.weight_dtype or r.dtype).removeprefix("torch."),
            "cuda_graphs": r.graphs is not None,
            "vision_graph": (r.vision_graph.error or "captured") if r.vision_graph is not None else None,
            "fused_kernels": r.fused is not None,
            "prefill_graphs": r.prefill_graphs is not None,
            "batch1_gemv": r.gemv is not None,
            "pdl": r.pdl,
            "stream_interval": self.stream_interval or f"auto (1 up to {AUTO_STREAM_BATCH} requests)",
            "prefill_chunk": self.prefill_chunk or "off",
            "prefill_chunk_max": self.prefill_chunk_max or "off",
            "mixed_graph_rows": r.mixed_graphs.sizes if r.mixed_graphs is not None else None,
            "prefix_cache": self.pages.enabled,
            "image_cache": r.image_cache.capacity,
        }

    def gauges(self) -> dict[str, float]:
        """Sizes now: requests running and waiting, the prefix and image caches."""
        return {
            **super().gauges(),
            "prefix_cache_pages": self.pages.cached_pages,
            "prefix_cache_tokens": self.pages.cached_pages * self.pages.page_size,
            "image_cache_images": len(self.runner.image_cache),
        }

    def cache_counters(self) -> dict[str, float]:
        """The caches' cumulative counters (hits, misses, evictions)."""
        st = self.pages.stats
        images = self.runner.image_cache
        return {
            "prefix_cache_hit_tokens": st.hit_tokens,
            "prefix_cache_miss_tokens": st.miss_tokens,
            "prefix_cache_hit_requests": st.hit_requests,
            "prefix_cache_evicted_pages": st.evicted_pages,
            "image_cache_hits": images.hits,
            "image_cache_misses": images.misses,
        }

    def tokens_per_response(self, running: int) -> int:
        """How many tokens a response carries when ``running`` requests decode together."""
        if self.stream_interval:
            return self.stream_interval
        return min(MAX_STREAM_INTERVAL, max(1, -(-running // AUTO_STREAM_BATCH)))

    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; it fails alone at once if it is invalid or could never fit
        the KV cache (client errors), or if the engine is shutting down."""
        if self.refuse_invalid(request, self.limits):
            return
        need = self.runner.cache.pages_for(request.total_tokens)
        capacity = self.runner.cache.allocator.capacity
        if need > capacity:
            with self.stats.lock:
                self.stats.requests_failed += 1
            safe_fail(
                request,
                f"{CLIENT_ERROR_PREFIX}the request needs {need * self.runner.cache.page_size} KV-cache tokens "
                f"(prompt plus max_tokens); this node holds {capacity * self.runner.cache.page_size}",
                client_error=True,
            )
            return
        if self.pages.enabled:  # hashing here, on the caller's thread, not the engine's
            self._key_pages(request)
        request.arrival = time.monotonic()
        with self._cond:
            stopping = self._stopping
            if not stopping:
                if request.prior_tokens:
                    # A continuation's client is mid-stream, waiting since its node failed:
                    # it goes before the requests that have not started (after earlier ones).
                    at = next(
                        (i for i, r in enumerate(self._waiting) if not r.prior_tokens), len(self._waiting)
                    )
                    self._waiting.insert(at, request)
                else:
                    self._waiting.append(request)
                self._cond.notify()
        if stopping:
            safe_fail(request, "the model is shutting down")

    def _key_pages(self, request: GenerationRequest) -> None:
        """The content hashes of ``request``'s images and the chained keys of its
        prompt's full pages (:mod:`~llava_node.engine.prefix_cache`)."""
        pixels = request.pixel_values
        images = [image_key(p) for p in pixels] if pixels is not None else []
        request.image_keys = images
        request.page_keys = block_keys(
            request.input_ids.tolist(),
            self.pages.page_size,
            image_token_id=self.limits.image_token_id,
            images=images,
        )

    def shutdown(self) -> None:
        """Stop the loop; end whatever is still waiting or running with an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        # The loop stops between steps: this waits out one step (or one prompt) at most.
        self._thread.join(timeout=30)
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for req in waiting:
            safe_fail(req, "the model is shutting down")
        for run in list(self._running.values()):
            self._finish(run, error="the model is shutting down")

    # -- the loop --------------------------------------------------------------------
    def _loop(self) -> None:
        # Pipelined: step N+1 is launched before the tokens of step N are handled, so the
        # device computes while the host detokenizes and sends. A request that finished
        # at step N has one extra token computed at N+1, which is dropped.
        inflight: _Step | None = None
        step = 0
        while True:
            with self._cond:
                while not self._stopping and not self._waiting and not self._running and inflight is None:
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self._admit()
                if step % self.cancel_check_every == 0:
                    self._reap_cancelled()
                launched = self._launch()
                if inflight is not None and self._still_needed(inflight):
                    self._collect(inflight)
                # else every request of the step in flight has finished: its tokens are not
                # needed, and not waiting for them lets a request that has just arrived
                # start its prefill now (the device runs the two in order anyway).
                inflight = launched
                step += 1
            except Exception as exc:  # a bug or a device error: fail the batch, keep serving
                log.exception("engine step failed")
                inflight = None
                for run in list(self._running.values()):
                    self._finish(run, error=f"generation failed on the node: {exc}")

    def _launch(self) -> _Step | None:
        """Launch the next step: the decoding requests, with up to ``prefill_chunk`` rows
        of the prompts still being prefilled, oldest first; up to ``prefill_chunk_max``
        when more than two chunks' rows wait (prompts arriving faster than one chunk a
        step clears them: at 64 streams of 655-row prompts and 128 new tokens, ~330 prompt
        rows a step keep up)."""
        runs = [r for r in self._running.values() if r.decoding]
        chunks: list[tuple[_Running, PromptChunk]] = []
        block = self.runner.cfg.chunk_block
        budget = self.prefill_chunk  # prompt rows, each chunk padded to whole blocks
        if self.prefill_chunk_max > budget and self._backlog() > 2 * budget:
            budget = self.prefill_chunk_max
        for r in self._running.values():  # admission order
            if r.decoding:
                continue
            if budget < block:
                break
            assert r.embeds is not None
            end = min(r.prefilled + budget, r.prompt_tokens)
            chunks.append((r, PromptChunk(r.slot, r.embeds, r.prefilled, end)))
            budget -= -(-(end - r.prefilled) // block) * block
        if not runs and not chunks:
            return None
        greedy = all(r.request.greedy for r in runs)
        with self.stats.lock:
            self.stats.decode_steps += 1
            self.stats.mixed_steps += bool(chunks)
        if not chunks:
            return _Step(runs, [], self.runner.decode_launch([r.slot for r in runs], greedy))
        greedy = greedy and all(r.request.greedy for r, _ in chunks)
        pending = self.runner.mixed_launch([r.slot for r in runs], [c for _, c in chunks], greedy)
        for r, c in chunks:
            r.prefilled = c.end
            if c.last:
                r.embeds = None  # decodes from the next step on
                self._publish_prompt(r)
        return _Step(runs, chunks, pending)

    def _still_needed(self, step: _Step) -> bool:
        """Whether any request of ``step`` is still running (its tokens are wanted)."""
        return any(self._running.get(r.slot) is r for r in [*step.runs, *(r for r, _ in step.chunks)])

    @staticmethod
    def _is_cancelled(req: GenerationRequest) -> bool:
        try:
            return bool(req.sink.is_cancelled())
        except Exception:  # the sink cannot be asked: end the request rather than the loop
            log.exception("request %s: asking whether it was cancelled failed", req.request_id)
            return True

    def _admit(self) -> None:
        cache = self.runner.cache
        while True:
            with self._cond:
                if not self._waiting or not self._free_slots:
                    return
                req = self._waiting[0]
                pages: list[int] | None = None
                cached = 0
                chunked = self._chunks_now()
                if not self._is_cancelled(req):
                    n = int(req.input_ids.shape[0])
                    # At least the prompt's last token is computed (its logits give the
                    # first token), so a reused prefix ends before the last page.
                    reused = self.pages.match(req.page_keys[: (n - 1) // cache.page_size])
                    if (
                        reused
                        and not chunked
                        and self._whole_prefill_is_faster(len(reused) * cache.page_size)
                    ):
                        self.pages.release(reused)
                        reused = []
                    fresh = self.pages.allocate(cache.pages_for(req.total_tokens) - len(reused))
                    if fresh is None:
                        self.pages.release(reused)
                        return  # first in line waits for pages; later ones wait behind it
                    pages = reused + fresh
                    cached = len(reused) * cache.page_size
                    slot = self._free_slots.pop()
                self._waiting.popleft()
            if pages is None:  # cancelled while it waited
                self._count_cancel()
                log.info("request %s cancelled before it started", req.request_id)
                self._end_unstarted(req)
                continue
            self._start(req, slot, pages, cached, chunked)

    def _chunks_now(self) -> bool:
        """Whether a prompt starting now goes in chunks carried by the decode steps: when
        others are running and the chunks already waiting are few enough (else whole)."""
        if not (self.prefill_chunk and self._running):
            return False
        return self._backlog() < MAX_CHUNK_BACKLOG_STEPS * self.prefill_chunk_max

    def _backlog(self) -> int:
        """Prompt rows still waiting for mixed steps."""
        return sum(r.prompt_tokens - r.prefilled for r in self._running.values() if not r.decoding)

    def _whole_prefill_is_faster(self, cached: int) -> bool:
        """Whether a prompt prefilled alone (not in chunks) that could reuse ``cached``
        tokens is better prefilled whole.

        A prompt prefilled alone runs from a captured prefill
        graph whose attention sees only its own rows; the rows after a reused prefix run
        instead in prompt steps of at most a mixed step's rows, each padded and ~1.3x the
        device time per row (H200: a 605-row rest after a 64-token system prompt took
        35 ms to the first token, the whole 669-token prompt 29 ms). Below one mixed
        step's worth of reused rows, the reuse costs more than it saves."""
        graphs = self.runner.mixed_graphs
        if self.runner.prefill_graphs is None or graphs is None:
            return False
        return cached < (self.prefill_chunk or graphs.rows)

    def _end_unstarted(self, req: GenerationRequest) -> None:
        """The final response of a request cancelled before its prompt ran."""
        try:
            req.sink.send("", [], FinishReason.CANCELLED, req.prompt_tokens, 0)
        except Exception as exc:
            log.info("request %s: the cancelled response was not delivered (%s)", req.request_id, exc)
            safe_fail(req, f"sending the final response failed: {exc}")

    def _start(self, req: GenerationRequest, slot: int, pages: list[int], cached: int, chunked: bool) -> None:
        """Start ``req`` in ``slot`` on ``pages`` (the first ``cached`` tokens' reused):
        its prompt whole now, or, ``chunked``, its embeddings now and its rows in the
        next steps."""
        n = int(req.input_ids.shape[0])
        try:
            text = SequenceText(self.tokenizer, req.stop, self.eos_token_ids, req.max_tokens)
            text.resume(req.prior_ids)  # a continuation: as if its prior tokens were generated here
        except Exception as exc:
            client_error = isinstance(exc, InvalidRequest)
            if not client_error:
                log.exception("request %s: its text state could not be made", req.request_id)
            self.pages.release(pages)
            with self._cond:
                self._free_slots.append(slot)
            with self.stats.lock:
                self.stats.requests_failed += 1
            if client_error:
                safe_fail(req, CLIENT_ERROR_PREFIX + str(exc), client_error=True)
            else:
                safe_fail(req, f"the request could not be started on the node: {exc}")
            return
        run = _Running(
            request=req, slot=slot, pages=pages, text=text, prompt_tokens=n, prefilled=cached, cached=cached
        )
        self.pages.count_prompt(n, cached)
        self._running[slot] = run
        with self.stats.lock:
            self.stats.requests_started += 1
            self.stats.queue_seconds += time.monotonic() - req.arrival
        started = time.perf_counter()
        try:
            # (a continuation samples on from its step: the seeded stream goes on)
            self.runner.assign(slot, pages, req.temperature, req.top_p, req.seed, step=req.prior_tokens)
            embeds = None
            if chunked or cached:
                # The vision tower (unless the images are cached) and the embeddings now
                embeds = self.runner.prompt_embeddings(
                    req.input_ids, req.pixel_values, req.image_keys, cached
                )
            if chunked:
                run.embeds = embeds  # the layers in the next steps
                return
            if embeds is not None:  # the rows after the reused prefix
                token = self.runner.prefill_from(slot, embeds, cached, req.greedy)
            else:
                token = self.runner.prefill(slot, req.input_ids, req.pixel_values, req.image_keys)
            self._publish_prompt(run)
        except torch.cuda.OutOfMemoryError:
            self._finish(run, error="the node ran out of GPU memory during the prompt; try a shorter one")
            return
        except Exception as exc:
            # Only this request's own prompt ran (no other request's state is touched by a
            # prefill), so it fails alone. It passed check_request: the node's fault.
            log.exception("request %s: its prompt failed", req.request_id)
            self._finish(run, error=f"the prompt failed on the node: {exc}")
            return
        finally:
            with self.stats.lock:
                self.stats.prefill_seconds += time.perf_counter() - started
        self._first_token(run, token)

    def _publish_prompt(self, run: _Running) -> None:
        """Offer ``run``'s full prompt pages to later requests: its prompt is launched, so
        any step launched after this one sees their keys and values."""
        self.pages.insert(run.request.page_keys, run.pages)

    def _publish_sequence(self, run: _Running) -> None:
        """Offer the pages ``run`` filled past its prompt too, as it leaves: every token
        fed to the model (all but the last sampled) has its keys and values cached, and
        the next turn of a conversation starts with them."""
        keys = run.request.page_keys
        page = self.pages.page_size
        fed = run.generated[:-1]
        done = run.prompt_tokens // page * page  # the prompt's full pages are keyed already
        tail = run.request.input_ids[done:].tolist() + fed
        image_tokens = int((run.request.input_ids[:done] == self.limits.image_token_id).sum())
        more = block_keys(
            tail,
            page,
            image_token_id=self.limits.image_token_id,
            images=run.request.image_keys or [],
            parent=keys[-1] if keys and done else b"",
            image_tokens_before=image_tokens,
        )
        first = done // page
        self.pages.insert(more, run.pages[first : first + len(more)])

    def _first_token(self, run: _Running, token: int) -> None:
        self._emit(run, token)
        run.first_token_at = time.monotonic()
        with self.stats.lock:
            self.stats.first_token_seconds += run.first_token_at - run.request.arrival

    def _reap_cancelled(self) -> None:
        for run in list(self._running.values()):
            if self._is_cancelled(run.request):
                run.text.cancel()
                self._count_cancel()
                log.info("request %s cancelled after %d tokens", run.request.request_id, run.text.count)
                self._finish(run)

    def _count_cancel(self) -> None:
        with self.stats.lock:
            self.stats.requests_cancelled += 1

    def _collect(self, step: _Step) -> None:
        t0 = time.perf_counter()
        tokens = step.pending.tokens()
        t1 = time.perf_counter()
        every = self.tokens_per_response(len(step.runs))
        for run, token in zip(step.runs, tokens[: len(step.runs)], strict=True):
            if self._running.get(run.slot) is run:  # still running, and not a new occupant
                self._emit(run, token, every)
                if self._admit_between_sends and self._waiting:  # (a hint; _admit locks)
                    self._admit()
        ended = [r for r, c in step.chunks if c.last]
        for run, token in zip(ended, tokens[len(step.runs) :], strict=True):
            if self._running.get(run.slot) is run:
                self._first_token(run, token)
        with self.stats.lock:
            self.stats.decode_wait_seconds += t1 - t0
            self.stats.token_handling_seconds += time.perf_counter() - t1

    def _emit(self, run: _Running, token: int, every: int = 1) -> None:
        try:
            run.pending_text += run.text.add(token)
        except Exception as exc:  # detokenizing this request's token: this request's fault
            log.exception("request %s: its text could not be decoded", run.request.request_id)
            self._finish(run, error=f"decoding the generated text failed on the node: {exc}")
            return
        run.pending_ids.append(token)
        run.generated.append(token)
        with self.stats.lock:
            self.stats.tokens_generated += 1
        finished = run.text.finish_reason is not None
        if finished or (run.pending_text and len(run.pending_ids) >= every):
            text, run.pending_text = run.pending_text, ""
            ids, run.pending_ids = run.pending_ids, []
            try:
                run.request.sink.send(
                    text,
                    ids,
                    run.text.finish_reason,
                    run.request.prompt_tokens,
                    run.text.count,
                    run.cached_shown,
                )
            except Exception as exc:  # the client is gone, or the response was refused
                log.info("request %s: sending failed (%s); stopping it", run.request.request_id, exc)
                run.text.cancel()
                self._count_cancel()
                # The stream must still be closed, or Triton never releases the request
                # (a model waiting for it never finishes unloading): fail() closes it.
                self._finish(run, error=f"sending a response failed: {exc}", send_failed=True)
                return
        if finished:
            self._finish(run, final_sent=True)

    def _finish(
        self, run: _Running, *, error: str | None = None, final_sent: bool = False, send_failed: bool = False
    ) -> None:
        """Take ``run`` out, give its pages and slot back, and end its stream: with
        ``error`` (``fail``), else with a final response, unless ``final_sent``."""
        if self._running.pop(run.slot, None) is None:
            return
        if (error is None or send_failed) and run.decoding and self.pages.enabled:
            try:  # cancelled or finished: what was computed is sound
                self._publish_sequence(run)
            except Exception:
                log.exception("request %s: caching its pages failed", run.request.request_id)
        self.pages.release(run.pages)
        with self._cond:
            self._free_slots.append(run.slot)
        with self.stats.lock:
            if error is not None and not send_failed:
                self.stats.requests_failed += 1
            else:
                self.stats.requests_finished += 1
        if final_sent:
            return
        if error is not None:
            safe_fail(run.request, error)
            return
        try:
            reason = run.text.finish_reason or FinishReason.CANCELLED
            run.request.sink.send(
                run.pending_text,
                run.pending_ids,
                reason,
                run.request.prompt_tokens,
                run.text.count,
                run.cached_shown,
            )
        except Exception as exc:  # the client is gone; the stream must still be closed
            log.debug("final response for %s not delivered", run.request.request_id)
            safe_fail(run.request, f"sending the final response failed: {exc}")
