"""Which checkpoint a model serves: a llava-hf directory named by the model's config or the
environment. Torch-free, so that ``llava_preprocess`` needs no engine code to find it."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CHECKPOINT_ENV", "checkpoint_from_env"]

CHECKPOINT_ENV = "LLAVA_CHECKPOINT"


def checkpoint_from_env(parameter: str | None) -> Path:
    """The checkpoint directory: the model parameter if set, else ``$LLAVA_CHECKPOINT``."""
    value = (parameter or "").strip() or os.environ.get(CHECKPOINT_ENV, "").strip()
    if not value:
        raise ValueError(
            "no checkpoint configured: set the model parameter 'checkpoint' or the "
            f"environment variable {CHECKPOINT_ENV} to a llava-hf checkpoint directory"
        )
    path = Path(value).expanduser()
    if not (path / "config.json").is_file():
        raise ValueError(f"checkpoint directory {path} has no config.json (is it a llava-hf checkpoint?)")
    return path
