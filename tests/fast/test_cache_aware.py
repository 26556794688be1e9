"""The cache_aware dispatch policy on fake nodes with prefix caches: conversations stick to
the node holding their prefix, spread when they are different, leave a loaded node, forget
a node that left routing or lost its cache; every decision is a routing_decisions row, and
cached_tokens reaches the requests, the decisions and the OpenAI usage; the index stays
bounded."""

from __future__ import annotations

import asyncio
import base64
import json
import random
from pathlib import Path
from typing import Any

import pytest

from control_plane.cli import DISPATCH_POLICIES
from control_plane.config import DispatchPolicy, Settings
from control_plane.fleet.workers import ModelStatus, WorkerInfo, WorkerState
from control_plane.nodes.fake import FakeNode
from control_plane.serving.affinity import MAX_BLOCKS, AffinityIndex, prefix_of
from tests.fast.harness import Harness, Response, eventually, node

IMAGE = b"\x89PNG fake image bytes " * 40
SYSTEM = "You are a careful assistant. Describe images precisely and answer in full sentences."


def image_url(data: bytes = IMAGE) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def first_turn(question: str, image: bytes = IMAGE, system: str = SYSTEM) -> list[dict[str, Any]]:
    """A conversation's first turn: a system prompt, then an image and a question."""
    return [
        {"role": "system", "content": system},
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image_url(image)}},
                {"type": "text", "text": question},
            ],
        },
    ]


async def turn(h: Harness, messages: list[dict[str, Any]], text: str, **params: Any) -> Response:
    """One turn: the history plus ``text``; the answer is appended to ``messages``."""
    if text:
        messages.append({"role": "user", "content": text})
    r = await h.chat(messages=messages, max_tokens=4, **params)
    assert r.status == 200, r.body
    messages.append({"role": "assistant", "content": r.json()["choices"][0]["message"]["content"]})
    return r


async def decisions(h: Harness) -> list[dict[str, Any]]:
    return await h.rows(
        "SELECT r.request_id AS rid, d.attempt, d.reason, d.policy, d.worker_id, d.expected_hit_tokens, "
        "d.affinity_worker_id, d.affinity_hit_tokens, d.candidate_count, d.candidates, d.cached_tokens, "
        "r.cached_tokens AS request_cached, r.worker_id AS served_by "
        "FROM routing_decisions d JOIN requests r ON r.id = d.request_id ORDER BY d.at, d.attempt"
    )


def three() -> list[FakeNode]:
    return [node(9000), node(9010), node(9020)]


def system_of(stream: Any) -> str:
    """The system prompt a fake node was sent."""
    return str(stream.inputs.messages[0]["content"][0]["text"])


# -- affinity ---------------------------------------------------------------------------------


async def test_the_turns_of_one_conversation_stick_to_one_node_and_hit(tmp_path: Path) -> None:
    nodes = three()
    async with Harness(tmp_path, nodes).running() as h:
        assert h.settings.dispatch_policy is DispatchPolicy.CACHE_AWARE  # the default
        messages = first_turn("What is in this picture?")
        answers = [await turn(h, messages, "")]
        for question in ["And the colours?", "Is there a person in it?", "Thanks. Summarize it all."]:
            answers.append(await turn(h, messages, question))
        served = [n for n in nodes if n.streams]
        assert len(served) == 1 and len(served[0].streams) == 4
        cached = [r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] for r in answers]
        assert cached[0] == 0 and all(c > 64 for c in cached[1:]), cached  # the image and more
        rows = await decisions(h)
        assert [r["reason"] for r in rows] == ["least_loaded", "affinity", "affinity", "affinity"]
        assert {r["worker_id"] for r in rows} == {h.worker(served[0]).id}
        assert [r["cached_tokens"] for r in rows] == [r["request_cached"] for r in rows] == cached
        assert rows[0]["expected_hit_tokens"] == 0 and all(r["expected_hit_tokens"] > 0 for r in rows[1:])
        assert all(r["affinity_worker_id"] == r["worker_id"] for r in rows[1:])
        chosen = json.loads(rows[1]["candidates"])
        assert chosen[0]["worker_id"] == rows[1]["worker_id"] and chosen[0]["expected_hit_tokens"] > 0
        assert sorted(c["worker_id"] for c in chosen) == [1, 2, 3] and rows[1]["candidate_count"] == 3
        assert all(c["expected_hit_tokens"] == 0 for c in chosen[1:])


async def test_the_llava_web_ui_flow_gets_affinity_through_the_address_it_is_given(tmp_path: Path) -> None:
    """LLaVA's web UI asks /get_worker_address (the model only) before every turn, then
    streams the whole conversation to that address: under cache_aware the address is the
    control plane itself, so each turn is routed by its content."""
    nodes = three()
    async with Harness(tmp_path, nodes).running() as h:
        image = base64.b64encode(IMAGE).decode()
        prompt = f"{SYSTEM} USER: <image>\nWhat is this? ASSISTANT:"
        for question in ("And its colour?", "Anything else?", "Thanks. Summarize."):
            address = (await h.client.post("/get_worker_address", {"model": "llava"})).json()["address"]
            assert address == "http://testserver"
            r = await h.llava(
                address.split("testserver", 1)[1] + "/worker_generate_stream", prompt=prompt, images=[image]
            )
            frames = r.frames()
            assert frames[-1]["error_code"] == 0
            prompt = f"{frames[-1]['text']}</s>USER: {question} ASSISTANT:"
        rows = await decisions(h)
        assert [d["reason"] for d in rows] == ["least_loaded", "affinity", "affinity"]
        assert len({d["served_by"] for d in rows}) == 1 and all(d["request_cached"] > 0 for d in rows[1:])


async def test_two_conversations_spread_over_two_nodes_and_each_keeps_its_own(tmp_path: Path) -> None:
    a, b = node(9000, token_delay_s=0.05), node(9010, token_delay_s=0.05)
    async with Harness(tmp_path, [a, b]).running() as h:
        one = first_turn("Describe the picture.", system="Conversation one: " + SYSTEM)
        two = first_turn("Describe the picture.", b"other", system="Conversation two: " + SYSTEM)
        # the first turns at once: the second finds one node busy and takes the other
        started = asyncio.create_task(turn(h, one, ""))
        await eventually(lambda: bool(a.running() or b.running()), what="the first turn on a node")
        await turn(h, two, "")
        await started
        first_node, second_node = (
            (a, b) if a.streams and system_of(a.streams[0]) == one[0]["content"] else (b, a)
        )
        for i in range(3):
            await asyncio.gather(turn(h, one, f"More about it, please ({i})."), turn(h, two, f"Go on ({i})."))
        assert len(first_node.streams) == len(second_node.streams) == 4
        assert {system_of(s) for s in first_node.streams} == {one[0]["content"]}
        assert {system_of(s) for s in second_node.streams} == {two[0]["content"]}
        reasons = [r["reason"] for r in await decisions(h)]
        assert reasons[:2] == ["least_loaded", "least_loaded"] and set(reasons[2:]) == {"affinity"}


async def test_a_loaded_affinity_node_is_left_for_the_least_loaded_and_recorded(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b], cache_aware_load_threshold=1).running() as h:
        messages = first_turn("What is in this picture?")
        await turn(h, messages, "")
        home = a if a.streams else b
        home.tokens, home.token_delay_s = ["x"] * 300, 0.01  # two long streams, pinned to it
        wid = h.worker(home).id
        busy = [asyncio.create_task(h.llava(f"/workers/{wid}/worker_generate_stream")) for _ in range(2)]
        await eventually(lambda: h.worker(home).inflight == 2, what="two streams on the affinity node")
        r = await turn(h, messages, "And the colours?")
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0  # a miss, on the other
        other = b if home is a else a
        assert len(other.streams) == 1
        for task in busy:
            task.cancel()
        await asyncio.gather(*busy, return_exceptions=True)
        rows = await decisions(h)
        pinned = [row for row in rows if row["reason"] == "pinned"]
        assert len(pinned) == 2 and {row["worker_id"] for row in pinned} == {wid}
        left = [row for row in rows if row["reason"] == "load"]
        assert len(left) == 1 and left[0]["worker_id"] == h.worker(other).id
        assert left[0]["affinity_worker_id"] == wid and left[0]["affinity_hit_tokens"] > 0
        assert left[0]["expected_hit_tokens"] == 0 and left[0]["cached_tokens"] == 0
        loads = {c["worker_id"]: c["load"] for c in json.loads(left[0]["candidates"])}
        assert loads == {wid: 2.0, h.worker(other).id: 0.0}


async def test_a_shared_system_prompt_alone_does_not_pull_new_conversations_onto_its_node(
    tmp_path: Path,
) -> None:
    """A new conversation shares only the system prompt (a tenth of its prompt) with the
    ones a node served: below cache_aware_min_match of the prompt, that is no affinity, and
    the request goes to the least loaded node, as shortest_queue would send it."""
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b]).running() as h:
        await turn(h, first_turn("What is in this picture?"), "")
        home = a if a.streams else b
        other = b if home is a else a
        home.tokens, home.token_delay_s = ["x"] * 300, 0.01  # one long stream keeps it busy
        wid = h.worker(home).id
        busy = asyncio.create_task(h.llava(f"/workers/{wid}/worker_generate_stream"))
        await eventually(lambda: h.worker(home).inflight == 1, what="a stream on the first node")
        await turn(h, first_turn("Describe it.", image=b"another image " * 50), "")
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        assert len(other.streams) == 1
        rows = [r for r in await decisions(h) if r["reason"] != "pinned"]
        assert rows[-1]["reason"] == "least_loaded" and rows[-1]["worker_id"] == h.worker(other).id
        assert rows[-1]["affinity_worker_id"] == wid and rows[-1]["affinity_hit_tokens"] > 0  # recorded


@pytest.mark.parametrize("how", ["down", "model unloaded", "circuit opened"])
async def test_a_node_out_of_routing_is_not_chosen_and_comes_back_without_affinity(
    tmp_path: Path, how: str
) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b], breaker_threshold=1, breaker_cooldown_s=1.0).running() as h:
        messages = first_turn("What is in this picture?")
        await turn(h, messages, "")
        home, other = (a, b) if a.streams else (b, a)
        home_id, other_id = h.worker(home).id, h.worker(other).id
        prompt = "USER: " + "a prompt the affinity node was sent by name, " * 4 + "ASSISTANT:"
        await h.llava(f"/workers/{home_id}/worker_generate_stream", prompt=prompt)
        if how == "down":
            home.up = False
            await eventually(lambda: h.worker(home).state is WorkerState.UNHEALTHY, what="out of routing")
        elif how == "model unloaded":
            home.set_models("UNAVAILABLE")
            await eventually(lambda: not h.worker(home).can_serve("llava"), what="its model out")
        else:  # a request fails on it: the breaker opens (the request is retried on the other)
            home.fail_after = 0
            assert (await h.llava(f"/workers/{home_id}/worker_generate_stream")).status == 200
            home.fail_after = None
        await turn(h, messages, "And the colours?")  # its affinity node is out: the other
        assert h.worker(home).state is not WorkerState.HEALTHY or not h.worker(home).can_serve("llava")
        home.up = True
        home.set_models("READY")
        await eventually(lambda: h.worker(home).can_serve("llava"), 3, "back in routing")
        # a long stream pinned to the other node: the least loaded is the one back
        other.tokens, other.token_delay_s = ["x"] * 300, 0.01
        busy = asyncio.create_task(h.llava(f"/workers/{other_id}/worker_generate_stream"))
        await eventually(lambda: h.worker(other).inflight == 1, what="the other node busy")
        await h.llava(prompt=prompt)
        busy.cancel()
        await asyncio.gather(busy, return_exceptions=True)
        rows = [r for r in await decisions(h) if r["reason"] not in ("pinned", "retry")]
        assert rows[1]["reason"] == "only_choice" and rows[1]["worker_id"] == other_id
        # back in routing, it holds the pinned prompt no more as far as the index knows
        assert rows[2]["worker_id"] == home_id and rows[2]["reason"] == "least_loaded"
        assert all(c["expected_hit_tokens"] == 0 for c in json.loads(rows[2]["candidates"]))


async def test_a_node_that_reports_no_hit_where_one_was_expected_is_forgotten(tmp_path: Path) -> None:
    a, b = node(9000), node(9010, up=False)
    async with Harness(tmp_path, [a, b]).running() as h:
        one = first_turn("Describe it.", system="Conversation one: " + SYSTEM)
        two = first_turn("Describe it.", b"second", system="Conversation two: " + SYSTEM)
        await turn(h, one, "")
        await turn(h, two, "")
        b.up = True
        await eventually(lambda: h.worker(b).can_serve("llava"), what="the second node")
        a.flush_cache()  # evicted (or restarted between two polls)
        r = await turn(h, one, "Go on.")
        assert r.json()["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert h.cp.service.router.index.forgotten_nodes == 1
        await turn(h, two, "Go on.")
        rows = await decisions(h)
        assert [r["reason"] for r in rows] == ["only_choice", "only_choice", "affinity", "least_loaded"]
        assert rows[2]["expected_hit_tokens"] > 64 and rows[2]["cached_tokens"] == 0
        assert all(c["expected_hit_tokens"] == 0 for c in json.loads(rows[3]["candidates"]))


async def test_affinity_is_per_model(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    for n in (a, b):
        n.set_models("READY", "llava-b")
    async with Harness(tmp_path, [a, b]).running() as h:
        messages = first_turn("What is in this picture?")
        await turn(h, messages, "")
        await turn(h, list(messages), "", model="llava-b")  # the same content, another model
        rows = await decisions(h)
        assert [r["reason"] for r in rows] == ["least_loaded", "least_loaded"]
        assert all(c["expected_hit_tokens"] == 0 for c in json.loads(rows[1]["candidates"]))


async def test_other_policies_record_their_decisions_and_retries(tmp_path: Path) -> None:
    bad, good = node(9000, fail_before_first="unreachable"), node(9010)
    async with Harness(tmp_path, [bad, good], dispatch_policy="round_robin").running() as h:
        for _ in range(2):
            assert (await h.llava()).frames()[-1]["error_code"] == 0
        rows = await decisions(h)
        assert [(r["attempt"], r["reason"]) for r in rows] == [
            (1, "round_robin"),
            (2, "retry"),
            (1, "round_robin"),
        ]
        assert {r["policy"] for r in rows} == {"round_robin"}
        assert [r["cached_tokens"] for r in rows] == [None, 0, 0]
        assert all(r["expected_hit_tokens"] == 0 for r in rows)
        assert h.cp.service.router.describe()["affinity"] is None


# -- what the APIs, the metrics and the status say ---------------------------------------------


async def test_cached_tokens_in_the_llava_frames_the_openai_stream_and_the_metrics(tmp_path: Path) -> None:
    a = node(9000)
    async with Harness(tmp_path, [a]).running() as h:
        prompt = "USER: <image>\n" + SYSTEM + " What is this? ASSISTANT:"  # 606 tokens: 37 blocks
        params: dict[str, Any] = {"prompt": prompt, "images": [base64.b64encode(IMAGE).decode()]}
        first, second = await h.llava(**params), await h.llava(**params)
        usage = [r.frames()[-1]["usage"] for r in (first, second)]
        assert usage[0]["cached_tokens"] == 0 and usage[1]["cached_tokens"] == 592
        assert usage[1]["prompt_tokens"] == usage[0]["prompt_tokens"] == 606
        # the same image as a data URL: the same bytes, the same prefix
        r = await h.llava(**{**params, "images": [image_url()]})
        assert r.frames()[-1]["usage"]["cached_tokens"] == 592

        async def streamed_usage() -> dict[str, Any]:
            messages = first_turn("What is in this picture?")
            r = await h.chat(messages=messages, stream=True, stream_options={"include_usage": True})
            return dict(r.events()[-2]["usage"])

        assert (await streamed_usage())["prompt_tokens_details"] == {"cached_tokens": 0}
        assert (await streamed_usage())["prompt_tokens_details"]["cached_tokens"] > 64
        metrics = (await h.client.get("/metrics")).body.decode()
        assert 'cp_routing_decisions_total{policy="cache_aware",reason="only_choice"} 5.0' in metrics
        assert f'cp_cached_prompt_tokens_total{{api="llava"}} {2 * 592.0}' in metrics
        assert 'cp_prompt_tokens_total{api="openai"}' in metrics
        status = (await h.client.get("/admin/status")).json()["routing"]
        assert status["policy"] == "cache_aware" and status["affinity"]["blocks"] > 0


async def test_a_node_without_a_prefix_cache_reports_zero_and_affinity_still_routes(tmp_path: Path) -> None:
    a = node(9000, prefix_cache=False)
    async with Harness(tmp_path, [a]).running() as h:
        messages = first_turn("What is in this picture?")
        await turn(h, messages, "")
        r = await turn(h, messages, "More.")
        assert r.json()["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
        rows = await h.rows("SELECT cached_tokens, prompt_tokens FROM requests")
        assert [row["cached_tokens"] for row in rows] == [0, 0] and all(row["prompt_tokens"] for row in rows)


# -- bounds -----------------------------------------------------------------------------------


async def test_the_index_stays_bounded(tmp_path: Path) -> None:
    a, b = node(9000), node(9010)
    async with Harness(tmp_path, [a, b], cache_aware_index_blocks=50).running() as h:
        for i in range(30):
            await h.llava(prompt=f"USER: conversation {i:03d} " + "lorem ipsum dolor sit amet " * 12)
        index = h.cp.service.router.index
        assert len(index) == 50 and index.evicted_blocks > 0
        assert (await h.client.get("/admin/status")).json()["routing"]["affinity"]["blocks"] == 50
        assert "cp_affinity_index_blocks 50.0" in (await h.client.get("/metrics")).body.decode()
        # the latest conversation's start is still known: it goes back to its node
        await h.llava(prompt="USER: conversation 029 " + "lorem ipsum dolor sit amet " * 12)
        rows = await h.rows("SELECT reason FROM routing_decisions ORDER BY at DESC LIMIT 1")
        assert rows == [{"reason": "affinity"}]


def test_prefix_keys_follow_the_leading_content() -> None:
    history = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "x" * 100}]}]
    longer = [*history, {"role": "assistant", "content": [{"type": "text", "text": "y" * 200}]}]
    one = prefix_of("llava", None, history, [b"img-a"], 64)
    two = prefix_of("llava", None, longer, [b"img-a"], 64)
    assert len(one.keys) == 2 and two.keys[: len(one.keys)] == one.keys and len(two.keys) > len(one.keys)
    assert one.upto[0] > 500  # the image block carries the image's tokens
    assert prefix_of("llava", None, history, [b"img-b"], 64).keys[0] != one.keys[0]  # another image
    assert prefix_of("other", None, history, [b"img-a"], 64).keys[0] != one.keys[0]  # another model
    assert prefix_of("llava", "short", None, [], 64).empty  # no full block: no affinity
    huge = prefix_of("llava", "z" * 1_048_576, None, [], 64)  # the prompt limit, 1 MiB
    assert len(huge.keys) == MAX_BLOCKS and huge.total == 1_048_576 // 4
    text = prefix_of("llava", "USER: <image>\n" + "q" * 70, None, [b"i"], 64)
    assert len(text.keys) == 2  # the image (with the text before it), then 64 characters


def worker(i: int) -> WorkerInfo:
    return WorkerInfo(
        id=i, name=f"http://w{i}:1", http_url="", grpc_url="", metrics_url="", state=WorkerState.HEALTHY
    )


def test_under_pressure_a_chain_loses_its_tail_first() -> None:
    index, w = AffinityIndex(4), worker(1)
    prefix = prefix_of("llava", "p" * 64 * 6, None, [], 64)
    index.record(prefix, w)
    assert len(index) == 4 and index.expected_hits(prefix, [w]) == {1: prefix.upto[3]}
    assert index.expected_hits(prefix, [worker(2)]) == {2: 0}


def test_leaving_routing_changes_a_workers_cache_epoch() -> None:
    w = worker(1)
    w.models = {"llava": ModelStatus(ready=True, state="READY")}
    epochs = [w.cache_epoch]
    w.set_models({"llava": ModelStatus(ready=True, state="READY"), "new": ModelStatus(ready=False)})
    w.set_state(WorkerState.HEALTHY)
    assert w.cache_epoch == epochs[-1]  # nothing lost
    for change in (
        lambda: w.set_state(WorkerState.UNHEALTHY),
        lambda: w.set_state(WorkerState.HEALTHY),  # back: a no-op, the epoch changed on leaving
        lambda: w.set_models({"llava": ModelStatus(ready=False, state="UNLOADING")}),
    ):
        change()
        epochs.append(w.cache_epoch)
    assert epochs[1] != epochs[0] and epochs[2] == epochs[1] and epochs[3] != epochs[2]
    assert worker(1).cache_epoch not in epochs  # a worker registered again starts afresh


def test_the_command_line_offers_every_policy() -> None:
    assert [p.value for p in DispatchPolicy] == DISPATCH_POLICIES
    assert Settings(data_dir=Path("/nonexistent")).dispatch_policy is DispatchPolicy.CACHE_AWARE


# -- the documented queries, on a workload ------------------------------------------------------

HOUSE_STYLE = (
    "You write for the catalogue of a museum. Use the house style: present tense, no first person, "
    "measurements in centimetres, colours named as in the style guide, materials before techniques, "
    "and one short paragraph per object. "
) * 4
# The last ```sql blocks of docs/schema.md: hit rate per node, decisions by reason, requests
# that left their affinity for load, TTFT with and without a hit.
# docs/schema.md's routing questions: the queries that read cached tokens (hit rate per
# node, decisions by reason, requests that left their affinity, TTFT with and without)
ROUTING_QUERIES = [
    query
    for block in (Path(__file__).resolve().parents[2] / "docs" / "schema.md").read_text().split("```sql")[1:]
    if "cached_tokens" in (query := block.split("```", 1)[0].strip())
]


async def conversations(h: Harness, count: int, turns: int, seed: int = 7) -> None:
    """``count`` conversations of ``turns`` turns at once, each with its own image; two in
    three share a long house-style system prompt."""
    rnd = random.Random(seed)

    async def one(c: int) -> None:
        system = (HOUSE_STYLE if c % 3 else "") + f"Conversation {c}: you describe pictures."
        messages = first_turn("What is in this picture?", f"image {c}".encode() * 300, system)
        await asyncio.sleep(rnd.uniform(0.0, 0.5))
        for t in range(turns):
            await turn(h, messages, f"Tell me more about part {t} of it, please." if t else "", timeout_s=30)
            await asyncio.sleep(rnd.uniform(0.0, 0.3))

    await asyncio.gather(*(one(c) for c in range(count)))


async def documented_answers(h: Harness) -> list[dict[str, Any]]:
    """What the documented routing queries answer (the batch writer flushed first)."""
    answers = []
    for query in ROUTING_QUERIES:
        r = await h.client.post("/admin/sql", {"query": query, "max_rows": 20})
        assert r.status == 200, r.body
        answers.append(r.json())
    return answers


def fleet_of_three(prefill_s_per_token: float) -> list[FakeNode]:
    return [
        node(9000 + 10 * i, token_delay_s=0.02, prefill_s_per_token=prefill_s_per_token, tokens=["ok"] * 8)
        for i in range(3)
    ]


async def test_the_documented_routing_queries_answer_on_a_workload(tmp_path: Path) -> None:
    async with Harness(tmp_path, fleet_of_three(0.0002), cache_aware_load_threshold=2).running() as h:
        await conversations(h, 6, 3)
        by_node, by_reason, left, ttft = [a["rows"] for a in await documented_answers(h)]
    assert sum(r[1] for r in by_node) == 18 and sum(r[2] for r in by_node) > 9  # requests, hits
    assert sum(r[2] for r in by_reason) == 18  # one decision a request: none failed
    assert {r[1] for r in by_reason} <= {"affinity", "least_loaded", "load"}
    assert all(r[3] != r[5] for r in left)  # the node left is not the one sent to
    by_cache = {r[0]: r for r in ttft}
    assert by_cache["hit"][1] + by_cache["miss"][1] == 18 and by_cache["miss"][3] == 0
    assert by_cache["hit"][4] < by_cache["miss"][4]  # p50 TTFT: the prefill of what was cached is saved


if __name__ == "__main__":  # the workload docs/schema.md shows the answers of

    async def main() -> None:
        import tempfile

        from control_plane.storage.sql import format_table, run_readonly

        h = Harness(Path(tempfile.mkdtemp()), fleet_of_three(0.0005), cache_aware_load_threshold=2)
        async with h.running():
            await conversations(h, 12, 5)
            h.nodes.node("http://127.0.0.1:9000").flush_cache()  # type: ignore[union-attr]
            await conversations(h, 3, 5, seed=8)  # three come back: one node lost its cache
            h.cp.writer.flush()
            for query in ROUTING_QUERIES:
                print(format_table(run_readonly(h.settings.sqlalchemy_url, query, max_rows=20)), end="\n\n")

    asyncio.run(main())
