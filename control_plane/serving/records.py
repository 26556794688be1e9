"""What a generation leaves in the database and the metrics: its ``requests`` row, one
``routing_decisions`` row per attempt and one ``migrations`` row per break, written through
the batch writer (never on the request's path), and the routing, migration and
prompt-token counters."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime

from control_plane.metrics import ControlPlaneMetrics
from control_plane.serving.migration import Break
from control_plane.serving.routing import Decision
from control_plane.storage.schema import Migration, RequestRecord, RoutingDecision, utcnow
from control_plane.storage.writer import BatchWriter

__all__ = ["RequestLog", "RequestState", "node_request_id"]


def node_request_id(request_id: str, key: str) -> str:
    """The Triton request id a request's nodes see: its ``request_id`` (the client's
    ``X-Request-Id``, or generated) and the first 8 characters of its ``requests.id``.

    Unique per request, so a cancel call that reaches a node late (one that was stopped,
    then went on) stops only the request it was meant for, never a later one with the same
    client id (a client's retry, on the node the first one left)."""
    return f"{request_id}.{key[:8]}"


@dataclass
class RequestState:
    """One request while it runs: what its ``requests`` row will say."""

    key: str  # requests.id
    node_id: str  # the Triton request id its nodes see (node_request_id)
    started: float  # monotonic
    first_token: float | None = None
    first_token_at: datetime | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    cached_tokens: int | None = None
    finish_reason: str | None = None
    attempts: int = 0
    migrations: int = 0
    worker_id: int | None = None
    decision: Decision | None = None  # the last attempt's
    decision_key: str | None = None  # its routing_decisions.id


class RequestLog:
    """Writes requests and their routing decisions (the batch writer) and counts them."""

    def __init__(self, writer: BatchWriter, metrics: ControlPlaneMetrics, replica: str) -> None:
        self.writer = writer
        self.metrics = metrics
        self.replica = replica

    def started(self, rec: RequestState, request_id: str, api: str, model: str) -> None:
        """The request arrived: its row, ``running``."""
        self.writer.insert(
            RequestRecord,
            {
                "id": rec.key,
                "request_id": request_id,
                "api": api,
                "model": model[:256],
                "worker_id": None,
                "replica": self.replica,
                "started_at": utcnow(),
                "status": "running",
                "attempts": 0,
            },
        )

    def routed(self, rec: RequestState, model: str, decision: Decision) -> None:
        """An attempt went to ``decision.worker``: one ``routing_decisions`` row (reason
        ``retry`` after another node failed the request before its first token,
        ``migration`` after one failed mid-stream)."""
        if rec.attempts > 1:
            decision = decision.but("migration" if rec.migrations else "retry")
        rec.decision, rec.decision_key, rec.worker_id = decision, uuid.uuid4().hex, decision.worker.id
        affinity_worker, affinity_hit = decision.affinity
        self.writer.insert(
            RoutingDecision,
            {
                "id": rec.decision_key,
                "request_id": rec.key,
                "attempt": rec.attempts,
                "at": utcnow(),
                "model": model[:256],
                "policy": decision.policy,
                "reason": decision.reason,
                "worker_id": decision.worker.id,
                "expected_hit_tokens": decision.expected_hit_tokens,
                "affinity_worker_id": affinity_worker,
                "affinity_hit_tokens": affinity_hit,
                "candidate_count": decision.candidate_count,
                "candidates": list(decision.candidates),
            },
        )
        self.metrics.routing_decisions.labels(decision.policy, decision.reason).inc()

    def ended(self, rec: RequestState, api: str, status: str, error: str | None) -> None:
        """The request ended: its row and its last decision's ``cached_tokens``."""
        ttft_ms = (rec.first_token - rec.started) * 1000.0 if rec.first_token is not None else None
        self.writer.update(
            RequestRecord,
            {
                "id": rec.key,
                "worker_id": rec.worker_id,
                "first_token_at": rec.first_token_at,
                "ttft_ms": ttft_ms,
                "ended_at": utcnow(),
                "prompt_tokens": rec.prompt_tokens,
                "completion_tokens": rec.completion_tokens,
                "cached_tokens": rec.cached_tokens,
                "status": status,
                "finish_reason": rec.finish_reason,
                "attempts": rec.attempts,
                "migrations": rec.migrations,
                "error": error[:2000] if error else None,
            },
        )
        if rec.decision_key is not None and rec.cached_tokens is not None:
            self.writer.update(RoutingDecision, {"id": rec.decision_key, "cached_tokens": rec.cached_tokens})
        if rec.prompt_tokens:
            self.metrics.prompt_tokens.labels(api).inc(rec.prompt_tokens)
        if rec.cached_tokens:
            self.metrics.cached_tokens.labels(api).inc(rec.cached_tokens)

    def migration(
        self, rec: RequestState, model: str, brk: Break, outcome: str, pause_s: float | None
    ) -> None:
        """A break's continuation ``resumed`` (after ``pause_s``), ``failed`` or found
        ``no_node``: its ``migrations`` row and counters."""
        self.writer.insert(
            Migration,
            {
                "id": brk.key,
                "request_id": rec.key,
                "at": brk.at,
                "model": model[:256],
                "from_worker_id": brk.from_worker,
                "to_worker_id": brk.to_worker,
                "after_tokens": brk.after_tokens,
                "reason": brk.reason,
                "error": brk.error[:2000],
                "outcome": outcome,
                "pause_ms": pause_s * 1000.0 if pause_s is not None else None,
            },
        )
        self.metrics.migrations.labels(outcome).inc()
        if pause_s is not None:
            self.metrics.migration_pause.observe(pause_s)
