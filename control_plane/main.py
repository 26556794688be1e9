"""The FastAPI application: its parts are made and closed by the lifespan."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
from fastapi import FastAPI
from sqlalchemy import update

from control_plane.config import Settings
from control_plane.db import BatchWriter, Database
from control_plane.discovery import DnsDiscovery
from control_plane.errors import ServiceError
from control_plane.fleet import Fleet
from control_plane.health import HealthPoller
from control_plane.leases import LeaseManager
from control_plane.lifecycle import ModelManager
from control_plane.metrics import ControlPlaneMetrics
from control_plane.proxy import TritonPool
from control_plane.retention import RetentionLoop
from control_plane.routing import Router
from control_plane.schema import RequestRecord, utcnow
from control_plane.service import GenerationService
from control_plane.sql import SqlExecutor
from control_plane.store import WorkerStore
from control_plane.worker_addresses import AddressPolicy
from llava_node.gc_freeze import freeze_startup_objects, unfreeze_at_shutdown

__all__ = ["ControlPlane", "create_app"]

log = logging.getLogger(__name__)


@dataclass
class ControlPlane:
    """Everything a request handler may need, made once per app."""

    settings: Settings
    db: Database
    writer: BatchWriter
    store: WorkerStore
    poller: HealthPoller
    fleet: Fleet
    pool: TritonPool
    router: Router
    service: GenerationService
    metrics: ControlPlaneMetrics
    http: aiohttp.ClientSession
    leases: LeaseManager
    models: ModelManager
    discovery: DnsDiscovery | None = None
    sql: SqlExecutor | None = None  # admin SQL's own threads (api/admin.py)
    retention: RetentionLoop | None = None


def _fail_abandoned_requests(db: Database, replica: str) -> int:
    """Requests this replica left 'running' when it died are failed, not left forever."""
    with db.session() as s:
        result = s.execute(
            update(RequestRecord)
            .where(RequestRecord.status == "running", RequestRecord.replica == replica)
            .values(
                status="error", error="the control plane stopped before the request ended", ended_at=utcnow()
            )
        )
        return int(getattr(result, "rowcount", 0) or 0)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database and clients, load and poll the fleet; close all at exit."""
    settings: Settings = app.state.settings
    db = Database(settings.sqlalchemy_url)
    await asyncio.to_thread(db.create_schema)
    abandoned = await asyncio.to_thread(_fail_abandoned_requests, db, settings.replica_name)
    if abandoned:
        log.warning("marked %d requests left running by a previous run as failed", abandoned)
    writer = BatchWriter(db, settings.db_flush_interval_s, settings.db_batch_size)
    store = WorkerStore(db, writer, replica=settings.replica_name)
    await asyncio.to_thread(store.load)
    http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=512, limit_per_host=8))
    leases = LeaseManager(db, settings.replica_name, settings.lease_period_s)
    pool = TritonPool()
    poller = HealthPoller(store, settings, http, leases=leases)
    metrics = ControlPlaneMetrics()
    writer.on_lost = lambda reason, rows: metrics.db_rows_lost.labels(reason=reason).inc(rows)
    sql = SqlExecutor(
        settings.sql_max_concurrent, lambda outcome: metrics.admin_sql.labels(outcome=outcome).inc()
    )
    retention = RetentionLoop.from_settings(
        db, settings, lambda table, rows: metrics.retention_deleted.labels(table=table).inc(rows)
    )
    router = Router(settings.dispatch_policy)
    fleet = Fleet(store, poller, pool, http, AddressPolicy(settings.worker_allowed_hosts))
    poller.on_removed = fleet.forget  # workers removed through another replica
    service = GenerationService(settings, store, router, pool, writer, metrics)
    poller.breaker = service.breaker
    models = ModelManager(settings, store, writer, http, metrics)
    service.ensure_loaded = models.ensure_loaded
    discovery = (
        DnsDiscovery(fleet, settings.discovery_dns, settings.discovery_interval_s)
        if settings.discovery_dns
        else None
    )
    cp = ControlPlane(
        settings,
        db,
        writer,
        store,
        poller,
        fleet,
        pool,
        router,
        service,
        metrics,
        http,
        leases,
        models,
        discovery,
        sql=sql,
        retention=retention,
    )
    app.state.cp = cp
    for url in settings.workers:
        try:
            await fleet.register(url, source="static", poll=False)
        except ServiceError as exc:  # a contradiction in the operator's own settings
            raise RuntimeError(f"static worker {url}: {exc.message}") from None
    await poller.poll_all()
    poller.start()
    if discovery is not None:
        discovery.start()
    await models.start()
    retention.start()
    # SIGTERM interrupts admin queries at once (uvicorn waits for open requests before the lifespan ends)
    restore_signals = sql.interrupt_on_signals(asyncio.get_running_loop())
    freeze_startup_objects()  # full collections had stalled the event loop 17-105 ms
    log.info("control plane %s up: %d workers, database %s", settings.replica_name, len(store.all()), db.url)
    try:
        yield
    finally:
        await sql.aclose()  # interrupts running admin queries: nothing below waits for one
        restore_signals()
        await retention.stop()
        await models.stop()
        if discovery is not None:
            await discovery.stop()
        await poller.stop()
        try:  # the other replicas take the polling over at once instead of after the lease period
            await asyncio.to_thread(leases.release_all)
        except Exception as exc:
            log.warning("could not release the poll leases: %s", exc)
        await service.drain()  # pending cancellations, bounded
        await pool.close()
        await http.close()
        await asyncio.to_thread(writer.close)
        db.dispose()
        unfreeze_at_shutdown()


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the control-plane app (nothing starts until its lifespan runs)."""
    from control_plane.api import admin, errors, llava, openai
    from control_plane.api.limits import BodySizeLimit

    settings = settings or Settings()
    app = FastAPI(
        title="LLaVA control plane",
        description="Routes LLaVA requests to Triton nodes; speaks LLaVA's controller protocol.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    errors.install(app)
    app.include_router(llava.router)
    app.include_router(llava.workers_router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(admin.public)
    return app
