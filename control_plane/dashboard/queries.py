"""The dashboard's fixed queries over the worker history, each run through
:func:`~control_plane.storage.sql.run_readonly` (a read-only connection, a time limit, a
row limit), the way ``/admin/sql`` runs an admin's.

The SQL is the same on SQLite and PostgreSQL but for one expression, the bucket a time
falls in (``CAST`` truncates on SQLite and rounds on PostgreSQL). Rows are filtered on the
tables' indexed timestamp columns and grouped by bucket in the database, so a refresh reads
at most a bucket-by-group grid of rows, whatever the traffic was.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from control_plane.dashboard.ranges import TimeRange
from control_plane.storage.sql import QueryHandle, QueryResult, run_readonly

__all__ = ["MAX_ROWS", "QUERIES", "HistoryReader", "Rows"]

MAX_ROWS = 20_000  # per query: buckets (720 at most) times nodes or kinds
MAX_EVENT_ROWS = 5_000  # state changes and model events in a range (the newest first when more)


def _bucket(dialect: str, column: str) -> str:
    if dialect == "sqlite":
        return f"CAST(({column} - :t0) / :bucket_s AS INTEGER)"
    return f"CAST(FLOOR(({column} - :t0) / :bucket_s) AS INTEGER)"


def _percentiles(value: str, where: str, dim: str, b: str) -> str:
    """Nearest-rank p50 / p95 / p99 of ``value`` per bucket and ``dim`` (as docs/schema.md's
    examples compute them)."""
    return f"""
WITH s AS (
  SELECT {b} AS b, COALESCE({dim}, '(none)') AS g, {value} AS v
  FROM v_requests
  WHERE started_at >= :since AND started_at < :until AND {where}
), r AS (
  SELECT b, g, v, ROW_NUMBER() OVER (PARTITION BY b, g ORDER BY v) AS rn,
         COUNT(*) OVER (PARTITION BY b, g) AS n
  FROM s
)
SELECT b, g, MAX(n) AS n,
       MIN(CASE WHEN rn * 100 >= n * 50 THEN v END) AS p50,
       MIN(CASE WHEN rn * 100 >= n * 95 THEN v END) AS p95,
       MIN(CASE WHEN rn * 100 >= n * 99 THEN v END) AS p99
FROM r GROUP BY b, g ORDER BY b, g"""


_TTFT = ("ttft_ms", "status = 'ok' AND ttft_ms IS NOT NULL")
# decode rate: the tokens after the first over the time after the first token
_TOKS = (
    "(completion_tokens - 1) * 1000.0 / (duration_ms - ttft_ms)",
    "status = 'ok' AND completion_tokens > 1 AND ttft_ms IS NOT NULL AND duration_ms > ttft_ms",
)
_IN_RANGE = "started_at >= :since AND started_at < :until"


def _queries(dialect: str) -> dict[str, str]:
    rb = _bucket(dialect, "started_unix")
    ab = _bucket(dialect, "at_unix")
    return {
        "requests": f"""
SELECT {rb} AS b, api, status, COUNT(*) AS n, SUM(completion_tokens) AS tokens
FROM v_requests WHERE {_IN_RANGE} GROUP BY 1, 2, 3""",
        "errors": f"""
SELECT {rb} AS b, api, SUBSTR(COALESCE(error, ''), 1, 160) AS error, COUNT(*) AS n
FROM v_requests WHERE {_IN_RANGE} AND status = 'error' GROUP BY 1, 2, 3""",
        "ttft_worker": _percentiles(*_TTFT, "worker", rb),
        "ttft_api": _percentiles(*_TTFT, "api", rb),
        "tokens_worker": _percentiles(*_TOKS, "worker", rb),
        "tokens_api": _percentiles(*_TOKS, "api", rb),
        "cache": f"""
SELECT {rb} AS b, COALESCE(worker, '(none)') AS g, COUNT(*) AS n,
       SUM(CASE WHEN cached_tokens > 0 THEN 1 ELSE 0 END) AS hits,
       SUM(cached_tokens) AS cached, SUM(prompt_tokens) AS prompt
FROM v_requests WHERE {_IN_RANGE} AND status = 'ok' AND cached_tokens IS NOT NULL GROUP BY 1, 2""",
        "routing": f"""
SELECT {ab} AS b, policy, reason, COUNT(*) AS n,
       SUM(CASE WHEN cached_tokens > 0 THEN 1 ELSE 0 END) AS hits
FROM v_routing_decisions WHERE at >= :since AND at < :until GROUP BY 1, 2, 3""",
        "load": f"""
SELECT {ab} AS b, worker AS g, AVG(inflight) AS inflight, MAX(inflight) AS inflight_max,
       AVG(queue_length) AS queued, MAX(queue_length) AS queued_max, AVG(active) AS active
FROM v_heartbeats WHERE at >= :since AND at < :until AND ok AND source = 'poll' GROUP BY 1, 2""",
        "model_events": f"""
SELECT at_unix, model, COALESCE(worker, '') AS worker, event, duration_ms, reason
FROM v_model_events WHERE at >= :since AND at < :until ORDER BY at DESC, id DESC LIMIT {MAX_EVENT_ROWS}""",
        "state_events": f"""
SELECT worker_id, worker, at_unix, from_state, to_state, reason
FROM v_worker_events WHERE at >= :since AND at < :until ORDER BY at DESC, id DESC LIMIT {MAX_EVENT_ROWS}""",
        # each worker's state when the range starts: its last change before it
        "state_before": """
SELECT e.worker_id, e.worker, e.to_state, e.reason
FROM v_worker_events e
WHERE e.id IN (SELECT MAX(id) FROM worker_events WHERE at < :since GROUP BY worker_id)""",
        "workers": "SELECT id, name, state FROM workers ORDER BY id",
    }


QUERIES = tuple(_queries("sqlite"))


@dataclass
class Rows:
    """Every query's rows (as dicts), and the queries whose rows were cut."""

    results: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    truncated: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return self.results.get(name, [])


class HistoryReader:
    """Runs the fixed queries for one range, on the caller's thread (an admin-SQL thread:
    :class:`~control_plane.storage.sql.SqlExecutor`), within one time limit for them all."""

    def __init__(
        self,
        url: str,
        dialect: str,
        *,
        timeout_s: float,
        max_result_bytes: int,
        run: Callable[..., QueryResult] = run_readonly,
    ) -> None:
        self.url = url
        self.queries = _queries(dialect)
        self.timeout_s = timeout_s
        self.max_result_bytes = max_result_bytes
        self._run = run

    def read(self, span: TimeRange, handle: QueryHandle | None = None) -> Rows:
        """Every query over ``span``; a time limit, an interruption or an SQL error raise as
        ``/admin/sql``'s do (400, 503)."""
        handle = handle or QueryHandle()
        params = {
            "since": span.db_since(),
            "until": span.db_until(),
            "t0": float(span.since),
            "bucket_s": float(span.bucket_s),
        }
        started = time.monotonic()
        deadline = started + self.timeout_s
        out = Rows()
        for name, sql in self.queries.items():
            used = {k: v for k, v in params.items() if f":{k}" in sql}
            result = self._run(
                self.url,
                sql,
                used,
                MAX_ROWS,
                timeout_s=max(0.05, deadline - time.monotonic()),
                max_result_bytes=self.max_result_bytes,
                handle=handle,
            )
            out.results[name] = [dict(zip(result.columns, row, strict=False)) for row in result.rows]
            if result.truncated:
                out.truncated.append(name)
        out.elapsed_ms = (time.monotonic() - started) * 1000.0
        return out
