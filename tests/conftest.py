"""Shared fixtures: the tiny checkpoint, real tritonserver nodes and a real PostgreSQL
server (all stopped by PID)."""

from __future__ import annotations

import os

# The GPU kernels' tests run under Triton's CPU interpreter, which must be chosen before
# anything imports triton (KERNELS_TEST_DEVICE=cuda runs them on a GPU instead).
os.environ.setdefault("TRITON_INTERPRET", "0" if os.environ.get("KERNELS_TEST_DEVICE") == "cuda" else "1")

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from llava_node.launcher import TritonNode
from llava_node.tiny_checkpoint import build_tiny_checkpoint
from tests.postgres import PostgresServer, find_pg_bin
from tests.processes import running_nodes


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny llava-hf checkpoint built for this test session (seed 0)."""
    return build_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def fleet(tiny_checkpoint: Path) -> Iterator[list[TritonNode]]:
    """Two real tritonserver nodes serving model_repository/ with the tiny checkpoint.

    Tests that stop a node must bring it back (``node.restart()``) before they end.
    """
    with running_nodes(tiny_checkpoint, 2) as nodes:
        yield nodes


@pytest.fixture(scope="session")
def node(fleet: list[TritonNode]) -> TritonNode:
    """One real tritonserver node."""
    return fleet[0]


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL server of this session on a loopback port (``scripts/test.sh``
    installs one where missing; without one, these tests are skipped, except in CI)."""
    bin_dir = find_pg_bin()
    if bin_dir is None:
        message = "no PostgreSQL server found (scripts/test.sh installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    server = PostgresServer(bin_dir).start()
    try:
        yield server
    finally:
        server.stop()
