"""Loading a llava-hf checkpoint from a local directory onto the right device."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["LoadedModel", "load_llava", "pick_device"]


def pick_device(preference: str = "auto") -> tuple[torch.device, torch.dtype]:
    """GPU in bf16 when there is one (or when asked), else CPU in float32."""
    pref = (preference or "auto").lower()
    if pref == "cpu" or (pref == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu"), torch.float32
    if not torch.cuda.is_available():
        raise ValueError(f"device {preference!r} requested but CUDA is not available")
    device = torch.device("cuda" if pref in ("auto", "cuda", "gpu") else pref)
    return device, torch.bfloat16


@dataclass
class LoadedModel:
    """A llava-hf model with its tokenizer and the facts engines need."""

    model: Any  # LlavaForConditionalGeneration
    tokenizer: Any
    device: torch.device
    dtype: torch.dtype
    eos_token_ids: list[int]
    image_token_id: int
    context_length: int


def load_llava(checkpoint: str | Path, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    """Load a llava-hf checkpoint from a local directory (nothing is downloaded)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    kwargs: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if device.type != "cpu" and importlib.util.find_spec("accelerate") is not None:
        kwargs["device_map"] = str(device)  # load straight onto the GPU
    model = LlavaForConditionalGeneration.from_pretrained(str(checkpoint), **kwargs)
    model = model.to(device).eval()  # type: ignore[arg-type]
    processor = AutoProcessor.from_pretrained(str(checkpoint), local_files_only=True)
    tokenizer = processor.tokenizer
    eos = model.generation_config.eos_token_id
    if eos is None:
        eos = tokenizer.eos_token_id
    eos_ids = [int(e) for e in (eos if isinstance(eos, list) else [eos]) if e is not None]
    text_config = model.config.text_config
    image_token_id = int(model.config.image_token_id)
    # The image token is a placeholder of the input, never an output: LLaVA's own
    # checkpoints cannot emit it (its index, -200, is outside their vocabulary), and a
    # reply holding it would turn into an image slot when the conversation is sent back.
    # transformers' generate() then suppresses it as the engine's sampler does.
    suppressed = list(model.generation_config.suppress_tokens or [])
    model.generation_config.suppress_tokens = sorted({*suppressed, image_token_id})
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        device=device,
        dtype=dtype,
        eos_token_ids=eos_ids,
        image_token_id=image_token_id,
        context_length=int(text_config.max_position_embeddings),
    )
