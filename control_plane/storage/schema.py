"""The worker information store's tables (SQLAlchemy 2.0 typed models).

This schema is a public interface: admins query it with plain SQL. It is documented,
with example queries, in ``docs/schema.md``; change it only by adding columns.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

__all__ = [
    "Base",
    "Heartbeat",
    "Migration",
    "ModelEvent",
    "PollLease",
    "RequestRecord",
    "RoutingDecision",
    "Worker",
    "WorkerEvent",
    "utcnow",
]


def utcnow() -> datetime:
    """The current time in UTC, as stored in every timestamp column."""
    return datetime.now(UTC).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of the store's tables."""


class Worker(Base):
    """A Triton node: where it listens, what it serves, its state."""

    __tablename__ = "workers"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(512), unique=True, doc="base URL, as registered")
    http_url: Mapped[str] = mapped_column(String(512))
    grpc_url: Mapped[str] = mapped_column(String(512), doc="host:port of the gRPC endpoint")
    metrics_url: Mapped[str] = mapped_column(String(512), default="")
    labels: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    state: Mapped[str] = mapped_column(String(32), default="unknown")
    models: Mapped[dict[str, Any]] = mapped_column(
        JSON, default=dict, doc="model name -> {ready: bool, state: str}"
    )
    queue_length: Mapped[int] = mapped_column(Integer, default=0, doc="requests waiting on the node")
    inflight: Mapped[int] = mapped_column(Integer, default=0, doc="this control plane's open streams")
    speed: Mapped[int] = mapped_column(Integer, default=1, doc="relative speed, for the lottery policy")
    source: Mapped[str] = mapped_column(String(32), default="admin", doc="admin, static, llava, ...")
    registered_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    last_seen_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    removed_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)


class Heartbeat(Base):
    """One poll of a node (or one heartbeat it pushed)."""

    __tablename__ = "heartbeats"
    __table_args__ = (Index("ix_heartbeats_worker_at", "worker_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[int] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)
    ok: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    server_ready: Mapped[bool] = mapped_column(Boolean, default=False)
    models: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    queue_length: Mapped[int] = mapped_column(Integer, default=0)
    active: Mapped[int] = mapped_column(Integer, default=0, doc="requests generating on the node")
    inflight: Mapped[int] = mapped_column(Integer, default=0)
    source: Mapped[str] = mapped_column(String(16), default="poll", doc="poll or push")
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    replica: Mapped[str | None] = mapped_column(
        String(128), nullable=True, doc="control plane that polled (or received the push)"
    )


class WorkerEvent(Base):
    """A change of a worker's state, with its reason."""

    __tablename__ = "worker_events"
    __table_args__ = (Index("ix_worker_events_worker_at", "worker_id", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    worker_id: Mapped[int] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"))
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    from_state: Mapped[str] = mapped_column(String(32))
    to_state: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(Text, default="")
    replica: Mapped[str | None] = mapped_column(
        String(128), nullable=True, doc="control plane that saw the change"
    )


class RequestRecord(Base):
    """One request proxied to a node, from arrival to its end."""

    __tablename__ = "requests"
    __table_args__ = (
        Index("ix_requests_started_at", "started_at"),
        Index("ix_requests_worker_started", "worker_id", "started_at"),
        Index("ix_requests_status", "status"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, doc="uuid, made by the control plane")
    request_id: Mapped[str] = mapped_column(
        String(128),
        index=True,
        doc="the client's X-Request-Id, or generated (Triton gets '<request_id>.<id[:8]>')",
    )
    api: Mapped[str] = mapped_column(String(16), doc="llava or openai")
    model: Mapped[str] = mapped_column(String(256))
    worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True
    )
    replica: Mapped[str] = mapped_column(String(128), default="", doc="control plane that served it")
    started_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    first_token_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    ttft_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    cached_tokens: Mapped[int | None] = mapped_column(
        Integer, nullable=True, doc="prompt tokens the node served from its prefix cache"
    )
    status: Mapped[str] = mapped_column(String(16), default="running", doc="running, ok, error, cancelled")
    finish_reason: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=1)
    migrations: Mapped[int | None] = mapped_column(
        Integer, nullable=True, default=0, doc="times the stream was continued on another node"
    )
    error: Mapped[str | None] = mapped_column(Text, nullable=True)


class RoutingDecision(Base):
    """One attempt of a request: which node the router chose, why, among which candidates."""

    __tablename__ = "routing_decisions"
    __table_args__ = (
        Index("ix_routing_decisions_at", "at"),
        Index("ix_routing_decisions_worker_at", "worker_id", "at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, doc="uuid, made by the control plane")
    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True, doc="requests.id (not requests.request_id)"
    )
    attempt: Mapped[int] = mapped_column(Integer, default=1, doc="1 for the first node tried")
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    model: Mapped[str] = mapped_column(String(256))
    policy: Mapped[str] = mapped_column(String(32))
    reason: Mapped[str] = mapped_column(String(32), doc="affinity, load, least_loaded, only_choice, ...")
    worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True, doc="the node chosen"
    )
    expected_hit_tokens: Mapped[int] = mapped_column(Integer, default=0, doc="the chosen node's")
    affinity_worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True, doc="the longest expected hit's node"
    )
    affinity_hit_tokens: Mapped[int] = mapped_column(Integer, default=0)
    candidate_count: Mapped[int] = mapped_column(Integer, default=1)
    candidates: Mapped[list[dict[str, Any]]] = mapped_column(
        JSON, default=list, doc="[{worker_id, load, expected_hit_tokens}], the chosen one first"
    )
    cached_tokens: Mapped[int | None] = mapped_column(
        Integer, nullable=True, doc="what the node reported, once the request ended"
    )


class Migration(Base):
    """A stream continued on another node after its node failed mid-stream."""

    __tablename__ = "migrations"
    __table_args__ = (Index("ix_migrations_at", "at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, doc="uuid, made by the control plane")
    request_id: Mapped[str] = mapped_column(
        ForeignKey("requests.id", ondelete="CASCADE"), index=True, doc="requests.id (not requests.request_id)"
    )
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, doc="when the break was seen")
    model: Mapped[str] = mapped_column(String(256))
    from_worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True, doc="the node that failed"
    )
    to_worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True, doc="the node that continued (or tried)"
    )
    after_tokens: Mapped[int] = mapped_column(Integer, doc="tokens the client had been sent before the break")
    reason: Mapped[str] = mapped_column(
        String(32), doc="unreachable (connection lost), node_error, stalled, node_left (out of routing)"
    )
    error: Mapped[str] = mapped_column(Text, default="", doc="what the failed node's stream said")
    outcome: Mapped[str] = mapped_column(
        String(16),
        doc="resumed (the new node streamed on), failed (it failed too), no_node (none could take it)",
    )
    pause_ms: Mapped[float | None] = mapped_column(
        Float, nullable=True, doc="from the last token before the break to the first after it (resumed only)"
    )


class ModelEvent(Base):
    """A model lifecycle step on a node: load requested, loaded, load failed, unloaded."""

    __tablename__ = "model_events"
    __table_args__ = (Index("ix_model_events_model_at", "model", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    model: Mapped[str] = mapped_column(String(256))
    worker_id: Mapped[int | None] = mapped_column(
        ForeignKey("workers.id", ondelete="SET NULL"), nullable=True
    )
    at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    event: Mapped[str] = mapped_column(String(32), doc="load_requested, loaded, load_failed, unloaded")
    duration_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")


class PollLease(Base):
    """Which control-plane replica polls a node, until when.

    A replica polls a node only while it holds the node's lease; it renews the lease
    every poll round, and another replica may take it once it has expired.
    """

    __tablename__ = "poll_leases"

    worker_id: Mapped[int] = mapped_column(ForeignKey("workers.id", ondelete="CASCADE"), primary_key=True)
    holder: Mapped[str] = mapped_column(String(128), doc="the replica polling the node")
    acquired_at: Mapped[datetime] = mapped_column(DateTime, doc="when this holder took the lease")
    expires_at: Mapped[datetime] = mapped_column(DateTime, index=True, doc="renewed every poll round")
