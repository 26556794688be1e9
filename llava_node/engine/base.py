"""What every engine shares: the request it takes, where its output goes, its counters."""

from __future__ import annotations

import abc
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llava_node.protocol import FinishReason

__all__ = ["Engine", "EngineStats", "GenerationRequest", "OutputSink"]


class OutputSink(Protocol):
    """Where an engine sends one request's output (a Triton response sender, in a node)."""

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: FinishReason | None,
        prompt_tokens: int,
        completion_tokens: int,
    ) -> None:
        """Send one streamed piece; ``finish_reason`` set means it is the last one."""

    def fail(self, message: str) -> None:
        """End the stream with an error (the last response)."""

    def is_cancelled(self) -> bool:
        """Whether the client cancelled the request."""


@dataclass
class GenerationRequest:
    """One generation: token ids and pixels from llava_preprocess, and its settings."""

    request_id: str
    input_ids: torch.Tensor  # int64 [n], CPU
    pixel_values: torch.Tensor | None  # float32 [images, 3, H, W], CPU, or None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str]
    sink: OutputSink
    arrival: float = 0.0

    @property
    def greedy(self) -> bool:
        """LLaVA's convention: a temperature at or below 0.001 means greedy decoding."""
        from llava_node.protocol import GREEDY_TEMPERATURE

        return self.temperature <= GREEDY_TEMPERATURE


@dataclass
class EngineStats:
    """Counters an engine keeps; exported as Triton custom metrics and in logs."""

    requests_started: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_failed: int = 0
    tokens_generated: int = 0
    tokens_after_cancel: int = 0  # tokens computed for a request after it was cancelled
    decode_steps: int = 0
    mixed_steps: int = 0  # decode steps that also carried a chunk of a prompt
    # Where the engine thread's time goes (seconds, cumulative): prompts (vision tower and
    # prefill), waiting for a decode step's tokens from the device, and handling tokens
    # on the host (detokenizing, stop strings, sending responses).
    first_token_seconds: float = 0.0  # arrival to first token sent, summed over requests
    queue_seconds: float = 0.0  # arrival to the start of the prefill, summed over requests
    prefill_seconds: float = 0.0
    decode_wait_seconds: float = 0.0
    token_handling_seconds: float = 0.0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def snapshot(self) -> dict[str, float]:
        """A copy of the counters."""
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if isinstance(v, (int, float))}


class Engine(abc.ABC):
    """Generates tokens for submitted requests on its own thread(s)."""

    def __init__(self) -> None:
        self.stats = EngineStats()

    @abc.abstractmethod
    def submit(self, request: GenerationRequest) -> None:
        """Queue a request; returns at once. Output goes to ``request.sink``."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop generating; requests still running are ended with an error."""

    @property
    @abc.abstractmethod
    def queue_length(self) -> int:
        """Requests waiting to start."""

    @property
    @abc.abstractmethod
    def active(self) -> int:
        """Requests generating now."""

    def describe(self) -> dict[str, Any]:
        """Engine kind and sizes, for the node's log."""
        return {"engine": type(self).__name__}
