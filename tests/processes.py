"""Real processes for end-to-end tests: nodes on consecutive free ports; control planes are
:class:`llava_stack.processes.ControlPlaneProcess` (real uvicorn, stopped by PID)."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from llava_node.launcher import TritonNode, TritonNodeConfig, free_port_block
from llava_stack.processes import ControlPlaneProcess

__all__ = ["ControlPlaneProcess", "node_config", "running_nodes", "start_nodes"]

_HANDED_OUT: set[int] = set()


def node_config(checkpoint: Path, **kwargs: Any) -> TritonNodeConfig:
    """A node on three consecutive free ports (HTTP, gRPC = HTTP + 1, metrics = HTTP + 2),
    Triton's own convention, which the control plane relies on to discover them."""
    base = free_port_block("127.0.0.1", 20000 + (os.getpid() % 300) * 40, avoid=_HANDED_OUT)
    _HANDED_OUT.update(range(base, base + 3))
    return TritonNodeConfig(
        checkpoint=checkpoint, http_port=base, grpc_port=base + 1, metrics_port=base + 2, **kwargs
    )  # type: ignore[arg-type]


def start_nodes(checkpoint: Path, count: int, configs: Sequence[dict[str, Any]] = ()) -> list[TritonNode]:
    """Start ``count`` nodes in parallel (node i with ``configs[i]`` as its config's
    keywords, when given) and wait until all are ready."""
    nodes = []
    for i in range(count):
        n = TritonNode(node_config(checkpoint, **(configs[i] if i < len(configs) else {})))
        n.start(wait=False)  # ports are taken now, so the next block differs
        nodes.append(n)
    try:
        for n in nodes:
            n.wait_ready(180)
    except BaseException:
        for n in nodes:
            n.stop()
        raise
    return nodes


@contextmanager
def running_nodes(
    checkpoint: Path, count: int, configs: Sequence[dict[str, Any]] = ()
) -> Iterator[list[TritonNode]]:
    """:func:`start_nodes`, stopped (by PID) on the way out."""
    nodes = start_nodes(checkpoint, count, configs)
    try:
        yield nodes
    finally:
        for n in nodes:
            n.stop()
