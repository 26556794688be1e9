"""The model lifecycle on fake nodes: cold starts with requests waiting, failed and slow
loads, scale to zero, scale out, pins."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from control_plane.nodes.fake import FakeNode
from tests.fast.harness import Harness, eventually, node


def with_other(port: int, **behaviour: object) -> FakeNode:
    """A node whose repository also has ``other`` (min replicas 0), not loaded."""
    n = node(port, **behaviour)  # type: ignore[arg-type]
    n.set_models("UNAVAILABLE", "other")
    return n


async def test_a_request_for_a_model_loaded_nowhere_loads_it_and_waiters_share_the_load(
    tmp_path: Path,
) -> None:
    a = with_other(9000, load_delay_s=0.3)
    async with Harness(tmp_path, [a]).running() as h:
        results = await asyncio.gather(*(h.llava(model="other") for _ in range(5)))
        assert all(r.frames()[-1]["error_code"] == 0 for r in results)
        assert a.loads == ["other"]  # one load for the five
        assert len([s for s in a.streams if s.model == "other"]) == 5
        rows = await h.rows("SELECT event FROM model_events WHERE model = 'other' ORDER BY id")
        assert [r["event"] for r in rows] == ["load_requested", "loaded"]


async def test_a_failed_load_says_why_and_the_next_request_tries_another_node(tmp_path: Path) -> None:
    # equal in models loaded and in load: the lower id (the broken one, registered first) goes first
    broken = with_other(9000, load_error="checkpoint directory /x has no config.json")
    fine = with_other(9010)
    async with Harness(tmp_path, [broken, fine]).running() as h:
        r = await h.chat(model="other")
        assert r.status == 502 and r.json()["error"]["code"] == "model_load_failed"
        assert (
            "has no config.json" in r.json()["error"]["message"]
            and broken.http_url in r.json()["error"]["message"]
        )
        r = await h.chat(model="other")
        assert r.status == 200, r.body
        assert (broken.loads, fine.loads) == (["other"], ["other"])


async def test_a_load_slower_than_the_cold_start_timeout_answers_503_and_carries_on(tmp_path: Path) -> None:
    slow = with_other(9000, load_delay_s=0.5)
    async with Harness(tmp_path, [slow], cold_start_timeout_s=0.1).running() as h:
        r = await h.chat(model="other")
        assert r.status == 503 and r.json()["error"]["code"] == "model_loading"
        await eventually(lambda: slow.models["other"] == "READY", 3, "the load to finish anyway")
        assert (await h.chat(model="other")).status == 200


@pytest.mark.parametrize("policy", ["cache_aware", "shortest_queue"])
async def test_get_worker_address_loads_a_cold_model_and_the_address_streams(
    tmp_path: Path, policy: str
) -> None:
    a = with_other(9000, load_delay_s=0.1)
    async with Harness(tmp_path, [a], dispatch_policy=policy).running() as h:
        r = await h.client.post("/get_worker_address", {"model": "other"})
        address = r.json()["address"]
        assert a.loads == ["other"]
        # cache_aware: the control plane itself (the node is chosen per stream, from its
        # content); else the node chosen here, pinned
        assert (
            address == "http://testserver"
            if policy == "cache_aware"
            else address.endswith(f"/workers/{h.worker(a).id}")
        )
        path = address.split("testserver", 1)[1] + "/worker_generate_stream"
        assert (await h.llava(path, model="other")).frames()[-1]["error_code"] == 0


async def test_an_idle_replica_is_unloaded_down_to_the_minimum(tmp_path: Path) -> None:
    a, b = with_other(9000), with_other(9010)
    a.set_models("READY", "other")
    b.set_models("READY", "other")
    async with Harness(tmp_path, [a, b], idle_ttl_s=0.3, model_min_replicas={"other": 1}).running() as h:

        def unloaded() -> int:
            return (a.unloads + b.unloads).count("other")

        await eventually(lambda: unloaded() == 1, 3, "one idle replica unloaded")
        await asyncio.sleep(0.5)
        assert unloaded() == 1  # the minimum stays
        rows = await h.rows(
            "SELECT event, reason FROM model_events WHERE event = 'unloaded' AND model = 'other'"
        )
        assert len(rows) == 1 and "idle for" in rows[0]["reason"]


async def test_a_model_with_no_minimum_scales_to_zero_and_comes_back_on_demand(tmp_path: Path) -> None:
    a = with_other(9000)
    a.set_models("READY", "other")
    async with Harness(tmp_path, [a], idle_ttl_s=0.2).running() as h:
        await eventually(lambda: a.unloads == ["other"], 3, "scaled to zero")
        assert (await h.chat(model="other")).status == 200
        assert a.loads == ["other"]


async def test_a_poll_that_read_the_index_before_an_unload_does_not_put_the_model_back(
    tmp_path: Path,
) -> None:
    # every poll answers 0.3 s late with the index as it was when it was asked: one is in
    # flight whenever the idle model is unloaded, and says it is still READY
    a = with_other(9000, poll_delay_s=0.3)
    a.set_models("READY", "other")
    async with Harness(tmp_path, [a], idle_ttl_s=0.2).running() as h:
        await eventually(lambda: a.unloads == ["other"], 3, "scaled to zero")
        polls = a.polls
        await eventually(lambda: a.polls > polls, 3, "the poll asked before the unload answered")
        assert not h.worker(a).models["other"].ready
        assert (await h.chat(model="other")).status == 200  # a cold start, not a node that has it not
        assert a.loads == ["other"]


async def test_a_pinned_model_is_never_unloaded(tmp_path: Path) -> None:
    a = with_other(9000)
    a.set_models("READY", "other")
    async with Harness(tmp_path, [a], idle_ttl_s=0.1, pinned_models=["other"]).running() as h:
        await asyncio.sleep(0.5)
        assert a.unloads == []
        r = await h.client.post("/admin/models/other/unload")
        assert r.status == 409 and "pinned" in r.json()["detail"]


async def test_load_above_the_threshold_adds_a_replica(tmp_path: Path) -> None:
    a, b = with_other(9000, tokens=["x"] * 100, token_delay_s=0.01), with_other(9010)
    a.set_models("READY", "other")
    async with Harness(tmp_path, [a, b], scale_out_inflight=2).running() as h:
        streams = [asyncio.create_task(h.llava(model="other")) for _ in range(4)]
        await eventually(lambda: b.loads == ["other"], 3, "a second replica")
        await asyncio.gather(*streams)
        rows = await h.rows("SELECT reason FROM model_events WHERE event = 'load_requested'")
        assert any("scale out" in r["reason"] for r in rows)
