"""Request validation in llava_preprocess: every client mistake gets a clear error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from llava_node.preprocess import InvalidRequest, Limits, Preprocessor, RawRequest
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
