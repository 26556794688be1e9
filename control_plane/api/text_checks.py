"""Checks on what clients send, shared by the API families: text that is valid Unicode,
and the bounds of the tensors numbers become on the node."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator

__all__ = ["INT32_MAX", "INT64_MAX", "Text", "check_unicode", "utf8_size"]

INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1


def check_unicode(value: str) -> str:
    """``value`` if it encodes as UTF-8; a lone UTF-16 surrogate (``"\\ud800"``, which
    JSON can carry as an escape) raises ValueError saying where, before it reaches a
    tokenizer or a database."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(
            f"the text is not valid Unicode: a lone surrogate {value[exc.start]!r} at position {exc.start}"
        ) from None
    return value


def utf8_size(value: str) -> int:
    """Bytes of ``value`` in UTF-8 (valid Unicode: see :func:`check_unicode`)."""
    return len(value.encode("utf-8"))


Text = Annotated[str, AfterValidator(check_unicode)]
