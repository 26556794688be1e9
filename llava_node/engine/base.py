"""What every engine shares: the request it takes, where its output goes, its counters,
and the checks every request passes before an engine takes it.

An engine's contract with its sink: every request submitted ends with exactly one
final call, a ``send`` with a finish reason or a ``fail``, on every path (a sink whose
``send`` raised is still told, with ``fail``). Triton releases a request only then.
"""

from __future__ import annotations

import abc
import logging
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from llava_wire.protocol import (
    CLIENT_ERROR_PREFIX,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    FinishReason,
    InvalidRequest,
    check_stop_strings,
)

__all__ = [
    "MAX_ABS_PIXEL",
    "Engine",
    "EngineStats",
    "GenerationRequest",
    "OutputSink",
    "RequestLimits",
    "check_request",
    "safe_fail",
]

log = logging.getLogger(__name__)

# Pixel values are normalized (CLIP's lie within about -1.8..2.2): anything past this is
# not an image, and values near float limits overflow to inf (then NaN) in the tower.
MAX_ABS_PIXEL = 1e4
MAX_SEED = (1 << 63) - 1


class OutputSink(Protocol):
    """Where an engine sends one request's output (a Triton response sender, in a node)."""

    def send(
        self,
        text: str,
        token_ids: Sequence[int],
        finish_reason: FinishReason | None,
        prompt_tokens: int,
        completion_tokens: int,
        cached_tokens: int = 0,
    ) -> None:
        """Send one streamed piece; ``finish_reason`` set means it is the last one.
        ``cached_tokens``: prompt tokens whose keys and values were reused, not computed."""

    def fail(self, message: str, client_error: bool = False) -> None:
        """End the stream with an error (the last response); ``client_error``: the
        request itself was at fault (Triton's INVALID_ARG), else the node (INTERNAL).
        Must not raise, and must accept being called after a ``send`` that raised."""

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
    # Set by an engine with a prefix cache: the images' content hashes, and the chained
    # key of each full KV page of the prompt (llava_node.engine.prefix_cache)
    image_keys: list[bytes] | None = None
    page_keys: list[bytes] = field(default_factory=list)
    # A continuation: the last ``prior_tokens`` of input_ids were generated before (by a
    # node that failed mid-stream); they count as generated, not as prompt.
    prior_tokens: int = 0

    @property
    def prompt_tokens(self) -> int:
        """Tokens of the prompt proper (a continuation's prior tokens not counted)."""
        return int(self.input_ids.shape[0]) - self.prior_tokens

    @property
    def total_tokens(self) -> int:
        """The most positions the sequence takes: prompt and ``max_tokens`` (which a
        continuation's prior tokens count toward)."""
        return self.prompt_tokens + self.max_tokens

    @property
    def prior_ids(self) -> list[int]:
        """A continuation's prior token ids (empty for a new generation)."""
        return (
            self.input_ids[self.input_ids.shape[0] - self.prior_tokens :].tolist()
            if self.prior_tokens
            else []
        )

    @property
    def greedy(self) -> bool:
        """LLaVA's convention: a temperature at or below 0.001 means greedy decoding."""
        from llava_wire.protocol import GREEDY_TEMPERATURE

        return self.temperature <= GREEDY_TEMPERATURE


@dataclass(frozen=True)
class RequestLimits:
    """What a model accepts; every engine checks each request against these at submit."""

    vocab_size: int  # token ids are in [0, vocab_size)
    max_seq_len: int  # prompt plus new tokens
    image_token_id: int
    tokens_per_image: int  # image tokens one image's features replace
    image_size: tuple[int, int]  # (H, W) the vision tower takes
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_length: int = MAX_STOP_LENGTH

    @classmethod
    def from_config(cls, config: Any, max_seq_len: int) -> RequestLimits:
        """From a ``LlavaConfig``: the text model's vocabulary, the vision tower's input
        size, and the image tokens per image (patches, plus the class token when the
        checkpoint keeps it: ``vision_feature_select_strategy="full"``)."""
        vision = config.vision_config
        size = vision.image_size
        h, w = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        patches = (h // vision.patch_size) * (w // vision.patch_size)
        strategy = getattr(config, "vision_feature_select_strategy", "default")
        return cls(
            vocab_size=int(config.text_config.vocab_size),
            max_seq_len=int(max_seq_len),
            image_token_id=int(config.image_token_id),
            tokens_per_image=patches + (1 if strategy == "full" else 0),
            image_size=(h, w),
        )


def _finite(x: Any, name: str) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        raise InvalidRequest(f"{name} must be a number, not {type(x).__name__}")
    value = float(x)
    if not math.isfinite(value):
        raise InvalidRequest(f"{name} is {value}; it must be a finite number")
    return value


def check_request(req: GenerationRequest, limits: RequestLimits) -> None:
    """Raise :class:`InvalidRequest` unless ``req`` is one the model can run; caps
    ``req.max_tokens`` at the room the sequence leaves (a "length" finish, as the
    ensemble's preprocessing caps it).

    ``llava_engine`` takes direct calls (tritonclient users may call any model), so
    nothing that reaches the engine is trusted: a token id outside the vocabulary, or
    pixels of another size, fails inside a step that other requests share.
    """
    ids = req.input_ids
    if not isinstance(ids, torch.Tensor) or ids.dtype not in (torch.int64, torch.int32):
        kind = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InvalidRequest(f"input_ids must be an int64 tensor, not {kind}")
    if ids.dim() != 1:
        raise InvalidRequest(f"input_ids must be one sequence of token ids, not of shape {list(ids.shape)}")
    n = int(ids.shape[0])
    if n == 0:
        raise InvalidRequest("input_ids is empty")
    if n >= limits.max_seq_len:
        raise InvalidRequest(
            f"the prompt is {n} tokens; this model takes sequences of at most "
            f"{limits.max_seq_len} tokens, leaving no room to generate"
        )
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= limits.vocab_size:
        bad = lo if lo < 0 else hi
        raise InvalidRequest(f"input_ids holds the token id {bad}; ids must be in [0, {limits.vocab_size})")
    n_image_tokens = int((ids == limits.image_token_id).sum())
    pv = req.pixel_values
    n_images = 0
    if pv is not None:
        if not isinstance(pv, torch.Tensor) or not pv.dtype.is_floating_point:
            kind = pv.dtype if isinstance(pv, torch.Tensor) else type(pv).__name__
            raise InvalidRequest(f"pixel_values must be a float32 tensor, not {kind}")
        h, w = limits.image_size
        if pv.dim() != 4 or tuple(pv.shape[1:]) != (3, h, w):
            raise InvalidRequest(
                f"pixel_values is of shape {list(pv.shape)}; this model's vision tower takes "
                f"[images, 3, {h}, {w}]"
            )
        n_images = int(pv.shape[0])
        if n_images:
            if not bool(torch.isfinite(pv).all()):
                raise InvalidRequest("pixel_values holds NaN or infinite values")
            peak = float(pv.abs().max())
            if peak > MAX_ABS_PIXEL:
                raise InvalidRequest(
                    f"pixel_values holds {peak:g}; normalized pixels are within +-{MAX_ABS_PIXEL:g}"
                )
    if n_image_tokens != n_images * limits.tokens_per_image:
        raise InvalidRequest(
            f"input_ids holds {n_image_tokens} image tokens (id {limits.image_token_id}) for "
            f"{n_images} image(s); each image takes {limits.tokens_per_image}"
        )
    if isinstance(req.max_tokens, bool) or not isinstance(req.max_tokens, int) or req.max_tokens < 1:
        raise InvalidRequest(f"max_tokens is {req.max_tokens!r}; it must be a positive integer")
    prior = req.prior_tokens
    if isinstance(prior, bool) or not isinstance(prior, int) or not 0 <= prior < n:
        raise InvalidRequest(f"gen_prior_tokens is {prior!r}; it must be in [0, {n}) (input_ids' length)")
    if prior >= req.max_tokens:
        raise InvalidRequest(
            f"a continuation of {prior} prior tokens needs max_tokens above that, not {req.max_tokens}"
        )
    if prior and bool((ids[n - prior :] == limits.image_token_id).any()):
        raise InvalidRequest("a continuation's prior tokens hold the image token")
    temperature = _finite(req.temperature, "temperature")
    if not 0.0 <= temperature <= MAX_TEMPERATURE:
        raise InvalidRequest(f"temperature is {temperature}; it must be between 0 and {MAX_TEMPERATURE}")
    top_p = _finite(req.top_p, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"top_p is {top_p}; it must be greater than 0 and at most 1")
    if isinstance(req.seed, bool) or not isinstance(req.seed, int) or not 0 <= req.seed <= MAX_SEED:
        raise InvalidRequest(f"seed is {req.seed!r}; it must be an integer in [0, 2**63)")
    if not isinstance(req.stop, list) or not all(isinstance(s, str) for s in req.stop):
        raise InvalidRequest("stop must be a list of strings")
    check_stop_strings(req.stop, limits.max_stop_strings, limits.max_stop_length)
    # (prior tokens are part of the generation's budget: room after the prompt proper)
    req.max_tokens = min(req.max_tokens, limits.max_seq_len - (n - prior))


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

    def gauges(self) -> dict[str, float]:
        """Sizes now, exported as gauges (requests running and waiting; engines with
        caches add their sizes)."""
        return {"active": self.active, "queue": self.queue_length}

    def cache_counters(self) -> dict[str, float]:
        """Cumulative counters of the engine's caches (none here)."""
        return {}

    def refuse_invalid(self, request: GenerationRequest, limits: RequestLimits) -> bool:
        """Check ``request`` (:func:`check_request`); if it is invalid, end it alone with
        a client error and return True."""
        try:
            check_request(request, limits)
        except InvalidRequest as exc:
            with self.stats.lock:
                self.stats.requests_failed += 1
            safe_fail(request, CLIENT_ERROR_PREFIX + str(exc), client_error=True)
            return True
        return False

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


def safe_fail(request: GenerationRequest, message: str, *, client_error: bool = False) -> None:
    """``request.sink.fail(...)``, which must not take an engine's loop down with it."""
    try:
        if client_error:
            request.sink.fail(message, client_error=True)
        else:  # positional only: sinks written before client_error existed still work
            request.sink.fail(message)
    except Exception:
        log.exception("ending request %s failed", request.request_id)
