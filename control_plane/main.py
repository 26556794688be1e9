"""The FastAPI application: ``create_app(settings, node_client=None)``.

Nothing starts until the lifespan runs. It builds the parts leaves first, each given what
it needs by keyword (nothing is wired by assignment afterwards), starts the background
loops, and at exit closes everything in the reverse order. The node client is the one
seam to the nodes: the real one by default, an in-memory one in the fast tests.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import aiohttp
from fastapi import FastAPI

from control_plane.config import Settings
from control_plane.container import ControlPlane
from control_plane.errors import ServiceError
from control_plane.fleet.addresses import AddressPolicy
from control_plane.fleet.breaker import CircuitBreaker
from control_plane.fleet.discovery import DnsDiscovery
from control_plane.fleet.health import HealthPoller
from control_plane.fleet.leases import LeaseManager
from control_plane.fleet.registry import Fleet
from control_plane.fleet.served_names import ServedNames
from control_plane.fleet.store import WorkerStore
from control_plane.lifecycle.admin import ModelAdmin
from control_plane.lifecycle.events import ModelEventLog
from control_plane.lifecycle.manager import ModelManager
from control_plane.lifecycle.views import ModelViews
from control_plane.metrics import ControlPlaneMetrics
from control_plane.nodes.client import NodeClient
from control_plane.nodes.triton import TritonNodeClient
from control_plane.serving.affinity import AffinityIndex
from control_plane.serving.records import node_request_id
from control_plane.serving.routing import Router
from control_plane.serving.service import GenerationService
from control_plane.storage.db import Database
from control_plane.storage.history import take_abandoned_requests
from control_plane.storage.retention import RetentionLoop
from control_plane.storage.sql import SqlExecutor
from control_plane.storage.writer import BatchWriter
from llava_wire.gc_freeze import freeze_startup_objects, unfreeze_at_shutdown

__all__ = ["create_app"]

log = logging.getLogger(__name__)


async def _build(settings: Settings, nodes: NodeClient) -> ControlPlane:
    """Every part, leaves first."""
    db = Database(settings.sqlalchemy_url)
    await asyncio.to_thread(db.create_schema)
    metrics = ControlPlaneMetrics()
    writer = BatchWriter(
        db,
        settings.db_flush_interval_s,
        settings.db_batch_size,
        on_lost=lambda reason, rows: metrics.db_rows_lost.labels(reason=reason).inc(rows),
    )
    store = WorkerStore(db, writer, replica=settings.replica_name)
    await asyncio.to_thread(store.load)
    leases = LeaseManager(db, settings.replica_name, settings.lease_period_s)
    breaker = CircuitBreaker(store, settings.breaker_threshold, settings.breaker_cooldown_s)
    poller = HealthPoller(store, settings, nodes=nodes, breaker=breaker, leases=leases)
    fleet = Fleet(store, poller, nodes=nodes, policy=AddressPolicy(settings.worker_allowed_hosts))
    models = ModelManager(settings, store, nodes=nodes, events=ModelEventLog(writer, metrics))
    views = ModelViews(models)
    names = ServedNames(store, settings.model_aliases, settings.default_model)
    service = GenerationService(
        settings,
        store,
        Router(
            settings.dispatch_policy,
            index=AffinityIndex(settings.cache_aware_index_blocks),
            load_threshold=settings.cache_aware_load_threshold,
            min_match=settings.cache_aware_min_match,
            block_chars=settings.cache_aware_block_chars,
        ),
        nodes=nodes,
        writer=writer,
        metrics=metrics,
        breaker=breaker,
        cold_start=models.ensure_loaded,
        listed_names=names.listed,
    )
    return ControlPlane(
        settings=settings,
        db=db,
        writer=writer,
        store=store,
        nodes=nodes,
        breaker=breaker,
        leases=leases,
        poller=poller,
        fleet=fleet,
        models=models,
        model_views=views,
        model_admin=ModelAdmin(models, views),
        service=service,
        metrics=metrics,
        http=aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64, limit_per_host=8)),
        sql=SqlExecutor(
            settings.sql_max_concurrent, lambda outcome: metrics.admin_sql.labels(outcome=outcome).inc()
        ),
        retention=RetentionLoop.from_settings(
            db, settings, lambda table, rows: metrics.retention_deleted.labels(table=table).inc(rows)
        ),
        names=names,
        discovery=(
            DnsDiscovery(fleet, settings.discovery_dns, settings.discovery_interval_s)
            if settings.discovery_dns
            else None
        ),
    )


async def _start(cp: ControlPlane) -> None:
    """Register the static workers, poll once, then start the background loops."""
    for url in cp.settings.workers:
        try:
            await cp.fleet.register(url, source="static", poll=False)
        except ServiceError as exc:  # a contradiction in the operator's own settings
            raise RuntimeError(f"static worker {url}: {exc.message}") from None
    await cp.poller.poll_all()
    # Requests a previous run left running may still be generating, for nobody: their
    # rows are failed and their nodes told to stop (in the background, retried a while)
    orphans = await asyncio.to_thread(take_abandoned_requests, cp.db, cp.settings.replica_name)
    if orphans:
        log.warning(
            "%d requests left running by a previous run: failed, and cancelled on their nodes", len(orphans)
        )
        for o in orphans:
            for wid in o.worker_ids:
                worker = cp.store.get(wid)
                if worker is not None:
                    cp.service.cancels.send(worker, o.model, node_request_id(o.request_id, o.key))
    cp.poller.start()
    if cp.discovery is not None:
        cp.discovery.start()
    await cp.models.start()
    cp.retention.start()


async def _stop(cp: ControlPlane) -> None:
    """Stop and close everything, the reverse of :func:`_build` and :func:`_start`."""
    await cp.sql.aclose()  # interrupts running admin queries: nothing below waits for one
    await cp.retention.stop()
    await cp.models.stop()
    if cp.discovery is not None:
        await cp.discovery.stop()
    await cp.poller.stop()
    try:  # the other replicas take the polling over at once instead of after the lease period
        await asyncio.to_thread(cp.leases.release_all)
    except Exception as exc:
        log.warning("could not release the poll leases: %s", exc)
    await cp.service.cancels.drain()  # pending cancellations, bounded
    await cp.http.close()
    await asyncio.to_thread(cp.writer.close)
    cp.db.dispose()


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Open the database and clients, load and poll the fleet; close all at exit."""
    settings: Settings = app.state.settings
    given: NodeClient | None = app.state.node_client
    async with AsyncExitStack() as stack:
        nodes = given if given is not None else TritonNodeClient()
        if given is None:  # ours to close; a client passed in is the caller's
            stack.push_async_callback(nodes.close)
        cp = await _build(settings, nodes)
        stack.push_async_callback(_stop, cp)
        app.state.cp = cp
        await _start(cp)
        # SIGTERM interrupts admin queries at once (uvicorn waits for open requests before the lifespan ends)
        stack.callback(cp.sql.interrupt_on_signals(asyncio.get_running_loop()))
        freeze_startup_objects()  # full collections had stalled the event loop 17-105 ms
        stack.callback(unfreeze_at_shutdown)
        log.info(
            "control plane %s up: %d workers, database %s",
            settings.replica_name,
            len(cp.store.all()),
            cp.db.url,
        )
        yield


def create_app(settings: Settings | None = None, node_client: NodeClient | None = None) -> FastAPI:
    """Build the control-plane app (nothing starts until its lifespan runs).

    ``node_client``: how it talks to nodes; default a :class:`TritonNodeClient` made (and
    closed) by the lifespan."""
    from control_plane.api import admin, dashboard, errors, llava, openai

    settings = settings or Settings()
    app = FastAPI(
        title="LLaVA control plane",
        description="Routes LLaVA requests to Triton nodes; speaks LLaVA's controller protocol.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.node_client = node_client
    errors.install(app)
    app.include_router(llava.router)
    app.include_router(llava.streams)
    app.include_router(llava.workers_router)
    app.include_router(openai.router)
    app.include_router(admin.router)
    app.include_router(admin.public)
    app.include_router(dashboard.router)
    return app
