"""Image inputs of the OpenAI API: data URLs, raw base64, and (only if enabled) http(s) URLs.

Fetching URLs is off by default. When enabled, only hosts on the allow-list are
fetched, without following redirects, with a size and a time limit.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
from urllib.parse import urlsplit

import aiohttp

from control_plane.errors import BadRequest

__all__ = ["ImageFetcher", "decode_base64_image"]


def decode_base64_image(text: str, where: str, max_bytes: int) -> bytes:
    """Bytes of a ``data:image/...;base64,`` URL or of raw base64."""
    payload = text
    if text.startswith("data:"):
        header, sep, payload = text.partition(",")
        if not sep or ";base64" not in header:
            raise BadRequest(f"{where}: a data URL must be 'data:image/<type>;base64,<data>'", param=where)
        if not header[5:].startswith("image/"):
            raise BadRequest(
                f"{where}: the data URL is {header[5:].split(';')[0]!r}, not an image", param=where
            )
    payload = "".join(payload.split())
    if len(payload) * 3 // 4 > max_bytes:
        raise BadRequest(f"{where}: the image is larger than {max_bytes} bytes", param=where)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(
            f"{where}: not valid base64 (expected a data: URL or base64 image bytes)", param=where
        ) from None
    if not data:
        raise BadRequest(f"{where}: the image is empty", param=where)
    return data


class ImageFetcher:
    """Turns ``image_url`` values into image bytes."""

    def __init__(
        self, session: aiohttp.ClientSession, allowed_hosts: list[str], max_bytes: int, timeout_s: float
    ) -> None:
        self.session = session
        self.allowed_hosts = {h.lower() for h in allowed_hosts}
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def load(self, url: str, where: str) -> bytes:
        """The image's bytes; raises BadRequest saying what was wrong."""
        if url.startswith(("http://", "https://")):
            return await self._fetch(url, where)
        return decode_base64_image(url, where, self.max_bytes)

    async def _fetch(self, url: str, where: str) -> bytes:
        host = (urlsplit(url).hostname or "").lower()
        if not self.allowed_hosts:
            raise BadRequest(
                f"{where}: image URLs are not enabled on this server; send the image as a "
                "data:image/...;base64 URL",
                param=where,
            )
        if host not in self.allowed_hosts:
            raise BadRequest(f"{where}: images from host {host!r} are not allowed", param=where)
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self.session.get(url, allow_redirects=False) as r:
                    if r.status != 200:
                        raise BadRequest(f"{where}: fetching the image gave HTTP {r.status}", param=where)
                    if (r.content_length or 0) > self.max_bytes:
                        raise BadRequest(
                            f"{where}: the image is larger than {self.max_bytes} bytes", param=where
                        )
                    data = bytearray()
                    async for block in r.content.iter_chunked(65536):
                        data += block
                        if len(data) > self.max_bytes:
                            raise BadRequest(
                                f"{where}: the image is larger than {self.max_bytes} bytes", param=where
                            )
                    return bytes(data)
        except TimeoutError:
            raise BadRequest(
                f"{where}: fetching the image took longer than {self.timeout_s:g} s", param=where
            ) from None
        except aiohttp.ClientError as exc:
            raise BadRequest(f"{where}: the image could not be fetched: {exc}", param=where) from None
