"""Served names on real nodes: the tiny checkpoint is listed under a name LLaVA's web UI
maps to its llava-1.5 template, and a generation through that name works on both APIs."""

from __future__ import annotations

import httpx

from tests.control_plane.conftest import TINY_SERVED_NAME, llava_stream, sql, wait_for
from tests.fast.test_served_names import llava_web_ui_template
from tests.processes import ControlPlaneProcess

PROMPT = "A chat between a curious human and an AI. USER: What is shown here? ASSISTANT:"


def test_the_nodes_served_name_is_listed_and_generates_on_both_apis(
    control_plane: ControlPlaneProcess,
) -> None:
    url = control_plane.url
    assert httpx.post(f"{url}/refresh_all_workers", timeout=30).status_code == 200
    wait_for(
        lambda: httpx.post(f"{url}/list_models", timeout=10).json()["models"] == [TINY_SERVED_NAME],
        30,
        "listed",
    )
    assert llava_web_ui_template(TINY_SERVED_NAME) == "llava_v1"  # the tiny checkpoint's format
    assert [m["id"] for m in httpx.get(f"{url}/v1/models", timeout=10).json()["data"]] == [TINY_SERVED_NAME]
    address = httpx.post(f"{url}/get_worker_address", json={"model": TINY_SERVED_NAME}, timeout=30).json()
    assert address["address"], address
    params = {
        "model": TINY_SERVED_NAME,
        "prompt": PROMPT,
        "max_new_tokens": 8,
        "temperature": 0,
        "stop": "</s>",
    }
    status, frames = llava_stream(f"{address['address']}/worker_generate_stream", params)
    assert status == 200 and frames[-1]["error_code"] == 0, frames[-1]
    assert frames[-1]["text"].startswith(PROMPT)
    chat = httpx.post(
        f"{url}/v1/chat/completions",
        json={"model": TINY_SERVED_NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8},
        timeout=60,
    )
    assert chat.status_code == 200, chat.text
    assert chat.json()["model"] == TINY_SERVED_NAME and chat.json()["choices"][0]["finish_reason"]
    # the Triton name still works (tritonclient users' name), and requests record it
    status, frames = llava_stream(f"{url}/worker_generate_stream", {**params, "model": "llava"})
    assert status == 200 and frames[-1]["error_code"] == 0
    rows = sql(control_plane, "SELECT DISTINCT model FROM requests WHERE api IN ('llava', 'openai')")
    assert {r["model"] for r in rows} == {"llava"}
