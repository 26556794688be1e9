"""The OpenAI-compatible API, exercised with the official ``openai`` client."""

from __future__ import annotations

import base64
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from llava_node.client import stream_generate
from llava_node.launcher import TritonNode
from llava_wire.messages import GenerationResult
from tests.control_plane.conftest import TINY_SERVED_NAME, llava_stream, sql, wait_for
from tests.media import image_bytes
from tests.processes import ControlPlaneProcess

API_KEY = "sk-test-key"
QUESTION = "What is in this picture?"
TEMPLATED = f"USER: <image>\n{QUESTION} ASSISTANT:"  # the tiny checkpoint's chat template


def data_url(img: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(img).decode()


def user_turn(img: bytes, text: str = QUESTION) -> Any:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url(img)}},
            {"type": "text", "text": text},
        ],
    }


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    """A loopback HTTP server with one PNG, for the (opt-in) image URL fetching."""
    png = image_bytes(color=(90, 30, 200))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path == "/cat.png":
                self.send_response(200)
                self.send_header("Content-Type", "image/png")
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)
            elif self.path == "/big.png":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\0" * 300_000)
            else:
                self.send_response(404)
                self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture(scope="module")
def control_plane(
    fleet: list[TritonNode], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ControlPlaneProcess]:
    """A control plane with API keys set and image fetching allowed from 127.0.0.1 only."""
    cp = ControlPlaneProcess(
        tmp_path_factory.mktemp("cp-openai"),
        [n.http_url for n in fleet],
        env={
            "LLAVA_CP_API_KEYS": API_KEY,
            "LLAVA_CP_IMAGE_URL_ALLOWED_HOSTS": "127.0.0.1",
            "LLAVA_CP_MAX_IMAGE_BYTES": "200000",
        },
    )
    cp.start()
    try:
        wait_for(
            lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [TINY_SERVED_NAME],
            30,
            "model listed",
        )
        yield cp
    finally:
        cp.stop()


@pytest.fixture()
def client(control_plane: ControlPlaneProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{control_plane.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def test_models_lists_llava(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [TINY_SERVED_NAME]


def test_a_listed_model_can_be_retrieved_and_an_unknown_one_is_404(client: openai.OpenAI) -> None:
    # by its Triton name or by its served name: the card names it as /v1/models does
    model = client.models.retrieve("llava")
    assert model.id == TINY_SERVED_NAME and model.object == "model"
    assert client.models.retrieve(TINY_SERVED_NAME).id == TINY_SERVED_NAME
    with pytest.raises(openai.NotFoundError) as err:
        client.models.retrieve("no-such-model")
    body = err.value.body
    assert isinstance(body, dict) and body["code"] == "model_not_found", body
    assert "'no-such-model' is not served here" in body["message"]


def test_streaming_chat_with_an_image_yields_deltas_and_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model="llava",
        messages=[user_turn(image_bytes())],
        max_tokens=20,
        temperature=0.0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) >= 3
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 20 and chunks[-1].usage.prompt_tokens > 576
    assert len({c.id for c in chunks}) == 1


def test_non_streaming_chat_returns_text_usage_and_finish_reason(client: openai.OpenAI) -> None:
    resp = client.chat.completions.with_raw_response.create(
        model="llava",
        messages=[{"role": "system", "content": "Be brief."}, user_turn(image_bytes())],
        max_completion_tokens=12,
        temperature=0.0,
        extra_headers={"X-Request-Id": "my-request-42"},
    )
    assert resp.headers["x-request-id"] == "my-request-42"
    completion = resp.parse()
    assert completion.id == "chatcmpl-my-request-42"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "length"
    assert completion.usage is not None and completion.usage.completion_tokens == 12
    wait_for(
        lambda: any(r["request_id"] == "my-request-42" and r["status"] == "ok" for r in sql_requests(client)),
        5,
        "request stored under its X-Request-Id",
    )


def sql_requests(client: openai.OpenAI) -> list[dict[str, Any]]:
    base = str(client.base_url).removesuffix("/v1/")
    r = httpx.post(f"{base}/admin/sql", json={"query": "SELECT request_id, status, api FROM requests"})
    return [dict(zip(r.json()["columns"], row, strict=True)) for row in r.json()["rows"]]


def test_stop_sequence_stops_generation(client: openai.OpenAI) -> None:
    full = client.chat.completions.create(
        model="llava", messages=[user_turn(image_bytes())], max_tokens=30, temperature=0.0
    )
    text = full.choices[0].message.content or ""
    stop = text[10:13]
    assert stop.strip()
    stopped = client.chat.completions.create(
        model="llava",
        messages=[user_turn(image_bytes())],
        max_tokens=30,
        temperature=0.0,
        stop=[stop, "never-appears"],
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stop not in (stopped.choices[0].message.content or "")
    assert text.startswith(stopped.choices[0].message.content or "")


def test_greedy_output_is_the_same_through_every_path(
    client: openai.OpenAI, control_plane: ControlPlaneProcess, fleet: list[TritonNode]
) -> None:
    img = image_bytes(color=(12, 200, 140), size=(96, 64))
    via_openai = (
        client.chat.completions.create(
            model="llava", messages=[user_turn(img)], max_tokens=24, temperature=0.0
        )
        .choices[0]
        .message.content
    )
    _, frames = llava_stream(
        f"{control_plane.url}/worker_generate_stream",
        {
            "model": "llava",
            "prompt": TEMPLATED,
            "images": [base64.b64encode(img).decode()],
            "temperature": 0.0,
            "max_new_tokens": 24,
        },
    )
    via_llava = frames[-1]["text"][len(TEMPLATED) :]
    direct = GenerationResult()
    for chunk in stream_generate(
        fleet[0].grpc_url, prompt=TEMPLATED, images=[img], max_tokens=24, temperature=0.0
    ):
        direct.add(chunk)
    assert via_openai == via_llava == direct.text
    assert direct.completion_tokens == 24


def test_multi_turn_with_an_image_in_an_earlier_turn(client: openai.OpenAI) -> None:
    messages = [
        user_turn(image_bytes()),
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And what colour is the stripe?"},
    ]
    resp = client.chat.completions.create(model="llava", messages=messages, max_tokens=8, temperature=0.0)
    assert resp.usage is not None and resp.usage.prompt_tokens > 576


def test_image_url_fetching_only_from_allowed_hosts(client: openai.OpenAI, image_server: str) -> None:
    ok = client.chat.completions.create(
        model="llava",
        max_tokens=4,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": f"{image_server}/cat.png"}},
                    {"type": "text", "text": "hi"},
                ],
            }
        ],
    )
    assert ok.usage is not None and ok.usage.prompt_tokens > 576
    for url, message in [
        (f"{image_server}/missing.png", "HTTP 404"),
        (f"{image_server}/big.png", "larger than 200000 bytes"),
        ("http://localhost:1/x.png", "not allowed"),
    ]:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(
                model="llava",
                max_tokens=4,
                messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}],
            )
        assert message in str(err.value)


def bad_request(client: openai.OpenAI, **kwargs) -> openai.APIStatusError:
    kwargs.setdefault("model", "llava")
    kwargs.setdefault("messages", [{"role": "user", "content": "hi"}])
    with pytest.raises(openai.APIStatusError) as err:
        client.chat.completions.create(**kwargs)
    return err.value


@pytest.mark.parametrize(
    ("kwargs", "status", "message", "param"),
    [
        ({"n": 2}, 400, "only n = 1", "n"),
        ({"logprobs": True}, 400, "unsupported parameter(s): logprobs", "logprobs"),
        (
            {"presence_penalty": 0.5, "extra_body": {"best_of": 3}},
            400,
            "unsupported parameter(s): best_of, presence_penalty",
            "best_of",
        ),
        ({"max_tokens": 0}, 400, "max_tokens is 0", "max_tokens"),
        ({"temperature": 7.0}, 400, "temperature: Input should be less than or equal to 2", "temperature"),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@@"}}],
                    }
                ]
            },
            400,
            "not valid base64",
            "messages[0].content[0].image_url",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "image_url", "image_url": {"url": data_url(b"GIF89a-not-really")}}
                        ],
                    }
                ]
            },
            400,
            "image 0 could not be decoded as an image: its bytes are not a PNG, JPEG or WebP file",
            "messages",  # found by the node; images are parts of the messages
        ),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role", "messages.0.role"),
        ({"model": "gpt-4o"}, 404, "no worker serves model 'gpt-4o'", "model"),
    ],
)
def test_errors_have_openai_shape_and_status(client: openai.OpenAI, kwargs, status, message, param) -> None:
    err = bad_request(client, **kwargs)
    assert err.status_code == status
    body = err.body
    assert isinstance(body, dict) and set(body) >= {"message", "type", "param", "code"}, body
    assert message in body["message"]
    assert body["param"] == param


def test_wrong_or_missing_api_key_is_401(control_plane: ControlPlaneProcess) -> None:
    c = openai.OpenAI(base_url=f"{control_plane.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        c.models.list()
    assert err.value.status_code == 401
    assert err.value.body["type"] == "authentication_error"  # type: ignore[index]
    r = httpx.post(f"{control_plane.url}/v1/chat/completions", json={"model": "llava", "messages": []})
    assert r.status_code == 401 and "missing API key" in r.json()["error"]["message"]


def test_malformed_json_is_400_in_openai_shape(control_plane: ControlPlaneProcess) -> None:
    r = httpx.post(
        f"{control_plane.url}/v1/chat/completions",
        content=b"{oops",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_no_healthy_worker_is_503(fleet: list[TritonNode], tmp_path: Path) -> None:
    cp = ControlPlaneProcess(tmp_path / "cp", [fleet[0].http_url])
    cp.start()
    try:
        wait_for(
            lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [TINY_SERVED_NAME],
            30,
            "model listed",
        )
        fleet[0].signal(19)  # SIGSTOP: the node stops answering polls
        try:
            wait_for(
                lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [], 15, "node out of routing"
            )
            c = openai.OpenAI(base_url=f"{cp.url}/v1", api_key="none", max_retries=0)
            err = bad_request(c)
            assert err.status_code == 503 and "no healthy worker" in err.body["message"]  # type: ignore[index]
        finally:
            fleet[0].signal(18)  # SIGCONT
        wait_for(
            lambda: httpx.post(f"{cp.url}/list_models").json()["models"] == [TINY_SERVED_NAME],
            15,
            "node back",
        )
        rows = sql(cp, "SELECT status, error FROM requests WHERE api = 'openai'")
        assert rows and rows[-1]["status"] == "error" and "no healthy worker" in rows[-1]["error"]
    finally:
        cp.stop()
