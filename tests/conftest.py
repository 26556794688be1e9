"""Shared fixtures: the tiny checkpoint and real tritonserver nodes (stopped by PID)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_node.launcher import TritonNode, TritonNodeConfig
from llava_node.tiny_checkpoint import build_tiny_checkpoint


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llava-hf checkpoint built for this test session (seed 0)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def node(tiny_checkpoint: Path) -> Iterator[TritonNode]:
    """One real tritonserver serving model_repository/ with the tiny checkpoint."""
    n = TritonNode(TritonNodeConfig(checkpoint=tiny_checkpoint))
    n.start()
    try:
        yield n
    finally:
        n.stop()
