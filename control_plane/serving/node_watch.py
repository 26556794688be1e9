"""A stream on a node that left routing ends at once, rather than after a timeout.

A node frozen mid-request (SIGSTOP, a wedged host) answers nothing: a stream waiting for
its first token would wait for the first-token timeout (120 s by default), and one that
was streaming for the stall timeout (60 s), though the health poller takes the node out
of routing within seconds. :func:`watch_node` ends such a stream with an unreachable,
stalled :class:`NodeStreamError` as soon as the node is out of routing: before the first
token at once (nothing has reached the client: the request is retried elsewhere), after
it once nothing came for ``frozen_after_s`` (the stream is continued elsewhere). The
stall timeout stays the last resort for a node that still looks healthy.

One timer per stream looks at the node's state every ``check_s`` while the stream waits
for its node; when it gives up, it cancels the waiting task and the wait raises the error
instead, as ``asyncio.timeout`` does (no task per chunk, nothing on the per-token path but
two assignments).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from control_plane.nodes.client import NodeStreamError
from llava_wire.messages import Chunk

__all__ = ["CHECK_S", "watch_node"]

# How often a waiting stream looks at its node's state (the poller's interval is 0.5-5 s,
# so this adds at most a quarter of a second to its verdict).
CHECK_S = 0.25


async def watch_node(
    stream: AsyncIterator[Chunk],
    out_of_routing: Callable[[], str | None],
    frozen_after_s: float,
    check_s: float = CHECK_S,
) -> AsyncGenerator[Chunk, None]:
    """``stream``'s chunks; raises an unreachable, stalled :class:`NodeStreamError` once
    ``out_of_routing()`` names a reason (the node's state) while the stream waits: before
    the first chunk at once, after it when nothing came for ``frozen_after_s``.

    A cancellation from elsewhere (the client left) passes through unchanged.
    """
    loop = asyncio.get_running_loop()
    current = asyncio.current_task()
    assert current is not None
    task: asyncio.Task[object] = current
    waiting = False
    gave_up: str | None = None
    last = loop.time()
    started = False  # a chunk came
    patience = 0.0  # before the first chunk: none
    handle: asyncio.TimerHandle | None = None

    def check() -> None:
        nonlocal handle, gave_up
        handle = loop.call_later(check_s, check)
        if not waiting or loop.time() - last < patience:
            return
        reason = out_of_routing()
        if reason is not None:
            handle.cancel()
            handle = None
            gave_up = reason
            task.cancel()

    handle = loop.call_later(check_s, check)
    try:
        while True:
            task = asyncio.current_task() or task  # (each wait may come from another task)
            waiting = True
            try:
                chunk = await anext(stream)
            except StopAsyncIteration:
                return
            except asyncio.CancelledError:
                if gave_up is None or task.uncancel() > 0:
                    raise  # not ours, or ours and another: the caller is cancelled
                raise NodeStreamError(
                    f"the node went {gave_up} before its first token"
                    if not started
                    else f"the node went {gave_up} and sent nothing for {frozen_after_s:g} s",
                    unreachable=True,
                    left=True,
                ) from None
            finally:
                waiting = False
            last = loop.time()
            started, patience = True, frozen_after_s
            yield chunk
    finally:
        if handle is not None:
            handle.cancel()
        with contextlib.suppress(Exception):
            await stream.aclose()  # type: ignore[attr-defined]
