"""Serving on fake nodes: retries and backoff, the circuit breaker, stalls, cancellation when
the client leaves, queueing and 429."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

from control_plane.fleet.workers import WorkerState
from control_plane.nodes.parsing import node_error_param
from control_plane.serving.records import node_request_id
from tests.fast.harness import Harness, eventually, node

# -- retries and backoff -------------------------------------------------------------------------


async def test_a_node_that_refuses_before_the_first_token_is_retried_on_another(tmp_path: Path) -> None:
    bad, good = node(9000, fail_before_first="unreachable"), node(9010)
    async with Harness(tmp_path, [bad, good], dispatch_policy="round_robin").running() as h:
        for _ in range(4):  # round robin puts some on the bad node first
            r = await h.llava()
            assert r.status == 200 and r.frames()[-1]["error_code"] == 0
            assert r.frames()[-1]["text"].endswith("Hello, world!")
        assert bad.streams and all(s.error for s in bad.streams)
        rows = await h.rows("SELECT attempts, status FROM requests ORDER BY started_at")
        assert {row["status"] for row in rows} == {"ok"} and max(row["attempts"] for row in rows) == 2


async def test_a_node_error_before_the_first_token_is_retried_on_another(tmp_path: Path) -> None:
    # e.g. a node being killed: its server still answers while its model stubs are gone
    broken, good = node(9000, fail_before_first="error"), node(9010)
    async with Harness(
        tmp_path, [broken, good], breaker_threshold=2, dispatch_policy="round_robin"
    ).running() as h:
        for _ in range(4):
            r = await h.chat()
            assert r.status == 200 and r.json()["choices"][0]["message"]["content"].endswith("Hello, world!")
        assert broken.streams and all(s.error for s in broken.streams)
        rows = await h.rows("SELECT attempts, status FROM requests ORDER BY started_at")
        assert {row["status"] for row in rows} == {"ok"} and max(row["attempts"] for row in rows) == 2
        assert len(broken.streams) == 2
        assert h.worker(broken).state is WorkerState.UNHEALTHY  # counted against the node


async def test_retries_back_off(tmp_path: Path) -> None:
    bad, good = node(9000, fail_before_first="unreachable"), node(9010)
    async with Harness(
        tmp_path, [bad, good], retry_backoff_s=0.3, dispatch_policy="round_robin"
    ).running() as h:
        times = []
        for _ in range(2):
            started = time.monotonic()
            assert (await h.llava()).status == 200
            times.append(time.monotonic() - started)
        assert max(times) >= 0.3  # the one that met the bad node waited before its retry
        assert min(times) < 0.3


async def test_when_every_attempt_fails_the_client_gets_one_clear_error(tmp_path: Path) -> None:
    nodes = [node(9000 + 10 * i, fail_before_first="unreachable") for i in range(3)]
    async with Harness(tmp_path, nodes, max_attempts=3, breaker_threshold=100).running() as h:
        r = await h.chat()
        assert r.status == 502 and r.json()["error"]["code"] == "worker_unreachable"
        r = await h.llava()
        assert r.status == 502 and r.frames() == [{"text": r.frames()[0]["text"], "error_code": 3}]
        assert sum(len(n.streams) for n in nodes) == 6


async def test_a_node_error_after_the_first_token_ends_the_stream_with_one_error(tmp_path: Path) -> None:
    flaky = node(9000, fail_after=2)
    async with Harness(tmp_path, [flaky]).running() as h:
        r = await h.llava()
        frames = r.frames()
        assert r.status == 200 and [f["error_code"] for f in frames] == [0, 0, 1]
        assert "generation failed on the node" in frames[-1]["text"]
        events = (await h.chat(stream=True)).events()
        assert "error" in events[-2] and events[-1] == "[DONE]"
        assert len(flaky.streams) == 2  # not retried: tokens had reached the client


async def test_a_request_the_node_rejects_is_the_clients_400_and_is_not_retried(tmp_path: Path) -> None:
    picky, other = node(9000, fail_before_first="client"), node(9010, fail_before_first="client")
    async with Harness(tmp_path, [picky, other], breaker_threshold=1).running() as h:
        r = await h.chat()
        assert r.status == 400 and r.json()["error"]["message"] == "the prompt is empty"
        assert r.json()["error"]["param"] == "messages"  # the node's "prompt", in OpenAI's terms
        frames = (await h.llava()).frames()
        assert frames[-1]["error_code"] != 0 and "the prompt is empty" in frames[-1]["text"]
        assert len(picky.streams) + len(other.streams) == 2
        assert h.worker(picky).state is WorkerState.HEALTHY and h.worker(other).state is WorkerState.HEALTHY


# -- the circuit breaker -------------------------------------------------------------------------


async def test_consecutive_node_errors_open_the_circuit(tmp_path: Path) -> None:
    sick, well = node(9000, fail_after=0), node(9010)
    async with Harness(
        tmp_path, [sick, well], breaker_threshold=3, dispatch_policy="round_robin"
    ).running() as h:
        for _ in range(8):
            await h.llava()
        assert h.worker(sick).state is WorkerState.UNHEALTHY
        assert len(sick.streams) == 3  # out of routing after its third failure
        before = len(well.streams)
        for _ in range(3):
            assert (await h.llava()).frames()[-1]["error_code"] == 0
        assert len(well.streams) == before + 3


async def test_after_the_cooldown_a_poll_brings_it_back_half_open(tmp_path: Path) -> None:
    sick, well = node(9000, fail_after=0), node(9010)
    settings: dict[str, Any] = {
        "breaker_threshold": 2,
        "breaker_cooldown_s": 0.3,
        "dispatch_policy": "round_robin",
    }
    async with Harness(tmp_path, [sick, well], **settings).running() as h:
        for _ in range(4):
            await h.llava()
        assert h.worker(sick).state is WorkerState.UNHEALTHY
        await asyncio.sleep(0.1)
        assert h.worker(sick).state is WorkerState.UNHEALTHY  # polls succeed, but the cooldown holds
        await eventually(lambda: h.worker(sick).state is WorkerState.HEALTHY, 2, "back after the cooldown")
        for _ in range(3):  # half open: one more failure opens it again
            await h.llava()
        assert h.worker(sick).state is WorkerState.UNHEALTHY


async def test_client_mistakes_never_open_the_circuit(tmp_path: Path) -> None:
    picky = node(9000, fail_before_first="client")
    async with Harness(tmp_path, [picky], breaker_threshold=2).running() as h:
        for _ in range(12):
            assert (await h.llava()).status == 400
        assert h.worker(picky).state is WorkerState.HEALTHY


# -- stalls -------------------------------------------------------------------------------------


async def test_a_stream_that_stalls_is_ended_and_cancelled_on_the_node(tmp_path: Path) -> None:
    stuck = node(9000, stall_after=2)
    async with Harness(tmp_path, [stuck], stall_timeout_s=0.3).running() as h:
        started = time.monotonic()
        r = await h.llava()
        assert 0.3 <= time.monotonic() - started < 2
        frames = r.frames()
        assert [f["error_code"] for f in frames[-1:]] == [3] and "sent nothing for 0.3 s" in frames[-1][
            "text"
        ]
        await eventually(lambda: stuck.cancels == [stuck.streams[0].request_id], what="a cancel call")


async def test_a_node_silent_before_the_first_token_is_left_for_another(tmp_path: Path) -> None:
    silent, good = node(9000, stall_after=0), node(9010)
    async with Harness(
        tmp_path, [silent, good], first_token_timeout_s=0.2, dispatch_policy="round_robin"
    ).running() as h:
        for _ in range(2):
            r = await h.llava()
            assert r.frames()[-1]["error_code"] == 0
        assert len(silent.streams) == 1 and silent.cancels == [silent.streams[0].request_id]


async def test_a_request_waiting_on_a_node_that_freezes_moves_once_the_node_is_out(tmp_path: Path) -> None:
    # A frozen node answers nothing, polls included: the poller takes it out of routing, and
    # the request still waiting there for its first token goes elsewhere at once rather
    # than after the first-token timeout.
    frozen, good = node(9000, stall_after=0), node(9010, up=False)
    async with Harness(tmp_path, [frozen, good], first_token_timeout_s=30).running() as h:
        await eventually(lambda: h.worker(frozen).can_serve("llava"), what="the first node up")
        started = time.monotonic()
        request = asyncio.create_task(h.llava())
        await eventually(lambda: bool(frozen.streams), what="the request on the first node")
        frozen.up, good.up = False, True
        r = await request
        assert r.frames()[-1]["error_code"] == 0 and r.frames()[-1]["text"].endswith("Hello, world!")
        assert time.monotonic() - started < 3
        assert frozen.cancels == [frozen.streams[0].request_id] or frozen.streams[0].closed_early
        rows = await h.rows("SELECT attempts, status FROM requests")
        assert rows == [{"attempts": 2, "status": "ok"}]


# -- cancellation when the client leaves --------------------------------------------------------


def sent_as(cancels: list[str], request_id: str) -> bool:
    """Whether ``cancels`` is one cancel of the request its client called ``request_id``
    (nodes see it with a suffix of its own: records.node_request_id)."""
    return len(cancels) == 1 and cancels[0].rpartition(".")[0] == request_id


async def test_a_client_that_leaves_mid_stream_cancels_the_generation(tmp_path: Path) -> None:
    slow = node(9000, tokens=["x"] * 200, token_delay_s=0.01)
    async with Harness(tmp_path, [slow]).running() as h:
        r = await h.llava(disconnect_after=3, headers={"X-Request-Id": "leaver"})
        assert r.status == 200 and len(r.frames()) == 3
        await eventually(lambda: sent_as(slow.cancels, "leaver"), what="a cancel call")
        await eventually(lambda: h.worker(slow).inflight == 0, what="the slot freed")
        rows = await h.rows("SELECT status, error FROM requests")
        assert rows == [{"status": "cancelled", "error": "the client went away"}]


async def test_an_openai_stream_whose_client_leaves_is_cancelled(tmp_path: Path) -> None:
    slow = node(9000, tokens=["x"] * 200, token_delay_s=0.01)
    async with Harness(tmp_path, [slow]).running() as h:
        await h.chat(stream=True, disconnect_after=4, headers={"X-Request-Id": "sse"})
        await eventually(lambda: sent_as(slow.cancels, "sse"), what="a cancel call")


async def test_a_non_streamed_request_whose_client_leaves_is_cancelled(tmp_path: Path) -> None:
    slow = node(9000, tokens=["x"] * 200, token_delay_s=0.01)
    async with Harness(tmp_path, [slow]).running() as h:
        r = await h.chat(disconnect_at=0.2, headers={"X-Request-Id": "whole"})
        assert r.chunks == []  # nothing was sent to a client that had gone
        await eventually(lambda: sent_as(slow.cancels, "whole"), what="a cancel call")
        assert slow.streams[0].sent < 200


async def test_a_stream_cancelled_on_its_node_by_someone_else_ends_with_an_error(tmp_path: Path) -> None:
    """A cancel call on the node (an operator's, with tritonclient) while the client still
    reads: the client gets what was generated, then an error saying so, never a "stop"
    that passes a cut answer off as whole (both APIs)."""
    slow = node(9000, tokens=["x"] * 200, token_delay_s=0.01)
    async with Harness(tmp_path, [slow]).running() as h:
        for n, (api, call) in enumerate((("llava", h.llava), ("openai", lambda: h.chat(stream=True)))):
            request = asyncio.create_task(call())
            await eventually(
                lambda n=n: len(slow.streams) > n and slow.streams[n].sent >= 3, what="streaming"
            )
            s = slow.streams[n]
            assert await h.cp.nodes.cancel(slow.grpc_url, "llava", s.request_id) == 1
            r = await request
            if api == "llava":
                last = r.frames()[-1]
                assert last["error_code"] != 0 and "cancelled the request after" in last["text"], last
                assert r.frames()[-2]["text"].endswith("x" * (s.sent - 1))
            else:
                events = r.events()
                errors = [e["error"]["message"] for e in events if isinstance(e, dict) and "error" in e]
                assert len(errors) == 1 and "cancelled the request after" in errors[0], events[-3:]
                assert not any(
                    c.get("finish_reason")
                    for e in events
                    if isinstance(e, dict)
                    for c in e.get("choices", ())
                )
        rows = await h.rows("SELECT status, error FROM requests")
        assert [r["status"] for r in rows] == ["error", "error"]
        assert all("cancelled the request after" in r["error"] for r in rows)


async def test_a_client_that_leaves_while_queued_gives_its_place_up(tmp_path: Path) -> None:
    busy = node(9000, tokens=["x"] * 40, token_delay_s=0.01)
    async with Harness(tmp_path, [busy], max_inflight_per_worker=1).running() as h:
        first = asyncio.create_task(h.llava())
        await eventually(lambda: h.worker(busy).inflight == 1)
        r = await h.llava(disconnect_at=0.05)
        assert r.status == 0  # it never got a response: it had left
        assert h.cp.service.admission.waiting == 0
        await first
        assert len(busy.streams) == 1  # the one that left never reached the node


# -- queueing and 429 ---------------------------------------------------------------------------


async def test_a_request_waits_for_a_slot_and_a_full_queue_is_429(tmp_path: Path) -> None:
    busy = node(9000, tokens=["x"] * 30, token_delay_s=0.01)
    async with Harness(tmp_path, [busy], max_inflight_per_worker=1, max_waiting=1).running() as h:
        first = asyncio.create_task(h.llava())
        await eventually(lambda: h.worker(busy).inflight == 1)
        second = asyncio.create_task(h.llava())
        await eventually(lambda: h.cp.service.admission.waiting == 1)
        third = await h.chat()
        assert third.status == 429 and int(third.headers["retry-after"]) >= 1
        assert third.json()["error"]["code"] == "overloaded"
        assert (await first).frames()[-1]["error_code"] == 0
        assert (await second).frames()[-1]["error_code"] == 0  # served once the first ended


async def test_a_wait_past_the_queue_timeout_is_429(tmp_path: Path) -> None:
    busy = node(9000, tokens=["x"] * 100, token_delay_s=0.01)
    async with Harness(tmp_path, [busy], max_inflight_per_worker=1, queue_timeout_s=0.1).running() as h:
        first = asyncio.create_task(h.llava())
        await eventually(lambda: h.worker(busy).inflight == 1)
        r = await h.llava()
        assert (
            r.status == 429 and r.frames()[0]["error_code"] == 4 and "within 0.1 s" in r.frames()[0]["text"]
        )
        await first


async def test_waiters_are_served_first_come_first_served(tmp_path: Path) -> None:
    busy = node(9000, tokens=["x"] * 5, token_delay_s=0.01)
    async with Harness(tmp_path, [busy], max_inflight_per_worker=1).running() as h:
        tasks = []
        for i in range(4):
            tasks.append(asyncio.create_task(h.llava(headers={"X-Request-Id": f"r{i}"})))
            await asyncio.sleep(0.01)
        await asyncio.gather(*tasks)
        assert [s.request_id.rpartition(".")[0] for s in busy.streams] == ["r0", "r1", "r2", "r3"]


def test_a_node_error_names_the_field_it_is_about_in_each_apis_terms() -> None:
    cases = {
        "image 1 could not be decoded as an image: its bytes are not a PNG, JPEG or WebP file": (
            "images[1]",
            "messages",
        ),
        "the prompt is empty": ("prompt", "messages"),
        "messages[2].role is 'x'; expected system, user or assistant": (
            "messages[2].role",
            "messages[2].role",
        ),
        "temperature is 3.0; it must be between 0 and 2.0": ("temperature", "temperature"),
        "17 stop strings given; at most 16 are accepted": ("stop", "stop"),
        "the request needs 5000 KV-cache tokens (prompt plus max_tokens); this node holds 4096": (
            "max_new_tokens",
            "max_tokens",
        ),
        "input_ids holds the token id 99999; ids must be in [0, 32000)": (None, None),
    }
    for message, (llava, openai) in cases.items():
        assert (node_error_param(message, "llava"), node_error_param(message, "openai")) == (llava, openai), (
            message
        )


async def test_a_restarted_control_plane_cancels_what_its_last_run_left_running(tmp_path: Path) -> None:
    """A control plane that died left rows 'running' whose requests its nodes may still be
    generating for nobody: the next start fails those rows and cancels them on their nodes."""
    import sqlite3

    a, b = node(9000), node(9010)
    first = Harness(tmp_path, [a, b])
    async with first.running() as h:
        for _ in range(3):
            assert (await h.chat()).status == 200
        rows = await h.rows("SELECT id, request_id, worker_id FROM requests ORDER BY started_at")
        by_id = {h.worker(n).id: n for n in (a, b)}
    # as if it had been killed while the first two ran (a clean stop ends every row)
    with sqlite3.connect(tmp_path / "control_plane.db") as db:
        db.executemany(
            "UPDATE requests SET status = 'running', ended_at = NULL WHERE id = ?",
            [(r["id"],) for r in rows[:2]],
        )
    async with Harness(tmp_path, [a, b], fakes=first.nodes).running() as h:
        await eventually(lambda: len(a.cancels) + len(b.cancels) == 2, what="the orphans cancelled")
        for r in rows[:2]:
            assert node_request_id(r["request_id"], r["id"]) in by_id[r["worker_id"]].cancels
        after = {r["id"]: r for r in await h.rows("SELECT id, status, error FROM requests")}
        assert all(after[r["id"]]["status"] == "error" for r in rows[:2])
        assert "cancelled on its node at restart" in after[rows[0]["id"]]["error"]
        assert after[rows[2]["id"]]["status"] == "ok"
