"""Migration on fake nodes: a stream whose node fails after it sent tokens goes on on another
node with the tokens sent so far (``prior_token_ids``), and the client sees one stream: no
token lost or repeated, counts right, each break recorded in SQL and counted."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from control_plane.nodes.fake import FakeNode
from tests.fast.harness import Harness, eventually, node

WORDS = ["The", " cat", " sat", " on", " the", " mat", "."]
FULL = "".join(WORDS)


def nodes(**first: object) -> list[FakeNode]:
    """A node that misbehaves as told, then two good ones (same script: one model)."""
    return [node(9000, tokens=WORDS, **first), node(9010, tokens=WORDS), node(9020, tokens=WORDS)]


async def test_a_node_error_mid_stream_is_continued_elsewhere_for_both_apis(tmp_path: Path) -> None:
    flaky, *good = nodes(fail_after=3)
    async with Harness(tmp_path, [flaky, *good], dispatch_policy="round_robin").running() as h:
        await eventually(lambda: all(h.worker(n).can_serve("llava") for n in (flaky, *good)))
        # LLaVA's protocol: cumulative frames, each extends the last; the whole text at the end
        frames: list[dict[str, Any]] = []
        while not flaky.streams:  # round robin: until one lands on the flaky node
            frames = (await h.llava()).frames()
        assert [f["error_code"] for f in frames] == [0] * len(frames)
        texts = [f["text"] for f in frames]
        assert all(b.startswith(a) for a, b in itertools.pairwise(texts))
        assert texts[-1] == "USER: hi ASSISTANT:" + FULL
        assert frames[-1]["usage"]["completion_tokens"] == len(WORDS)
        cont = [s for n in good for s in n.streams if s.inputs.prior_token_ids]
        assert len(cont) == 1 and list(cont[0].inputs.prior_token_ids) == [100, 101, 102]
        assert cont[0].inputs.seed is not None and cont[0].inputs.seed == flaky.streams[0].inputs.seed
        # OpenAI: the deltas add up to the text once, usage counts every token once
        flaky.streams.clear()
        while not flaky.streams:
            r = await h.chat(stream=True, stream_options={"include_usage": True})
        events = r.events()
        deltas = "".join(
            e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e.get("choices")
        )
        assert deltas == FULL
        usage = next(e["usage"] for e in events[:-1] if e.get("usage"))
        assert usage["completion_tokens"] == len(WORDS)
        rows = await h.rows(
            "SELECT m.after_tokens, m.reason, m.outcome, m.pause_ms, m.from_worker, m.to_worker, "
            "r.migrations, r.attempts, r.status, r.completion_tokens "
            "FROM v_migrations m JOIN requests r ON r.id = m.request_id"
        )
        assert len(rows) == 2
        for row in rows:
            assert row["after_tokens"] == 3 and row["reason"] == "node_error" and row["outcome"] == "resumed"
            assert row["pause_ms"] is not None and row["pause_ms"] >= 0
            assert row["from_worker"] == flaky.http_url and row["to_worker"] != flaky.http_url
            assert (row["migrations"], row["attempts"], row["status"]) == (1, 2, "ok")
            assert row["completion_tokens"] == len(WORDS)
        reasons = await h.rows("SELECT reason FROM routing_decisions WHERE attempt = 2")
        assert [r["reason"] for r in reasons] == ["migration", "migration"]
        metrics = (await h.client.get("/metrics")).body.decode()
        assert 'cp_migrations_total{outcome="resumed"} 2.0' in metrics
        assert "cp_migration_pause_seconds_count 2.0" in metrics


async def test_a_stream_migrates_again_when_its_second_node_fails_too(tmp_path: Path) -> None:
    first, second, third = (
        node(9000, tokens=WORDS, fail_after=2),
        node(9010, tokens=WORDS, fail_after=4),
        node(9020, tokens=WORDS),
    )
    async with Harness(tmp_path, [first, second, third], dispatch_policy="shortest_queue").running() as h:
        await eventually(lambda: all(h.worker(n).can_serve("llava") for n in (first, second, third)))
        pinned = f"/workers/{h.worker(first).id}/worker_generate_stream"
        for _ in range(6):  # each starts on the first node; its continuation goes to either other
            frames = (await h.llava(pinned)).frames()
            assert frames[-1]["error_code"] == 0 and frames[-1]["text"].endswith(FULL)
            assert frames[-1]["usage"]["completion_tokens"] == len(WORDS)
        rows = await h.rows(
            "SELECT request_id, after_tokens, from_worker, outcome FROM v_migrations ORDER BY at"
        )
        assert {r["outcome"] for r in rows} == {"resumed"}
        by_request: dict[str, list[tuple[str, int]]] = {}
        for r in rows:
            by_request.setdefault(r["request_id"], []).append((r["from_worker"], r["after_tokens"]))
        assert len(by_request) == 6
        for breaks in by_request.values():  # from the first after 2, then maybe from the second after 4
            assert breaks in ([(first.http_url, 2)], [(first.http_url, 2), (second.http_url, 4)])
        counts = await h.rows("SELECT migrations, attempts FROM requests")
        assert all(c["attempts"] == c["migrations"] + 1 for c in counts)


async def test_bounded_migrations_end_with_one_clear_error(tmp_path: Path) -> None:
    flaky, other = node(9000, tokens=WORDS, fail_after=2), node(9010, tokens=WORDS, fail_after=4)
    async with Harness(tmp_path, [flaky, other], max_migrations=1).running() as h:
        await eventually(lambda: all(h.worker(n).can_serve("llava") for n in (flaky, other)))
        for _ in range(4):
            frames = (await h.llava()).frames()
            assert [f["error_code"] for f in frames[:-1]] == [0] * (len(frames) - 1)
            assert frames[-1]["error_code"] == 1 and "failed" in frames[-1]["text"]
            assert "after 4 tokens" in frames[-1]["text"] or "after 2 tokens" in frames[-1]["text"]
        rows = await h.rows("SELECT migrations, status FROM requests")
        assert all(r["status"] == "error" and r["migrations"] <= 1 for r in rows)


async def test_no_node_to_continue_on_is_one_error_that_says_where_the_stream_broke(tmp_path: Path) -> None:
    flaky = node(9000, tokens=WORDS, fail_after=3)
    async with Harness(tmp_path, [flaky]).running() as h:
        frames = (await h.llava()).frames()
        assert [f["error_code"] for f in frames] == [0, 0, 0, 1]
        assert "broke after 3 tokens" in frames[-1]["text"] and "no other node" in frames[-1]["text"]
        rows = await h.rows("SELECT outcome, to_worker_id FROM migrations")
        assert rows == [{"outcome": "no_node", "to_worker_id": None}]


async def test_a_node_refusing_a_continuation_is_not_the_clients_error_nor_the_nodes(tmp_path: Path) -> None:
    flaky, short = node(9000, tokens=WORDS, fail_after=3), node(9010, tokens=WORDS[:3])
    async with Harness(
        tmp_path, [flaky, short], breaker_threshold=1, dispatch_policy="shortest_queue"
    ).running() as h:
        await eventually(lambda: all(h.worker(n).can_serve("llava") for n in (flaky, short)))
        r = await h.llava(f"/workers/{h.worker(flaky).id}/worker_generate_stream")
        last = r.frames()[-1]
        assert r.status == 200 and last["error_code"] == 1, last
        assert "after 3 tokens could not continue the stream" in last["text"]
        assert short.streams[0].inputs.prior_token_ids == (100, 101, 102)
        assert h.worker(short).can_serve("llava")  # not counted against the node that refused
        rows = await h.rows("SELECT outcome FROM migrations")
        assert rows == [{"outcome": "failed"}]


async def test_a_stream_on_a_node_that_freezes_migrates_once_the_node_is_out(tmp_path: Path) -> None:
    """No token for ``frozen_stream_s`` while the poller has the node out of routing: the
    stream goes on elsewhere, long before the stall timeout."""
    frozen, good = node(9000, tokens=WORDS, stall_after=3), node(9010, tokens=WORDS, up=False)
    async with Harness(tmp_path, [frozen, good], stall_timeout_s=30, frozen_stream_s=0.2).running() as h:
        await eventually(lambda: h.worker(frozen).can_serve("llava"), what="the first node up")
        started = time.monotonic()
        request = asyncio.create_task(h.llava())
        await eventually(lambda: bool(frozen.streams) and frozen.streams[0].sent == 3)
        frozen.up, good.up = False, True  # frozen: polls fail too
        frames = (await request).frames()
        assert frames[-1]["error_code"] == 0 and frames[-1]["text"].endswith(FULL)
        assert time.monotonic() - started < 3
        frozen.up = True  # (so that the cancel sent to it lands)
        await eventually(lambda: frozen.cancels == [frozen.streams[0].request_id], what="a cancel call")
        rows = await h.rows("SELECT reason, outcome, after_tokens FROM migrations")
        assert rows == [{"reason": "node_left", "outcome": "resumed", "after_tokens": 3}]


async def test_a_late_cancel_stops_only_the_request_it_was_for(tmp_path: Path) -> None:
    """The cancel of a stream that moved off a frozen node lands once the node answers
    again, maybe while a later request with the same X-Request-Id (a client's retry) runs
    there: each request reaches its nodes under an id of its own, so that one runs on."""
    frozen, good = node(9000, tokens=WORDS, stall_after=3), node(9010, tokens=WORDS, up=False)
    async with Harness(tmp_path, [frozen, good], stall_timeout_s=30, frozen_stream_s=0.2).running() as h:
        await eventually(lambda: h.worker(frozen).can_serve("llava"), what="the first node up")
        first = asyncio.create_task(h.llava(headers={"X-Request-Id": "same"}))
        await eventually(lambda: bool(frozen.streams) and frozen.streams[0].sent == 3)
        frozen.up, good.up = False, True
        assert (await first).frames()[-1]["text"].endswith(FULL)
        # back, serving, but the first stream's cancel (retried each second) not in yet
        frozen.up, frozen.cancels_refused, frozen.stall_after, frozen.token_delay_s = True, True, None, 0.4
        await eventually(lambda: h.worker(frozen).can_serve("llava"), what="the node back")
        retry = asyncio.create_task(
            h.llava(
                f"/workers/{h.worker(frozen).id}/worker_generate_stream", headers={"X-Request-Id": "same"}
            )
        )
        await eventually(lambda: len(frozen.streams) == 2 and frozen.streams[1].sent >= 1, what="the retry")
        frozen.cancels_refused = False
        await eventually(lambda: bool(frozen.cancels), what="the late cancel")
        last = (await retry).frames()[-1]
        assert last["error_code"] == 0 and last["text"].endswith(FULL), last
        first_id, retry_id = (s.request_id for s in frozen.streams)
        assert first_id != retry_id and first_id.startswith("same.") and retry_id.startswith("same.")
        assert frozen.cancels == [first_id] and not frozen.streams[1].cancelled
