"""Helpers for the deployment files' checks: YAML, Dockerfiles, the settings' names."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from control_plane.config import Settings
from llava_node.launcher import PROJECT_ROOT

ROOT = PROJECT_ROOT
SETTINGS_ENV = {f"LLAVA_CP_{name.upper()}" for name in Settings.model_fields}
# what llava_node reads from a node's environment (llava_node/engine, model config comments)
NODE_ENV = {
    "LLAVA_CHECKPOINT",
    "LLAVA_ENGINE",
    "LLAVA_DEVICE",
    "LLAVA_MAX_BATCH",
    "LLAVA_MAX_SEQ_LEN",
    "LLAVA_KV_CACHE_FRACTION",
    "LLAVA_CUDA_GRAPHS",
}


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def load_yaml_documents(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def dockerfile_args(path: Path) -> dict[str, str]:
    """``ARG NAME=default`` lines of a Dockerfile."""
    return dict(re.findall(r"^ARG\s+(\w+)=(\S+)\s*$", path.read_text(), flags=re.M))


def dockerfile_instructions(path: Path, keyword: str) -> list[str]:
    """The arguments of every ``keyword`` instruction (continuation lines joined)."""
    text = re.sub(r"\\\n", " ", path.read_text())
    return [m.strip() for m in re.findall(rf"^{keyword}\s+(.+)$", text, flags=re.M)]
