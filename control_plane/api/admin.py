"""Admin API: the fleet (list, show, add, remove workers), models (placements, load,
unload, pin), status, read-only SQL.

Every route needs ``Authorization: Bearer <admin token>`` when an admin token is set.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request, status
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, Field

from control_plane.api.deps import AdminDep, CPDep
from control_plane.api.errors import plain_error
from control_plane.api.routes import family_route
from control_plane.errors import NotFound
from control_plane.storage.history import worker_history
from control_plane.storage.sql import QueryHandle, QueryResult, SqlInterrupted, run_readonly

__all__ = ["router"]

router = APIRouter(
    prefix="/admin", tags=["admin"], dependencies=[AdminDep], route_class=family_route(plain_error)
)

# Admin reads first wait for the writes queued before them (batched: up to the flush
# interval), so that a query sees what this control plane has done; bounded, in case the
# database is slow.
READ_FLUSH_TIMEOUT_S = 5.0
public = APIRouter(tags=["operations"], route_class=family_route(plain_error))


class WorkerIn(BaseModel):
    """A node to add to the fleet."""

    url: str = Field(description="HTTP base URL of the Triton node, e.g. http://10.0.0.5:8000")
    grpc_url: str | None = Field(None, description="host:port of its gRPC endpoint; default: HTTP port + 1")
    metrics_url: str | None = Field(None, description="its metrics URL; default: discovered")
    labels: dict[str, Any] = Field(default_factory=dict)
    speed: int = Field(1, ge=1, le=1_000_000)


class SqlIn(BaseModel):
    """A read-only query."""

    query: str = Field(min_length=1, max_length=100_000)
    params: dict[str, Any] = Field(default_factory=dict)
    max_rows: int = Field(1000, ge=1, le=100_000)


@router.get("/workers")
async def list_workers(cp: CPDep) -> dict[str, Any]:
    """Every registered worker with its live state."""
    return {"workers": [w.to_dict() for w in sorted(cp.store.all(), key=lambda w: w.id)]}


@router.get("/workers/{worker_id}")
async def show_worker(worker_id: int, cp: CPDep) -> dict[str, Any]:
    """One worker, with its recent state changes and heartbeats."""
    w = cp.store.get(worker_id)
    if w is None:
        raise NotFound(f"no worker with id {worker_id}")
    await asyncio.to_thread(cp.writer.flush, READ_FLUSH_TIMEOUT_S)
    history = await asyncio.to_thread(worker_history, cp.db, worker_id)
    return {**w.to_dict(), **history}


@router.post("/workers", status_code=status.HTTP_201_CREATED)
async def add_worker(body: WorkerIn, cp: CPDep, response: Response) -> dict[str, Any]:
    """Register a node (polled at once); an existing URL is updated (200)."""
    info, created = await cp.fleet.register(
        body.url, grpc_url=body.grpc_url, metrics_url=body.metrics_url, labels=body.labels, speed=body.speed
    )
    if not created:
        response.status_code = status.HTTP_200_OK
    return info.to_dict()


@router.delete("/workers/{worker_id}")
async def remove_worker(worker_id: int, cp: CPDep) -> dict[str, Any]:
    """Take a node out of the fleet; its history stays."""
    info = await cp.fleet.remove(worker_id)
    if info is None:
        raise NotFound(f"no worker with id {worker_id}")
    return {"removed": worker_id, "name": info.name}


class ModelAction(BaseModel):
    """Where to load or unload a model."""

    worker_id: int | None = Field(
        None, description="the worker; default: the best one (load) or every one (unload)"
    )


@router.get("/models")
async def list_models(cp: CPDep) -> dict[str, Any]:
    """Every model the nodes list: its state on each node, pin, replicas, last use, last load error."""
    return {"models": cp.model_views.describe()}


@router.get("/models/{model}")
async def show_model(model: str, cp: CPDep) -> dict[str, Any]:
    """One model, with its placements."""
    if model not in cp.store.known_models() and model not in cp.models.pinned:
        raise NotFound(f"no worker lists model {model!r}")
    return cp.model_views.describe_model(model)


@router.post("/models/{model}/load")
async def load_model(model: str, cp: CPDep, body: ModelAction | None = None) -> dict[str, Any]:
    """Load a model on a worker (the best one if none is given); answers once it is loaded."""
    return await cp.model_admin.load(model, body.worker_id if body else None)


@router.post("/models/{model}/unload")
async def unload_model(model: str, cp: CPDep, body: ModelAction | None = None) -> dict[str, Any]:
    """Unload a model from a worker (from every worker if none is given). Refused for a
    pinned model, or below the model's minimum replicas."""
    return await cp.model_admin.unload(model, body.worker_id if body else None)


@router.post("/models/{model}/pin")
async def pin_model(model: str, cp: CPDep) -> dict[str, Any]:
    """Pin a model: it is never unloaded, neither when idle nor by an unload call."""
    return cp.model_admin.pin(model)


@router.delete("/models/{model}/pin")
async def unpin_model(model: str, cp: CPDep) -> dict[str, Any]:
    """Unpin a model."""
    return cp.model_admin.unpin(model)


@router.get("/status")
async def control_plane_status(cp: CPDep) -> dict[str, Any]:
    """Poller, database writer and fleet summary."""
    workers = cp.store.all()
    states: dict[str, int] = {}
    for w in workers:
        states[w.state.value] = states.get(w.state.value, 0) + 1
    return {
        "replica": cp.settings.replica_name,
        "database": cp.db.dialect,
        "dispatch_policy": cp.settings.dispatch_policy.value,
        "workers": states,
        "models": cp.store.listed_models(),
        "servable_models": cp.store.servable_models(),
        "poller": cp.poller.describe(),
        "admission": {
            "waiting": cp.service.admission.waiting,
            "rejected": cp.service.admission.rejected,
            "circuits_opened": cp.breaker.opened,
        },
        "lifecycle_rounds": cp.models.rounds,
        "routing": cp.service.router.describe(),
        # dropped: every row lost, by any reason; lost: by reason (see db.BatchWriter)
        "writer": cp.writer.describe(),
        "retention": cp.retention.describe() if cp.retention is not None else None,
        "sql": cp.sql.describe() if cp.sql is not None else None,
    }


@router.post("/sql")
async def sql(body: SqlIn, cp: CPDep, request: Request) -> dict[str, Any]:
    """Run one read-only SQL query over the worker history (writes are refused). It sees
    everything this control plane did before the query (queued writes are written first).

    Bounded: the query is stopped after ``sql_timeout_s`` (400 naming the limit); rows are
    cut at ``max_rows`` and at ``sql_max_result_bytes`` of JSON (``truncated`` is true and
    ``truncated_reason`` says which); BLOBs come as ``{"blob_hex": ..., "bytes": n}``. At
    most ``sql_max_concurrent`` queries run at once, on threads of their own: one more is
    answered 429 at once. A query whose client leaves is stopped.
    """
    executor = cp.sql
    if executor is None:
        raise SqlInterrupted("the SQL interface is not running")
    settings = cp.settings

    def query(handle: QueryHandle) -> QueryResult:
        # On the SQL threads, with the query: a slow flush never holds a default-executor thread.
        cp.writer.flush(READ_FLUSH_TIMEOUT_S)
        return run_readonly(
            settings.sqlalchemy_url,
            body.query,
            body.params,
            body.max_rows,
            timeout_s=settings.sql_timeout_s,
            max_result_bytes=settings.sql_max_result_bytes,
            handle=handle,
        )

    result = await executor.run(query, disconnected=request.is_disconnected)
    return result.to_json()


@public.get("/health")
async def health() -> dict[str, str]:
    """Liveness of the control plane itself."""
    return {"status": "ok"}


@public.get("/metrics", include_in_schema=False)
async def metrics(cp: CPDep) -> Response:
    """The control plane's Prometheus metrics."""
    return Response(generate_latest(cp.metrics.registry), media_type=CONTENT_TYPE_LATEST)
