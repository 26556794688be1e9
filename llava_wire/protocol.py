"""The interface of the ``llava`` ensemble: tensor names, types and defaults, step and
metric names, finish reasons, the client-error prefix.

This module is the single place that names them: the models in ``model_repository/``,
the node package and the control plane all import them from here, and the README
documents them for tritonclient users.

Inputs of ``llava`` (all optional except that one of ``prompt`` / ``messages`` is needed):

==================== ======= ====== ======================================================
name                 dtype   shape  meaning
==================== ======= ====== ======================================================
``prompt``           BYTES   [1]    prompt text, already templated, one ``<image>`` per image
``messages``         BYTES   [1]    JSON chat messages; the checkpoint's chat template applies
``images``           BYTES   [n]    encoded images (PNG, JPEG, WebP), in placeholder order
``max_tokens``       INT32   [1]    most new tokens (default 256)
``temperature``      FP32    [1]    0 (or <= 0.001) is greedy; default 1.0; at most 2
``top_p``            FP32    [1]    nucleus sampling mass in (0, 1]; default 1.0
``stop``             BYTES   [k]    stop strings; generation ends where one appears
``seed``             INT64   [1]    sampling seed, for reproducible sampled output
``prior_token_ids``  INT64   [k]    a continuation: token ids this generation already
                                    produced elsewhere (see below)
==================== ======= ====== ======================================================

A continuation (``prior_token_ids``, what the control plane sends when a stream's node
fails mid-stream) resumes a generation as if its node had produced those tokens itself:
they follow the prompt, count toward ``max_tokens`` and ``completion_tokens``, and prime
the text state (incremental decoding and stop strings), so the responses carry exactly
the text and token ids the broken stream would have sent next, and nothing before.
Sampling continues the seeded stream at step ``k`` (a request's randomness is a hash of
its seed and the step): with the same seed, a continuation draws the same random numbers
for each later token as the uninterrupted stream would have. ``k`` must be below
``max_tokens``; ids that already end the generation (an end-of-sequence token, a stop
string) or hold an image token are refused as client errors.

Errors a request causes (bad text, images, numbers or sizes) come back as
``INVALID_ARG`` with a message that starts with :data:`CLIENT_ERROR_PREFIX`; anything
else is the node's fault (``INTERNAL``). Text must be valid Unicode (UTF-8 without
lone surrogates, which a JSON ``\\ud800`` escape decodes to). The size limits
(prompt bytes, image sides, aspect ratio, resized pixels, ...) are model-config
parameters of ``llava_preprocess``, listed in ``llava_node/preprocess.py``.

``llava_engine`` may be called directly (its inputs are :data:`ENGINE_INPUTS`;
``input_ids`` alone is enough: without ``pixel_values`` the prompt has no images, and
the ``gen_*`` settings default as above; ``gen_prior_tokens`` = k says the last k ids
are a continuation's prior tokens). It checks every input itself, so one
malformed request fails alone, whatever runs beside it.

Outputs of ``llava`` (one response per generated piece of text, then a last one):

===================== ======= ====== ======================================================
``text_output``       BYTES   [1]    the new text of this response (a delta)
``token_ids``         INT64   [n]    the token ids generated in this response
``finish_reason``     BYTES   [1]    "" while streaming; then "stop", "length" or "cancelled"
``prompt_tokens``     INT32   [1]    tokens in the prompt, image tokens included
``completion_tokens`` INT32   [1]    tokens generated so far
``cached_tokens``     INT32   [1]    prompt tokens served from the node's prefix cache
                                     (their keys and values were not computed again)
===================== ======= ====== ======================================================
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from enum import Enum

__all__ = [
    "ACTIVE_METRIC",
    "CANCEL_INPUT",
    "CANCEL_OUTPUT",
    "CLIENT_ERROR_PREFIX",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_TEMPERATURE",
    "DEFAULT_TOP_P",
    "ENGINE_INPUTS",
    "ENGINE_METRICS",
    "ENSEMBLE_INPUTS",
    "GREEDY_TEMPERATURE",
    "MAX_STOP_LENGTH",
    "MAX_STOP_STRINGS",
    "MAX_TEMPERATURE",
    "MODEL_INFO_METRIC",
    "OUTPUTS",
    "QUEUE_METRIC",
    "STEP_SUFFIXES",
    "FinishReason",
    "InvalidRequest",
    "check_stop_strings",
    "check_text",
    "engine_model",
    "error_text",
    "is_served_model",
    "preprocess_model",
]

# Ensemble inputs: (name, Triton dtype, shape)
ENSEMBLE_INPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("prompt", "BYTES", [1]),
    ("messages", "BYTES", [1]),
    ("images", "BYTES", [-1]),
    ("max_tokens", "INT32", [1]),
    ("temperature", "FP32", [1]),
    ("top_p", "FP32", [1]),
    ("stop", "BYTES", [-1]),
    ("seed", "INT64", [1]),
    ("prior_token_ids", "INT64", [-1]),
)

# What llava_preprocess hands to llava_engine.
ENGINE_INPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("input_ids", "INT64", [-1]),
    ("pixel_values", "FP32", [-1, -1, -1, -1]),
    ("gen_max_tokens", "INT32", [1]),
    ("gen_temperature", "FP32", [1]),
    ("gen_top_p", "FP32", [1]),
    ("gen_seed", "INT64", [1]),
    ("gen_stop", "BYTES", [-1]),
    # the last n of input_ids were generated before (a continuation: prior_token_ids)
    ("gen_prior_tokens", "INT32", [1]),
)

OUTPUTS: tuple[tuple[str, str, list[int]], ...] = (
    ("text_output", "BYTES", [1]),
    ("token_ids", "INT64", [-1]),
    ("finish_reason", "BYTES", [1]),
    ("prompt_tokens", "INT32", [1]),
    ("completion_tokens", "INT32", [1]),
    ("cached_tokens", "INT32", [1]),
)

# Errors caused by the request (not the node) start with this, so that a caller can
# tell them apart in an error message that Triton passes on as text.
CLIENT_ERROR_PREFIX = "invalid request: "

DEFAULT_MAX_TOKENS = 256
DEFAULT_TEMPERATURE = 1.0
DEFAULT_TOP_P = 1.0
# LLaVA's convention: a temperature at or below this is greedy decoding.
GREEDY_TEMPERATURE = 0.001
MAX_TEMPERATURE = 2.0
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # characters per stop string
# Longest error text a client is sent: messages quote at most a name or a number, so
# this only cuts what an exception from a library might carry (a whole template, say).
MAX_ERROR_CHARS = 2000

_SURROGATE = re.compile("[\ud800-\udfff]")


class InvalidRequest(ValueError):
    """A client error: the message says what was wrong with the request."""


def check_text(text: str, what: str) -> None:
    """Raise :class:`InvalidRequest` unless ``text`` is valid Unicode a tokenizer takes.

    A lone UTF-16 surrogate (``"\\ud800"`` in JSON decodes to one) cannot be encoded
    as UTF-8: the tokenizer raises a TypeError on it, which must not pass for a node
    fault. NUL and other control characters are valid text and tokenize; they are kept.
    """
    m = _SURROGATE.search(text)
    if m is not None:
        raise InvalidRequest(
            f"{what} is not valid Unicode: it holds a lone surrogate U+{ord(m.group()):04X} "
            f"at character {m.start()} (text must be UTF-8; in JSON, a \\uD800-\\uDFFF escape "
            "is valid only as half of a surrogate pair)"
        )


def check_stop_strings(
    stop: Sequence[str], max_strings: int = MAX_STOP_STRINGS, max_length: int = MAX_STOP_LENGTH
) -> list[str]:
    """The non-empty stop strings of ``stop``; raise :class:`InvalidRequest` if there are
    more than ``max_strings``, one is longer than ``max_length`` or is not valid Unicode."""
    stops = [s for s in stop if s]
    if len(stops) > max_strings:
        raise InvalidRequest(f"{len(stops)} stop strings given; at most {max_strings} are accepted")
    for i, s in enumerate(stops):
        if len(s) > max_length:
            raise InvalidRequest(f"a stop string is {len(s)} characters; the limit is {max_length}")
        check_text(s, f"stop string {i}")
    return stops


def error_text(message: str) -> str:
    """``message`` as an error text Triton can carry: valid UTF-8 (a surrogate quoted
    from a request would make building the error raise), and not unbounded."""
    text = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(text) > MAX_ERROR_CHARS:
        text = text[:MAX_ERROR_CHARS] + " [...]"
    return text


# An ensemble NAME is served through its steps NAME_preprocess and NAME_engine; clients
# address only the ensemble.
STEP_SUFFIXES = ("_preprocess", "_engine")


def engine_model(model: str) -> str:
    """The engine step of an ensemble: ``llava`` -> ``llava_engine``."""
    return f"{model}_engine"


def preprocess_model(model: str) -> str:
    """The preprocessing step of an ensemble: ``llava`` -> ``llava_preprocess``."""
    return f"{model}_preprocess"


def is_served_model(name: str) -> bool:
    """Whether clients address this model (an ensemble), not one of its steps."""
    return not name.endswith(STEP_SUFFIXES)


# The engine's cancel call: an inference request to the engine step with only this
# input (the Triton request id to stop); its one output says how many were running.
CANCEL_INPUT = "cancel_request_id"
CANCEL_OUTPUT = "cancelled_requests"

# The engine's Prometheus metrics (Triton custom metrics, on each node's metrics port,
# labelled by the engine model): key -> (name, help, kind).
ENGINE_METRICS: dict[str, tuple[str, str, str]] = {
    "tokens_generated": ("llava_engine_generated_tokens_total", "Tokens generated", "counter"),
    "requests_finished": ("llava_engine_requests_finished_total", "Requests finished", "counter"),
    "requests_cancelled": ("llava_engine_requests_cancelled_total", "Requests cancelled", "counter"),
    "requests_failed": ("llava_engine_requests_failed_total", "Requests failed", "counter"),
    "tokens_after_cancel": (
        "llava_engine_tokens_after_cancel_total",
        "Tokens computed for requests after they were cancelled",
        "counter",
    ),
    "decode_steps": ("llava_engine_decode_steps_total", "Batched decode steps run", "counter"),
    "mixed_steps": (
        "llava_engine_mixed_steps_total",
        "Decode steps that also carried a chunk of a prompt",
        "counter",
    ),
    "requests_started": ("llava_engine_requests_started_total", "Requests started", "counter"),
    "first_token_seconds": (
        "llava_engine_time_to_first_token_seconds_total",
        "Time from a request's arrival at the engine to its first token sent, summed",
        "counter",
    ),
    "queue_seconds": (
        "llava_engine_queue_seconds_total",
        "Time from a request's arrival at the engine to the start of its prefill, summed",
        "counter",
    ),
    "prefill_seconds": (
        "llava_engine_prefill_seconds_total",
        "Engine time spent on prompts (vision tower and prefill)",
        "counter",
    ),
    "decode_wait_seconds": (
        "llava_engine_decode_wait_seconds_total",
        "Engine time spent waiting for a decode step's tokens from the device",
        "counter",
    ),
    "token_handling_seconds": (
        "llava_engine_token_handling_seconds_total",
        "Engine time spent handling tokens on the host (detokenizing, sending)",
        "counter",
    ),
    "prefix_cache_hit_tokens": (
        "llava_engine_prefix_cache_hit_tokens_total",
        "Prompt tokens whose keys and values came from the prefix cache",
        "counter",
    ),
    "prefix_cache_miss_tokens": (
        "llava_engine_prefix_cache_miss_tokens_total",
        "Prompt tokens computed (not found in the prefix cache)",
        "counter",
    ),
    "prefix_cache_hit_requests": (
        "llava_engine_prefix_cache_hit_requests_total",
        "Requests that reused at least one cached KV page",
        "counter",
    ),
    "prefix_cache_evicted_pages": (
        "llava_engine_prefix_cache_evicted_pages_total",
        "Cached KV pages evicted to make room for new requests",
        "counter",
    ),
    "image_cache_hits": (
        "llava_engine_image_cache_hits_total",
        "Images whose vision-tower output came from the image cache",
        "counter",
    ),
    "image_cache_misses": (
        "llava_engine_image_cache_misses_total",
        "Images that went through the vision tower",
        "counter",
    ),
    "prefix_cache_pages": ("llava_engine_prefix_cache_pages", "KV pages in the prefix cache", "gauge"),
    "prefix_cache_tokens": (
        "llava_engine_prefix_cache_tokens",
        "Tokens whose keys and values the prefix cache holds",
        "gauge",
    ),
    "image_cache_images": ("llava_engine_image_cache_images", "Images in the image cache", "gauge"),
    "active": ("llava_engine_active_requests", "Requests generating now", "gauge"),
    "queue": ("llava_engine_queued_requests", "Requests waiting to start", "gauge"),
}
# What a node serves each model as (llava_node/served_name.py): one sample of 1 per model,
# exported by its preprocess step (label ``model``: that step, e.g. ``llava_preprocess``),
# labels ``served_name`` (what the control plane lists) and ``checkpoint``.
MODEL_INFO_METRIC = "llava_served_model_info"
ACTIVE_METRIC = ENGINE_METRICS["active"][0]
QUEUE_METRIC = ENGINE_METRICS["queue"][0]


class FinishReason(str, Enum):
    """Why a generation ended."""

    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_tokens reached, or the context is full
    CANCELLED = "cancelled"  # the client cancelled or went away
