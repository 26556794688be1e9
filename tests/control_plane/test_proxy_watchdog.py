"""The proxy's stall watchdog: one timer per stream, moved by each wait, cancels the call."""

from __future__ import annotations

import asyncio

from control_plane.nodes.watchdog import Watchdog


class FakeCall:
    def __init__(self) -> None:
        self.cancelled_at: float | None = None

    def cancel(self) -> bool:
        self.cancelled_at = asyncio.get_running_loop().time()
        return True


async def test_expires_when_a_wait_outlasts_its_timeout() -> None:
    call = FakeCall()
    w = Watchdog(call)
    start = asyncio.get_running_loop().time()
    w.arm(0.05)
    await asyncio.sleep(0.15)
    assert w.expired and call.cancelled_at is not None
    assert 0.04 <= call.cancelled_at - start <= 0.14
    w.close()


async def test_many_short_waits_never_expire_and_keep_one_timer() -> None:
    call = FakeCall()
    w = Watchdog(call)
    for _ in range(30):  # 30 waits of 10 ms under a 50 ms timeout: 300 ms in all
        w.arm(0.05)
        await asyncio.sleep(0.01)
        w.disarm()
    assert not w.expired and call.cancelled_at is None
    w.close()


async def test_time_between_waits_does_not_count() -> None:
    call = FakeCall()
    w = Watchdog(call)
    w.arm(0.05)
    await asyncio.sleep(0.01)
    w.disarm()
    await asyncio.sleep(0.1)  # the consumer is slow: not a stalled node
    assert not w.expired
    w.arm(0.05)
    await asyncio.sleep(0.01)
    w.disarm()
    assert not w.expired and call.cancelled_at is None
    w.close()


async def test_a_shorter_timeout_takes_effect_at_once() -> None:
    """The first wait (first token) has a long timeout, the next ones a short one."""
    call = FakeCall()
    w = Watchdog(call)
    loop = asyncio.get_running_loop()
    w.arm(60.0)
    await asyncio.sleep(0.01)
    w.disarm()
    start = loop.time()
    w.arm(0.05)
    await asyncio.sleep(0.2)
    assert w.expired and call.cancelled_at is not None
    assert call.cancelled_at - start <= 0.15
    w.close()


async def test_close_stops_the_timer() -> None:
    call = FakeCall()
    w = Watchdog(call)
    w.arm(0.02)
    w.close()
    await asyncio.sleep(0.06)
    assert not w.expired and call.cancelled_at is None
