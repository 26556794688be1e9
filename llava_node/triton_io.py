"""Helpers for the Python-backend models: reading inputs and model-config parameters.

``triton_python_backend_utils`` exists only inside Triton's stub process, so the
functions here take it (or its objects) as arguments. What a client sent wrong (a
tensor of the wrong size, text that is not UTF-8) raises
:class:`~llava_wire.protocol.InvalidRequest`, a client error.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from numpy.typing import NDArray

from llava_wire.protocol import InvalidRequest, check_text

__all__ = ["bytes_list", "int_list", "param", "scalar", "text", "text_list"]


def param(model_config: dict[str, Any], key: str, env: str | None = None, default: str = "") -> str:
    """A model-config parameter; if empty, the environment variable ``env``; else ``default``."""
    value = model_config.get("parameters", {}).get(key, {}).get("string_value", "")
    if not value and env:
        value = os.environ.get(env, "")
    return value or default


def _array(pb: Any, request: Any, name: str) -> NDArray[Any] | None:
    tensor = pb.get_input_tensor_by_name(request, name)
    return None if tensor is None else tensor.as_numpy()


def scalar(pb: Any, request: Any, name: str) -> Any:
    """The single value of an optional [1]-shaped input, or None when absent."""
    arr = _array(pb, request, name)
    if arr is None or arr.size == 0:
        return None
    if arr.size != 1:
        raise InvalidRequest(f"input {name} must hold one value, got {arr.size}")
    value = arr.reshape(-1)[0]
    return value.item() if isinstance(value, np.generic) else value


def _decode(value: Any, what: str) -> str:
    if isinstance(value, bytes):
        try:
            out = value.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(f"{what} is not valid UTF-8 (byte {exc.start} is not)") from None
    else:
        out = str(value)
    check_text(out, what)
    return out


def text(pb: Any, request: Any, name: str) -> str | None:
    """An optional [1]-shaped BYTES input as UTF-8 text (strict: a client error if not)."""
    value = scalar(pb, request, name)
    return None if value is None else _decode(value, f"input {name}")


def text_list(pb: Any, request: Any, name: str) -> list[str]:
    """An optional BYTES input as a list of UTF-8 strings (strict, like :func:`text`)."""
    arr = _array(pb, request, name)
    if arr is None:
        return []
    return [_decode(v, f"{name}[{i}]") for i, v in enumerate(arr.reshape(-1))]


def bytes_list(pb: Any, request: Any, name: str) -> list[bytes]:
    """An optional BYTES input as a list of byte strings (empty when absent)."""
    arr = _array(pb, request, name)
    if arr is None:
        return []
    return [v if isinstance(v, bytes) else str(v).encode() for v in arr.reshape(-1)]


def int_list(pb: Any, request: Any, name: str, limit: int) -> list[int]:
    """An optional integer input as a list (empty when absent); more than ``limit``
    values, or values that are not integers, are a client error."""
    arr = _array(pb, request, name)
    if arr is None:
        return []
    if not np.issubdtype(arr.dtype, np.integer):
        raise InvalidRequest(f"input {name} must hold integers, not {arr.dtype}")
    if arr.size > limit:
        raise InvalidRequest(f"input {name} holds {arr.size} values; at most {limit} are accepted")
    return [int(v) for v in arr.reshape(-1)]
