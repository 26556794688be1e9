"""LLaVA's controller protocol, complete, so LLaVA's web UI and scripts work unchanged.

Worker addresses handed out by ``/get_worker_address`` point back at this control
plane: ``<base>`` under ``cache_aware`` (the node is chosen per stream, from its
content), else ``<base>/workers/<id>``, which proxies ``/worker_generate_stream`` to that
node.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import AsyncIterator
from enum import Enum
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from control_plane.api.deps import CPDep, WorkerCredentialDep, require_api_key_for_llava
from control_plane.api.errors import llava_error, llava_frame, plain_error
from control_plane.api.routes import family_route, validation_message
from control_plane.api.streaming import TokenStreamResponse, start_watched
from control_plane.api.text_checks import INT64_MAX, Text, utf8_size
from control_plane.config import DispatchPolicy
from control_plane.errors import BadRequest, NotFound, ServiceError
from control_plane.fleet.registry import MAX_SPEED
from control_plane.fleet.workers import WorkerState
from control_plane.nodes.parsing import clamp_load
from control_plane.serving.service import GenerateRequest

__all__ = ["router", "streams", "workers_router"]

_TAGS: list[str | Enum] = ["LLaVA controller protocol"]
router = APIRouter(
    tags=_TAGS, dependencies=[Depends(require_api_key_for_llava)], route_class=family_route(plain_error)
)
# The generation streams answer errors in LLaVA's frames.
streams = APIRouter(
    tags=_TAGS, dependencies=[Depends(require_api_key_for_llava)], route_class=family_route(llava_error)
)
# Workers' pushes take the worker (or admin) token, not a client's API key.
workers_router = APIRouter(tags=_TAGS, route_class=family_route(plain_error))

M = TypeVar("M", bound=BaseModel)


def _body_doc(model: type[BaseModel]) -> dict[str, Any]:
    schema = {"content": {"application/json": {"schema": model.model_json_schema()}}, "required": True}
    return {"requestBody": schema}


async def parse_body(request: Request, model: type[M]) -> M:
    """The JSON body as ``model``, whatever the Content-Type (LLaVA's clients and curl
    differ); a body that is not valid JSON or does not fit gets a 400 naming the problem."""
    raw = await request.body()
    try:
        return model.model_validate_json(raw or b"{}")
    except ValidationError as exc:
        message, param = validation_message(RequestValidationError(exc.errors()))
        raise BadRequest(message, param=param) from None


class RegisterWorker(BaseModel):
    """Body of ``/register_worker``."""

    worker_name: str = Field(
        max_length=2048, description="the node's HTTP base URL, e.g. http://10.0.0.5:8000"
    )
    check_heart_beat: bool = True
    worker_status: dict[str, Any] | None = None
    grpc_url: str | None = Field(None, max_length=2048, description="extension: the node's gRPC host:port")
    metrics_url: str | None = Field(None, max_length=2048, description="extension: the node's metrics URL")


class HeartBeat(BaseModel):
    """Body of ``/receive_heart_beat``."""

    worker_name: str = Field(max_length=2048)
    queue_length: int = 0


class ModelQuery(BaseModel):
    """Body of ``/get_worker_address``."""

    model: Text = Field(max_length=256)


class GenerateParams(BaseModel):
    """Body of ``/worker_generate_stream`` (LLaVA's generate parameters)."""

    model_config = ConfigDict(extra="ignore")

    model: Text = Field(min_length=1, max_length=256)
    prompt: Text = Field(min_length=1)
    images: list[str] | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    max_new_tokens: int = 256  # capped at max_new_tokens_cap, as LLaVA caps it
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX)


def _speed(status: dict[str, Any]) -> int:
    speed = status.get("speed", 1)
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 1 <= speed <= MAX_SPEED:
        raise BadRequest(
            f"worker_status.speed must be a number from 1 to {MAX_SPEED}", param="worker_status.speed"
        )
    return int(speed)


@workers_router.post("/register_worker", openapi_extra=_body_doc(RegisterWorker))
async def register_worker(request: Request, cp: CPDep, admin: WorkerCredentialDep) -> dict[str, Any]:
    """Register a Triton node by its HTTP base URL (LLaVA's ``worker_name``).

    Needs ``Authorization: Bearer`` with the worker token or the admin token (see the
    README); the node's addresses must be in the allowed worker hosts. A registered
    worker's addresses and speed change only with the admin token (409 otherwise).
    """
    body = await parse_body(request, RegisterWorker)
    info, created = await cp.fleet.register(
        body.worker_name,
        grpc_url=body.grpc_url,
        metrics_url=body.metrics_url,
        speed=_speed(body.worker_status or {}),
        source="llava",
        may_change=admin,
    )
    return {"worker_id": info.id, "created": created, "state": info.state.value}


@router.post("/refresh_all_workers")
async def refresh_all_workers(cp: CPDep) -> dict[str, Any]:
    """Probe every node now, as LLaVA's controller re-checks its workers: one that does not
    answer leaves the model list at once, and is removed if it was out of routing already."""
    removed = await cp.fleet.refresh()
    workers = cp.store.all()
    healthy = sum(w.state is WorkerState.HEALTHY for w in workers)
    return {"workers": len(workers), "healthy": healthy, "removed": [w.name for w in removed]}


@router.post("/list_models")
async def list_models(cp: CPDep) -> dict[str, list[str]]:
    """Models the fleet can serve: those a healthy node lists, loaded or not (a request
    for one that is loaded nowhere loads it first)."""
    return {"models": cp.names.listed(cp.store.servable_models())}


def _base_url(request: Request, configured: str) -> str:
    return (configured or str(request.base_url)).rstrip("/")


@router.post("/get_worker_address", openapi_extra=_body_doc(ModelQuery))
async def get_worker_address(request: Request, cp: CPDep) -> dict[str, str]:
    """An address (under this control plane) for a node serving ``model``; ``""`` if none.

    A model that is loaded nowhere is loaded first (the answer waits, up to the
    cold-start timeout; LLaVA's web UI waits for this call without a time limit, but
    not for the first bytes of a stream). If that fails, ``error`` says why.

    Under ``cache_aware`` the address is this control plane itself: the node is chosen
    when the stream starts, from the prompt and images (a conversation's next turn goes
    where its history is cached), where ``/get_worker_address`` knows only the model.
    Under the other policies it pins the node chosen here (``<base>/workers/<id>``).
    """
    body = await parse_body(request, ModelQuery)
    try:
        worker = await cp.service.pick_worker(cp.names.resolve(body.model))
    except ServiceError as exc:
        return {"address": "", "error": exc.message}
    if worker is None:
        return {"address": ""}
    base = _base_url(request, cp.settings.public_url)
    if cp.settings.dispatch_policy is DispatchPolicy.CACHE_AWARE:
        return {"address": base}
    return {"address": f"{base}/workers/{worker.id}"}


@workers_router.post("/receive_heart_beat", openapi_extra=_body_doc(HeartBeat))
async def receive_heart_beat(request: Request, cp: CPDep, _admin: WorkerCredentialDep) -> dict[str, bool]:
    """Accept a pushed heartbeat; ``exist: false`` asks the worker to register again.

    Needs the worker token or the admin token, like ``/register_worker``; the queue
    length is clamped to [0, 1000000].
    """
    body = await parse_body(request, HeartBeat)
    worker = cp.store.by_name(body.worker_name)
    if worker is None:
        return {"exist": False}
    cp.store.record_push(worker, clamp_load(body.queue_length))
    return {"exist": True}


@router.post("/worker_get_status")
async def worker_get_status(cp: CPDep) -> dict[str, Any]:
    """The fleet as one worker: models, total speed, total queue."""
    healthy = [w for w in cp.store.all() if w.state is WorkerState.HEALTHY]
    return {
        "model_names": cp.names.listed(cp.store.listed_models()),
        "speed": sum(w.speed for w in healthy),
        "queue_length": sum(w.inflight + w.queue_length for w in healthy),
    }


@router.post("/workers/{worker_id}/worker_get_status")
async def one_worker_status(worker_id: int, cp: CPDep) -> dict[str, Any]:
    """One node's models, speed and queue."""
    w = cp.store.get(worker_id)
    if w is None:
        raise NotFound(f"no worker with id {worker_id}")
    return {
        "model_names": cp.names.listed(w.ready_models()),
        "speed": w.speed,
        "queue_length": w.inflight + w.queue_length,
    }


def _decode_images(images: list[str] | None, limit: int, max_bytes: int) -> list[bytes]:
    if not images:
        return []
    if len(images) > limit:
        raise BadRequest(f"{len(images)} images given; at most {limit} are accepted", param="images")
    out = []
    for i, text in enumerate(images):
        if not isinstance(text, str) or not text:
            raise BadRequest(f"images[{i}] must be a non-empty base64 string", param="images")
        if text.startswith("data:"):
            text = text.partition(",")[2]
        if len(text) * 3 // 4 > max_bytes:
            raise BadRequest(f"images[{i}] is larger than {max_bytes} bytes", param="images")
        try:
            out.append(base64.b64decode(text, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"images[{i}] is not valid base64", param="images") from None
    return out


def _to_request(
    params: GenerateParams, cp: CPDep, request_id: str | None, pinned: int | None
) -> GenerateRequest:
    if params.max_new_tokens < 1:
        raise BadRequest(
            f"max_new_tokens is {params.max_new_tokens}; it must be at least 1", param="max_new_tokens"
        )
    size = utf8_size(params.prompt)
    if size > cp.settings.max_prompt_bytes:
        raise BadRequest(
            f"the prompt is {size} bytes; the limit is {cp.settings.max_prompt_bytes} bytes", param="prompt"
        )
    stop = [params.stop] if isinstance(params.stop, str) else list(params.stop or [])
    return GenerateRequest(
        model=cp.names.resolve(params.model),  # the Triton model (recorded so)
        api="llava",
        prompt=params.prompt,
        images=_decode_images(params.images, cp.settings.max_images, cp.settings.max_image_bytes),
        # LLaVA caps max_new_tokens at 1024; the node also caps it at the room left.
        max_tokens=min(params.max_new_tokens, cp.settings.max_new_tokens_cap),
        temperature=params.temperature,
        top_p=params.top_p,
        stop=[s for s in stop if s],
        seed=params.seed,
        request_id=cp.service.new_request_id(request_id),
        pinned_worker=pinned,
    )


async def _stream_frames(req: GenerateRequest, cp: CPDep, request: Request) -> Response:
    """Start the stream (errors before the first token get their own HTTP status), then
    stream NUL-delimited frames whose text is the prompt followed by everything so far."""
    watch, stream = await start_watched(cp.service.stream(req), request.receive)
    prompt = req.prompt or ""

    async def frames() -> AsyncIterator[bytes]:
        text = prompt
        try:
            async for chunk in stream:
                text += chunk.text
                frame: dict[str, Any] = {"text": text, "error_code": 0}
                if chunk.finish_reason:
                    frame["finish_reason"] = chunk.finish_reason
                    frame["usage"] = {
                        "prompt_tokens": chunk.prompt_tokens,
                        "completion_tokens": chunk.completion_tokens,
                        "cached_tokens": chunk.cached_tokens,
                    }
                yield llava_frame(frame)
        except ServiceError as exc:
            yield llava_frame({"text": exc.message, "error_code": exc.llava_code})
        finally:
            await stream.aclose()

    return TokenStreamResponse(
        frames(), media_type="application/octet-stream", headers={"X-Request-Id": req.request_id}, watch=watch
    )


@streams.post("/worker_generate_stream", openapi_extra=_body_doc(GenerateParams))
async def worker_generate_stream(
    request: Request, cp: CPDep, x_request_id: str | None = Header(None)
) -> Response:
    """Generate with any node serving ``model``; NUL-delimited JSON frames."""
    params = await parse_body(request, GenerateParams)
    return await _stream_frames(_to_request(params, cp, x_request_id, None), cp, request)


@streams.post("/workers/{worker_id}/worker_generate_stream", openapi_extra=_body_doc(GenerateParams))
async def pinned_generate_stream(
    worker_id: int, request: Request, cp: CPDep, x_request_id: str | None = Header(None)
) -> Response:
    """Generate on the node ``/get_worker_address`` chose (another one if it has failed)."""
    params = await parse_body(request, GenerateParams)
    if cp.store.get(worker_id) is None:
        raise NotFound(f"no worker with id {worker_id}; ask /get_worker_address again")
    return await _stream_frames(_to_request(params, cp, x_request_id, worker_id), cp, request)
