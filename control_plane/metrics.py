"""The control plane's own Prometheus metrics (served at ``/metrics``)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["ControlPlaneMetrics"]


class ControlPlaneMetrics:
    """Counters and histograms in a registry of their own (one per app)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "cp_requests",
            "Requests proxied, by API, model and outcome",
            ["api", "model", "status"],
            registry=self.registry,
        )
        self.retries = Counter(
            "cp_retries", "Requests retried on another node before streaming", registry=self.registry
        )
        self.migrations = Counter(
            "cp_migrations",
            "Streams continued on another node after their node failed mid-stream, by outcome "
            "(resumed, failed: that node failed too, no_node: none could take it)",
            ["outcome"],
            registry=self.registry,
        )
        self.migration_pause = Histogram(
            "cp_migration_pause_seconds",
            "A migrated stream's pause: from its last token before the break to the first after it",
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
            registry=self.registry,
        )
        self.ttft = Histogram(
            "cp_time_to_first_token_seconds",
            "Time to first token through the control plane",
            ["api"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.tokens = Counter(
            "cp_completion_tokens", "Tokens streamed to clients", ["api"], registry=self.registry
        )
        self.inflight = Gauge("cp_inflight_requests", "Streams open now", registry=self.registry)
        # Routing: one decision per attempt (serving/routing.py REASONS); prompt tokens of
        # the requests served and those the nodes served from their prefix caches.
        self.routing_decisions = Counter(
            "cp_routing_decisions",
            "Routing decisions (one per attempt), by policy and reason",
            ["policy", "reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "cp_prompt_tokens",
            "Prompt tokens of the requests served, by API",
            ["api"],
            registry=self.registry,
        )
        self.cached_tokens = Counter(
            "cp_cached_prompt_tokens",
            "Prompt tokens the nodes served from their prefix caches, by API",
            ["api"],
            registry=self.registry,
        )
        self.affinity_blocks = Gauge(
            "cp_affinity_index_blocks", "Blocks the cache_aware prefix index holds", registry=self.registry
        )
        self.model_loads = Counter(
            "cp_model_loads",
            "Model loads on nodes, by model and outcome",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.model_load_seconds = Histogram(
            "cp_model_load_seconds",
            "Time to load a model on a node (the cold-start time)",
            buckets=(0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600),
            registry=self.registry,
        )
        self.model_unloads = Counter(
            "cp_model_unloads", "Models unloaded from nodes, by model", ["model"], registry=self.registry
        )
        # Storage: rows the batch writer could not write (by reason, see db.LOSS_REASONS),
        # rows deleted by retention (by table), admin SQL queries (by outcome).
        self.db_rows_lost = Counter(
            "cp_db_rows_lost",
            "Rows never written to the database: queue_full, write_failed (the row itself), "
            "db_unavailable (its batch given up)",
            ["reason"],
            registry=self.registry,
        )
        for reason in ("queue_full", "write_failed", "db_unavailable"):
            self.db_rows_lost.labels(reason=reason)  # every reason at 0 from the start
        self.retention_deleted = Counter(
            "cp_retention_deleted_rows",
            "Rows deleted by retention, by table",
            ["table"],
            registry=self.registry,
        )
        self.admin_sql = Counter(
            "cp_admin_sql_queries",
            "Admin SQL queries, by outcome: ok, error, timeout, busy (refused at the limit), interrupted",
            ["outcome"],
            registry=self.registry,
        )
