"""EngineOptions from a node's model config and environment (llava_engine's settings)."""

from __future__ import annotations

import pytest

from llava_node.engine.options import EngineOptions


def options(**given: str) -> EngineOptions:
    """Options as llava_engine reads them: a model-config parameter, else the default."""
    return EngineOptions.from_model_config(lambda key, _env, default: given.get(key, default))


def test_the_defaults_are_automatic() -> None:
    o = options()
    assert (o.kind, o.device, o.max_batch, o.max_seq_len) == ("auto", "auto", 0, 0)
    assert (o.kv_cache_fraction, o.kv_cache_dtype, o.cuda_graphs) == (0.9, "auto", True)
    assert (o.stream_interval, o.fused_kernels, o.prefill_chunk) == (0, None, -1)
    assert o.weight_dtype == "auto"  # float8 weights are off unless asked for
    assert o.pdl  # used where the GPU and Triton have it


def test_values_are_parsed() -> None:
    o = options(
        engine="hf_generate",
        max_batch="32",
        kv_cache_fraction="0.5",
        cuda_graphs="no",
        stream_interval="4",
        fused_kernels="true",
        prefill_chunk="0",
    )
    assert (o.kind, o.max_batch, o.kv_cache_fraction, o.cuda_graphs) == ("hf_generate", 32, 0.5, False)
    assert (o.stream_interval, o.fused_kernels, o.prefill_chunk) == (4, True, 0)
    assert options(fused_kernels="auto", prefill_chunk="auto", stream_interval="auto").fused_kernels is None


def test_the_environment_fills_in_for_missing_parameters() -> None:
    env = {"LLAVA_MAX_BATCH": "16", "LLAVA_DEVICE": "cpu", "LLAVA_WEIGHT_DTYPE": "fp8", "LLAVA_PDL": "false"}
    o = EngineOptions.from_model_config(lambda _key, var, default: env.get(var, default))
    assert (o.max_batch, o.device, o.weight_dtype, o.pdl) == (16, "cpu", "fp8", False)


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ({"max_batch": "-1"}, "max_batch must be a number of 0 or more"),
        ({"max_seq_len": "lots"}, "max_seq_len must be a number"),
        ({"kv_cache_fraction": "1.5"}, "kv_cache_fraction must be in (0, 1]"),
        ({"cuda_graphs": "maybe"}, "cuda_graphs must be true or false"),
        ({"pdl": "sometimes"}, "pdl must be true or false"),
        ({"stream_interval": "0"}, "stream_interval must be 'auto' or a positive number"),
        ({"stream_interval": "x"}, "stream_interval must be 'auto' or a positive number"),
        ({"fused_kernels": "sometimes"}, "expected auto, true or false"),
        ({"prefill_chunk": "-5"}, "prefill_chunk must be 'auto' or a number of tokens"),
        ({"prefill_chunk_max": "many"}, "prefill_chunk_max must be 'auto' or a number of tokens"),
    ],
)
def test_a_bad_value_is_named(given: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        options(**given)
