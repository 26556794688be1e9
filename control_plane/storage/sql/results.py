"""What admin SQL answers: its rows as JSON-safe values, its errors, a handle to interrupt a running query, and a text table."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from datetime import time as dtime
from decimal import Decimal
from typing import Any

from control_plane.errors import BadRequest, Overloaded, ServiceError


class ReadOnlyViolation(BadRequest):
    """The query tried to change something."""


class SqlTimeout(BadRequest):
    """The query ran longer than the time limit (``sql_timeout_s``).

    400, not 408: the query itself is what is too slow, so sending it again will not help,
    and clients and proxies may repeat a request answered 408 on their own."""


class SqlBusy(Overloaded):
    """As many admin queries as allowed (``sql_max_concurrent``) are running: 429, at once."""


class SqlInterrupted(ServiceError):
    """The query was stopped from outside: the control plane is stopping, or its client left."""

    status_code = 503
    openai_type = "service_unavailable"


@dataclass
class QueryResult:
    """Columns, rows, and whether (and why) rows were cut: ``truncated_reason`` is
    ``max_rows`` or ``max_result_bytes``."""

    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool
    truncated_reason: str | None = None
    result_bytes: int = 0

    def to_json(self) -> dict[str, Any]:
        """The admin API's answer: every value JSON-safe (see :func:`json_value`);
        ``truncated_reason`` only when the rows were cut."""
        body: dict[str, Any] = {
            "columns": self.columns,
            "rows": [[json_value(v) for v in row] for row in self.rows],
            "truncated": self.truncated,
        }
        if self.truncated:
            body["truncated_reason"] = self.truncated_reason
        return body


class QueryHandle:
    """Stops a running query from another thread: the reason is kept, and the driver is
    told at once (``sqlite3.Connection.interrupt``, PostgreSQL's cancel request)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._interrupt: Callable[[], None] | None = None
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` was called."""
        return self.reason is not None

    def bind(self, interrupt: Callable[[], None] | None) -> None:
        """Set (or clear, with None) what stops the query now running."""
        with self._lock:
            self._interrupt = interrupt

    def cancel(self, reason: str) -> None:
        """Stop the query (if one runs) and keep ``reason``; the first reason stays."""
        with self._lock:
            if self.reason is None:
                self.reason = reason
            interrupt = self._interrupt
        if interrupt is not None:
            with contextlib.suppress(Exception):  # the query ended and its connection closed meanwhile
                interrupt()


def json_value(value: Any) -> Any:
    """``value`` as JSON can hold it: BLOBs (bytes) as ``{"blob_hex": "...", "bytes": n}``;
    infinities and NaN (which JSON lacks) as the strings ``"Infinity"``, ``"-Infinity"``,
    ``"NaN"``; decimals as numbers, timestamps as ISO 8601, intervals as seconds; anything
    else the driver returns as its text."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, (bytes, bytearray, memoryview)):
        data = bytes(value)
        return {"blob_hex": data.hex(), "bytes": len(data)}
    if isinstance(value, Decimal):
        if not value.is_finite():
            return json_value(float(value))
        return int(value) if int(value.as_tuple().exponent) >= 0 else float(value)
    if isinstance(value, (datetime, date, dtime)):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, dict):
        return {str(k): json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_value(v) for v in value]
    return str(value)


def _value_size(value: Any) -> int:
    """About how many bytes ``value`` takes in the JSON answer (cheap, never much under)."""
    if value is None or isinstance(value, bool):
        return 5
    if isinstance(value, str):
        return (len(value) if value.isascii() else len(value.encode("utf-8", "replace"))) + 2
    if isinstance(value, (bytes, bytearray, memoryview)):
        return 2 * len(value) + 32  # as hex, in its marker object
    if isinstance(value, dict):
        return 2 + sum(_value_size(str(k)) + _value_size(v) + 2 for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return 2 + sum(_value_size(v) + 1 for v in value)
    if isinstance(value, (int, float, Decimal)):
        return 24
    return len(str(value)) + 2


def row_size(row: Sequence[Any]) -> int:
    return 3 + sum(_value_size(v) + 1 for v in row)


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"X'{bytes(value).hex().upper()}'"  # SQL's BLOB literal: never raw bytes on a terminal
    return str(value)


def format_table(result: QueryResult) -> str:
    """Rows as an aligned text table (BLOBs as SQL literals ``X'0A1B'``)."""
    cells = [[_cell(v) for v in row] for row in result.rows]
    widths = [len(c) for c in result.columns]
    for row in cells:
        widths = [max(w, len(v)) for w, v in zip(widths, row, strict=False)]

    def line(values: Sequence[str]) -> str:
        return " | ".join(v.ljust(w) for v, w in zip(values, widths, strict=False)).rstrip()

    out = [line(result.columns), "-+-".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    cut = f", truncated at {result.truncated_reason or 'max_rows'}" if result.truncated else ""
    out.append(f"({len(cells)} row{'s' if len(cells) != 1 else ''}{cut})")
    return "\n".join(out)
