"""The fleet on fake nodes: health states from polls, registration, and poll leases shared by
two control-plane replicas over one database (the lease taken over when its holder stops
or dies)."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from control_plane.fleet.workers import WorkerState
from tests.fast.harness import Harness, eventually, node


async def test_a_node_that_stops_answering_goes_unhealthy_then_offline_and_comes_back(tmp_path: Path) -> None:
    flaky, steady = node(9000), node(9010)
    async with Harness(tmp_path, [flaky, steady], offline_after_s=0.3).running() as h:
        assert h.worker(flaky).state is WorkerState.HEALTHY
        flaky.up = False
        await eventually(lambda: h.worker(flaky).state is WorkerState.UNHEALTHY, what="unhealthy")
        assert (await h.llava()).frames()[-1]["error_code"] == 0  # served by the other
        await eventually(lambda: h.worker(flaky).state is WorkerState.OFFLINE, what="offline")
        flaky.up = True
        await eventually(lambda: h.worker(flaky).state is WorkerState.HEALTHY, what="healthy again")
        rows = await h.rows("SELECT from_state, to_state FROM worker_events WHERE worker_id = 1 ORDER BY id")
        assert [(r["from_state"], r["to_state"]) for r in rows][-4:] == [
            ("unknown", "healthy"),
            ("healthy", "unhealthy"),
            ("unhealthy", "offline"),
            ("offline", "healthy"),
        ]


async def test_one_failed_poll_takes_a_nodes_models_out_of_routing_at_once(tmp_path: Path) -> None:
    flaky, steady = node(9000), node(9010)
    async with Harness(tmp_path, [flaky, steady], unhealthy_after_failures=100).running() as h:
        flaky.up = False
        await eventually(lambda: h.worker(flaky).consecutive_failures >= 1, what="a failed poll")
        assert h.worker(flaky).state is WorkerState.HEALTHY  # not yet unhealthy...
        before = len(steady.streams)
        for _ in range(4):  # ...but nothing is sent to it
            assert (await h.llava()).frames()[-1]["error_code"] == 0
        assert len(steady.streams) == before + 4


async def test_a_worker_registered_with_the_worker_token_is_polled_and_served(tmp_path: Path) -> None:
    h = Harness(tmp_path, [], worker_token="w")
    extra = h.nodes.add(node(9020))
    async with h.running():
        r = await h.client.post(
            "/register_worker", {"worker_name": extra.http_url}, headers={"Authorization": "Bearer w"}
        )
        assert r.status == 200 and r.json()["state"] == "healthy"
        assert h.worker(extra).grpc_url == extra.grpc_url and h.worker(extra).metrics_url == extra.metrics_url
        assert (await h.llava()).frames()[-1]["error_code"] == 0
        assert len(extra.streams) == 1


async def test_removing_a_worker_takes_it_out_of_routing_and_keeps_its_history(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b]).running() as h:
        assert (await h.client.request("DELETE", f"/admin/workers/{h.worker(a).id}")).status == 200
        for _ in range(3):
            await h.llava()
        assert len(a.streams) == 0 and len(b.streams) == 3
        rows = await h.rows("SELECT to_state, reason FROM worker_events WHERE worker_id = 1 ORDER BY id")
        assert rows[-1] == {"to_state": "removed", "reason": "removed by admin"}


async def test_two_replicas_share_the_polling_and_one_takes_over_when_the_other_stops(tmp_path: Path) -> None:
    a = node(9000)
    first = Harness(tmp_path, [a], instance_name="first")
    second = Harness(tmp_path, [a], instance_name="second", fakes=first.nodes)
    async with contextlib.AsyncExitStack() as stack:
        stop_first = contextlib.AsyncExitStack()
        await stop_first.enter_async_context(first.running())
        await stack.enter_async_context(second.running())
        await asyncio.sleep(0.3)
        assert [r["holder"] for r in await second.rows("SELECT holder FROM poll_leases")] == ["first"]
        polled_by = await second.rows("SELECT DISTINCT replica FROM heartbeats WHERE source = 'poll'")
        assert [r["replica"] for r in polled_by] == ["first"]  # one replica polls the node
        # both serve it: the second learns its state from the rows the first writes
        assert (await second.llava()).frames()[-1]["error_code"] == 0
        await stop_first.aclose()  # the first releases its leases as it stops...
        await eventually(lambda: second.cp.leases.holds(second.worker(a).id), 1, "taken over")
        assert [r["holder"] for r in await second.rows("SELECT holder FROM poll_leases")] == ["second"]


async def test_a_replica_that_dies_holding_leases_loses_them_after_the_lease_period(tmp_path: Path) -> None:
    a = node(9000)
    # (a lease period long against the second replica's start-up on a loaded machine: it
    # must find the lease still held, then take it once it has run out)
    first = Harness(tmp_path, [a], instance_name="first", lease_period_s=2.0)
    second = Harness(tmp_path, [a], instance_name="second", lease_period_s=2.0, fakes=first.nodes)
    async with first.running():
        await eventually(lambda: first.cp.leases.holds(first.worker(a).id), what="the first holds the lease")
        await first.cp.poller.stop()  # it "dies": no more rounds, its leases are never released
        async with second.running():
            assert not second.cp.leases.holds(second.worker(a).id)
            await eventually(lambda: second.cp.leases.holds(second.worker(a).id), 6, "taken over")
            holders = await second.rows("SELECT holder FROM poll_leases")
            assert [r["holder"] for r in holders] == ["second"]
