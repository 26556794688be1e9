"""The dashboard's time range: presets or explicit bounds, cut into a bounded number of
buckets, so that no request (a hostile one included) asks for more than a month of history
or more than :data:`MAX_BUCKETS` points a series."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime

from control_plane.errors import BadRequest

__all__ = ["MAX_BUCKETS", "MAX_SPAN_S", "PRESETS", "TimeRange", "iso", "parse_range", "plot_time"]

PRESETS = {"15m": 900, "1h": 3600, "6h": 6 * 3600, "24h": 86400, "7d": 7 * 86400}
MAX_SPAN_S = 31 * 86400  # past the default retention of requests (30 days)
MAX_BUCKETS = 720
# bucket widths the automatic choice takes from (seconds): round numbers on a time axis
_STEPS = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)
_TARGET_BUCKETS = 60


@dataclass(frozen=True)
class TimeRange:
    """``[since, until)`` in Unix seconds, cut into ``buckets`` of ``bucket_s``."""

    since: float
    until: float
    bucket_s: float

    @property
    def buckets(self) -> int:
        """How many buckets cover the range (the last may be partial)."""
        return max(1, math.ceil((self.until - self.since) / self.bucket_s))

    def bucket_start(self, index: int) -> float:
        """Unix seconds where bucket ``index`` starts."""
        return self.since + index * self.bucket_s

    def db_since(self) -> str:
        """``since`` as the database stores timestamps (UTC, naive, microseconds)."""
        return db_timestamp(self.since)

    def db_until(self) -> str:
        """``until`` as the database stores timestamps."""
        return db_timestamp(self.until)

    def to_json(self) -> dict[str, object]:
        """The range as the page shows it."""
        return {
            "since": iso(self.since),
            "until": iso(self.until),
            "plot_since": plot_time(self.since),
            "plot_until": plot_time(self.until),
            "bucket_s": self.bucket_s,
            "buckets": self.buckets,
        }


def db_timestamp(unix: float) -> str:
    """A timestamp in the text form SQLAlchemy stores on SQLite (and PostgreSQL casts)."""
    return datetime.fromtimestamp(unix, UTC).replace(tzinfo=None).strftime("%Y-%m-%d %H:%M:%S.%f")


def iso(unix: float) -> str:
    """ISO 8601 in UTC with milliseconds."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def plot_time(unix: float) -> str:
    """A UTC time as plotly reads dates (it has no time zones: none is written)."""
    return datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def _instant(name: str, value: str) -> float:
    """Unix seconds from ``value``: a number of seconds, or ISO 8601 (UTC unless it says)."""
    text = value.strip()
    try:
        number = float(text)
    except ValueError:
        pass
    else:
        if not math.isfinite(number):
            raise BadRequest(f"{name} must be a finite time, got {value!r}", param=name)
        return number
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"{name} must be Unix seconds or an ISO 8601 time (e.g. 2026-12-01T13:00:00Z), got {value!r}",
            param=name,
        ) from None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.timestamp()


def _auto_bucket(span_s: float) -> float:
    for step in _STEPS:
        if span_s / step <= _TARGET_BUCKETS:
            return float(step)
    return float(math.ceil(span_s / MAX_BUCKETS))


def parse_range(
    range_: str | None = None,
    since: str | None = None,
    until: str | None = None,
    bucket: str | None = None,
    *,
    now: float | None = None,
) -> TimeRange:
    """The range a request asks for; a :class:`BadRequest` (400) that says what is wrong
    and what is allowed for anything out of bounds.

    ``range_``: a preset (:data:`PRESETS`, ending now); else ``since`` (default one hour
    before ``until``) and ``until`` (default now). ``bucket``: seconds per point (default:
    a round width giving about 60 points).
    """
    now = time.time() if now is None else now
    if range_ is not None and (since is not None or until is not None):
        raise BadRequest("give either range or since/until, not both", param="range")
    if range_ is not None:
        if range_ not in PRESETS:
            raise BadRequest(f"range must be one of {', '.join(PRESETS)}, got {range_!r}", param="range")
        end, start = now, now - PRESETS[range_]
    else:
        end = _instant("until", until) if until is not None else now
        start = _instant("since", since) if since is not None else end - 3600
    if end <= start:
        raise BadRequest("since must be before until", param="since")
    span = end - start
    if span > MAX_SPAN_S:
        raise BadRequest(
            f"the range is {span / 86400:.1f} days; at most {MAX_SPAN_S // 86400} days can be shown",
            param="since",
        )
    if end > now + 86400 or start < 946684800:  # 2000-01-01: nothing was recorded before
        raise BadRequest("the range must lie between 2000-01-01 and tomorrow", param="since")
    if bucket is None or bucket == "":
        width = _auto_bucket(span)
    else:
        try:
            width = float(bucket)
        except ValueError:
            raise BadRequest(f"bucket must be a number of seconds, got {bucket!r}", param="bucket") from None
        if not math.isfinite(width) or width < 1:
            raise BadRequest("bucket must be at least 1 second", param="bucket")
    if span / width > MAX_BUCKETS:
        raise BadRequest(
            f"{math.ceil(span / width)} buckets of {width:g} s; at most {MAX_BUCKETS} a range: "
            f"ask for a bucket of at least {math.ceil(span / MAX_BUCKETS)} s",
            param="bucket",
        )
    return TimeRange(start, end, width)
