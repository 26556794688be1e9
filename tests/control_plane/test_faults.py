"""Fault injection with real nodes: SIGKILL and SIGSTOP of a node, SIGKILL of the control plane.

A node's streams survive it: those that had no token yet are retried elsewhere, those
that were streaming are continued elsewhere (migration), and each migrated stream's text
is what one node alone generates for the request (greedy). Each scenario prints its
counts (requests sent, completed, retried, migrated, failed, pauses) and appends them to
``$FAULT_REPORT`` (a JSON-lines file) when that is set.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from llava_node.launcher import TritonNode
from tests.control_plane.conftest import admin_get, sql, wait_for
from tests.processes import ControlPlaneProcess, running_nodes

POLL_S = 0.5
POLL_TIMEOUT_S = 1.0
STALL_S = 30.0  # the last resort: here, a frozen node's streams must move long before it
FROZEN_S = 0.5
# 32 streams fill the three nodes' 24 engine slots: a migrated stream waits for a slot on
# the two left (its pause); fewer (FAULT_KILL_STREAMS=12) leave room, and show the pause
# without that wait
KILL_STREAMS = int(os.environ.get("FAULT_KILL_STREAMS", "32"))


@dataclass
class Outcome:
    """What one client saw."""

    request_id: str
    api: str
    sent_at: float
    first_text_at: float | None = None
    ended_at: float | None = None
    error_code: int | None = None
    error_text: str = ""
    frames: int = 0
    text: str = ""  # the whole text (LLaVA: the last cumulative frame; OpenAI: the deltas)
    completion_tokens: int | None = None
    last_text_at: float | None = None
    max_gap_s: float = 0.0  # the longest wait between two pieces of text: a migration's pause

    def got_text(self) -> None:
        now = time.monotonic()
        if self.first_text_at is None:
            self.first_text_at = now
        elif self.last_text_at is not None:
            self.max_gap_s = max(self.max_gap_s, now - self.last_text_at)
        self.last_text_at = now


def sampling(rid: str) -> dict[str, Any]:
    """Greedy, but every fourth request sampled with a seed of its own.

    Greedy prompts run (nearly) to max_new_tokens; sampled ones (sharpened) mostly do, but
    one can end at an end-of-sequence token before the fault it is meant to see."""
    i = int(rid.rsplit("-", 1)[1])
    return {"temperature": 0.5, "seed": 1000 + i} if i % 4 == 3 else {"temperature": 0}


def llava_body(rid: str, max_new_tokens: int) -> dict[str, Any]:
    return {
        "model": "llava",
        "prompt": f"USER: story {rid} ASSISTANT:",
        "max_new_tokens": max_new_tokens,
        **sampling(rid),
    }


def openai_body(rid: str, max_new_tokens: int) -> dict[str, Any]:
    return {
        "model": "llava",
        "messages": [{"role": "user", "content": f"story {rid}"}],
        "max_tokens": max_new_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        **sampling(rid),
    }


def stream(
    url: str, rid: str, max_new_tokens: int, start_gate: threading.Event | None = None, api: str = "llava"
) -> Outcome:
    """One streamed request through the control plane, as its client sees it."""
    if start_gate is not None:
        start_gate.wait()
    out = Outcome(rid, api, time.monotonic())
    llava = api == "llava"
    path, body = (
        ("/worker_generate_stream", llava_body(rid, max_new_tokens))
        if llava
        else ("/v1/chat/completions", openai_body(rid, max_new_tokens))
    )
    try:
        with httpx.stream("POST", url + path, json=body, timeout=120, headers={"X-Request-Id": rid}) as r:
            buf = b""
            for data in r.iter_bytes():
                buf += data
                *frames, buf = buf.split(b"\0" if llava else b"\n\n")
                for f in frames:
                    if llava:
                        read_llava_frame(out, json.loads(f), len(body["prompt"]))
                    elif f.startswith(b"data: ") and f != b"data: [DONE]":
                        read_openai_event(out, json.loads(f[6:]))
            if r.status_code != 200 and out.error_code is None:
                out.error_code, out.error_text = r.status_code, buf.decode(errors="replace")
    except httpx.HTTPError as exc:
        out.error_code = -1
        out.error_text = f"{type(exc).__name__}: {exc}"
    out.ended_at = time.monotonic()
    if out.error_code is None:
        out.error_code = 0
    return out


def read_llava_frame(out: Outcome, frame: dict[str, Any], prompt_chars: int) -> None:
    out.frames += 1
    out.error_code = frame["error_code"]
    if frame["error_code"] != 0:
        out.error_text = frame["text"]
        return
    assert frame["text"].startswith(out.text), "a cumulative frame that does not extend the last one"
    if len(frame["text"]) > max(len(out.text), prompt_chars):
        out.got_text()
    out.text = frame["text"]
    out.completion_tokens = (frame.get("usage") or {}).get("completion_tokens", out.completion_tokens)


def read_openai_event(out: Outcome, event: dict[str, Any]) -> None:
    out.frames += 1
    if "error" in event:
        out.error_code, out.error_text = 1, event["error"].get("message", "")
        return
    if event.get("usage"):
        out.completion_tokens = event["usage"]["completion_tokens"]
    for choice in event.get("choices") or ():
        delta = (choice.get("delta") or {}).get("content") or ""
        out.text += delta
        if delta:
            out.got_text()


def report(name: str, counts: dict[str, Any]) -> None:
    print(f"\n[fault report] {name}: {counts}")
    path = os.environ.get("FAULT_REPORT")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"scenario": name, **counts}) + "\n")


@pytest.fixture(scope="module")
def third_node(tiny_checkpoint: Path) -> Iterator[TritonNode]:
    with running_nodes(tiny_checkpoint, 1) as nodes:
        yield nodes[0]


@pytest.fixture(scope="module")
def trio(fleet: list[TritonNode], third_node: TritonNode) -> list[TritonNode]:
    return [*fleet, third_node]


@pytest.fixture()
def cp3(trio: list[TritonNode], tmp_path: Path) -> Iterator[ControlPlaneProcess]:
    cp = ControlPlaneProcess(
        tmp_path / "cp",
        [n.http_url for n in trio],
        poll_interval_s=POLL_S,
        env={
            "LLAVA_CP_STALL_TIMEOUT_S": str(STALL_S),
            "LLAVA_CP_FROZEN_STREAM_S": str(FROZEN_S),
            "LLAVA_CP_POLL_TIMEOUT_S": str(POLL_TIMEOUT_S),
            "LLAVA_CP_DB_FLUSH_INTERVAL_S": "0.05",
            "LLAVA_CP_BREAKER_THRESHOLD": "1000",
        },
    )
    cp.start()
    try:
        wait_for(
            lambda: (
                len([w for w in admin_get(cp, "/admin/workers")["workers"] if w["state"] == "healthy"]) == 3
            ),
            30,
            "three healthy workers",
        )
        yield cp
    finally:
        cp.stop()


def engine_metric(node: TritonNode, name: str) -> float:
    """A ``llava_engine`` metric of a node (summed over its label sets)."""
    text = httpx.get(node.metrics_url, timeout=5).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def worker_state(cp: ControlPlaneProcess, name: str) -> str:
    return next(w["state"] for w in admin_get(cp, "/admin/workers")["workers"] if w["name"] == name)


def run_load(
    cp: ControlPlaneProcess, n: int, max_new_tokens: int, tag: str, during: Any, *, both_apis: bool = False
) -> tuple[list[Outcome], Any]:
    """``n`` streams at once (with ``both_apis``, every other one OpenAI), and ``during()``
    while they run."""
    gate = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        futures = [
            pool.submit(
                stream,
                cp.url,
                f"{tag}-{i}",
                max_new_tokens,
                gate,
                "openai" if both_apis and i % 2 else "llava",
            )
            for i in range(n)
        ]
        gate.set()
        fault = during()
        outcomes = [f.result(180) for f in futures]
    return outcomes, fault


def migrations(cp: ControlPlaneProcess) -> dict[str, list[dict[str, Any]]]:
    """Each request's migrations rows (by its X-Request-Id), in order."""
    rows = sql(
        cp,
        "SELECT r.request_id, m.after_tokens, m.pause_ms, m.reason, m.outcome, m.from_worker_id "
        "FROM migrations m JOIN requests r ON r.id = m.request_id ORDER BY m.at",
    )
    out: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        out.setdefault(row["request_id"], []).append(row)
    return out


def check_migrated(
    cp: ControlPlaneProcess,
    outcomes: list[Outcome],
    moved: dict[str, list[dict[str, Any]]],
    max_new_tokens: int,
) -> None:
    """Each migrated stream's whole text is what one node generates for the request alone
    (greedy, or sampled with the same seed), its token count too: nothing lost, nothing
    repeated."""
    by_id = {o.request_id: o for o in outcomes}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        alone = dict(
            zip(
                moved,
                pool.map(lambda rid: stream(cp.url, rid, max_new_tokens, api=by_id[rid].api), moved),
                strict=True,
            )
        )
    for rid, ref in alone.items():
        got = by_id[rid]
        assert ref.error_code == 0, ref
        if got.text != ref.text:
            at = next((i for i, (a, b) in enumerate(zip(got.text, ref.text, strict=False)) if a != b), None)
            raise AssertionError(
                f"{rid} ({got.api}, migrated after {[m['after_tokens'] for m in moved[rid]]} tokens): its text "
                f"differs from one node's at character {at}: {got.text[at - 20 if at else 0 :][:80]!r} vs "
                f"{ref.text[at - 20 if at else 0 :][:80]!r}"
            )
        assert got.completion_tokens == ref.completion_tokens, (
            rid,
            got.completion_tokens,
            ref.completion_tokens,
        )


def pauses(moved: dict[str, list[dict[str, Any]]], outcomes: list[Outcome]) -> dict[str, Any]:
    """Pause p50, p99 and max (ms) over the migrations that resumed, as the control plane
    recorded them, and each migrated stream's longest wait between two pieces of text as
    its client saw it."""
    values = sorted(m["pause_ms"] for rows in moved.values() for m in rows if m["outcome"] == "resumed")
    if not values:
        return {}

    def q(p: float) -> float:
        return round(values[min(len(values) - 1, int(p * len(values)))], 1)

    gaps = sorted(round(o.max_gap_s * 1000, 1) for o in outcomes if o.request_id in moved)
    return {
        "pause_p50_ms": q(0.5),
        "pause_p99_ms": q(0.99),
        "pause_max_ms": round(values[-1], 1),
        "client_longest_gap_ms": gaps,
    }


def test_sigkill_one_of_three_nodes_during_32_streams_loses_no_stream(
    cp3: ControlPlaneProcess, trio: list[TritonNode]
) -> None:
    victim = trio[2]
    victim_id = next(
        w["id"] for w in admin_get(cp3, "/admin/workers")["workers"] if w["name"] == victim.http_url
    )

    def kill_when_streaming() -> float:
        wait_for(
            lambda: admin_get(cp3, f"/admin/workers/{victim_id}")["inflight"] >= KILL_STREAMS // 4,
            30,
            "victim busy",
        )
        time.sleep(0.8)  # let some streams start on every node
        at = time.monotonic()
        victim.kill()
        return at

    try:
        # Long enough that the victim's streams are still running at the kill: with the
        # node's tokens grouped per response, 300 could end within the 0.8 s before it.
        outcomes, _ = run_load(cp3, KILL_STREAMS, 1000, "kill", kill_when_streaming, both_apis=True)
        wait_for(lambda: not sql(cp3, "SELECT id FROM requests WHERE status = 'running'"), 10, "rows written")
        moved = migrations(cp3)
        rows = {
            r["request_id"]: r
            for r in sql(cp3, "SELECT request_id, attempts, migrations, status FROM requests")
        }
    finally:
        victim.restart()
    failed = [o for o in outcomes if o.error_code != 0]
    report(
        f"sigkill node during {KILL_STREAMS} streams (both APIs)",
        {
            "sent": len(outcomes),
            "completed": len(outcomes) - len(failed),
            "failed": len(failed),
            "retried_before_first_token": sum(
                r["attempts"] > 1 and not r["migrations"] for r in rows.values()
            ),
            "migrated": len(moved),
            "migrated_openai": sum(o.api == "openai" for o in outcomes if o.request_id in moved),
            "migrated_sampled_seeded": sum("seed" in sampling(rid) for rid in moved),
            **pauses(moved, outcomes),
        },
    )
    assert not failed, [(o.request_id, o.api, o.error_text) for o in failed]
    assert all(r["status"] == "ok" for r in rows.values())
    assert moved, "some streams were running on the killed node"
    for rid, ms in moved.items():
        assert [m["from_worker_id"] for m in ms] == [victim_id] and ms[0]["outcome"] == "resumed", ms
        assert ms[0]["reason"] in ("unreachable", "node_error"), ms
        assert rows[rid]["migrations"] == 1
    check_migrated(cp3, outcomes, moved, 1000)
    wait_for(lambda: worker_state(cp3, victim.http_url) == "healthy", 30, "victim back after restart")


def test_sigstop_a_node_its_streams_move_on_and_sigcont_brings_it_back(
    cp3: ControlPlaneProcess, trio: list[TritonNode]
) -> None:
    victim = trio[1]
    victim_id = next(
        w["id"] for w in admin_get(cp3, "/admin/workers")["workers"] if w["name"] == victim.http_url
    )
    stopped_at = 0.0
    detected_s = None

    def stop_when_streaming() -> None:
        nonlocal stopped_at, detected_s
        wait_for(lambda: admin_get(cp3, f"/admin/workers/{victim_id}")["inflight"] >= 2, 30, "victim busy")
        time.sleep(0.2)
        victim.signal(signal.SIGSTOP)
        stopped_at = time.monotonic()
        wait_for(lambda: worker_state(cp3, victim.http_url) == "unhealthy", 15, "stopped node detected")
        detected_s = time.monotonic() - stopped_at

    try:
        outcomes, _ = run_load(cp3, 12, 1400, "stop", stop_when_streaming, both_apis=True)
    finally:
        victim.signal(signal.SIGCONT)
    wait_for(
        lambda: not sql(cp3, "SELECT id FROM requests WHERE status = 'running'"), 10, "request rows written"
    )
    moved = migrations(cp3)
    failed = [o for o in outcomes if o.error_code != 0]
    report(
        "sigstop node during 12 streams (both APIs)",
        {
            "sent": len(outcomes),
            "completed": len(outcomes) - len(failed),
            "failed": len(failed),
            "detected_after_s": round(detected_s or -1, 2),
            "migrated": len(moved),
            "migrated_sampled_seeded": sum("seed" in sampling(rid) for rid in moved),
            **pauses(moved, outcomes),
        },
    )
    heartbeat_timeout = 2 * (POLL_S + POLL_TIMEOUT_S) + POLL_S
    # (slack for a loaded 2-core machine)
    assert detected_s is not None and detected_s <= heartbeat_timeout + 1.5, detected_s
    assert not failed, [(o.request_id, o.api, o.error_text) for o in failed]
    assert moved, "some streams were running on the stopped node"
    for ms in moved.values():
        assert [(m["from_worker_id"], m["reason"], m["outcome"]) for m in ms] == [
            (victim_id, "node_left", "resumed")
        ], ms
        # moved once the poller had it out and FROZEN_S passed without a token, long
        # before the stall timeout would have ended it
        assert ms[0]["pause_ms"] <= (heartbeat_timeout + 1.5 + FROZEN_S + 2.0) * 1000, ms
    check_migrated(cp3, outcomes, moved, 1400)
    wait_for(lambda: worker_state(cp3, victim.http_url) == "healthy", 15, "SIGCONT brings it back")
    # the node stopped generating for the moved requests once it could (the control plane
    # cancelled them there): nothing runs on its engine any more, no token is generated after
    try:
        wait_for(lambda: engine_metric(victim, "llava_engine_active_requests") == 0, 20, "the node idle")
        generated = engine_metric(victim, "llava_engine_generated_tokens_total")
        time.sleep(2.5)  # the engine publishes its metrics once a second
        assert engine_metric(victim, "llava_engine_generated_tokens_total") == generated
    except AssertionError:
        print(victim.log_path.read_text()[-3000:])
        print(cp3.log()[-3000:])
        raise


def test_sigkill_and_restart_of_the_control_plane_under_load(fleet: list[TritonNode], tmp_path: Path) -> None:
    cp = ControlPlaneProcess(
        tmp_path / "cp", poll_interval_s=POLL_S, env={"LLAVA_CP_DB_FLUSH_INTERVAL_S": "0.05"}
    )
    cp.start()
    try:
        for n in fleet:
            assert (
                httpx.post(f"{cp.url}/admin/workers", json={"url": n.http_url}, timeout=30).status_code == 201
            )
        killed = threading.Event()

        def kill() -> None:
            # while streams run (a fixed delay could outlast them all: the node may end
            # a stream early, at an end-of-sequence token), once their rows are written
            wait_for(
                lambda: sum(w["inflight"] for w in admin_get(cp, "/admin/workers")["workers"]) >= 8,
                30,
                "streams running",
            )
            time.sleep(0.3)  # > LLAVA_CP_DB_FLUSH_INTERVAL_S
            cp.kill(signal.SIGKILL)
            killed.set()

        outcomes, _ = run_load(cp, 16, 1000, "cpkill", kill)
        assert killed.is_set()
        with sqlite3.connect(cp.db_path) as db:
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            running_at_kill = db.execute("SELECT COUNT(*) FROM requests WHERE status = 'running'").fetchone()[
                0
            ]

        def active() -> float:
            return sum(engine_metric(n, "llava_engine_active_requests") for n in fleet)

        # the nodes go on generating for the dead control plane's streams (1000 tokens each);
        # their gauge is published once a second, so it may not show them yet at the kill
        wait_for(lambda: active() > 0, 3.0, "the dead control plane's streams running on the nodes")
        cp.start()
        up = time.monotonic()
        # the restarted control plane cancels them on their nodes (their gauge is published
        # once a second, so 0 shows up to a second after the engine stopped)
        try:
            wait_for(lambda: active() == 0, 3.0, "the nodes stop the orphaned requests")
        except AssertionError:
            print(f"still active on the nodes: {active()}; rows running at the kill: {running_at_kill}")
            print(cp.log()[-6000:])
            raise
        stopped_after_s = round(time.monotonic() - up, 2)
        workers = admin_get(cp, "/admin/workers")["workers"]
        assert sorted(w["name"] for w in workers) == sorted(n.http_url for n in fleet)
        rows = sql(cp, "SELECT status, error FROM requests")
        assert not [r for r in rows if r["status"] == "running"]
        abandoned = [r for r in rows if (r["error"] or "").startswith("the control plane stopped before")]
        assert len(abandoned) == running_at_kill > 0
        assert sql(cp, "SELECT COUNT(*) AS n FROM heartbeats")[0]["n"] > 0
        report(
            "sigkill control plane under 16 streams",
            {
                "sent": len(outcomes),
                "completed": sum(o.error_code == 0 for o in outcomes),
                "broken_by_the_kill": sum(o.error_code != 0 for o in outcomes),
                "marked_failed_on_restart": len(abandoned),
                "nodes_idle_after_restart_s": stopped_after_s,
            },
        )
    finally:
        cp.stop()
