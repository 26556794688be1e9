"""Weight-only float8 (``LLAVA_WEIGHT_DTYPE=fp8``): the quantization, the kernels over
float8 weights (Triton's CPU interpreter, as the suite's conftest sets it), and the
runner and engine on the tiny checkpoint with float8 linear layers."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from llava_node.engine import EngineOptions, build_engine
from llava_node.engine.base import GenerationRequest
from llava_node.engine.fp8_weights import FP8_MAX, Fp8Weight, linear, quantize_fp8, weight_dtype
from llava_node.engine.loading import load_llava
from llava_node.engine.runner import LlavaRunner, RunnerConfig
from llava_node.tiny_checkpoint import build_tiny_checkpoint

FP8 = torch.float8_e4m3fn
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def fp8_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The largest rounding error of each element: half a step of e4m3's 3-bit mantissa
    (1/16 of the value) in the normal range, half the subnormal step (2**-10) below it."""
    return torch.maximum(w.abs() / 16, scale[:, None] * 2.0**-10) * (1 + 1e-6)


# --------------------------------------------------------------------------------------
# quantization
# --------------------------------------------------------------------------------------
def test_the_setting_names_float8_or_the_models_dtype() -> None:
    assert weight_dtype("auto") is None and weight_dtype("") is None
    assert weight_dtype("fp8") == FP8 and weight_dtype("FP8_E4M3") == FP8
    with pytest.raises(ValueError, match="weight_dtype"):
        weight_dtype("int4")


def test_round_trip_error_is_within_one_rounding_per_channel() -> None:
    g = torch.Generator().manual_seed(0)
    # rows of very different sizes (a per-tensor scale would flush the small ones to 0)
    w = torch.randn(96, 320, generator=g) * torch.logspace(-4, 1, 96)[:, None]
    w[5, 7] = 30.0  # an outlier sets its own row's scale only
    qw = quantize_fp8(w)
    assert qw.q.dtype == FP8 and qw.q.shape == w.shape and qw.scale.shape == (96,)
    assert qw.q.is_contiguous() and qw.scale.dtype == torch.float32
    amax = w.abs().amax(1)
    torch.testing.assert_close(qw.scale, amax / FP8_MAX)
    # each row's largest value lands on +-448 exactly
    assert torch.equal(qw.q.float().abs().amax(1), torch.full((96,), FP8_MAX))
    err = (qw.dequantize() - w).abs()
    assert (err <= fp8_bound(w, qw.scale)).all()
    per_channel = err.norm(dim=1) / w.norm(dim=1)
    assert float(per_channel.max()) < 0.04  # ~2.5 % rms for Gaussian rows
    assert qw.nbytes() == 96 * 320 + 96 * 4


def test_all_zero_rows_stay_zero_with_a_unit_scale() -> None:
    w = torch.randn(8, 64)
    w[3] = 0  # as the LM head's padding rows
    qw = quantize_fp8(w)
    assert float(qw.scale[3]) == 1.0 and not qw.q[3].float().any()
    assert torch.isfinite(qw.dequantize()).all()


def test_the_reference_product_is_the_dequantized_weights_product() -> None:
    g = torch.Generator().manual_seed(1)
    w, x, b = torch.randn(48, 80, generator=g), torch.randn(5, 80, generator=g), torch.randn(48, generator=g)
    qw = quantize_fp8(w)
    ref = x.double() @ qw.dequantize(torch.float64).T + b.double()
    got = linear(x, qw, b)
    assert float((got.double() - ref).norm() / ref.norm()) < 1e-6
    assert torch.equal(linear(x, w, b), torch.nn.functional.linear(x, w, b))  # plain weights unchanged


# --------------------------------------------------------------------------------------
# kernels (interpreter on the CPU; the GPU with KERNELS_TEST_DEVICE=cuda)
# --------------------------------------------------------------------------------------
DEVICE = torch.device(os.environ.get("KERNELS_TEST_DEVICE", "cpu"))
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32


def _kernels() -> Any:
    pytest.importorskip("triton")
    from llava_node.engine import kernels

    return kernels


def _operands(m: int, n: int, k: int, seed: int) -> tuple[torch.Tensor, Fp8Weight, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(DEVICE, DTYPE)
    w = (torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)).to(DEVICE)
    qw = quantize_fp8(w)
    ref = x.double() @ qw.dequantize(torch.float64).T
    return x, qw, ref


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref).norm() / ref.norm())


TOL = 1e-2 if DEVICE.type == "cuda" else 1e-5  # bf16 output rounding on a GPU


@pytest.mark.parametrize(("n", "k"), [(40, 96), (33, 2048 + 70)], ids=["short", "tail"])
def test_gemv_over_float8_weights(n: int, k: int) -> None:
    kernels = _kernels()
    x, qw, ref = _operands(1, n, k, seed=n)
    y = kernels.gemv(x, qw.q, kernels.GemvConfig(block_n=8, block_k=512), scale=qw.scale)
    assert y.shape == (1, n) and y.dtype == DTYPE
    assert _rel(y, ref) < TOL
    assert _rel(kernels.gemv(x, qw.q, scale=qw.scale), ref) < TOL  # its float8 default
    with pytest.raises(ValueError, match="scale"):
        kernels.gemv(x, qw.q, scale=qw.scale[:-1])


@pytest.mark.parametrize(
    ("m", "n", "k"),
    [(2, 40, 128), (13, 72, 200), (33, 64, 256), (70, 136, 64)],
    ids=["two-rows", "tails", "decode-batch", "prompt"],
)
def test_fp8_matmul_against_the_dequantized_product(m: int, n: int, k: int) -> None:
    kernels = _kernels()
    x, qw, ref = _operands(m, n, k, seed=m)
    y = kernels.fp8_matmul(x, qw.q, qw.scale)
    assert y.shape == (m, n) and y.dtype == DTYPE
    assert _rel(y, ref) < TOL
    small = kernels.Fp8MatmulConfig(block_m=16, block_n=32, block_k=32, num_warps=4, num_stages=2, group_m=2)
    assert _rel(kernels.fp8_matmul(x, qw.q, qw.scale, small), ref) < TOL  # several row groups
    assert kernels.fp8_matmul(x[:0], qw.q, qw.scale).shape == (0, n)


def test_the_launch_configuration_follows_the_rows() -> None:
    kernels = _kernels()
    cpu = torch.device("cpu")
    assert kernels.fp8_matmul_config(1, 4096, cpu).block_m == 16
    assert kernels.fp8_matmul_config(32, 4096, cpu).block_m == 32
    assert kernels.fp8_matmul_config(256, 4096, cpu).block_m == 128


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_fp8_kernels_on_the_gpu_at_the_7b_shapes() -> None:  # pragma: no cover - GPU hosts only
    from llava_node.engine import kernels

    dev = torch.device("cuda")
    for n, k in ((12288, 4096), (4096, 11008)):
        w = torch.randn(n, k, device=dev) * 0.02
        qw = quantize_fp8(w)
        ref64 = qw.dequantize(torch.float64)
        for m in (1, 8, 32, 256):
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            ref = x.double() @ ref64.T
            y = kernels.gemv(x, qw.q, scale=qw.scale) if m == 1 else kernels.fp8_matmul(x, qw.q, qw.scale)
            assert _rel(y, ref) < 1e-2, (n, k, m)


# --------------------------------------------------------------------------------------
# the runner and the engine with float8 linear layers (tiny checkpoint, float32 on the CPU)
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint's model on 112-pixel images: 64 image tokens a prompt."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava-112", seed=0, image_size=112)


def _prompt(checkpoint: Path, colour: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    processor = AutoProcessor.from_pretrained(checkpoint)
    img = Image.new("RGB", (320, 240), colour)
    enc = processor(images=[img], text="USER: <image>\nWhat is in it? ASSISTANT:", return_tensors="pt")
    return enc["input_ids"][0], enc["pixel_values"]


def _runner(checkpoint: Path, fused: bool, weights: torch.dtype | None) -> LlavaRunner:
    loaded = load_llava(checkpoint, torch.device("cpu"), torch.float32)
    return LlavaRunner(loaded, RunnerConfig(max_batch=2, fused_kernels=fused, weight_dtype=weights))


def _teacher_forced(
    r: LlavaRunner, ids: torch.Tensor, pixels: torch.Tensor, forced: list[int]
) -> list[torch.Tensor]:
    n = int(ids.shape[0])
    r.assign(0, list(range(1, 1 + r.cache.pages_for(n + len(forced) + 1))), 0.0, 1.0, 0)
    out = [r.prefill_logits(0, ids, pixels)]
    with torch.inference_mode():
        for t, token in enumerate(forced):
            r.last_tokens[0] = token
            out.append(r.step_logits(torch.tensor([0]), torch.tensor([n + t]))[0])
    return out


def test_the_runner_keeps_float8_weights_for_the_decoder_layers_only(small_checkpoint: Path) -> None:
    r = _runner(small_checkpoint, fused=False, weights=FP8)
    for w in r.layers:
        for m in (w.wqkv, w.wo, w.wgu, w.wdown):
            assert isinstance(m, Fp8Weight) and m.q.dtype == FP8
    assert isinstance(r.lm_head, torch.Tensor) and r.lm_head.dtype == torch.float32  # kept
    assert r.embed.dtype == torch.float32
    vision = r.loaded.model.model.vision_tower
    assert all(p.dtype == torch.float32 for p in vision.parameters())
    plain = _runner(small_checkpoint, fused=False, weights=None)
    assert all(isinstance(m, torch.Tensor) for m in (plain.layers[0].wqkv, plain.layers[0].wdown))


def test_float8_logits_stay_near_the_full_precision_ones(small_checkpoint: Path) -> None:
    # first step and teacher-forced steps: moved by the weights' rounding only
    ids, pixels = _prompt(small_checkpoint, (40, 180, 90))
    forced = [5, 17, 300, 42]
    full = _teacher_forced(_runner(small_checkpoint, False, None), ids, pixels, forced)
    fp8 = _teacher_forced(_runner(small_checkpoint, False, FP8), ids, pixels, forced)
    for ref, got in zip(full, fp8, strict=True):
        rel = float((got - ref).norm() / ref.norm())
        # rounded, not equal: 10-18 % on this random tiny model (two layers of width 64,
        # whose logits amplify any change), where a wrong scale or a weight read as raw
        # bytes moves the logits by their whole size or more
        assert 0 < rel < 0.3, rel


def test_the_fused_float8_path_matches_its_torch_path(small_checkpoint: Path) -> None:
    pytest.importorskip("triton")
    assert INTERPRETED, "the conftest runs Triton's interpreter on the CPU"
    ids, pixels = _prompt(small_checkpoint, (200, 40, 90))
    forced = [7, 11]
    paths = {
        fused: _teacher_forced(_runner(small_checkpoint, fused, FP8), ids, pixels, forced)
        for fused in (False, True)
    }
    for ref, got in zip(paths[False], paths[True], strict=True):
        assert float((got - ref).norm() / ref.norm()) < 1e-4
    # a batch of two decode rows goes through fp8_matmul, one row through the GEMV
    r = _runner(small_checkpoint, True, FP8)
    assert r.gemv is not None
    n = int(ids.shape[0])
    for slot in (0, 1):
        r.assign(slot, list(range(1 + 8 * slot, 9 + 8 * slot)), 0.0, 1.0, 0)
        r.prefill(slot, ids, pixels)
    both = r.decode_launch([0, 1], True).tokens()
    assert both[0] == both[1]
    assert int(r.seq_lens[0]) == n + 1


class _Sink:
    def __init__(self) -> None:
        self.ids: list[int] = []
        self.finish: Any = None
        self.error: str | None = None
        self.done = threading.Event()

    def send(self, text: str, token_ids: Any, finish: Any, p: int, c: int, cached: int = 0) -> None:
        self.ids.extend(token_ids)
        if finish is not None:
            self.finish = finish
            self.done.set()

    def fail(self, message: str, client_error: bool = False) -> None:
        self.error = message
        self.done.set()

    def is_cancelled(self) -> bool:
        return False


def test_the_engine_generates_with_float8_weights(small_checkpoint: Path) -> None:
    ids, pixels = _prompt(small_checkpoint, (90, 30, 160))
    engine = build_engine(small_checkpoint, EngineOptions(kind="batching", device="cpu", weight_dtype="fp8"))
    try:
        assert engine.describe()["weight_dtype"] == "float8_e4m3fn"  # type: ignore[attr-defined]
        sinks = [_Sink() for _ in range(3)]
        for i, sink in enumerate(sinks):
            engine.submit(GenerationRequest(f"r{i}", ids, pixels, 12, 0.0, 1.0, 0, [], sink))
        for sink in sinks:
            assert sink.done.wait(120) and sink.error is None
    finally:
        engine.shutdown()
    vocab = int(engine.runner.vocab)  # type: ignore[attr-defined]
    assert all(len(s.ids) == 12 or s.finish == "stop" for s in sinks)
    assert all(0 <= t < vocab for s in sinks for t in s.ids)
    assert sinks[0].ids == sinks[1].ids == sinks[2].ids  # greedy: batched rows agree
    # the same greedy tokens as the float8 runner alone
    r = _runner(small_checkpoint, False, FP8)
    r.assign(0, list(range(1, 1 + r.cache.pages_for(int(ids.shape[0]) + 16))), 0.0, 1.0, 0)
    alone = [r.prefill(0, ids, pixels)]
    while len(alone) < len(sinks[0].ids):
        alone += r.decode_launch([0], True).tokens()
    assert alone == sinks[0].ids


def test_a_bad_weight_dtype_fails_before_loading(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="weight_dtype"):
        build_engine(tmp_path / "missing", EngineOptions(device="cpu", weight_dtype="int8"))
