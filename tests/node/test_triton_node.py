"""A real tritonserver serving model_repository/: streaming, exactness, errors, cancellation."""

from __future__ import annotations

import json
import queue
import re
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import tritonclient.grpc as grpcclient
from PIL import Image
from tritonclient.utils import InferenceServerException

from llava_node.client import cancel, stream_generate
from llava_node.engine.loading import load_llava
from llava_node.launcher import NodeStartError, TritonNode, TritonNodeConfig
from llava_wire.messages import GenerationResult, build_inputs
from tests.media import bomb_png, image_bytes

PROMPT = "USER: <image>\nWhat is in this picture? ASSISTANT:"


def generate(node: TritonNode, **kwargs) -> GenerationResult:
    result = GenerationResult()
    for chunk in stream_generate(node.grpc_url, **kwargs):
        result.add(chunk)
    return result


def metric(node: TritonNode, name: str) -> float:
    text = urllib.request.urlopen(node.metrics_url, timeout=5).read().decode()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + "{")]
    return sum(values)


def test_grpc_stream_yields_pieces_then_a_final_response(node: TritonNode) -> None:
    chunks = list(
        stream_generate(node.grpc_url, prompt=PROMPT, images=[image_bytes()], max_tokens=16, temperature=0.0)
    )
    assert len(chunks) >= 3
    assert all(c.finish_reason is None for c in chunks[:-1])
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].completion_tokens == 16
    assert chunks[-1].prompt_tokens > 576  # image tokens are counted
    assert sum(len(c.token_ids) for c in chunks) == 16


def http_events(node: TritonNode, **body: object) -> list[dict[str, object]]:
    """The events of a ``generate_stream`` call to ``llava`` over HTTP (server-sent events)."""
    req = urllib.request.Request(
        f"{node.http_url}/v2/models/llava/generate_stream",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        raw = resp.read().decode()
    return [json.loads(line[len("data: ") :]) for line in raw.splitlines() if line.startswith("data: ")]


def test_http_generate_stream_yields_sse_events(node: TritonNode) -> None:
    events = http_events(node, prompt="USER: hello there ASSISTANT:", max_tokens=12, temperature=0.0)
    assert len(events) >= 2
    assert events[-1]["finish_reason"] == "length"
    assert events[-1]["completion_tokens"] == 12
    assert all(e["finish_reason"] == "" for e in events[:-1])


def test_http_generate_stream_takes_an_image_as_base64(node: TritonNode) -> None:
    """Over HTTP's generate extension an image can only be a JSON string: its base64 text
    is decoded by the node, and the answer is the one gRPC gets for the image's bytes.
    (A one-element output comes as a bare value there: ``token_ids`` is a number in a
    response that carries one token, a list otherwise.)"""
    import base64

    img = image_bytes(color=(20, 90, 160), size=(90, 70))
    b64 = base64.b64encode(img).decode()
    expected = generate(node, prompt=PROMPT, images=[img], max_tokens=10, temperature=0.0).token_ids
    for images in (b64, [b64], f"data:image/png;base64,{b64}"):
        events = http_events(node, prompt=PROMPT, images=images, max_tokens=10, temperature=0.0)
        assert events and events[-1]["finish_reason"] == "length", events[-1:]
        ids: list[object] = []
        for e in events:
            ids += e["token_ids"] if isinstance(e["token_ids"], list) else [e["token_ids"]]
        assert ids == expected, images if isinstance(images, list) else images[:30]


def test_greedy_output_equals_transformers_generate(node: TritonNode, tiny_checkpoint: Path) -> None:
    from transformers import AutoProcessor

    img = image_bytes(color=(10, 120, 220), size=(120, 90))
    got = generate(node, prompt=PROMPT, images=[img], max_tokens=40, temperature=0.0)
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    import io

    inputs = processor(images=[Image.open(io.BytesIO(img)).convert("RGB")], text=PROMPT, return_tensors="pt")
    ref = load_llava(tiny_checkpoint, torch.device("cpu"), torch.float32).model
    out = ref.generate(**inputs, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    expected = out[0, inputs["input_ids"].shape[1] :].tolist()
    assert got.token_ids == expected
    assert got.text == processor.tokenizer.decode(expected, skip_special_tokens=True)


def test_a_next_turn_reuses_the_cached_prefix_and_says_so(node: TritonNode) -> None:
    """The second turn of a conversation (its history resent, the same image) gets its
    prompt's start from the node's prefix cache: the same tokens as the first time for
    the shared part, ``cached_tokens`` in its responses, the node's hit counter up."""
    img = image_bytes(color=(77, 140, 33), size=(100, 80))
    prompt = "USER: <image>\nWhat is in this picture? Describe every detail you can see. ASSISTANT:"
    hits = metric(node, "llava_engine_prefix_cache_hit_tokens_total")
    first = generate(node, prompt=prompt, images=[img], max_tokens=12, temperature=0.0)
    assert first.cached_tokens == 0
    again = generate(node, prompt=prompt, images=[img], max_tokens=12, temperature=0.0)
    assert again.token_ids == first.token_ids
    assert again.cached_tokens == (first.prompt_tokens - 1) // 16 * 16 > 576  # past the image
    turn2 = f"{prompt} {first.text}</s>USER: And its colour? ASSISTANT:"
    second = generate(node, prompt=turn2, images=[img], max_tokens=12, temperature=0.0)
    assert first.prompt_tokens // 16 * 16 <= second.cached_tokens < second.prompt_tokens
    other = generate(
        node, prompt=prompt, images=[image_bytes(color=(78, 140, 33), size=(100, 80))], max_tokens=4
    )
    assert other.cached_tokens < 16  # another image: nothing past the text before it
    deadline = time.monotonic() + 10  # the node publishes its metrics once a second
    while (
        metric(node, "llava_engine_prefix_cache_hit_tokens_total")
        < hits + again.cached_tokens + second.cached_tokens
    ):
        assert time.monotonic() < deadline, "the hit counter did not grow"
        time.sleep(0.2)
    assert metric(node, "llava_engine_prefix_cache_tokens") > 0


def test_stop_string_stops_generation(node: TritonNode) -> None:
    full = generate(node, prompt=PROMPT, images=[image_bytes()], max_tokens=40, temperature=0.0)
    stop = full.text[15:19]
    assert stop.strip()
    stopped = generate(
        node, prompt=PROMPT, images=[image_bytes()], max_tokens=40, temperature=0.0, stop=[stop]
    )
    assert stopped.finish_reason == "stop"
    assert stop not in stopped.text
    assert full.text.startswith(stopped.text)
    assert stopped.completion_tokens < full.completion_tokens


def test_seed_makes_sampling_reproducible(node: TritonNode) -> None:
    a = generate(node, prompt="USER: hi ASSISTANT:", max_tokens=20, temperature=0.8, seed=42)
    b = generate(node, prompt="USER: hi ASSISTANT:", max_tokens=20, temperature=0.8, seed=42)
    c = generate(node, prompt="USER: hi ASSISTANT:", max_tokens=20, temperature=0.8, seed=43)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"prompt": PROMPT}, "1 <image> placeholder(s) but 0 image(s)"),
        (
            {"prompt": PROMPT, "images": [image_bytes(), image_bytes()]},
            "1 <image> placeholder(s) but 2 image(s)",
        ),
        ({"prompt": PROMPT, "images": [b"\x89PNG\r\n\x1a\nbroken"]}, "image 0"),
        ({"prompt": PROMPT, "images": [bomb_png()]}, "image 0 is"),
        ({"prompt": "word " * 2000}, "the model's context is 2048 tokens"),
        ({"prompt": "hi", "max_tokens": 0}, "max_tokens is 0"),
        ({"prompt": "hi", "max_tokens": 5000}, "max_tokens is 5000"),
        ({"prompt": "hi", "temperature": 3.0}, "temperature is 3.0"),
        ({"prompt": "hi", "top_p": 0.0}, "top_p is 0.0"),
        ({}, "a prompt or messages input is required"),
        ({"messages": "[{]"}, "messages is not valid JSON"),
    ],
)
def test_bad_input_gets_its_error_and_the_node_keeps_serving(node: TritonNode, kwargs, message) -> None:
    with pytest.raises(InferenceServerException) as err:
        generate(node, **kwargs)
    assert message in str(err.value)
    ok = generate(node, prompt="USER: still there? ASSISTANT:", max_tokens=4)
    assert ok.finish_reason == "length"


def test_closing_the_stream_and_cancelling_stops_the_model(node: TritonNode) -> None:
    cancelled_before = metric(node, "llava_engine_requests_cancelled_total")
    responses: queue.Queue[tuple[object, object]] = queue.Queue()
    client = grpcclient.InferenceServerClient(node.grpc_url)
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    client.async_stream_infer(
        "llava",
        build_inputs(grpcclient, prompt="USER: go on ASSISTANT:", max_tokens=2000),
        request_id="cancel-me",
    )
    try:
        for _ in range(5):
            _result, error = responses.get(timeout=60)
            assert error is None
    except queue.Empty:  # (seen once in CI): what the node was doing
        gauges = {
            g: metric(node, g) for g in ("llava_engine_active_requests", "llava_engine_queued_requests")
        }
        print(gauges, node.log_path.read_text()[-4000:])
        raise
    client.stop_stream(cancel_requests=True)  # the client closes its stream mid-way...
    client.close()
    assert cancel(node.grpc_url, "cancel-me") == 1  # ...and the engine hears of it
    deadline = time.monotonic() + 10
    while metric(node, "llava_engine_requests_cancelled_total") < cancelled_before + 1:
        assert time.monotonic() < deadline, "the model never reported the cancellation"
        time.sleep(0.2)
    log = node.log_path.read_text()
    m = re.search(r"request cancel-me cancelled after (\d+) tokens", log)
    assert m, "the model did not log the cancellation"
    assert int(m.group(1)) < 2000
    tokens = metric(node, "llava_engine_generated_tokens_total")
    time.sleep(1.5)  # metrics are published once a second
    assert metric(node, "llava_engine_generated_tokens_total") == tokens  # nothing more generated
    assert cancel(node.grpc_url, "cancel-me") == 0  # it is gone


def test_two_concurrent_streams_both_complete_correctly(node: TritonNode) -> None:
    solo = [
        generate(node, prompt=PROMPT, images=[image_bytes(color=c)], max_tokens=24, temperature=0.0)
        for c in [(250, 0, 0), (0, 0, 250)]
    ]
    results: list[GenerationResult | None] = [None, None]

    def run(i: int, color) -> None:
        results[i] = generate(
            node, prompt=PROMPT, images=[image_bytes(color=color)], max_tokens=24, temperature=0.0
        )

    threads = [threading.Thread(target=run, args=(i, c)) for i, c in enumerate([(250, 0, 0), (0, 0, 250)])]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.token_ids for r in results if r] == [s.token_ids for s in solo]


def test_launcher_failure_reports_the_server_log(tmp_path: Path) -> None:
    repo = tmp_path / "repo" / "broken"
    (repo / "1").mkdir(parents=True)
    (repo / "config.pbtxt").write_text('name: "broken"\nbackend: "no_such_backend"\n')
    node = TritonNode(TritonNodeConfig(model_repository=tmp_path / "repo", startup_timeout_s=60))
    with pytest.raises(NodeStartError) as err:
        node.start()
    assert "no_such_backend" in str(err.value)
    assert node.process is None


def test_node_answers_health_and_repository_index(node: TritonNode) -> None:
    assert urllib.request.urlopen(f"{node.http_url}/v2/health/ready", timeout=5).status == 200
    req = urllib.request.Request(f"{node.http_url}/v2/repository/index", data=b"{}", method="POST")
    index = json.loads(urllib.request.urlopen(req, timeout=5).read())
    states = {m["name"]: m.get("state") for m in index}
    assert states == {"llava": "READY", "llava_preprocess": "READY", "llava_engine": "READY"}
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(f"{node.http_url}/v2/models/nope/ready", timeout=5)
