"""CUDA graphs of the decode step, one per batch size bucket (GPU only).

A decode step of a 7B model is a few hundred small kernels; launching them one by one
from Python costs more than running them. Each bucket's step is captured once and
replayed: the slots to decode are written into the bucket's static index buffer
(padded with the runner's dummy slot) and the graph is replayed. All graphs share one
memory pool, captured from the largest bucket down.

The vision tower and projector of one image (a fixed shape) are captured too: a few
hundred more launches that would otherwise sit in front of every prompt's prefill. So
is the language model's prefill, per padded prompt length (a multiple of 16 tokens),
when a length is first seen: on a host with a slow CPU the ~400 launches of an eager
prefill, not the GPU, would set its pace. So are mixed steps (decode rows plus a fixed
number of prompt rows), per decode-batch bucket and per prompt-row count, at start-up.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol

import torch

__all__ = ["DecodeGraphs", "ImageFeatureGraph", "MixedGraphSet", "MixedGraphs", "PrefillGraphs"]

log = logging.getLogger(__name__)


class LlavaRunner(Protocol):
    """What the graphs use of :class:`llava_node.engine.runner.LlavaRunner` (a protocol, so
    that this module, which the runner imports, does not import the runner back)."""

    cfg: Any  # RunnerConfig
    loaded: Any  # LoadedModel
    device: torch.device
    dtype: torch.dtype
    dummy_slot: int
    hidden: int
    max_batch: int
    max_seq_len: int

    def mixed_layout(
        self,
        slots: Sequence[int],
        chunks: Sequence[Any],
        *,
        batch: int | None = None,
        rows: int | None = None,
        ends: int | None = None,
    ) -> Any:
        """The runner's MixedLayout of a step."""
        ...

    def upload(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` on the device."""
        ...

    def decode_step(self, slots: torch.Tensor, all_greedy: bool) -> torch.Tensor:
        """One decode step's tokens."""
        ...

    def image_features_eager(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The vision tower and projector, eagerly."""
        ...

    def padded_prefill_logits(self, x: torch.Tensor, rows: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """A padded prefill's last logits."""
        ...

    def mixed_step(self, *args: Any, **kwargs: Any) -> Any:
        """One mixed step (decode rows and prompt chunks)."""
        ...


class DecodeGraphs:
    """Captured decode steps for a set of batch sizes, greedy and sampling."""

    def __init__(self, runner: LlavaRunner, batch_sizes: Sequence[int]) -> None:
        self.runner = runner
        sizes = sorted({b for b in batch_sizes if b >= 1} | {runner.max_batch})
        self.batch_sizes = sizes
        dev = runner.device
        self.slots = {b: torch.full((b,), runner.dummy_slot, dtype=torch.int64, device=dev) for b in sizes}
        self.outputs: dict[tuple[int, bool], torch.Tensor] = {}
        self.graphs: dict[tuple[int, bool], torch.cuda.CUDAGraph] = {}
        self.pool: Any = None
        self.capture_s = 0.0

    def bucket(self, n: int) -> int:
        """The smallest captured batch size that holds ``n`` rows."""
        for b in self.batch_sizes:
            if b >= n:
                return b
        raise ValueError(f"batch of {n} exceeds the largest graph ({self.batch_sizes[-1]})")

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture every bucket (largest first, sharing one memory pool)."""
        started = time.monotonic()
        r = self.runner
        stream = torch.cuda.Stream(device=r.device)
        stream.wait_stream(torch.cuda.current_stream(r.device))
        with torch.cuda.stream(stream):
            for greedy in (True, False):  # warm-up: cuBLAS handles, Triton kernel compilation
                for b in self.batch_sizes:
                    r.decode_step(self.slots[b], greedy)
        torch.cuda.current_stream(r.device).wait_stream(stream)
        torch.cuda.synchronize(r.device)
        for b in reversed(self.batch_sizes):
            for greedy in (True, False):
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool):
                    out = r.decode_step(self.slots[b], greedy)
                if self.pool is None:
                    self.pool = graph.pool()
                self.graphs[(b, greedy)] = graph
                self.outputs[(b, greedy)] = out
        torch.cuda.synchronize(r.device)
        self.capture_s = time.monotonic() - started
        log.info(
            "captured %d decode graphs (batch sizes %s) in %.1f s",
            len(self.graphs),
            self.batch_sizes,
            self.capture_s,
        )

    def launch(self, slots: Sequence[int], all_greedy: bool) -> torch.Tensor:
        """Replay the step for ``slots``; returns the device tensor holding their tokens
        (valid until the next replay of the same bucket; copy it out first)."""
        n = len(slots)
        b = self.bucket(n)
        idx = torch.full((b,), self.runner.dummy_slot, dtype=torch.int64)
        idx[:n] = torch.tensor(list(slots), dtype=torch.int64)
        self.slots[b].copy_(idx.pin_memory(), non_blocking=True)
        self.graphs[(b, all_greedy)].replay()
        return self.outputs[(b, all_greedy)][:n]


class ImageFeatureGraph:
    """The vision tower and projector of one image, captured (GPU only).

    Prompts with one image at the checkpoint's image size replay it; anything else runs
    eagerly. If capture fails (a vision tower that synchronises with the host, say), the
    node logs why and keeps running eagerly.
    """

    def __init__(self, runner: LlavaRunner) -> None:
        self.runner = runner
        vision = runner.loaded.model.config.vision_config
        size = int(getattr(vision, "image_size", 0) or 0)
        channels = int(getattr(vision, "num_channels", 3) or 3)
        self.shape = (1, channels, size, size)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.input: torch.Tensor | None = None
        self.output: torch.Tensor | None = None
        self.capture_s = 0.0
        self.error: str | None = None

    @torch.inference_mode()
    def capture(self) -> None:
        """Warm up and capture; on failure, remember why and stay eager."""
        r = self.runner
        if not self.shape[-1]:
            self.error = "the vision config names no image size"
            return
        started = time.monotonic()
        try:
            static = torch.zeros(self.shape, device=r.device, dtype=r.dtype)
            stream = torch.cuda.Stream(device=r.device)
            stream.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    r.image_features_eager(static)
            torch.cuda.current_stream(r.device).wait_stream(stream)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = r.image_features_eager(static)
            torch.cuda.synchronize(r.device)
        except Exception as exc:  # pragma: no cover - GPU hosts only
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("vision tower not captured (%s); it runs eagerly", self.error)
            torch.cuda.synchronize(r.device)
            return
        self.graph, self.input, self.output = graph, static, out
        self.capture_s = time.monotonic() - started
        log.info("captured the vision tower for %s images in %.1f s", self.shape, self.capture_s)

    @torch.inference_mode()
    def run(self, pixel_values: torch.Tensor) -> torch.Tensor | None:
        """Image features from the graph (a fresh tensor), or None if this shape was not captured."""
        if self.graph is None or tuple(pixel_values.shape) != self.shape:
            return None
        assert self.input is not None and self.output is not None
        self.input.copy_(self.runner.upload(pixel_values))
        self.graph.replay()
        return self.output.clone()


class PrefillGraphs:
    """The fused prefill captured per padded prompt length (GPU only).

    A prompt of ``n`` tokens runs in the graph of ``ceil(n / multiple) * multiple``
    tokens, captured the first time that length is needed (a few hundred milliseconds,
    once) and replayed after. All share one memory pool; outputs are copied out at once.
    If a capture fails, the node logs why and prefills eagerly from then on.
    """

    def __init__(self, runner: LlavaRunner, multiple: int = 16) -> None:
        self.runner = runner
        self.multiple = max(1, multiple)
        self.graphs: dict[
            int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
        ] = {}
        self.pool: Any = None
        self.error: str | None = None
        self.capture_s = 0.0

    def padded_length(self, n: int) -> int:
        """The captured length that holds ``n`` tokens."""
        return -(-n // self.multiple) * self.multiple

    @torch.inference_mode()
    def run(self, x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor | None:
        """Float32 logits [vocab] of the prompt's last token (its KV cache filled at
        ``rows``), or None when this length cannot be captured (the caller runs eagerly)."""
        n = x.shape[0]
        p = self.padded_length(n)
        if self.error is not None or p > self.runner.max_seq_len:
            return None
        entry = self.graphs.get(p) or self._capture(p)
        if entry is None:
            return None
        graph, x_in, rows_in, last_in, out = entry
        x_in[:n].copy_(x)
        x_in[n:].zero_()
        rows_in[:n].copy_(rows)
        rows_in[n:].zero_()  # the padding's keys and values go to the reserved page 0
        last_in.fill_(n - 1)
        graph.replay()
        return out[0].clone()

    def _capture(
        self, p: int
    ) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None:
        r = self.runner
        started = time.monotonic()
        try:
            x_in = torch.zeros(p, r.hidden, device=r.device, dtype=r.dtype)
            rows_in = torch.zeros(p, device=r.device, dtype=torch.int64)
            last_in = torch.zeros(1, device=r.device, dtype=torch.int64)
            stream = torch.cuda.Stream(device=r.device)
            stream.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(stream):  # warm-up: cuBLAS and attention for this shape
                r.padded_prefill_logits(x_in, rows_in, last_in)
            torch.cuda.current_stream(r.device).wait_stream(stream)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = r.padded_prefill_logits(x_in, rows_in, last_in)
            if self.pool is None:
                self.pool = graph.pool()
            torch.cuda.synchronize(r.device)
        except Exception as exc:  # pragma: no cover - GPU hosts only
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("prefill not captured (%s); prompts are prefilled eagerly", self.error)
            torch.cuda.synchronize(r.device)
            return None
        spent = time.monotonic() - started
        self.capture_s += spent
        log.info("captured the prefill of %d tokens in %.2f s", p, spent)
        entry = (graph, x_in, rows_in, last_in, out)
        self.graphs[p] = entry
        return entry


class MixedGraphs:
    """Mixed steps (decode rows plus ``rows`` rows of prompts) captured per decode-batch
    bucket and sampling mode, at start-up (GPU only).

    A mixed step launched eagerly is several hundred kernels from Python: on an H100 its
    host time (~20 ms) exceeds its device time, which is what made chunked prefill slow.
    Captured, it is one replay: the step's layout (decode slots, prompt positions, the
    prompt of each block of rows, the rows to sample) goes to the device in one copy, the
    prompt rows' embeddings in one copy per chunk. If a capture fails, the node logs why
    and runs mixed steps eagerly from then on.
    """

    def __init__(self, runner: LlavaRunner, rows: int, batch_sizes: Sequence[int]) -> None:
        self.runner = runner
        block = runner.cfg.chunk_block
        self.rows = -(-rows // block) * block
        self.ends = self.rows // block  # at most one prompt ends per block of rows
        self.batch_sizes = sorted(batch_sizes)
        self.x = torch.zeros(self.rows, runner.hidden, dtype=runner.dtype, device=runner.device)
        # per bucket: the int buffer its graph reads, the graph and its output
        self.ints: dict[int, torch.Tensor] = {}
        self.graphs: dict[tuple[int, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool: Any = None
        self.error: str | None = None
        self.capture_s = 0.0

    def capture(self) -> None:
        """Capture every bucket, greedy and sampling (at start-up: a capture in the middle
        of serving would stall the running requests for it)."""
        started = time.monotonic()
        for b in self.batch_sizes:
            for greedy in (True, False):
                if self._capture(b, greedy) is None:
                    return
        log.info("captured %d mixed steps in %.1f s", len(self.graphs), time.monotonic() - started)

    def _null_layout(self, b: int) -> Any:
        """A layout that changes nothing: dummy slots, padding rows, nothing ends."""
        return self.runner.mixed_layout([], [], batch=b, rows=self.rows, ends=self.ends)

    def launch(self, slots: Sequence[int], chunks: Sequence[Any], all_greedy: bool) -> torch.Tensor | None:
        """Replay the step; its tokens (decode rows, then ended prompts), or None when it
        cannot be captured (the caller runs it eagerly)."""
        if self.error is not None or len(slots) > self.batch_sizes[-1]:
            return None
        b = next(s for s in self.batch_sizes if s >= len(slots))
        try:
            lay = self.runner.mixed_layout(slots, chunks, batch=b, rows=self.rows, ends=self.ends)
        except ValueError:
            return None  # more prompt rows than the graphs hold
        entry = self.graphs.get((b, all_greedy)) or self._capture(b, all_greedy)
        if entry is None:
            return None
        graph, out = entry
        host = torch.tensor(lay.flat(), dtype=torch.int64).pin_memory()
        self.ints[b].copy_(host, non_blocking=True)
        for c, off in zip(chunks, lay.offsets, strict=True):
            self.x[off : off + c.end - c.start].copy_(c.embeds[c.start : c.end])
        graph.replay()
        return out[: lay.tokens]

    @torch.inference_mode()
    def _capture(self, b: int, all_greedy: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor] | None:
        r = self.runner
        started = time.monotonic()
        try:
            null = self._null_layout(b)
            if b not in self.ints:
                self.ints[b] = torch.zeros(sum(null.sizes()), dtype=torch.int64, device=r.device)
            ints = self.ints[b]
            d, p, bs, pr, ps, es, el = ints.split(null.sizes())
            torch.cuda.synchronize(r.device)
            ints.copy_(torch.tensor(null.flat(), dtype=torch.int64))
            stream = torch.cuda.Stream(device=r.device)
            stream.wait_stream(torch.cuda.current_stream(r.device))
            with torch.cuda.stream(stream):  # warm-up: kernel compilation, cuBLAS for these shapes
                r.mixed_step(d, self.x, p, bs, pr, ps, es, el, all_greedy)
            torch.cuda.current_stream(r.device).wait_stream(stream)
            torch.cuda.synchronize(r.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                out = r.mixed_step(d, self.x, p, bs, pr, ps, es, el, all_greedy)
            if self.pool is None:
                self.pool = graph.pool()
            torch.cuda.synchronize(r.device)
        except Exception as exc:  # pragma: no cover - GPU hosts only
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("mixed step not captured (%s); mixed steps run eagerly", self.error)
            torch.cuda.synchronize(r.device)
            return None
        spent = time.monotonic() - started
        self.capture_s += spent
        log.debug(
            "captured the mixed step for %d decode rows + %d prompt rows in %.2f s", b, self.rows, spent
        )
        self.graphs[(b, all_greedy)] = (graph, out)
        return graph, out


class MixedGraphSet:
    """Mixed steps captured at several prompt-row counts (:class:`MixedGraphs` each, one
    memory pool): a step replays the smallest that holds its prompt rows, so a prompt's
    tail, or a step the budget lets carry more rows under a backlog, is not padded to
    one fixed size."""

    def __init__(self, runner: LlavaRunner, rows: Sequence[int], batch_sizes: Sequence[int]) -> None:
        self.sets = [MixedGraphs(runner, r, batch_sizes) for r in sorted(set(rows))]
        self.rows = self.sets[-1].rows  # the most prompt rows a captured step holds
        self.batch_sizes = self.sets[-1].batch_sizes

    @property
    def sizes(self) -> list[int]:
        """The prompt-row counts captured."""
        return [g.rows for g in self.sets]

    @property
    def graphs(self) -> dict[tuple[int, int, bool], Any]:
        """Every captured step, by (prompt rows, decode rows, greedy)."""
        return {(g.rows, *key): entry for g in self.sets for key, entry in g.graphs.items()}

    @property
    def error(self) -> str | None:
        """Why a capture failed (that row count's steps run eagerly), if one did."""
        return next((g.error for g in self.sets if g.error is not None), None)

    def capture(self) -> None:
        """Capture every row count's steps, the largest first, all in one memory pool."""
        started = time.monotonic()
        pool = None
        for g in reversed(self.sets):
            g.pool = pool
            g.capture()
            pool = g.pool if g.pool is not None else pool
        log.info(
            "captured %d mixed steps (%s prompt rows) in %.1f s",
            len(self.graphs),
            "/".join(map(str, self.sizes)),
            time.monotonic() - started,
        )

    def launch(self, slots: Sequence[int], chunks: Sequence[Any], all_greedy: bool) -> torch.Tensor | None:
        """Replay the step in the smallest row count that holds ``chunks`` (each padded to
        whole blocks); None when none does or it cannot be captured (run it eagerly)."""
        block = self.sets[0].runner.cfg.chunk_block
        need = sum(-(-(c.end - c.start) // block) * block for c in chunks)
        for g in self.sets:
            if g.rows >= need:
                return g.launch(slots, chunks, all_greedy)
        return None
