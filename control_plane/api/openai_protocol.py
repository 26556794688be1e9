"""Wire models of the OpenAI-compatible chat API (requests in, responses out)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from control_plane.api.text_checks import INT32_MAX, INT64_MAX, Text

__all__ = [
    "ChatCompletionRequest",
    "ChatMessage",
    "ImageURL",
    "ImageURLPart",
    "StreamOptions",
    "TextPart",
    "unsupported_parameters",
]


class ImageURL(BaseModel):
    """``image_url`` of a content part: a data URL, raw base64, or (if enabled) an http(s) URL."""

    url: Text = Field(min_length=1)
    detail: str | None = None


class TextPart(BaseModel):
    """A text content part."""

    type: Literal["text"]
    text: Text


class ImageURLPart(BaseModel):
    """An image content part."""

    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    """One turn of the conversation."""

    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart | ImageURLPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    """``stream_options``."""

    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    """Body of ``POST /v1/chat/completions``.

    Parameters that would change the output but are not implemented are refused with
    a 400 naming them (see :func:`unsupported_parameters`), never silently ignored.
    """

    model_config = ConfigDict(extra="allow")

    model: Text = Field(min_length=1, max_length=256)
    messages: list[ChatMessage] = Field(min_length=1)
    # Bounded by the tensors they become (INT32 and INT64 on the node); the node checks
    # them against its own limits and its model's context.
    max_tokens: int | None = Field(None, le=INT32_MAX)
    max_completion_tokens: int | None = Field(None, le=INT32_MAX)
    temperature: float | None = Field(None, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: Text | list[Text] | None = None
    seed: int | None = Field(None, ge=0, le=INT64_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int | None = None
    user: str | None = None
    # Accepted only at their neutral values:
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


_NEUTRAL: dict[str, Any] = {
    "frequency_penalty": (None, 0, 0.0),
    "presence_penalty": (None, 0, 0.0),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None, True, False),
}


def unsupported_parameters(req: ChatCompletionRequest) -> list[str]:
    """Names of parameters given that this server does not implement."""
    names = sorted((req.model_extra or {}).keys())
    for name, neutral in _NEUTRAL.items():
        if getattr(req, name) not in neutral:
            names.append(name)
    if req.response_format not in (None, {"type": "text"}):
        names.append("response_format")
    return names
