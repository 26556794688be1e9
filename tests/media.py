"""Test images, made with Pillow (nothing is downloaded)."""

from __future__ import annotations

import base64
import io

from PIL import Image


def image_bytes(
    color: tuple[int, int, int] = (200, 30, 30), size: tuple[int, int] = (64, 48), fmt: str = "PNG"
) -> bytes:
    """An encoded image: a colour field with a diagonal stripe, so it is not uniform."""
    img = Image.new("RGB", size, color)
    for i in range(min(size)):
        img.putpixel((i, i), (255 - color[0], 255 - color[1], 255 - color[2]))
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


def image_b64(**kwargs: object) -> str:
    """The same, base64-encoded (as LLaVA's protocol sends images)."""
    return base64.b64encode(image_bytes(**kwargs)).decode()  # type: ignore[arg-type]


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small PNG whose header claims a huge image (a decompression bomb)."""
    img = Image.new("1", (width, height))
    buf = io.BytesIO()
    img.save(buf, "PNG", optimize=True)
    return buf.getvalue()
