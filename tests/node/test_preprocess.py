"""Request validation in llava_preprocess: every client mistake gets a clear error."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from PIL import Image

from llava_node.preprocess import MESSAGES_JSON_FACTOR, InvalidRequest, Limits, Preprocessor, RawRequest
from tests.media import bomb_png, image_bytes


@pytest.fixture(scope="module")
def pre(tiny_checkpoint: Path) -> Preprocessor:
    return Preprocessor(tiny_checkpoint, Limits(max_images=2, max_image_pixels=1000 * 1000))


def test_prompt_with_image_expands_image_tokens(pre: Preprocessor) -> None:
    out = pre.prepare(RawRequest(prompt="USER: <image>\nWhat? ASSISTANT:", images=[image_bytes()]))
    image_id = pre.tokenizer.convert_tokens_to_ids("<image>")
    assert int((out.input_ids == image_id).sum()) == 576
    assert out.pixel_values.shape == (1, 3, 336, 336)
    assert out.max_tokens == 256 and out.temperature == 1.0 and out.top_p == 1.0


def test_messages_apply_the_chat_template(pre: Preprocessor) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
    ]
    out = pre.prepare(RawRequest(messages=json.dumps(messages), images=[image_bytes(fmt="JPEG")]))
    text = pre.tokenizer.decode(
        out.input_ids[out.input_ids != pre.tokenizer.convert_tokens_to_ids("<image>")]
    )
    assert "Be brief." in text and "USER:" in text and text.rstrip().endswith("ASSISTANT:")


def test_webp_is_accepted(pre: Preprocessor) -> None:
    out = pre.prepare(RawRequest(prompt="<image> hi", images=[image_bytes(fmt="WEBP")]))
    assert out.pixel_values.shape[0] == 1


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            RawRequest(prompt="<image> <image> two", images=[image_bytes()]),
            "2 <image> placeholder(s) but 1 image",
        ),
        (RawRequest(prompt="none", images=[image_bytes()]), "0 <image> placeholder(s) but 1 image"),
        (RawRequest(prompt="<image>", images=[b"not an image at all"]), "image 0 could not be decoded"),
        (RawRequest(prompt="<image>", images=[b""]), "image 0 is empty"),
        (
            RawRequest(prompt="<image>", images=[image_bytes(fmt="BMP")]),
            "accepted formats are PNG, JPEG and WebP",
        ),
        (RawRequest(prompt="<image>", images=[bomb_png()]), "the limit is 1000000 pixels"),
        (RawRequest(prompt="<image>" * 3, images=[image_bytes()] * 3), "at most 2 are accepted"),
        (RawRequest(prompt="hi", max_tokens=0), "max_tokens is 0"),
        (RawRequest(prompt="hi", max_tokens=100000), "max_tokens is 100000"),
        (RawRequest(prompt="hi", temperature=-1.0), "temperature is -1.0"),
        (RawRequest(prompt="hi", temperature=2.5), "temperature is 2.5"),
        (RawRequest(prompt="hi", top_p=0.0), "top_p is 0.0"),
        (RawRequest(prompt="hi", top_p=1.5), "top_p is 1.5"),
        (RawRequest(prompt="hi", seed=-4), "seed is -4"),
        (RawRequest(), "a prompt or messages input is required"),
        (RawRequest(prompt="   "), "the prompt is empty"),
        (RawRequest(prompt="a", messages="[]"), "either prompt or messages"),
        (RawRequest(messages="{nope"), "messages is not valid JSON"),
        (RawRequest(messages='[{"role": "robot", "content": "x"}]'), "expected system, user or assistant"),
        (RawRequest(messages='[{"role": "user", "content": [{"type": "video"}]}]'), "content[0] must be"),
        (
            RawRequest(messages='[{"role": "user", "content": [{"type": "image"}]}]'),
            "1 image part(s) but 0 image",
        ),
        (RawRequest(prompt="word " * 3000), "the model's context is 2048 tokens"),
    ],
)
def test_bad_input_names_the_problem(pre: Preprocessor, raw: RawRequest, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        pre.prepare(raw)
    assert message in str(err.value)


def test_max_tokens_capped_to_the_room_left(pre: Preprocessor) -> None:
    out = pre.prepare(RawRequest(prompt="word " * 500, max_tokens=4000))
    assert len(out.input_ids) + out.max_tokens == pre.context_length


# -- text a tokenizer cannot take is the client's error, never the node's -------------------
# "\ud800" reaches the node through the messages JSON as the escape \ud800, which json.loads
# turns into a lone surrogate; the tokenizer's TypeError on it came back as INTERNAL.
LONE = "\ud800"


@pytest.mark.parametrize(
    ("raw", "where"),
    [
        (RawRequest(prompt=f"USER: hi {LONE} ASSISTANT:"), "the prompt"),
        (RawRequest(messages='[{"role": "user", "content": "hi \\ud800"}]'), "messages[0].content"),
        (
            RawRequest(messages='[{"role": "user", "content": [{"type": "text", "text": "\\udfff"}]}]'),
            "messages[0].content[0].text",
        ),
        (RawRequest(prompt="hi", stop=["ok", f"x{LONE}"]), "stop string 1"),
    ],
)
def test_lone_surrogates_are_refused_as_invalid_text(pre: Preprocessor, raw: RawRequest, where: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        pre.prepare(raw)
    assert str(err.value).startswith(f"{where} is not valid Unicode: it holds a lone surrogate U+D")


def test_surrogate_pairs_and_control_characters_are_valid_text(pre: Preprocessor) -> None:
    # A JSON surrogate pair is one character; NUL and other controls tokenize fine.
    pre.prepare(RawRequest(messages='[{"role": "user", "content": "smile \\ud83d\\ude00 \\u0000 \\u0007"}]'))
    pre.prepare(RawRequest(prompt="USER: a\x00b\x1b ASSISTANT:", stop=["\x00"]))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("[" * 20_000 + "]" * 20_000, "nests too deeply"),
        ('[{"role": "user", "content": "x", "n": ' + "9" * 5000 + "}]", "messages is not valid JSON"),
        ('[{"role": ["user"], "content": "x"}]', "expected system, user or assistant"),
    ],
)
def test_malformed_messages_json_is_a_client_error(pre: Preprocessor, messages: str, message: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        pre.prepare(RawRequest(messages=messages))
    assert message in str(err.value)


# -- images: every bound is checked on the header, before decoding or resizing --------------
def png(width: int, height: int) -> bytes:
    """A small PNG of one colour (a 1x2000 one is under 100 bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 40, 200)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def default_pre(tiny_checkpoint: Path) -> Preprocessor:
    """The preprocessor with the node's default limits."""
    return Preprocessor(tiny_checkpoint)


@pytest.mark.parametrize(
    ("size", "message"),
    [
        ((1, 2000), "image 0 is 1x2000 pixels, an aspect ratio of 2000:1; the limit is 20:1"),
        ((2000, 1), "image 0 is 2000x1 pixels, an aspect ratio of 2000:1; the limit is 20:1"),
        (
            (30000, 1),
            "image 0 is 30000x1 pixels; a side may be at most 16384 pixels",
        ),  # 30000 px: in the pixel limit
        ((336, 7000), "an aspect ratio of 20.83:1; the limit is 20:1"),
    ],
)
def test_narrow_images_are_refused_quickly(
    default_pre: Preprocessor, size: tuple[int, int], message: str
) -> None:
    data = png(*size)
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as err:
        default_pre.prepare(RawRequest(prompt="USER: <image>\nWhat? ASSISTANT:", images=[data]))
    assert time.perf_counter() - started < 0.2  # it took 3-4 s (and ~2 GB) before
    assert message in str(err.value)


def test_the_resized_size_is_bounded_by_the_checkpoints_resize_rule(tiny_checkpoint: Path) -> None:
    # With the aspect limit raised, the bound on the resized image still refuses what
    # CLIP's shortest-edge resize would blow up: 2x400 would become 336x67200 first.
    pre = Preprocessor(tiny_checkpoint, Limits(max_image_aspect=1000))
    with pytest.raises(InvalidRequest) as err:
        pre.prepare(RawRequest(prompt="<image>", images=[png(2, 400)]))
    assert str(err.value) == (
        "image 0 is 2x400 pixels; this model's image processor resizes the shortest edge to 336 "
        "pixels, then keeps a 336x336 center crop, which would make it 336x67200 = 22579200 "
        "pixels first; the limit is 2257920 pixels"
    )
    pre.prepare(RawRequest(prompt="<image>", images=[png(20, 400)]))  # 20:1 is 20 crops: in


def test_the_resize_rule_is_the_image_processors(default_pre: Preprocessor) -> None:
    rule = default_pre.image_rule
    ip = default_pre.processor.image_processor
    for w, h in [(640, 480), (480, 640), (1000, 333), (333, 1000), (17, 5), (336, 336)]:
        img = Image.new("RGB", (w, h))
        out = ip(images=[img], do_center_crop=False, return_tensors="np")["pixel_values"]
        assert tuple(out.shape[2:]) == rule.resized(w, h)[::-1], (w, h)


@pytest.mark.parametrize(
    "size",
    [(640, 480), (1920, 1080), (1600, 400), (400, 1600), (1080, 10000), (7680, 4320), (8192, 4320), (1, 1)],
    ids=["vga", "full-hd", "4-to-1-banner", "1-to-4", "long-screenshot", "8k-uhd", "8k-dci", "one-pixel"],
)
def test_ordinary_images_still_work(default_pre: Preprocessor, size: tuple[int, int]) -> None:
    out = default_pre.prepare(RawRequest(prompt="USER: <image>\nWhat? ASSISTANT:", images=[png(*size)]))
    assert out.pixel_values.shape == (1, 3, 336, 336)


def test_a_narrow_image_costs_neither_memory_nor_time(tiny_checkpoint: Path) -> None:
    # In a process of its own, so that its peak RSS says what the request cost (this
    # process's peak is whatever earlier tests reached).
    script = textwrap.dedent(
        f"""
        import io, json, resource, sys, time
        from PIL import Image
        from llava_node.preprocess import InvalidRequest, Preprocessor, RawRequest
        pre = Preprocessor({str(tiny_checkpoint)!r})
        pre.prepare(RawRequest(prompt="<image>", images=[{png(64, 48)!r}]))  # warm
        out = {{}}
        for w, h in [(1, 2000), (1, 30000)]:
            buf = io.BytesIO()
            Image.new("RGB", (w, h)).save(buf, "PNG")
            before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            t = time.perf_counter()
            try:
                pre.prepare(RawRequest(prompt="<image>", images=[buf.getvalue()]))
                refused = False
            except InvalidRequest:
                refused = True
            out[f"{{w}}x{{h}}"] = dict(
                refused=refused,
                seconds=time.perf_counter() - t,
                rss_mib=(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024,
                png_bytes=len(buf.getvalue()),
            )
        print(json.dumps(out))
        """
    )
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    for name, r in result.items():
        assert r["refused"], (name, r)
        assert r["seconds"] < 0.1, (name, r)
        assert r["rss_mib"] < 20, (name, r)  # ~2 GB before


# -- prompt size is bounded in bytes before templating or tokenizing -------------------------
def test_the_byte_limit_is_the_context_times_the_longest_token(pre: Preprocessor) -> None:
    longest = max(len(t.encode()) for t in pre.tokenizer.get_vocab())
    assert pre.bytes_per_token == longest
    assert pre.max_prompt_bytes == longest * pre.context_length == 12 * 2048
    assert pre.max_messages_bytes == MESSAGES_JSON_FACTOR * pre.max_prompt_bytes


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            RawRequest(prompt="word " * 2_000_000),
            "the prompt is at least 10000000 bytes; the limit is 24576 bytes",
        ),
        (RawRequest(prompt="é" * 20_000), "the prompt is 40000 bytes; the limit is 24576 bytes"),
        (
            RawRequest(messages=json.dumps([{"role": "user", "content": "word " * 2_000_000}])),
            "the messages JSON is at least 10000",
        ),
        (
            RawRequest(messages=json.dumps([{"role": "user", "content": "word " * 10_000}])),
            "the text of the messages is 50000 bytes; the limit is 24576 bytes",
        ),
        (
            # the text fits, the template's additions make it too long: refused before tokenizing
            RawRequest(messages=json.dumps([{"role": "user", "content": "w"}] * 4000)),
            "the templated prompt is 32010 bytes; the limit is 24576 bytes",
        ),
    ],
    ids=["10MB-prompt", "multibyte-prompt", "10MB-messages", "messages-text", "templated"],
)
def test_oversized_prompts_are_refused_before_tokenizing(
    pre: Preprocessor, raw: RawRequest, message: str
) -> None:
    started = time.perf_counter()
    with pytest.raises(InvalidRequest) as err:
        pre.prepare(raw)
    assert time.perf_counter() - started < 0.3  # a 10 MB prompt was tokenized for 8-11 s before
    assert message in str(err.value)
    assert "(the model's context of 2048 tokens, at most 12 bytes of text per token)" in str(err.value)


def test_no_prompt_that_fits_the_context_is_refused_for_its_size(pre: Preprocessor) -> None:
    # The densest text there is: the vocabulary's longest token, over and over. It fills
    # the context in tokens before it reaches the byte limit.
    vocab = pre.tokenizer.get_vocab()
    longest = max(vocab, key=lambda t: len(t.encode()))
    piece = pre.tokenizer.convert_tokens_to_string([longest])
    fits = pre.context_length - 2 - 100  # <s>, and room to generate
    out = pre.prepare(RawRequest(prompt=piece * fits, max_tokens=10))
    assert len(out.input_ids) <= fits + 1
    assert len((piece * fits).encode()) > pre.max_prompt_bytes * 0.8  # close to the limit


def test_an_image_sent_as_base64_text_is_decoded() -> None:
    """Over Triton's HTTP generate extension a JSON string is all a client can send: an
    image arrives as its base64 text (or a data URL), and is decoded like its bytes."""
    import base64

    from llava_node.preprocess import decode_image
    from tests.media import image_bytes

    raw = image_bytes(size=(40, 30))
    limits = Limits()
    for data in (raw, base64.b64encode(raw), b"data:image/png;base64," + base64.b64encode(raw)):
        assert decode_image(data, 0, limits).size == (40, 30)
    with pytest.raises(InvalidRequest, match="image 0 could not be decoded"):
        decode_image(base64.b64encode(b"plain text, not an image"), 0, limits)
    small = Limits(max_image_bytes=100)
    with pytest.raises(InvalidRequest, match=r"image 0 is about \d+ bytes \(base64\); the limit is 100"):
        decode_image(base64.b64encode(raw), 0, small)
