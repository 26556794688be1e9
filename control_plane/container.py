"""The :class:`ControlPlane` record: the app's parts, made once by the lifespan, read by
the API modules (``request.app.state.cp``)."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from control_plane.config import Settings
from control_plane.fleet.breaker import CircuitBreaker
from control_plane.fleet.discovery import DnsDiscovery
from control_plane.fleet.health import HealthPoller
from control_plane.fleet.leases import LeaseManager
from control_plane.fleet.registry import Fleet
from control_plane.fleet.served_names import ServedNames
from control_plane.fleet.store import WorkerStore
from control_plane.lifecycle.admin import ModelAdmin
from control_plane.lifecycle.manager import ModelManager
from control_plane.lifecycle.views import ModelViews
from control_plane.metrics import ControlPlaneMetrics
from control_plane.nodes.client import NodeClient
from control_plane.serving.service import GenerationService
from control_plane.storage.db import Database
from control_plane.storage.retention import RetentionLoop
from control_plane.storage.sql import SqlExecutor
from control_plane.storage.writer import BatchWriter

__all__ = ["ControlPlane"]


@dataclass(frozen=True)
class ControlPlane:
    """Everything a request handler may need, made once per app."""

    settings: Settings
    db: Database
    writer: BatchWriter
    store: WorkerStore
    nodes: NodeClient
    breaker: CircuitBreaker
    leases: LeaseManager
    poller: HealthPoller
    fleet: Fleet
    models: ModelManager
    model_views: ModelViews
    model_admin: ModelAdmin
    service: GenerationService
    metrics: ControlPlaneMetrics
    http: aiohttp.ClientSession  # for image URLs (OpenAI API), when they are allowed
    sql: SqlExecutor  # admin SQL's own threads
    retention: RetentionLoop
    names: ServedNames  # served names <-> Triton models
    discovery: DnsDiscovery | None = None
