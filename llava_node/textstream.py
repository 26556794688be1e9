"""Turning generated token ids into streamed text: incremental decoding and stop strings.

Both engines share :class:`SequenceText`, so text, stop strings and finish reasons
behave the same whichever engine generates the tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from llava_wire.protocol import FinishReason, InvalidRequest

__all__ = ["IncrementalDetokenizer", "SequenceText", "StopMatcher"]


class IncrementalDetokenizer:
    """Decodes one token at a time into text deltas whose concatenation equals
    ``tokenizer.decode(all_ids, skip_special_tokens=True)``.

    It decodes a short window of recent ids twice (with and without the new token)
    and emits the difference, so per-token cost stays flat however long the output
    grows; a window that ends inside a multi-byte character waits for the next token.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def _decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(ids, skip_special_tokens=True))

    def add(self, token_id: int) -> str:
        """Append one token; return the text it completes (may be empty)."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return text[len(prefix) :]
        return ""

    def flush(self) -> str:
        """Text still held back (an incomplete character at the end), at the finish."""
        prefix = self._decode(self.ids[self.prefix_offset : self.read_offset])
        text = self._decode(self.ids[self.prefix_offset :])
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :] if len(text) > len(prefix) else ""


class StopMatcher:
    """Finds stop strings in streamed text without ever emitting part of one.

    Text that could be the start of a stop string is held back until the next delta
    shows whether it is.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops = [s for s in stops if s]
        self.pending = ""

    def feed(self, delta: str) -> tuple[str, bool]:
        """Add ``delta``; return (text safe to emit, whether a stop string appeared)."""
        if not self.stops:
            return delta, False
        self.pending += delta
        hit = -1
        for s in self.stops:
            i = self.pending.find(s)
            if i >= 0 and (hit < 0 or i < hit):
                hit = i
        if hit >= 0:
            out = self.pending[:hit]
            self.pending = ""
            return out, True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), keep, -1):
                if self.pending.endswith(s[:k]):
                    keep = k
                    break
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Whatever was held back, when generation ends for another reason."""
        out, self.pending = self.pending, ""
        return out


class SequenceText:
    """Per-request text state: tokens in, (text delta, finish reason) out."""

    def __init__(
        self,
        tokenizer: Any,
        stop: Iterable[str],
        eos_token_ids: Iterable[int],
        max_tokens: int,
    ) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stop = StopMatcher(stop)
        self.eos = frozenset(eos_token_ids)
        self.max_tokens = max_tokens
        self.count = 0
        self.finish_reason: FinishReason | None = None

    def add(self, token_id: int) -> str:
        """Record one generated token; return the text to emit now.

        Sets :attr:`finish_reason` when this token ends the sequence.
        """
        if self.finish_reason is not None:
            return ""
        self.count += 1
        if token_id in self.eos:
            self.finish_reason = FinishReason.STOP
            return self._flush()[0]
        text, stopped = self.stop.feed(self.detok.add(token_id))
        if stopped:
            self.finish_reason = FinishReason.STOP
            return text
        if self.count >= self.max_tokens:
            tail, stopped = self._flush()
            self.finish_reason = FinishReason.STOP if stopped else FinishReason.LENGTH
            return text + tail
        return text

    def resume(self, prior_ids: Sequence[int]) -> None:
        """Take a continuation's prior tokens as if generated here, their text discarded:
        it was sent by the stream they came from. The state after them (what decoding
        and the stop strings hold back) is the one that stream had, so the text from here
        on is what it would have sent next. Raises :class:`InvalidRequest` when they
        already end the sequence."""
        for i, token_id in enumerate(prior_ids):
            self.add(token_id)
            if self.finish_reason is not None:
                why = "an end-of-sequence token" if token_id in self.eos else "a stop string"
                raise InvalidRequest(f"prior_token_ids end the generation already ({why} at prior token {i})")

    def cancel(self) -> None:
        """Mark the sequence cancelled (held-back text is dropped)."""
        if self.finish_reason is None:
            self.finish_reason = FinishReason.CANCELLED

    def _flush(self) -> tuple[str, bool]:
        text, stopped = self.stop.feed(self.detok.flush())
        return (text, True) if stopped else (text + self.stop.flush(), False)
