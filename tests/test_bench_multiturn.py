"""The pure parts of scripts/bench_multiturn.py: prompts, images, the phase summary."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
bench: Any = importlib.import_module("bench_multiturn")


def test_llava_v1_prompt_is_the_web_uis_form() -> None:
    assert bench.llava_v1_prompt(["Q1"], []) == f"{bench.SYSTEM} USER: <image>\nQ1 ASSISTANT:"
    assert bench.llava_v1_prompt(["Q1", "Q2", "Q3"], ["A1", "A2"]) == (
        f"{bench.SYSTEM} USER: <image>\nQ1 ASSISTANT: A1</s>USER: Q2 ASSISTANT: A2</s>USER: Q3 ASSISTANT:"
    )
    with pytest.raises(ValueError):
        bench.llava_v1_prompt(["Q1", "Q2"], [])


def test_openai_messages_carry_the_image_once_and_every_answer() -> None:
    msgs = bench.openai_messages("data:image/png;base64,AAAA", ["Q1", "Q2"], ["A1"])
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user"]
    assert msgs[1]["content"][0] == {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    assert msgs[1]["content"][1] == {"type": "text", "text": "Q1"}
    assert msgs[2]["content"] == "A1" and msgs[3]["content"] == "Q2"


def test_answers_lose_image_placeholders_and_whitespace() -> None:
    assert bench.clean_answer("  a <image> b \n") == "a  b"


def test_images_are_seeded_and_distinct() -> None:
    a = bench.conversation_image(bench.image_seed("c2", 0), side=64)
    assert a == bench.conversation_image(bench.image_seed("c2", 0), side=64)
    assert a != bench.conversation_image(bench.image_seed("c2", 1), side=64)
    assert a[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_splits_first_and_later_turns() -> None:
    def turn(
        conv: int, n: int, ttft_ms: float, prompt: int, cached: int | None, error: str | None = None
    ) -> Any:
        t = bench.Turn(conv, n, f"r{conv}-{n}", start=1.0, first=1.0 + ttft_ms / 1000, end=2.0)
        t.prompt_tokens, t.completion_tokens, t.cached_tokens, t.error = prompt, 10, cached, error
        return t

    turns = [
        turn(0, 1, 100, 600, 50),
        turn(0, 2, 20, 700, 650),
        turn(1, 1, 300, 600, None),
        turn(1, 2, 40, 700, 600),
        turn(1, 3, 5, 800, 800, error="boom"),
    ]
    s = bench.summarize(turns, wall_s=2.0)
    assert (s["requests"], s["errors"], s["completion_tokens"], s["tok_s"]) == (5, 1, 40, 20.0)
    assert s["ttft_ms_first_turn_p50"] == 200.0 and s["ttft_ms_later_turns_p50"] == 30.0
    assert s["hit_rate_later_turns"] == round(1250 / 1400, 4)
    assert s["hit_rate_all_turns"] == round(1300 / 2600, 4)
    assert s["cached_tokens_reported"] is True
    assert s["by_turn"]["1"]["prompt_tokens_mean"] == 600 and set(s["by_turn"]) == {"1", "2"}
    assert bench.summarize([turn(0, 1, 10, 600, None)], 1.0)["cached_tokens_reported"] is False


def test_metrics_deltas_and_the_nodes_hit_rate() -> None:
    before = {"x_prefix_cache_hit_tokens_total": 10.0, "x_prefix_cache_miss_tokens_total": 5.0, "pages": 3.0}
    after = {"x_prefix_cache_hit_tokens_total": 40.0, "x_prefix_cache_miss_tokens_total": 15.0, "pages": 7.0}
    d = bench.delta(before, after)
    assert d == {
        "x_prefix_cache_hit_tokens_total": 30.0,
        "x_prefix_cache_miss_tokens_total": 10.0,
        "pages": 7.0,
    }
    assert bench.node_hit_rate([d, d]) == 0.75
    assert bench.node_hit_rate([{}]) is None
    assert bench.compare({"a": {"summary": {}}}, "a", "b") is None
