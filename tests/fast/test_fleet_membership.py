"""Which workers the fleet keeps: workers restored at start are not trusted until a poll
answers, workers offline for the retention period are removed, and LLaVA's
``/refresh_all_workers`` drops those that do not answer (each change recorded)."""

from __future__ import annotations

from pathlib import Path

from control_plane.fleet.workers import WorkerState
from tests.fast.harness import Harness, eventually, node


async def _events(h: Harness, worker_id: int = 1) -> list[tuple[str, str, str]]:
    rows = await h.rows(
        f"SELECT from_state, to_state, reason FROM worker_events WHERE worker_id = {worker_id} ORDER BY id"
    )
    return [(r["from_state"], r["to_state"], r["reason"]) for r in rows]


async def test_a_worker_restored_at_start_is_unknown_and_not_routed_to_until_a_poll_answers(
    tmp_path: Path,
) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b]).running() as h:
        assert h.worker(a).state is WorkerState.HEALTHY
    a.up = False  # gone while the control plane was down
    second = Harness(tmp_path, [a, b], unhealthy_after_failures=100, fakes=h.nodes)
    async with second.running() as h2:
        assert h2.worker(a).state is WorkerState.UNKNOWN  # not healthy: it has not answered
        before = len(a.streams)
        for _ in range(3):
            assert (await h2.llava()).frames()[-1]["error_code"] == 0
        assert len(a.streams) == before  # nothing routed to it
        events = await _events(h2)
        assert events[-1][:2] == ("healthy", "unknown") and "control plane started" in events[-1][2]
        a.up = True
        await eventually(lambda: h2.worker(a).state is WorkerState.HEALTHY, what="healthy after a poll")
        assert [e[:2] for e in await _events(h2)][-2:] == [("healthy", "unknown"), ("unknown", "healthy")]
        assert (await h2.rows("SELECT state FROM workers WHERE id = 1")) == [{"state": "healthy"}]


async def test_a_worker_offline_longer_than_the_retention_is_removed(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    # (the retention counts from the last answer: well past the time to go offline, so
    # that the offline state is seen before the removal however slowly the polls run)
    async with Harness(tmp_path, [a, b], offline_after_s=0.1, offline_worker_ttl_s=2.0).running() as h:
        a.up = False
        await eventually(lambda: h.worker(a).state is WorkerState.OFFLINE, what="offline")
        await eventually(lambda: h.cp.store.by_name(a.http_url) is None, what="removed")
        last = (await _events(h))[-1]
        assert last[:2] == ("offline", "removed") and "offline_worker_ttl_s" in last[2]
        assert (await h.rows("SELECT state FROM workers WHERE id = 1")) == [{"state": "removed"}]
        assert h.worker(b).state is WorkerState.HEALTHY


async def test_no_retention_keeps_offline_workers(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b], offline_after_s=0.05, offline_worker_ttl_s=0).running() as h:
        a.up = False
        await eventually(lambda: h.worker(a).state is WorkerState.OFFLINE, what="offline")
        await h.client.post("/admin/sql", {"query": "SELECT 1"})
        assert h.cp.store.by_name(a.http_url) is not None


async def test_refresh_all_workers_takes_a_silent_worker_out_then_removes_it_once_offline(
    tmp_path: Path,
) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b], unhealthy_after_failures=100, offline_after_s=1.0).running() as h:
        a.up = False
        first = (await h.client.post("/refresh_all_workers")).json()
        assert first["removed"] == [] and first["healthy"] == 1
        assert h.worker(a).state is WorkerState.UNHEALTHY  # out of routing at once, kept
        assert (await _events(h))[-1][:2] == ("healthy", "unhealthy")
        # a node that is restarting is not dropped by the next page load of the web UI
        second = (await h.client.post("/refresh_all_workers")).json()
        assert second["removed"] == [] and h.worker(a).state is WorkerState.UNHEALTHY
        await eventually(lambda: h.worker(a).state is WorkerState.OFFLINE, what="offline")
        third = (await h.client.post("/refresh_all_workers")).json()
        assert third["removed"] == [a.http_url] and third["workers"] == 1
        assert h.cp.store.by_name(a.http_url) is None
        last = (await _events(h))[-1]
        assert last[:2] == ("offline", "removed") and "/refresh_all_workers" in last[2]
        assert (await h.client.post("/list_models")).json() == {"models": ["llava"]}  # served by b


async def test_refresh_all_workers_keeps_a_worker_that_answers_again(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b], unhealthy_after_failures=100).running() as h:
        a.up = False
        await h.client.post("/refresh_all_workers")
        a.up = True
        assert (await h.client.post("/refresh_all_workers")).json()["removed"] == []
        assert h.worker(a).state is WorkerState.HEALTHY
