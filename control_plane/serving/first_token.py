"""Waiting for a node's first token no longer than the node stays in routing.

A node frozen mid-request (SIGSTOP, a wedged host) answers nothing: its streams that are
already running end on the stall timeout, but one still waiting for its first token would
wait for the first-token timeout (120 s by default) though the health poller takes the node
out of routing within seconds. Nothing has reached the client before the first token, so
such a request is given up there and retried elsewhere as soon as the node is out.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from control_plane.nodes.client import NodeStreamError
from llava_wire.messages import Chunk

__all__ = ["CHECK_S", "until_node_leaves"]

# How often the wait for the first token looks at the node's state (the poller's interval
# is 0.5-5 s, so this adds at most a quarter of a second to its verdict).
CHECK_S = 0.25


async def until_node_leaves(
    stream: AsyncIterator[Chunk], out_of_routing: Callable[[], str | None], check_s: float = CHECK_S
) -> AsyncGenerator[Chunk, None]:
    """``stream``'s chunks; before the first one, raises an unreachable, stalled
    :class:`NodeStreamError` once ``out_of_routing()`` names a reason (the node's state).

    The first chunk is awaited in a task of its own, watched from here; the rest are read
    directly. A cancellation of the caller (its client left) cancels that task too.
    """
    first: asyncio.Task[Chunk] = asyncio.ensure_future(anext(stream))
    try:
        while not first.done():
            await asyncio.wait({first}, timeout=check_s)
            reason = None if first.done() else out_of_routing()
            if reason is not None:
                first.cancel()
                await asyncio.wait({first})
                raise NodeStreamError(
                    f"the node went {reason} before its first token", unreachable=True, stalled=True
                )
        try:
            chunk = first.result()
        except StopAsyncIteration:
            return
        yield chunk
        async for chunk in stream:
            yield chunk
    finally:
        if not first.done():
            first.cancel()
            await asyncio.wait({first})
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
