"""LLaVA's controller protocol against a real control plane and two real Triton nodes."""

from __future__ import annotations

import base64
import concurrent.futures
import itertools
import time

import httpx
import pytest

from llava_node.client import stream_generate
from llava_node.launcher import TritonNode
from llava_wire.messages import GenerationResult
from tests.control_plane.conftest import TINY_SERVED_NAME, WORKER_TOKEN, admin_get, llava_stream, wait_for
from tests.media import image_b64, image_bytes
from tests.processes import ControlPlaneProcess

PROMPT = "A chat between a curious human and an AI. USER: <image>\nWhat is shown here? ASSISTANT:"


def test_llava_client_flow_streams_cumulative_frames(control_plane: ControlPlaneProcess) -> None:
    url = control_plane.url
    assert httpx.post(f"{url}/refresh_all_workers", timeout=30).status_code == 200
    models = httpx.post(f"{url}/list_models", timeout=10).json()["models"]
    assert models == [TINY_SERVED_NAME]
    address = httpx.post(f"{url}/get_worker_address", json={"model": "llava"}, timeout=10).json()["address"]
    assert address == url  # cache_aware, the default: the node is chosen per stream, from its content
    params = {
        "model": "llava",
        "prompt": PROMPT,
        "images": [image_b64()],
        "temperature": 0.0,
        "top_p": 1.0,
        "max_new_tokens": 24,
        "stop": "###",
    }
    status, frames = llava_stream(address + "/worker_generate_stream", params)
    assert status == 200
    assert len(frames) >= 3
    assert all(f["error_code"] == 0 for f in frames)
    texts = [f["text"] for f in frames]
    assert all(t.startswith(PROMPT) for t in texts)  # the prompt exactly as sent, then the output
    assert all(b.startswith(a) for a, b in itertools.pairwise(texts))  # cumulative
    assert frames[-1]["finish_reason"] == "length"
    assert frames[-1]["usage"]["completion_tokens"] == 24


def test_output_through_the_protocol_equals_tritonclient_direct(
    control_plane: ControlPlaneProcess, fleet: list[TritonNode]
) -> None:
    img = image_bytes(color=(40, 160, 90))
    direct = GenerationResult()
    for chunk in stream_generate(
        fleet[1].grpc_url, prompt=PROMPT, images=[img], max_tokens=20, temperature=0.0
    ):
        direct.add(chunk)
    params = {
        "model": "llava",
        "prompt": PROMPT,
        "images": [base64.b64encode(img).decode()],
        "temperature": 0.0,
        "max_new_tokens": 20,
    }
    _, frames = llava_stream(f"{control_plane.url}/worker_generate_stream", params)
    assert frames[-1]["text"] == PROMPT + direct.text


def test_no_worker_for_a_model_gives_one_error_frame(control_plane: ControlPlaneProcess) -> None:
    params = {"model": "llava-13b", "prompt": "USER: hi ASSISTANT:"}
    status, frames = llava_stream(f"{control_plane.url}/worker_generate_stream", params)
    assert len(frames) == 1
    assert frames[0]["error_code"] == 2
    assert "llava-13b" in frames[0]["text"]
    assert status == 404
    address = httpx.post(f"{control_plane.url}/get_worker_address", json={"model": "llava-13b"}).json()
    assert address == {"address": ""}


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"model": "llava", "prompt": PROMPT}, "1 <image> placeholder(s) but 0 image(s)"),
        ({"model": "llava", "prompt": PROMPT, "images": ["%%%not-base64"]}, "images[0] is not valid base64"),
        ({"model": "llava", "prompt": PROMPT, "images": [base64.b64encode(b"hello").decode()]}, "image 0"),
        ({"model": "llava", "prompt": "hi", "max_new_tokens": 0}, "max_new_tokens is 0"),
        ({"model": "llava", "prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"model": "llava"}, "prompt"),
    ],
)
def test_bad_input_gets_a_frame_naming_the_problem(
    control_plane: ControlPlaneProcess, params, message
) -> None:
    status, frames = llava_stream(f"{control_plane.url}/worker_generate_stream", params)
    assert status == 400
    assert len(frames) == 1 and frames[0]["error_code"] == 5
    assert message in frames[0]["text"]


def test_malformed_json_is_a_clear_400(control_plane: ControlPlaneProcess) -> None:
    r = httpx.post(f"{control_plane.url}/worker_generate_stream", content=b"{not json", timeout=10)
    assert r.status_code == 400
    assert b"not valid JSON" in r.content and r.content.endswith(b"\0")


def test_shortest_queue_spreads_concurrent_requests_and_counts_return_to_zero(
    control_plane: ControlPlaneProcess,
) -> None:
    prompt = "USER: tell me more ASSISTANT:"
    params = {"model": "llava", "max_new_tokens": 48, "temperature": 0.0}

    def one(i: int) -> int:
        status, frames = llava_stream(
            f"{control_plane.url}/worker_generate_stream",
            {**params, "prompt": prompt + " " * (i % 3)},
        )
        assert status == 200 and frames[-1]["error_code"] == 0
        return len(frames)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        assert all(n > 1 for n in pool.map(one, range(16)))
    wait_for(
        lambda: all(w["inflight"] == 0 for w in admin_get(control_plane, "/admin/workers")["workers"]),
        10,
        "in-flight counts back to zero",
    )
    time.sleep(1)  # the request rows are written in batches
    r = httpx.post(
        f"{control_plane.url}/admin/sql",
        json={
            "query": "SELECT worker_id, COUNT(*) AS n FROM requests WHERE status = 'ok' GROUP BY worker_id"
        },
    )
    per_worker = {row[0]: row[1] for row in r.json()["rows"]}
    assert len(per_worker) == 2 and min(per_worker.values()) >= 3, per_worker


def test_worker_status_heartbeat_and_registration(
    control_plane: ControlPlaneProcess, fleet: list[TritonNode]
) -> None:
    url = control_plane.url
    status = httpx.post(f"{url}/worker_get_status").json()
    assert status["model_names"] == [TINY_SERVED_NAME] and status["speed"] == 2
    worker = {"Authorization": f"Bearer {WORKER_TOKEN}"}  # LLaVA's worker pushes need a credential
    beat = {"worker_name": fleet[0].http_url, "queue_length": 0}
    assert httpx.post(f"{url}/receive_heart_beat", json=beat).status_code == 401
    assert httpx.post(f"{url}/receive_heart_beat", json=beat, headers=worker).json() == {"exist": True}
    assert httpx.post(
        f"{url}/receive_heart_beat",
        json={"worker_name": "http://10.9.9.9:8000", "queue_length": 1},
        headers=worker,
    ).json() == {"exist": False}
    again = httpx.post(
        f"{url}/register_worker",
        json={
            "worker_name": fleet[0].http_url + "/",
            "check_heart_beat": True,
            "worker_status": {"model_names": ["llava"], "speed": 1, "queue_length": 0},
        },
        headers=worker,
    )
    assert again.status_code == 200 and again.json()["created"] is False
    bad = httpx.post(f"{url}/register_worker", json={"worker_name": "ftp://user:pw@host:21"}, headers=worker)
    assert bad.status_code == 400 and "scheme" in bad.json()["detail"]
