"""OpenAI-compatible API: ``GET /v1/models`` and ``POST /v1/chat/completions`` with images.

Requests are routed and proxied like LLaVA's protocol; the checkpoint's chat template
formats the messages (on the node). Streaming responses are Server-Sent Events that
end with ``data: [DONE]``; a failure after streaming began ends the stream with one
error event, then ``[DONE]``.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, Response

from control_plane.api.deps import CPDep, require_api_key
from control_plane.api.errors import openai_error
from control_plane.api.images import ImageFetcher
from control_plane.api.openai_protocol import ChatCompletionRequest, ImageURLPart, unsupported_parameters
from control_plane.api.routes import family_route
from control_plane.api.streaming import StartedStream, TokenStreamResponse, start_watched
from control_plane.api.text_checks import utf8_size
from control_plane.errors import BadRequest, ServiceError, UnknownModel
from control_plane.serving.service import GenerateRequest

__all__ = ["ChunkEvents", "router"]


router = APIRouter(
    prefix="/v1",
    tags=["OpenAI-compatible API"],
    dependencies=[Depends(require_api_key)],
    route_class=family_route(openai_error),
)


def _model_card(cp: CPDep, name: str, ready: set[str]) -> dict[str, Any]:
    return {
        "id": cp.names.name_of(name),
        "object": "model",
        "created": 0,
        "owned_by": "llava-triton",
        "ready": name in ready,
        "state": cp.model_views.model_state(name),
    }


@router.get("/models")
async def list_models(cp: CPDep) -> dict[str, Any]:
    """Models the fleet can serve, loaded or not: ``ready`` says whether one is loaded
    now, ``state`` is ``loaded``, ``loading``, ``failed`` or ``unloaded`` (a request for
    a model loaded nowhere loads it first)."""
    ready = set(cp.store.listed_models())
    cards: dict[str, dict[str, Any]] = {}
    for name in cp.store.servable_models():  # two models served under one name: the first
        card = _model_card(cp, name, ready)
        cards.setdefault(card["id"], card)
    return {"object": "list", "data": list(cards.values())}


@router.get("/models/{model_id}")
async def retrieve_model(model_id: str, cp: CPDep) -> dict[str, Any]:
    """One model of ``GET /v1/models``; 404 ``model_not_found`` for one the fleet cannot serve."""
    model = cp.names.resolve(model_id)
    if model not in cp.store.servable_models():
        raise UnknownModel(f"model '{model_id}' is not served here; GET /v1/models lists those that are")
    return _model_card(cp, model, set(cp.store.listed_models()))


async def to_generate_request(
    body: ChatCompletionRequest, cp: CPDep, request_id: str | None
) -> GenerateRequest:
    """Check a chat request and turn it into the ensemble's terms (messages + images)."""
    unsupported = unsupported_parameters(body)
    if unsupported:
        raise BadRequest(f"unsupported parameter(s): {', '.join(unsupported)}", param=unsupported[0])
    if body.n not in (None, 1):
        raise BadRequest(f"n is {body.n}; only n = 1 is supported", param="n")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 1:
        field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        raise BadRequest(f"{field} is {max_tokens}; it must be at least 1", param=field)
    s = cp.settings
    fetcher = ImageFetcher(cp.http, s.image_url_allowed_hosts, s.max_image_bytes, s.image_fetch_timeout_s)
    messages: list[dict[str, Any]] = []
    images: list[bytes] = []
    for i, msg in enumerate(body.messages):
        role = "system" if msg.role == "developer" else msg.role
        parts: list[dict[str, Any]] = []
        if isinstance(msg.content, str):
            parts.append({"type": "text", "text": msg.content})
        elif msg.content is None:
            raise BadRequest(f"messages[{i}].content is missing", param=f"messages[{i}].content")
        else:
            for j, part in enumerate(msg.content):
                if isinstance(part, ImageURLPart):
                    if role != "user":
                        raise BadRequest(
                            f"messages[{i}]: only user messages may carry images", param="messages"
                        )
                    if len(images) >= s.max_images:
                        raise BadRequest(
                            f"more than {s.max_images} images in the conversation", param="messages"
                        )
                    images.append(
                        await fetcher.load(part.image_url.url, f"messages[{i}].content[{j}].image_url")
                    )
                    parts.append({"type": "image"})
                else:
                    parts.append({"type": "text", "text": part.text})
        messages.append({"role": role, "content": parts})
    text_bytes = sum(utf8_size(p["text"]) for m in messages for p in m["content"] if p["type"] == "text")
    if text_bytes > s.max_prompt_bytes:
        raise BadRequest(
            f"the messages' text is {text_bytes} bytes; the limit is {s.max_prompt_bytes} bytes",
            param="messages",
        )
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return GenerateRequest(
        model=cp.names.resolve(body.model),  # the Triton model (recorded so); responses echo body.model
        api="openai",
        messages=messages,
        images=images,
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        stop=[x for x in stop if x],
        seed=body.seed,
        request_id=cp.service.new_request_id(request_id),
    )


def _usage(prompt: int, completion: int, cached: int) -> dict[str, Any]:
    """OpenAI's usage object; ``cached_tokens``: prompt tokens the node served from its prefix cache."""
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def _sse(payload: Any) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


class ChunkEvents:
    """SSE events of one streamed completion: ``chat.completion.chunk`` objects.

    Everything but the delta and the finish reason is the same in every event of a
    stream, so it is serialized once; each event then joins three pieces, byte for byte
    what ``_sse`` makes of the whole object (one event per token).
    """

    __slots__ = ("_head",)

    def __init__(self, completion_id: str, created: int, model: str) -> None:
        head = orjson.dumps(
            {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model}
        )
        self._head = b"data: " + head[:-1] + b',"choices":[{"index":0,"delta":'

    def __call__(self, delta: dict[str, Any], finish: str | None = None) -> bytes:
        """The event carrying ``delta`` (and ``finish``, the finish reason)."""
        tail = (
            b',"logprobs":null,"finish_reason":null}]}\n\n'
            if finish is None
            else (b',"logprobs":null,"finish_reason":' + orjson.dumps(finish) + b"}]}\n\n")
        )
        return self._head + orjson.dumps(delta) + tail


@router.post("/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, cp: CPDep, x_request_id: str | None = Header(None)
) -> Response:
    """Chat with images: streaming (SSE) or not; the response carries usage and a request id.

    A client that disconnects cancels the generation, streamed or not."""
    req = await to_generate_request(body, cp, x_request_id)
    watch, stream = await start_watched(cp.service.stream(req), request.receive)
    completion_id = f"chatcmpl-{req.request_id}"
    created = int(time.time())
    headers = {"X-Request-Id": req.request_id}
    if not body.stream:
        try:
            return await watch.guard(_complete(stream, completion_id, created, body.model, headers))
        finally:
            watch.close()

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    event = ChunkEvents(completion_id, created, body.model)

    async def events() -> AsyncIterator[bytes]:
        prompt_tokens = completion_tokens = cached_tokens = 0
        try:
            yield event({"role": "assistant", "content": ""})
            async for chunk in stream:
                prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
                cached_tokens = chunk.cached_tokens
                if chunk.text:
                    yield event({"content": chunk.text})
                if chunk.finish_reason:
                    yield event({}, chunk.finish_reason if chunk.finish_reason != "cancelled" else "stop")
            if include_usage:
                yield _sse(
                    {
                        "id": completion_id,
                        "object": "chat.completion.chunk",
                        "created": created,
                        "model": body.model,
                        "choices": [],
                        "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
                    }
                )
        except ServiceError as exc:
            yield _sse(
                {
                    "error": {
                        "message": exc.message,
                        "type": exc.openai_type,
                        "param": exc.param,
                        "code": exc.openai_code,
                    }
                }
            )
        finally:
            await stream.aclose()
        yield b"data: [DONE]\n\n"

    return TokenStreamResponse(
        events(),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache"},
        watch=watch,
    )


async def _complete(
    stream: StartedStream, completion_id: str, created: int, model: str, headers: dict[str, str]
) -> Response:
    text, finish, prompt_tokens, completion_tokens, cached_tokens = "", None, 0, 0, 0
    try:
        async for chunk in stream:
            text += chunk.text
            finish = chunk.finish_reason or finish
            prompt_tokens, completion_tokens = chunk.prompt_tokens, chunk.completion_tokens
            cached_tokens = chunk.cached_tokens
    finally:
        await stream.aclose()
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "logprobs": None,
                "finish_reason": finish if finish != "cancelled" else "stop",
            }
        ],
        "usage": _usage(prompt_tokens, completion_tokens, cached_tokens),
    }
    return JSONResponse(body, headers=headers)
