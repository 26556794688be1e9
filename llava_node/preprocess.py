"""Request preparation for ``llava_preprocess``: validation, images, templating, tokens.

Everything here runs on the CPU and raises :class:`InvalidRequest` with a message
that names the problem (and the limit, where one was passed), for anything a client
can get wrong. What a request costs is bounded before the expensive step it would
drive: text by its size in bytes before it is templated or tokenized, images by
their header (format, sides, aspect ratio, and the size the checkpoint's image
processor would resize them to) before any pixel is decoded.

Limits (model-config parameters of ``llava_preprocess``; empty or 0 = the default):

======================== ============================================================
``max_images``           images per request (8)
``max_image_bytes``      encoded size of one image (20 MiB)
``max_image_pixels``     width x height of one image (40,000,000)
``max_image_side``       longest side of one image, in pixels (16384)
``max_image_aspect``     longest side / shortest side (20)
``max_resized_pixels``   pixels of an image once the checkpoint's processor has resized
                         it, before its center crop (default: 20 crops' worth)
``max_prompt_bytes``     UTF-8 bytes of the prompt, and of the templated messages
                         (default: context length x the longest token of the vocabulary
                         in bytes); the ``messages`` JSON may take 8 times this
``max_tokens_limit``     the largest ``max_tokens`` accepted (4096)
======================== ============================================================
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import random
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from llava_wire.protocol import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_TEMPERATURE,
    DEFAULT_TOP_P,
    MAX_STOP_LENGTH,
    MAX_STOP_STRINGS,
    MAX_TEMPERATURE,
    InvalidRequest,
    check_stop_strings,
    check_text,
)

__all__ = [
    "MESSAGES_JSON_FACTOR",
    "InvalidRequest",
    "Limits",
    "PreparedRequest",
    "Preprocessor",
    "RawRequest",
    "ResizeRule",
    "decode_image",
    "max_token_bytes",
]

ALLOWED_IMAGE_FORMATS = frozenset({"PNG", "JPEG", "WEBP"})
IMAGE_PLACEHOLDER = "<image>"
# The messages JSON may be this many times max_prompt_bytes: JSON takes up to 6 bytes
# for one byte of text ("\u0001"; 2 bytes per byte for CJK as "\u65e5"), and every
# message and part adds its keys. Parsing 8x is still a few milliseconds.
MESSAGES_JSON_FACTOR = 8
# How many center crops' worth of pixels a resized image may hold, by default. CLIP
# resizes the shortest edge to the crop size, so an image of aspect ratio r becomes r
# crops (then only the middle one is kept): this matches the default aspect limit.
DEFAULT_RESIZED_CROPS = 20


@dataclass(frozen=True)
class Limits:
    """Bounds that protect a node from oversized or malformed requests.

    The defaults are for a 336-px CLIP LLaVA (LLaVA-1.5): images up to 8K (7680x4320
    and 8192x4320 are 33-35 MP; 12-36 MP camera photos) and screenshots, including
    long scrolling ones, pass; decoding the largest takes ~280 MB (RGBA plus RGB).
    A long side of 16384 and an aspect ratio of 20 admit panoramas and phone
    screenshots up to 1080x21600; past that the center crop would keep under a
    twentieth of the image anyway. The resize bound (``max_resized_pixels``, 0 = 20
    crops: 2.26 MP, 27 MB as float32 for 336 px) is what stops a 1x2000 PNG of 94
    bytes from becoming a 336x672000 image (~2 GB) before its crop.
    ``max_prompt_bytes`` 0 means: derived from the checkpoint (see
    :func:`max_token_bytes`).
    """

    max_images: int = 8
    max_image_pixels: int = 40_000_000
    max_image_bytes: int = 20 * 1024 * 1024
    max_image_side: int = 16384
    max_image_aspect: float = 20.0
    max_resized_pixels: int = 0  # 0: DEFAULT_RESIZED_CROPS center crops of the checkpoint
    max_prompt_bytes: int = 0  # 0: context length x the longest token's bytes
    max_tokens_limit: int = 4096
    max_stop_strings: int = MAX_STOP_STRINGS
    max_stop_length: int = MAX_STOP_LENGTH


@dataclass(frozen=True)
class ResizeRule:
    """How the checkpoint's image processor sizes an image before its center crop.

    Read from the processor's config (``do_resize``, ``size``, ``do_center_crop``,
    ``crop_size``) so that the size an image will be resized to is known from its
    header alone. Sizes are (width, height).
    """

    shortest_edge: int | None = None  # the short side becomes this, aspect kept (CLIP)
    longest_edge: int | None = None  # the long side becomes this, aspect kept
    fixed: tuple[int, int] | None = None  # resized to exactly this
    crop: tuple[int, int] | None = None  # the center crop after the resize

    @classmethod
    def from_processor(cls, image_processor: Any) -> ResizeRule:
        """The rule of a transformers image processor (CLIP's and similar ones)."""
        cfg: Mapping[str, Any] = image_processor.to_dict()
        size = cfg.get("size") or {}
        if isinstance(size, int):
            size = {"shortest_edge": size}
        crop_cfg = cfg.get("crop_size") or {}
        if isinstance(crop_cfg, int):
            crop_cfg = {"height": crop_cfg, "width": crop_cfg}
        crop = None
        if cfg.get("do_center_crop", False) and crop_cfg.get("height") and crop_cfg.get("width"):
            crop = (int(crop_cfg["width"]), int(crop_cfg["height"]))
        if not cfg.get("do_resize", True):
            return cls(crop=crop)
        if size.get("shortest_edge"):
            return cls(shortest_edge=int(size["shortest_edge"]), crop=crop)
        if size.get("height") and size.get("width"):
            return cls(fixed=(int(size["width"]), int(size["height"])), crop=crop)
        if size.get("longest_edge"):
            return cls(longest_edge=int(size["longest_edge"]), crop=crop)
        return cls(crop=crop)

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """The size the processor resizes a ``width`` x ``height`` image to (as
        transformers' ``get_resize_output_image_size`` computes it)."""
        short, long = min(width, height), max(width, height)
        if self.shortest_edge:
            new_short, new_long = self.shortest_edge, int(self.shortest_edge * long / short)
        elif self.longest_edge:
            new_short, new_long = int(self.longest_edge * short / long), self.longest_edge
        elif self.fixed:
            return self.fixed
        else:
            return width, height
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def crop_pixels(self) -> int:
        """Pixels of the image the vision tower gets (the crop, else the resize target)."""
        if self.crop:
            return self.crop[0] * self.crop[1]
        if self.fixed:
            return self.fixed[0] * self.fixed[1]
        edge = self.shortest_edge or self.longest_edge or 336
        return edge * edge

    def describe(self) -> str:
        """The rule in words, for error messages."""
        if self.shortest_edge:
            how = f"resizes the shortest edge to {self.shortest_edge} pixels"
        elif self.longest_edge:
            how = f"resizes the longest edge to {self.longest_edge} pixels"
        elif self.fixed:
            how = f"resizes to {self.fixed[0]}x{self.fixed[1]} pixels"
        else:
            how = "does not resize"
        if self.crop:
            how += f", then keeps a {self.crop[0]}x{self.crop[1]} center crop"
        return how


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
    prior_token_ids: Sequence[int] = ()  # a continuation (llava_wire.protocol)


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
    prior_tokens: int = 0  # the last ones of input_ids were generated before (a continuation)


# How an encoded image starts: PNG, JPEG, WebP (RIFF....WEBP), and GIF/BMP/TIFF, which are
# refused by format once opened
_IMAGE_MAGIC = (b"\x89PNG", b"\xff\xd8", b"RIFF", b"GIF8", b"BM", b"II*\x00", b"MM\x00*")
_BASE64 = re.compile(rb"[A-Za-z0-9+/=\s]+")
_DATA_URL = re.compile(rb"data:[\w/+.-]*;base64,")


def _unwrap_base64(data: bytes, index: int, limits: Limits) -> bytes:
    """``data`` itself, or the image it encodes in base64 (optionally a ``data:`` URL): a
    JSON client, such as Triton's HTTP ``generate`` extension, can only send text, so an
    image arrives there as its base64 string. The decoded size is bounded before decoding."""
    if data.startswith(_IMAGE_MAGIC):
        return data
    url = _DATA_URL.match(data)
    text = data[url.end() :] if url else data
    if not _BASE64.fullmatch(text):
        return data  # neither an image nor base64: the decoder below says what is wrong
    if len(text) // 4 * 3 > limits.max_image_bytes:
        raise InvalidRequest(
            f"image {index} is about {len(text) // 4 * 3} bytes (base64); the limit is {limits.max_image_bytes}"
        )
    try:
        decoded = base64.b64decode(text, validate=False)
    except binascii.Error:
        return data  # not base64 after all: the decoder below says it is no image
    return decoded if decoded.startswith(_IMAGE_MAGIC) else data


def decode_image(data: bytes, index: int, limits: Limits, rule: ResizeRule | None = None) -> Any:
    """Decode one encoded image into an RGB ``PIL.Image``, refusing bombs and non-images.

    Every bound is checked on the header (``Image.open`` reads only that; the size is
    known before ``load``), so a refused image costs no decoding: its sides, pixel
    count, aspect ratio and, with ``rule``, the size the processor would resize it to.
    """
    from PIL import Image, UnidentifiedImageError

    if len(data) == 0:
        raise InvalidRequest(f"image {index} is empty")
    data = _unwrap_base64(data, index, limits)
    if len(data) > limits.max_image_bytes:
        raise InvalidRequest(f"image {index} is {len(data)} bytes; the limit is {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            fmt = img.format or "unknown"
            if fmt not in ALLOWED_IMAGE_FORMATS:
                raise InvalidRequest(f"image {index} is {fmt}; accepted formats are PNG, JPEG and WebP")
            _check_image_size(index, *img.size, limits, rule)
            img.load()
            return img.convert("RGB")
    except InvalidRequest:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidRequest(
            f"image {index} is too large ({exc}); the limit is {limits.max_image_pixels} pixels"
        ) from None
    except UnidentifiedImageError:
        # PIL's message names its in-memory file object ("<_io.BytesIO object at 0x...>")
        raise InvalidRequest(
            f"image {index} could not be decoded as an image: its bytes are not a PNG, JPEG or WebP file"
        ) from None
    except (OSError, ValueError, SyntaxError, EOFError) as exc:
        raise InvalidRequest(f"image {index} is corrupt or truncated: {exc}") from None


def _check_image_size(index: int, width: int, height: int, limits: Limits, rule: ResizeRule | None) -> None:
    name = f"image {index} is {width}x{height} pixels"
    if width < 1 or height < 1:
        raise InvalidRequest(f"{name}; it has no pixels")
    if max(width, height) > limits.max_image_side:
        raise InvalidRequest(f"{name}; a side may be at most {limits.max_image_side} pixels")
    if width * height > limits.max_image_pixels:
        raise InvalidRequest(f"{name}; the limit is {limits.max_image_pixels} pixels")
    aspect = max(width, height) / min(width, height)
    if aspect > limits.max_image_aspect:
        raise InvalidRequest(
            f"{name}, an aspect ratio of {aspect:.4g}:1; the limit is {limits.max_image_aspect:g}:1"
        )
    if rule is not None:
        rw, rh = rule.resized(width, height)
        cap = limits.max_resized_pixels or DEFAULT_RESIZED_CROPS * rule.crop_pixels()
        if rw * rh > cap:
            raise InvalidRequest(
                f"{name}; this model's image processor {rule.describe()}, which would make it "
                f"{rw}x{rh} = {rw * rh} pixels first; the limit is {cap} pixels"
            )


def max_token_bytes(tokenizer: Any) -> int:
    """An upper bound on the UTF-8 bytes of text one token of ``tokenizer`` stands for.

    Byte-level BPE writes each byte as one character of its token string (bytes
    0x80-0xFF as two-byte characters), SentencePiece writes a space as "▁" (three
    bytes) and byte fallbacks as "<0xNN>": the UTF-8 size of a token's string, with
    "▁" counted as the one space it is, is never less than the text it covers. The
    longest over the vocabulary (added tokens such as ``<image>`` included) times the
    context length is then a size in bytes that no prompt fitting the context exceeds
    (for tokenizers whose normalizer does not shrink text: byte-level BPE and Llama's
    SentencePiece, the LLaVA families; set ``max_prompt_bytes`` for others).
    """
    vocab: Mapping[str, int] = tokenizer.get_vocab()
    return max((len(t.replace("▁", " ").encode("utf-8")) for t in vocab), default=16)


def _utf8_size(text: str, limit: int) -> tuple[int, bool]:
    """``text``'s UTF-8 size, and whether it is exact: far past ``limit`` characters its
    length (a lower bound) is enough to refuse it, without encoding 10 MB."""
    if len(text) > 4 * limit:
        return len(text), False
    return len(text.encode("utf-8", "surrogatepass")), True


def _parse_messages(text: str) -> list[dict[str, Any]]:
    try:
        messages = json.loads(text)
    except ValueError as exc:  # JSONDecodeError, and e.g. an integer of over 4300 digits
        raise InvalidRequest(f"messages is not valid JSON: {exc}") from None
    except RecursionError:
        raise InvalidRequest("messages is not valid JSON: it nests too deeply") from None
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest("messages must be a non-empty JSON list of {role, content} objects")
    out: list[dict[str, Any]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise InvalidRequest(f"messages[{i}] must be an object with 'role' and 'content'")
        role = msg["role"]
        if not isinstance(role, str) or role not in ("system", "user", "assistant"):
            raise InvalidRequest(f"messages[{i}].role is {role!r}; expected system, user or assistant")
        content = msg["content"]
        if isinstance(content, str):
            check_text(content, f"messages[{i}].content")
            out.append({"role": role, "content": [{"type": "text", "text": content}]})
            continue
        if not isinstance(content, list):
            raise InvalidRequest(f"messages[{i}].content must be a string or a list of parts")
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                check_text(part["text"], f"messages[{i}].content[{j}].text")
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


def _text_bytes(messages: list[dict[str, Any]]) -> int:
    return sum(len(p["text"].encode("utf-8")) for m in messages for p in m["content"] if p["type"] == "text")


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
        self.image_rule = ResizeRule.from_processor(self.processor.image_processor)
        self.bytes_per_token = max_token_bytes(self.tokenizer)
        self.max_prompt_bytes = self.limits.max_prompt_bytes or self.bytes_per_token * self.context_length
        self.max_messages_bytes = MESSAGES_JSON_FACTOR * self.max_prompt_bytes
        self._why_bytes = (
            "(the node's max_prompt_bytes)"
            if self.limits.max_prompt_bytes
            else f"(the model's context of {self.context_length} tokens, at most "
            f"{self.bytes_per_token} bytes of text per token)"
        )

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
        images = [decode_image(b, i, self.limits, self.image_rule) for i, b in enumerate(raw.images)]
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
        prior = self._prior_tokens(raw.prior_token_ids, max_tokens)
        if prior.size:
            input_ids = np.concatenate([input_ids, prior])
        return PreparedRequest(
            input_ids=input_ids,
            pixel_values=pixel_values,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
            stop=stop,
            prior_tokens=int(prior.size),
        )

    def _prior_tokens(self, ids: Sequence[int], max_tokens: int) -> NDArray[Any]:
        """A continuation's prior token ids, checked: fewer than ``max_tokens`` (the
        budget they count toward), no image token (the engine checks the ids against the
        model's vocabulary, and whether they already end the generation)."""
        if len(ids) >= max_tokens:
            raise InvalidRequest(
                f"prior_token_ids holds {len(ids)} tokens; a continuation needs fewer than "
                f"max_tokens ({max_tokens}, after capping at the context)"
            )
        prior = np.asarray(list(ids), dtype=np.int64)
        if not prior.size:  # (every request but a continuation)
            return prior
        if bool((prior == self.tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)).any()):
            raise InvalidRequest("prior_token_ids holds the image token; a continuation cannot")
        return prior

    def _crop_size(self) -> tuple[int, int]:
        ip = self.processor.image_processor
        crop = getattr(ip, "crop_size", None) or {}
        h = crop.get("height") or 336
        w = crop.get("width") or 336
        return int(h), int(w)

    def _check_size(self, what: str, size: tuple[int, bool], limit: int) -> None:
        n, exact = size
        if n > limit:
            raise InvalidRequest(
                f"{what} is {'' if exact else 'at least '}{n} bytes; the limit is {limit} bytes {self._why_bytes}"
            )

    def _prompt(self, raw: RawRequest) -> str:
        # Sizes are checked before the text is parsed, templated or tokenized: a 10 MB
        # prompt took 9-11 s of tokenizing before the token count refused it, while the
        # other requests of the node waited.
        if raw.prompt is not None and raw.messages is not None:
            raise InvalidRequest("give either prompt or messages, not both")
        if raw.messages is not None:
            self._check_size(
                "the messages JSON",
                _utf8_size(raw.messages, self.max_messages_bytes),
                self.max_messages_bytes,
            )
            messages = _parse_messages(raw.messages)
            self._check_size("the text of the messages", (_text_bytes(messages), True), self.max_prompt_bytes)
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
            text = str(text)
            self._check_size(
                "the templated prompt", _utf8_size(text, self.max_prompt_bytes), self.max_prompt_bytes
            )
            return text
        if raw.prompt is None:
            raise InvalidRequest("a prompt or messages input is required")
        self._check_size("the prompt", _utf8_size(raw.prompt, self.max_prompt_bytes), self.max_prompt_bytes)
        check_text(raw.prompt, "the prompt")
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
        if not (0.0 <= temperature <= MAX_TEMPERATURE):  # NaN fails every comparison
            raise InvalidRequest(f"temperature is {temperature}; it must be between 0 and {MAX_TEMPERATURE}")
        top_p = DEFAULT_TOP_P if raw.top_p is None else float(raw.top_p)
        if not (0.0 < top_p <= 1.0):
            raise InvalidRequest(f"top_p is {top_p}; it must be greater than 0 and at most 1")
        seed = random.getrandbits(63) if raw.seed is None else int(raw.seed)
        if seed < 0:
            raise InvalidRequest(f"seed is {seed}; it must not be negative")
        stop = check_stop_strings(raw.stop, lim.max_stop_strings, lim.max_stop_length)
        return max_tokens, temperature, top_p, seed, stop
