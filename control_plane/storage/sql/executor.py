"""Admin SQL's own threads: a fixed number of queries at a time, never on the event loop's
default executor; interrupted when their client leaves, at shutdown and on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from control_plane.errors import ServiceError
from control_plane.storage.sql.results import QueryHandle, SqlBusy, SqlInterrupted, SqlTimeout

T = TypeVar("T")


class SqlExecutor:
    """Runs the admin API's queries on ``max_concurrent`` threads of their own.

    Never the event loop's default executor (6 threads on a 2-core host), which polling,
    registration and the lifespan use: however many queries run, those keep their threads.
    A query beyond ``max_concurrent`` is answered at once (:class:`SqlBusy`, 429), never
    queued. A query whose client leaves is interrupted; :meth:`aclose` interrupts every
    running query, so that stopping the control plane does not wait for one.
    """

    def __init__(self, max_concurrent: int = 2, on_outcome: Callable[[str], None] | None = None) -> None:
        self.max_concurrent = max(1, max_concurrent)
        self.on_outcome = on_outcome
        self._pool = ThreadPoolExecutor(max_workers=self.max_concurrent, thread_name_prefix="admin-sql")
        self._lock = threading.Lock()
        self._running: set[QueryHandle] = set()
        self._futures: set[asyncio.Future[Any]] = set()  # of the running jobs (for aclose)
        self._closed = False
        self.outcomes: dict[str, int] = dict.fromkeys(("ok", "error", "timeout", "busy", "interrupted"), 0)

    @property
    def running(self) -> int:
        """Queries whose threads are running now."""
        with self._lock:
            return len(self._running)

    def describe(self) -> dict[str, Any]:
        """Counts for ``/admin/status``."""
        return {"max_concurrent": self.max_concurrent, "running": self.running, **self.outcomes}

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        if self.on_outcome is not None:
            self.on_outcome(outcome)

    async def run(
        self,
        job: Callable[[QueryHandle], T],
        *,
        disconnected: Callable[[], Awaitable[bool]] | None = None,
        poll_s: float = 0.25,
    ) -> T:
        """Run ``job(handle)`` on one of the threads; ``disconnected`` is asked every
        ``poll_s`` while it runs, and the query is interrupted once it says True."""
        handle = QueryHandle()
        with self._lock:
            if self._closed:
                busy: ServiceError | None = SqlInterrupted("the control plane is stopping")
            elif len(self._running) >= self.max_concurrent:
                busy = SqlBusy(
                    f"{len(self._running)} admin SQL queries are running, the most allowed at once "
                    "(sql_max_concurrent): try again when one has ended"
                )
            else:
                busy = None
                self._running.add(handle)
        if busy is not None:
            self._count("busy" if isinstance(busy, SqlBusy) else "interrupted")
            raise busy
        try:
            future = asyncio.wrap_future(self._pool.submit(self._call, job, handle))
        except RuntimeError:  # the pool was shut down meanwhile
            with self._lock:
                self._running.discard(handle)
            self._count("interrupted")
            raise SqlInterrupted("the control plane is stopping") from None
        future.add_done_callback(_retrieve)  # no "exception never retrieved" when nobody awaits it
        self._futures.add(future)
        future.add_done_callback(self._futures.discard)
        try:
            while True:
                done, _ = await asyncio.wait({future}, timeout=poll_s if disconnected else None)
                if done:
                    break
                if disconnected is not None and await disconnected():
                    handle.cancel("the client went away")
                    disconnected = None  # the thread ends at its next progress check
            result = future.result()
        except asyncio.CancelledError:
            handle.cancel("the request was cancelled")
            raise
        except SqlTimeout:
            self._count("timeout")
            raise
        except SqlInterrupted:
            self._count("interrupted")
            raise
        except BaseException:
            self._count("error")
            raise
        self._count("ok")
        return result

    def _call(self, job: Callable[[QueryHandle], T], handle: QueryHandle) -> T:
        try:
            return job(handle)
        finally:
            with self._lock:
                self._running.discard(handle)

    def interrupt_all(self, reason: str) -> int:
        """Interrupt every running query; how many there were."""
        with self._lock:
            handles = list(self._running)
        for h in handles:
            h.cancel(reason)
        return len(handles)

    def _stopping(self) -> None:
        with self._lock:
            self._closed = True
        self.interrupt_all("the control plane is stopping")

    def interrupt_on_signals(
        self, loop: asyncio.AbstractEventLoop, signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)
    ) -> Callable[[], None]:
        """Interrupt the running queries (and refuse new ones) as soon as the process is
        told to stop, then hand the signal on to the handler that was there (uvicorn's).

        The lifespan's shutdown comes too late for that: uvicorn first waits for every
        open request to be answered, so a query whose client is still connected would hold
        the process up to its time limit. Returns what puts the previous handlers back.
        Only in the main thread (where signals are handled); elsewhere (TestClient) a no-op.
        """
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        previous: dict[int, Any] = {}

        def handler(signum: int, frame: Any) -> None:
            # Not the lock here (the interrupted code may hold it): on the loop, soon.
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                loop.call_soon_threadsafe(self._stopping)
            before = previous.get(signum)
            if callable(before):
                before(signum, frame)
            elif before == signal.SIG_DFL:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        for sig in signals:
            previous[sig] = signal.getsignal(sig)
            signal.signal(sig, handler)

        def restore() -> None:
            for sig, before in previous.items():
                if signal.getsignal(sig) is handler and before is not None:
                    signal.signal(sig, before)

        return restore

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Refuse new queries, interrupt the running ones and wait (up to ``timeout_s``)
        until their threads have given them up."""
        with self._lock:
            self._closed = True
        self.interrupt_all("the control plane is stopping")
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._futures:
            await asyncio.wait(set(self._futures), timeout=timeout_s)


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()
