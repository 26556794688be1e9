"""Incremental decoding and stop strings, on the tiny checkpoint's real tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from llava_node.textstream import IncrementalDetokenizer, SequenceText, StopMatcher
from llava_wire.protocol import FinishReason


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path):
    return AutoTokenizer.from_pretrained(tiny_checkpoint)


def test_incremental_decoding_matches_full_decode(tokenizer) -> None:
    text = "A red square, 42 cats! Ünïcødé → ok 日本"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids] + [detok.flush()]
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    assert sum(1 for p in pieces if p) > 5  # it streams, not one piece at the end


def test_multibyte_character_is_never_split(tokenizer) -> None:
    ids = tokenizer("日本", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.add(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + detok.flush() == "日本"


def test_stop_matcher_holds_back_a_possible_stop() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("hello ST") == ("hello ", False)
    assert m.feed("OR") == ("STOR", False)  # "STOR" cannot begin "STOP": released
    assert m.pending == ""
    m2 = StopMatcher(["STOP"])
    assert m2.feed("abc ST") == ("abc ", False)
    assert m2.feed("OP and more") == ("", True)


def test_stop_matcher_earliest_of_several() -> None:
    m = StopMatcher(["zz", "b"])
    assert m.feed("aaa b zz") == ("aaa ", True)


def test_sequence_text_stop_string_finishes_with_stop(tokenizer) -> None:
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    seq = SequenceText(tokenizer, ["three"], eos_token_ids=[], max_tokens=100)
    out = ""
    for i in ids:
        out += seq.add(i)
        if seq.finish_reason:
            break
    assert seq.finish_reason is FinishReason.STOP
    assert out == "one two "


def test_sequence_text_length_and_eos(tokenizer) -> None:
    ids = tokenizer("one two three four", add_special_tokens=False).input_ids
    seq = SequenceText(tokenizer, [], eos_token_ids=[], max_tokens=2)
    seq.add(ids[0])
    seq.add(ids[1])
    assert seq.finish_reason is FinishReason.LENGTH and seq.count == 2
    seq = SequenceText(tokenizer, [], eos_token_ids=[tokenizer.eos_token_id], max_tokens=10)
    seq.add(ids[0])
    seq.add(tokenizer.eos_token_id)
    assert seq.finish_reason is FinishReason.STOP and seq.count == 2
