"""The control plane's settings: one object, every knob an environment variable.

Each field reads ``LLAVA_CP_<FIELD>`` (for example ``LLAVA_CP_DATABASE_URL``);
list fields take JSON (``LLAVA_CP_WORKERS='["http://10.0.0.5:8000"]'``) or a
comma-separated string.
"""

from __future__ import annotations

import ipaddress
import socket
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from control_plane.fleet.addresses import AddressPolicy

__all__ = ["DispatchPolicy", "Settings"]

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class DispatchPolicy(StrEnum):
    """How the control plane picks a node for a request."""

    CACHE_AWARE = "cache_aware"
    SHORTEST_QUEUE = "shortest_queue"
    LOTTERY = "lottery"
    ROUND_ROBIN = "round_robin"
    POWER_OF_TWO = "power_of_two"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _split_list(value: Any) -> Any:
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            import json

            return json.loads(text)
        return [v.strip() for v in text.split(",") if v.strip()]
    return value


class Settings(BaseSettings):
    """Control-plane configuration (environment variables ``LLAVA_CP_*``)."""

    model_config = SettingsConfigDict(env_prefix="LLAVA_CP_", extra="ignore")

    # -- serving ------------------------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = 21001  # LLaVA's controller port, so its clients find us unchanged
    public_url: str = Field(
        "",
        description="Base URL clients use to reach this control plane; worker addresses handed "
        "out by /get_worker_address start with it. Empty: taken from each request.",
    )
    instance_name: str = Field(
        "", description="Name of this replica in the database; default <hostname>:<port>, unique per process"
    )

    # -- storage --------------------------------------------------------------------------
    data_dir: Path = PROJECT_ROOT / "var" / "data"
    database_url: str = Field("", description="SQLAlchemy URL; empty: SQLite file in data_dir")
    db_flush_interval_s: float = 0.25
    db_batch_size: int = 500
    heartbeat_retention_days: float = Field(
        14.0, ge=0, description="Delete heartbeats older than this (control_plane/retention.py); 0: keep all"
    )
    request_retention_days: float = Field(
        30.0, ge=0, description="Delete requests rows that started longer ago than this; 0: keep all"
    )
    retention_interval_s: float = Field(600.0, gt=0, description="How often old rows are deleted")
    retention_batch_rows: int = Field(
        5000, ge=1, description="Most rows one retention statement deletes (one short transaction each)"
    )
    retention_pause_s: float = Field(
        0.05, ge=0, description="Pause between retention statements, so that the batch writer gets in"
    )
    sql_timeout_s: float = Field(
        30.0, gt=0, description="Longest an admin SQL query (API and CLI) may run; then it is stopped (400)"
    )
    sql_max_result_bytes: int = Field(
        8 * 1024 * 1024,
        ge=1024,
        description="Most bytes of rows (as JSON) an admin SQL answer holds; more are cut (truncated)",
    )
    sql_max_concurrent: int = Field(
        2,
        ge=1,
        description="Admin SQL queries run at once, on threads of their own; one more is answered 429",
    )

    # -- fleet -----------------------------------------------------------------------------
    workers: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Node base URLs registered at start (static fleet)"
    )
    poll_interval_s: float = 2.0
    poll_timeout_s: float = 1.5
    unhealthy_after_failures: int = 2
    offline_after_s: float = 30.0  # LLaVA drops a worker silent for 30 s
    offline_worker_ttl_s: float = Field(
        86400.0,
        ge=0,
        description="Remove a worker offline and not seen this long (a removed event); 0: never",
    )
    lease_period_s: float = Field(
        10.0,
        description="How long a replica's claim to poll a node lasts without renewal; another replica "
        "takes the polling over within this time when the holder dies",
    )
    discovery_dns: str = Field(
        "",
        description="host:port of a DNS name (e.g. a Kubernetes headless Service) whose A records are "
        "the nodes' addresses; empty: no DNS discovery",
    )
    discovery_interval_s: float = 10.0

    # -- routing and proxying ------------------------------------------------------------
    grpc_experiments: str = Field(
        "-event_engine_client",
        description="GRPC_EXPERIMENTS for this process's gRPC clients (set by `serve` and `stack` before "
        "gRPC starts, unless the environment already sets GRPC_EXPERIMENTS; empty: gRPC's defaults). "
        "The default turns off gRPC's EventEngine client, which costs a third more CPU per streamed "
        "token under asyncio (docs/performance.md)",
    )
    dispatch_policy: DispatchPolicy = Field(
        DispatchPolicy.CACHE_AWARE,
        description="cache_aware (the node likely to hold the request's prefix in its KV cache, unless "
        "too loaded), shortest_queue, lottery, round_robin or power_of_two (serving/routing.py)",
    )
    cache_aware_load_threshold: float = Field(
        4.0,
        ge=0,
        description="cache_aware: a node whose load (this control plane's streams to it per unit of "
        "speed) exceeds the least loaded candidate's by more than this is passed over for its prefix",
    )
    cache_aware_min_match: float = Field(
        0.5,
        ge=0,
        le=1,
        description="cache_aware: a node's expected hit counts only from this share of the request's "
        "prompt on (a shared system prompt before a new image is not worth a queue); below it, the "
        "least loaded node",
    )
    cache_aware_block_chars: int = Field(
        64, ge=16, le=4096, description="cache_aware: characters of prompt text per block of the prefix index"
    )
    cache_aware_index_blocks: int = Field(
        100_000,
        ge=1,
        le=10_000_000,
        description="cache_aware: most blocks the prefix index remembers (about 200 bytes each), least "
        "recently routed first out",
    )
    first_token_timeout_s: float = 120.0
    stall_timeout_s: float = 60.0  # a stream with no token for this long is ended and cancelled
    cancel_retry_s: float = 60.0  # how long to keep asking a silent node to cancel
    max_new_tokens_cap: int = 1024  # LLaVA caps max_new_tokens at 1024
    max_attempts: int = 3  # nodes tried for a request that fails before its first token
    retry_backoff_s: float = 0.05
    max_migrations: int = Field(
        2,
        ge=0,
        le=16,
        description="Times a stream whose node fails after streaming began is continued on another node "
        "(the tokens sent so far go with it; 0: such a stream ends with an error)",
    )
    frozen_stream_s: float = Field(
        1.0,
        gt=0,
        le=600,
        description="A stream whose node the poller took out of routing is continued elsewhere once it "
        "got no token for this long (the stall timeout stays the last resort for a node that looks healthy)",
    )
    max_inflight_per_worker: int = 128
    max_waiting: int = 512
    queue_timeout_s: float = 30.0
    breaker_threshold: int = 3
    breaker_cooldown_s: float = 5.0
    max_body_bytes: int = 64 * 1024 * 1024
    max_images: int = 8
    max_image_bytes: int = 20 * 1024 * 1024
    max_prompt_bytes: int = Field(
        1024 * 1024,
        description="Most bytes of prompt text (LLaVA) or of all message texts (OpenAI) a request may carry; "
        "the node also bounds prompts by its model's context, before tokenizing",
    )
    client_header_timeout_s: float = Field(
        10.0, description="A connection must send its request line and headers within this time"
    )
    client_body_timeout_s: float = Field(60.0, description="A request body must arrive within this time")
    client_send_timeout_s: float = Field(
        30.0,
        description="A client that reads nothing of its response for this long (the connection's send "
        "buffer stays full) is disconnected: its slot is freed and its generation cancelled",
    )
    image_url_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Hosts the OpenAI API may fetch http(s) image URLs from; empty: fetching is off",
    )
    image_fetch_timeout_s: float = 10.0

    # -- model lifecycle (nodes in explicit model-control mode; see lifecycle.py) -----------
    default_model: str = Field(
        "llava", description="Keeps one replica loaded unless model_min_replicas says otherwise"
    )
    model_aliases: dict[str, str] = Field(
        default_factory=dict,
        description='Triton model -> the name /list_models and /v1/models show, JSON, e.g. {"llava": '
        '"llava-v1.5-7b"} (LLaVA\'s web UI picks its prompt format by it); default: the name its nodes report',
    )
    cold_start_timeout_s: float = Field(
        300.0,
        description="How long a request for a model loaded nowhere waits for its load; 0: no loading on demand",
    )
    model_load_timeout_s: float = Field(900.0, description="Longest a node's load call may take")
    load_retry_after_s: float = Field(
        30.0, description="After a model failed to load on every eligible node, fail at once for this long"
    )
    idle_ttl_s: float = Field(600.0, description="Unload a model idle this long on a node; 0: never")
    scale_out_inflight: float = Field(
        4.0, description="Load another replica when in-flight requests per replica exceed this; 0: never"
    )
    lifecycle_interval_s: float = Field(2.0, description="How often idle, minimum and scale-out checks run")
    model_min_replicas: dict[str, int] = Field(
        default_factory=dict, description='Per model, e.g. {"llava-13b": 1}; default 0 (1 for default_model)'
    )
    model_max_replicas: dict[str, int] = Field(default_factory=dict, description="Per model; default below")
    default_max_replicas: int = Field(0, description="Most replicas per model; 0: one per eligible node")
    model_labels: dict[str, dict[str, str]] = Field(
        default_factory=dict,
        description='Worker labels a model needs, e.g. {"llava-13b": {"gpu": "h100"}}',
    )
    pinned_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Models never unloaded (admins pin more at run time)"
    )

    # -- security --------------------------------------------------------------------------
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Bearer tokens accepted on inference APIs; empty: open"
    )
    llava_api_requires_key: bool = Field(
        False,
        description="Also require an API key on LLaVA's protocol (LLaVA's own clients send none)",
    )
    admin_token: str = Field(
        "", description="Bearer token for /admin; empty: admin is open (only allowed on a loopback host)"
    )
    allow_open_admin: bool = Field(
        False,
        description="Serve an open admin API (no admin token) on a non-loopback host; for trusted networks",
    )
    worker_token: str = Field(
        "",
        description="Bearer token a worker sends to /register_worker and /receive_heart_beat (the admin "
        "token works too); with neither set, those endpoints are off unless open_worker_registration is set",
    )
    open_worker_registration: bool = Field(
        False,
        description="Accept /register_worker and /receive_heart_beat without a credential (LLaVA's own "
        "workers send none); for trusted networks. A registered worker's addresses still change only by admins",
    )
    worker_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["loopback", "private"],
        description="Hosts and networks node addresses may point at (see control_plane/worker_addresses.py): "
        "loopback, private, CIDR networks, addresses, host names, *.domain, or * for any",
    )

    @field_validator(
        "workers",
        "api_keys",
        "image_url_allowed_hosts",
        "pinned_models",
        "worker_allowed_hosts",
        mode="before",
    )
    @classmethod
    def _lists(cls, value: Any) -> Any:
        return _split_list(value)

    @field_validator("worker_allowed_hosts", mode="after")
    @classmethod
    def _valid_hosts(cls, value: list[str]) -> list[str]:
        AddressPolicy(value)  # raises ValueError naming a malformed entry
        return value

    @model_validator(mode="after")
    def _no_open_admin_when_exposed(self) -> Settings:
        # An open admin API adds workers, removes them and reads the history: on an address
        # other hosts reach it needs a token, unless an operator says the network is trusted.
        if not self.admin_token and not self.allow_open_admin and not _is_loopback(self.host):
            raise ValueError(
                f"the control plane would listen on {self.host} with an open admin API: set "
                "LLAVA_CP_ADMIN_TOKEN (or LLAVA_CP_ALLOW_OPEN_ADMIN=true on a trusted network)"
            )
        return self

    @model_validator(mode="after")
    def _lease_outlives_a_round(self) -> Settings:
        # Leases are renewed once a poll round; a round lasts up to the poll interval plus
        # the poll timeout, so a shorter lease would lapse between renewals.
        if self.lease_period_s <= self.poll_interval_s + self.poll_timeout_s:
            raise ValueError(
                f"lease_period_s ({self.lease_period_s:g}) must be longer than poll_interval_s + "
                f"poll_timeout_s ({self.poll_interval_s + self.poll_timeout_s:g})"
            )
        return self

    @property
    def sqlalchemy_url(self) -> str:
        """The database URL, defaulting to a SQLite file in ``data_dir``."""
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'control_plane.db').resolve()}"

    @property
    def replica_name(self) -> str:
        """This control plane's name in the database (leases, requests, heartbeats).

        Unique per process by default: the host name tells machines (and containers,
        and Kubernetes pods) apart, the port tells processes on one host apart. A
        replica restarted with the same name takes back what its earlier run left.
        """
        return self.instance_name or f"{socket.gethostname()}:{self.port}"
