"""Request preparation for ``llava_preprocess``: validation, images, templating, tokens.

Everything here runs on the CPU and raises :class:`InvalidRequest` with a message
that names the problem, for anything a client can get wrong.
"""

from __future__ import annotations

import io
import json
import random
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from llava_node.protocol import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_TEMPERATURE,
)

__all__ = [
    "InvalidRequest",
    "Limits",
    "PreparedRequest",
    "Preprocessor",
    "RawRequest",
    "decode_image",
]

ALLOWED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
IMAGE_PLACEHOLDER = "<image>"


class InvalidRequest(ValueError):
    """A client error: the message says what was wrong with the request."""


@dataclass(frozen=True)
class Limits:
    """Bounds that protect a node from oversized or malformed requests."""

    max_images: int = 8
    max_image_pixels: int = 4096 * 4096
    max_image_bytes: int = 20 * 1024 * 1024
    max_tokens_limit: int = 4096
    max_stop_strings: int = 16
    max_stop_length: int = 256


@dataclass
class RawRequest:
    """A request as the ensemble receives it, before validation."""

    prompt: str | None = None
    messages: str | None = None
    images: Sequence[bytes] = ()
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass
class PreparedRequest:
    """What the engine needs: token ids, pixels and normalized sampling settings."""

    input_ids: NDArray[Any]  # int64 [n]
    pixel_values: NDArray[Any]  # float32 [images, 3, H, W]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int
    stop: list[str] = field(default_factory=list)


def decode_image(data: bytes, index: int, limits: Limits) -> Any:
    """Decode one encoded image into an RGB ``PIL.Image``, refusing bombs and non-images."""
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise InvalidRequest(f"image {index} is empty")
    if len(data) > limits.max_image_bytes:
        raise InvalidRequest(f"image {index} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in ALLOWED_IMAGE_FORMATS:
                raise InvalidRequest(f"image {index} is {fmt}; accepted formats are PNG, JPEG and WebP")
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise InvalidRequest(
                    f"image {index} is {width}x{height} pixels; the limit is {limits.max_image_pixels} pixels"
                )
            img.load()
            return img.convert("RGB")
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(
            f"image {index} is too large ({exc}); the limit is {limits.max_image_pixels} pixels"
        ) from None
    except UnidentifiedImageError as exc:
        raise InvalidRequest(f"image {index} could not be decoded as an image: {exc}") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise InvalidRequest(f"image {index} is corrupt or truncated: {exc}") from None


def _parse_messages(text: str) -> list[dict[str, Any]]:
    try:
        messages = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"messages is not valid JSON: {exc}") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty JSON list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg["role"]
        if role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role is {role!r}; expected system, user or assistant")
        content = msg["content"]
        if isinstance(content, str):
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind in ("image", "image_url"):
                parts.append({"type": "image"})
            else:
                raise InvalidRequest(
                    f"messages[{i}].content[{j}] must be {{'type': 'text', 'text': ...}} "
                    "or {'type': 'image'}"
                )
        out.append({"role": role, "content": parts})
    return out


def _count_image_parts(messages: list[dict[str, Any]]) -> int:
    return sum(1 for m in messages for p in m["content"] if p["type"] == "image")


class Preprocessor:
    """Turns raw requests into engine inputs with the checkpoint's own processor."""

    def __init__(self, checkpoint: str | Path, limits: Limits | None = None) -> None:
        from transformers import AutoConfig, AutoProcessor

        self.checkpoint = str(checkpoint)
        self.processor = AutoProcessor.from_pretrained(self.checkpoint)
        config = AutoConfig.from_pretrained(self.checkpoint)
        text_config = getattr(config, "text_config", config)
        self.context_length = int(getattr(text_config, "max_position_embeddings", 4096))
        self.limits = limits or Limits()
        self.tokenizer = self.processor.tokenizer

    def prepare(self, raw: RawRequest) -> PreparedRequest:
        """Validate ``raw`` and build token ids and pixel values; raise InvalidRequest."""
        max_tokens, temperature, top_p, seed, stop = self._sampling(raw)
        if len(raw.images) > self.limits.max_images:
            raise InvalidRequest(
                f"{len(raw.images)} images given; at most {self.limits.max_images} are accepted"
            )
        prompt = self._prompt(raw)
        placeholders = prompt.count(IMAGE_PLACEHOLDER)
        if placeholders != len(raw.images):
            raise InvalidRequest(
                f"the prompt has {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
                f"{len(raw.images)} image(s) were given; they must match"
            )
        images = [decode_image(b, i, self.limits) for i, b in enumerate(raw.images)]
        try:
            encoded = self.processor(images=images or None, text=prompt, return_tensors="np")
        except ValueError as exc:
            raise InvalidRequest(f"the prompt could not be processed: {exc}") from None
        input_ids = np.asarray(encoded["input_ids"][0], dtype=np.int64)
        if images:
            pixel_values = np.asarray(encoded["pixel_values"], dtype=np.float32)
        else:
            size = self._crop_size()
            pixel_values = np.zeros((0, 3, size[0], size[1]), dtype=np.float32)
        n = int(input_ids.shape[0])
        if n >= self.context_length:
            raise InvalidRequest(
                f"the prompt is {n} tokens (image tokens included); the model's context "
                f"is {self.context_length} tokens, leaving no room to generate"
            )
        # Generation stops at the end of the context ("length"), as LLaVA caps it.
        max_tokens = min(max_tokens, self.context_length - n)
        return PreparedRequest(
            input_ids=input_ids,
            pixel_values=pixel_values,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
        )

    def _crop_size(self) -> tuple[int, int]:
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        h = crop.get("height") or 336
        w = crop.get("width") or 336
        return int(h), int(w)

    def _prompt(self, raw: RawRequest) -> str:
        if raw.prompt is not None and raw.messages is not None:
            raise InvalidRequest("give either prompt or messages, not both")
        if raw.messages is not None:
            messages = _parse_messages(raw.messages)
            if _count_image_parts(messages) != len(raw.images):
                raise InvalidRequest(
                    f"the messages have {_count_image_parts(messages)} image part(s) but "
                    f"{len(raw.images)} image(s) were given; they must match"
                )
            try:
                text = self.processor.apply_chat_template(
                    messages, add_generation_prompt=True, tokenize=False
                )
            except Exception as exc:  # jinja errors from a checkpoint's template
                raise InvalidRequest(f"the chat template failed on these messages: {exc}") from None
            return str(text)
        if raw.prompt is None:
            raise InvalidRequest("a prompt or messages input is required")
        if not raw.prompt.strip():
            raise InvalidRequest("the prompt is empty")
        return raw.prompt

    def _sampling(self, raw: RawRequest) -> tuple[int, float, float, int, list[str]]:
        lim = self.limits
        max_tokens = DEFAULT_MAX_TOKENS if raw.max_tokens is None else int(raw.max_tokens)
        if max_tokens < 1 or max_tokens > lim.max_tokens_limit:
            raise InvalidRequest(
                f"max_tokens is {max_tokens}; it must be between 1 and {lim.max_tokens_limit}"
            )
        temperature = DEFAULT_TEMPERATURE if raw.temperature is None else float(raw.temperature)
        if not (0.0 <= temperature <= MAX_TEMPERATURE):
            raise InvalidRequest(f"temperature is {temperature}; it must be between 0 and {MAX_TEMPERATURE}")
        top_p = DEFAULT_TOP_P if raw.top_p is None else float(raw.top_p)
        if not (0.0 < top_p <= 1.0):
            raise InvalidRequest(f"top_p is {top_p}; it must be greater than 0 and at most 1")
        seed = random.getrandbits(63) if raw.seed is None else int(raw.seed)
        if seed < 0:
            raise InvalidRequest(f"seed is {seed}; it must not be negative")
        stop = [s for s in raw.stop if s]
        if len(stop) > lim.max_stop_strings:
            raise InvalidRequest(
                f"{len(stop)} stop strings given; at most {lim.max_stop_strings} are accepted"
            )
        for s in stop:
            if len(s) > lim.max_stop_length:
                raise InvalidRequest(
                    f"a stop string is {len(s)} characters; the limit is {lim.max_stop_length}"
                )
        return max_tokens, temperature, top_p, seed, stop
