"""Reading what a node answers, defensively: a broken or hostile node must not overflow the
store's integers, skew routing without bound or break a poll round. A repository index and a
metrics page are a few kB; reported loads are clamped; error bodies lose their tracebacks."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import re

import aiohttp

from control_plane.nodes.client import ModelStatus
from llava_wire.protocol import (
    ACTIVE_METRIC,
    CLIENT_ERROR_PREFIX,
    MODEL_INFO_METRIC,
    QUEUE_METRIC,
    STEP_SUFFIXES,
)

__all__ = [
    "MAX_INDEX_BYTES",
    "MAX_METRICS_BYTES",
    "MAX_REPORTED_LOAD",
    "clamp_load",
    "clean_node_error",
    "describe_error",
    "node_error_param",
    "node_message",
    "parse_index",
    "parse_load",
    "parse_served_names",
    "read_bounded",
]

# What a node reports is clamped to this (a broken or hostile node must not overflow the
# store's integers or skew routing without bound).
MAX_REPORTED_LOAD = 1_000_000
MAX_INDEX_BYTES = 4 << 20
MAX_METRICS_BYTES = 4 << 20


def clamp_load(value: float) -> int:
    """A reported queue length or request count as an int in [0, MAX_REPORTED_LOAD]."""
    if not math.isfinite(value):
        return MAX_REPORTED_LOAD if value > 0 else 0
    return int(min(max(value, 0.0), MAX_REPORTED_LOAD))


def parse_load(metrics_text: str) -> tuple[int, int]:
    """(queued, active) summed over a node's engine models, from its metrics page;
    malformed values count as 0, and each sum is clamped (:func:`clamp_load`)."""
    queued = active = 0.0
    for line in metrics_text.splitlines():
        if line.startswith(QUEUE_METRIC):
            queued += _sample_value(line)
        elif line.startswith(ACTIVE_METRIC):
            active += _sample_value(line)
    return clamp_load(queued), clamp_load(active)


# A served name as the node may report it (llava_node/served_name.py spells them so); a
# label value that is not one is ignored, as is everything past MAX_SERVED_NAMES samples.
SERVED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
MAX_SERVED_NAMES = 256
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.){0,512})"')


def parse_served_names(metrics_text: str) -> dict[str, str]:
    """Model -> the name it is served under, from a node's ``llava_served_model_info``
    samples (label ``model``: the model's preprocess step, e.g. ``llava_preprocess`` for
    ``llava``). Malformed samples, invalid names and samples past the first
    ``MAX_SERVED_NAMES`` are ignored; of two names for one model the first counts."""
    out: dict[str, str] = {}
    seen = 0
    for line in metrics_text.splitlines():
        if not line.startswith(MODEL_INFO_METRIC + "{"):
            continue
        seen += 1
        if seen > MAX_SERVED_NAMES:
            break
        labels = dict(_LABEL.findall(line[len(MODEL_INFO_METRIC) + 1 : line.rfind("}")]))
        step, name = labels.get("model", ""), labels.get("served_name", "")
        model = step.removesuffix(STEP_SUFFIXES[0])
        if model == step or not model or len(model) > 256 or not SERVED_NAME.fullmatch(name):
            continue
        out.setdefault(model, name)
    return out


def _sample_value(line: str) -> float:
    try:
        value = float(line.rsplit(" ", 1)[-1])
    except ValueError:
        return 0.0
    return value if math.isfinite(value) else 0.0


def parse_index(body: bytes) -> dict[str, ModelStatus]:
    """Each model's state from a node's ``/v2/repository/index`` answer; raises ValueError
    when it is not the list of objects Triton sends."""
    entries = json.loads(body)
    if not isinstance(entries, list):
        raise ValueError("the repository index is not a JSON list")
    models: dict[str, ModelStatus] = {}
    for m in entries:
        name = m.get("name") if isinstance(m, dict) else None
        if not isinstance(name, str) or not name or len(name) > 256:
            raise ValueError("the repository index has an entry without a valid model name")
        state, reason = m.get("state", ""), m.get("reason", "")
        state = state if isinstance(state, str) else ""
        reason = reason if isinstance(reason, str) else ""
        models[name] = ModelStatus(ready=state == "READY", state=state[:64], reason=reason[:2000])
    return models


def clean_node_error(body: str) -> str:
    """The cause in a Triton error body: its ``error`` text, without Python tracebacks."""
    text = body
    with contextlib.suppress(ValueError):
        parsed = json.loads(body)
        if isinstance(parsed, dict) and isinstance(parsed.get("error"), str):
            text = parsed["error"]
    lines: list[str] = []
    in_traceback = False
    for line in text.splitlines():
        if line.strip() == "At:":
            in_traceback = True
            continue
        if in_traceback and (line.startswith(" ") or not line.strip()):
            continue
        in_traceback = False
        if line.strip():
            lines.append(line.strip())
    message = " ".join(lines).strip().rstrip(";").strip()
    return message[:1500] or "(the node gave no reason)"


def node_message(text: str) -> tuple[str, bool]:
    """The client-facing part of a node's error text, and whether it blames the request."""
    i = text.find(CLIENT_ERROR_PREFIX)
    if i >= 0:
        return text[i + len(CLIENT_ERROR_PREFIX) :], True
    return text, False


# What a node's client-error message is about, from how it starts (the node names the
# input first: "image 1 is ...", "temperature is 3.0; ...", "messages[2].role is ...").
_ERROR_SUBJECTS = (
    (re.compile(r"image (\d+) "), "images[{0}]"),
    (re.compile(r"(?:the )?prompt "), "prompt"),
    (re.compile(r"(?:a |give either )?prompt or messages"), "prompt"),
    (re.compile(r"(messages\[\d+\](?:\.\w+)?)"), "{0}"),
    (re.compile(r"(?:the chat template failed on these )?messages"), "messages"),
    (re.compile(r"(max_tokens|temperature|top_p|seed) "), "{0}"),
    (re.compile(r"(?:a stop string|\d+ stop strings|stop )"), "stop"),
    (re.compile(r"the request needs \d+ KV-cache tokens"), "max_tokens"),
)


def node_error_param(message: str, api: str = "llava") -> str | None:
    """The request field a node's client-error message is about, in the terms of ``api``
    (``llava``: ``images[1]``, ``prompt``, ``max_new_tokens``, ...; ``openai``: images and
    prompts are in ``messages``), or None when the message names none."""
    for pattern, param in _ERROR_SUBJECTS:
        m = pattern.match(message)
        if m:
            name = param.format(*m.groups())
            break
    else:
        return None
    if api == "openai":
        return "messages" if name.startswith(("images", "prompt")) else name
    return "max_new_tokens" if name == "max_tokens" else name


async def read_bounded(response: aiohttp.ClientResponse, limit: int) -> bytes:
    data = await response.content.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the node sent more than {limit} bytes")
    return data


def describe_error(exc: BaseException, timeout_s: float) -> str:
    if isinstance(exc, asyncio.TimeoutError):
        return f"no answer within {timeout_s:g} s"
    if isinstance(exc, aiohttp.ClientConnectorError):
        return f"connection failed: {exc.os_error or exc}"
    return f"{type(exc).__name__}: {exc}"
