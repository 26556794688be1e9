"""The dashboard's rows shaped into plotly traces: one list of traces per plot, each a
plotly trace as it is (``type``, ``x``, ``y``, ...), so the page only draws them."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterable
from typing import Any

from control_plane.dashboard.queries import Rows
from control_plane.dashboard.ranges import TimeRange, iso, plot_time

__all__ = [
    "ERROR_KINDS",
    "STATE_COLORS",
    "build_plots",
    "error_kind",
    "error_table",
    "model_event_table",
    "state_segments",
]

STATE_COLORS = {
    "healthy": "#2ca02c",
    "unknown": "#7f7f7f",
    "unhealthy": "#ff7f0e",
    "offline": "#d62728",
    "removed": "#393b79",
}
# (kind, words of the message that tell it): the first match wins; messages are the
# errors the control plane records (control_plane/errors.py and the nodes' own)
ERROR_KINDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("abandoned at restart", ("previous run", "left running", "restart")),
    (
        "bad request",
        (
            "invalid",
            "bad request",
            "must be",
            "must match",
            "placeholder",
            "too long",
            "too large",
            "out of range",
        ),
    ),
    ("model load failed", ("could not be loaded", "load failed", "failed to load")),
    ("model loading", ("still loading", "cold start")),
    ("stalled", ("stall", "no token for", "first token")),
    ("unreachable", ("unreachable", "connect", "connection", "timed out", "timeout")),
    ("overloaded", ("overloaded", "queue")),
    ("no worker", ("no healthy worker", "no worker", "serves no", "not served")),
    ("node failed", ("failed", "error", "not healthy")),
)


def error_kind(message: str | None) -> str:
    """The kind of a recorded error, from its message."""
    text = (message or "").lower()
    for kind, words in ERROR_KINDS:
        if any(w in text for w in words):
            return kind
    return "other" if text else "unknown"


def _x(span: TimeRange) -> list[str]:
    return [plot_time(span.bucket_start(i) + span.bucket_s / 2) for i in range(span.buckets)]  # mid-bucket


def _index(value: Any, span: TimeRange) -> int | None:
    try:
        i = int(value)
    except (TypeError, ValueError):
        return None
    return i if 0 <= i < span.buckets else None


def _num(value: Any) -> float | None:
    return None if value is None else float(value)


def _counts(
    rows: Iterable[dict[str, Any]], span: TimeRange, key: Any, value: str, scale: float = 1.0
) -> dict[str, list[float]]:
    """Zero-filled series per ``key(row)`` of ``row[value]`` summed per bucket."""
    out: dict[str, list[float]] = {}
    for row in rows:
        i = _index(row["b"], span)
        if i is None:
            continue
        series = out.setdefault(key(row), [0.0] * span.buckets)
        series[i] += float(row[value] or 0) * scale
    return dict(sorted(out.items()))


def _lines(
    series: dict[str, list[Any]], span: TimeRange, kind: str = "lines", **extra: Any
) -> list[dict[str, Any]]:
    x = _x(span)
    if kind == "bar":
        return [{"type": "bar", "name": name, "x": x, "y": ys, **extra} for name, ys in series.items()]
    return [
        {"type": "scatter", "mode": kind, "name": name, "x": x, "y": ys, "connectgaps": False, **extra}
        for name, ys in series.items()
    ]


def _percentile_traces(rows: list[dict[str, Any]], span: TimeRange, digits: int) -> list[dict[str, Any]]:
    """p50 (solid) and p95 (dotted) per group; buckets with no request are gaps."""
    out: dict[str, list[Any]] = {}
    for row in rows:
        i = _index(row["b"], span)
        if i is None:
            continue
        for p in ("p50", "p95"):
            ys = out.setdefault(f"{row['g']} {p}", [None] * span.buckets)
            v = _num(row[p])
            ys[i] = None if v is None else round(v, digits)
    traces = _lines(dict(sorted(out.items())), span, "lines+markers")
    for t in traces:
        if t["name"].endswith("p95"):
            t["line"] = {"dash": "dot"}
    return traces


def state_segments(
    rows: Rows, span: TimeRange, now: float | None = None
) -> dict[str, list[tuple[float, float, str, str]]]:
    """Per worker name, its states over the range as ``(start, end, state, reason)``, from
    its state before the range and its state changes in it."""
    end = min(span.until, time.time() if now is None else now)
    current: dict[str, tuple[float, str, str]] = {}
    for row in rows["state_before"]:
        current[row["worker"] or f"worker {row['worker_id']}"] = (
            span.since,
            row["to_state"],
            row["reason"] or "",
        )
    out: dict[str, list[tuple[float, float, str, str]]] = defaultdict(list)
    for row in sorted(rows["state_events"], key=lambda r: float(r["at_unix"])):
        name = row["worker"] or f"worker {row['worker_id']}"
        at = max(span.since, float(row["at_unix"]))
        if name in current:
            start, state, reason = current[name]
            if at > start:
                out[name].append((start, at, state, reason))
        current[name] = (at, row["to_state"], row["reason"] or "")
    for name, (start, state, reason) in current.items():
        if end > start:
            out[name].append((start, end, state, reason))
    return dict(sorted(out.items()))


def _timeline(rows: Rows, span: TimeRange) -> list[dict[str, Any]]:
    by_state: dict[str, dict[str, list[Any]]] = {}
    for name, segments in state_segments(rows, span).items():
        for start, end, state, reason in segments:
            t = by_state.setdefault(state, {"y": [], "base": [], "x": [], "text": []})
            t["y"].append(name)
            t["base"].append(plot_time(start))
            t["x"].append(round((end - start) * 1000.0))  # a date axis counts bar lengths in ms
            t["text"].append(f"{state} from {iso(start)} to {iso(end)}" + (f": {reason}" if reason else ""))
    return [
        {
            "type": "bar",
            "orientation": "h",
            "name": state,
            "marker": {"color": STATE_COLORS.get(state, "#17becf")},
            "hovertemplate": "%{y}: %{text}<extra></extra>",
            "textposition": "none",  # the text is for hovering: written on the bars it spilt over their neighbours
            **t,
        }
        for state, t in sorted(by_state.items())
    ]


def _model_loads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    groups: dict[str, dict[str, list[Any]]] = {}
    for row in reversed(rows):  # oldest first
        event = row["event"]
        if event == "loaded":
            name, y = f"{row['model']} loaded", _num(row["duration_ms"])
        elif event == "load_failed":
            name, y = f"{row['model']} load failed", _num(row["duration_ms"]) or 0.0
        else:
            continue
        g = groups.setdefault(name, {"x": [], "y": [], "text": []})
        g["x"].append(plot_time(float(row["at_unix"])))
        g["y"].append(None if y is None else round(y, 1))
        g["text"].append(f"{row['worker']}: {row['reason'] or event}")
    return [
        {
            "type": "scatter",
            "mode": "markers",
            "name": name,
            "marker": {"size": 10, "symbol": "x" if name.endswith("failed") else "circle"},
            "hovertemplate": "%{y} ms on %{text}<extra>%{fullData.name}</extra>",
            **g,
        }
        for name, g in sorted(groups.items())
    ]


def build_plots(rows: Rows, span: TimeRange) -> dict[str, list[dict[str, Any]]]:
    """Every plot's traces (an empty list: nothing recorded in the range)."""
    per_min = 60.0 / span.bucket_s
    requests = _counts(rows["requests"], span, lambda r: f"{r['api']} {r['status']}", "n", per_min)
    errors = _counts(rows["errors"], span, lambda r: error_kind(r["error"]), "n")
    routing = _counts(rows["routing"], span, lambda r: f"{r['reason']} ({r['policy']})", "n")
    inflight: dict[str, list[Any]] = {}
    for row in rows["load"]:
        i = _index(row["b"], span)
        if i is None:
            continue
        for key, label in (("inflight", "in flight"), ("queued", "queued on node")):
            ys = inflight.setdefault(f"{row['g']} {label}", [None] * span.buckets)
            v = _num(row[key])
            ys[i] = None if v is None else round(v, 2)
    cache: dict[str, list[Any]] = {}
    for row in rows["cache"]:
        i = _index(row["b"], span)
        if i is None or not row["n"]:
            continue
        cache.setdefault(f"{row['g']} requests hit", [None] * span.buckets)[i] = round(
            100.0 * float(row["hits"] or 0) / float(row["n"]), 1
        )
        if row["prompt"]:
            cache.setdefault(f"{row['g']} prompt tokens cached", [None] * span.buckets)[i] = round(
                100.0 * float(row["cached"] or 0) / float(row["prompt"]), 1
            )
    return {
        "timeline": _timeline(rows, span),
        "requests": _lines(requests, span, "bar"),
        "ttft_worker": _percentile_traces(rows["ttft_worker"], span, 1),
        "ttft_api": _percentile_traces(rows["ttft_api"], span, 1),
        "tokens_worker": _percentile_traces(rows["tokens_worker"], span, 1),
        "tokens_api": _percentile_traces(rows["tokens_api"], span, 1),
        "errors": _lines(errors, span, "bar"),
        "model_loads": _model_loads(rows["model_events"]),
        "load": _lines(inflight, span, "lines+markers"),
        "cache": _lines(cache, span, "lines+markers"),
        "routing": _lines(routing, span, "bar"),
    }


def error_table(rows: Rows, limit: int = 20) -> list[dict[str, Any]]:
    """The most frequent errors in the range: kind, API, message, count."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for row in rows["errors"]:
        counts[(error_kind(row["error"]), row["api"], row["error"])] += int(row["n"])
    top = sorted(counts.items(), key=lambda kv: -kv[1])[:limit]
    return [{"kind": k, "api": a, "error": e, "count": n} for (k, a, e), n in top]


def model_event_table(rows: Rows, limit: int = 30) -> list[dict[str, Any]]:
    """The newest model events in the range."""
    return [
        {
            "at": iso(float(r["at_unix"])),
            "model": r["model"],
            "worker": r["worker"],
            "event": r["event"],
            "duration_ms": None if r["duration_ms"] is None else round(float(r["duration_ms"]), 1),
            "reason": r["reason"],
        }
        for r in rows["model_events"][:limit]
    ]
