"""Poll leases: each node is polled by exactly one control-plane replica at a time.

Replicas that share a database agree on who polls which node through the
``poll_leases`` table: a replica polls a node only while it holds that node's
lease, renews its leases every poll round, and takes a lease that is free or has
expired. Taking and renewing are single conditional statements, so under
concurrency exactly one replica wins a lease:

* renew or take over: ``UPDATE poll_leases SET holder = me, expires_at = now + period
  WHERE worker_id IN (...) AND (holder = me OR expires_at < now) RETURNING worker_id``
  (on PostgreSQL a competing UPDATE re-checks the condition on the row it waited for);
* take a free one: ``INSERT ... ON CONFLICT (worker_id) DO NOTHING RETURNING worker_id``.

Expiry is judged by the database's clock on PostgreSQL (replicas on several hosts
need not agree on the time) and by this host's clock on SQLite (one host). Locally a
lease counts only until ``period`` after the renewal *started* (monotonic time), so a
replica stops polling before the database lets another replica take over, and a
replica that cannot reach the database stops polling within one lease period.

When a replica stops cleanly it releases its leases, and the others take over at
their next round instead of after the lease period.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import case, delete, func, or_, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from control_plane.storage.db import Database
from control_plane.storage.schema import PollLease, utcnow

__all__ = ["LeaseManager"]

log = logging.getLogger(__name__)


class LeaseManager:
    """This replica's poll leases: take, renew, check and release them.

    ``renew`` and ``release_all`` block on the database: call them from a thread.
    ``holds`` reads memory only.
    """

    def __init__(self, db: Database, holder: str, period_s: float) -> None:
        if not holder:
            raise ValueError("a lease holder needs a name")
        self.db = db
        self.holder = holder
        self.period_s = period_s
        self._valid_until: dict[int, float] = {}  # worker id -> monotonic deadline
        self._lock = threading.Lock()
        self.acquired = 0  # leases taken (not renewed) since start
        self.failures = 0  # renewals that could not reach the database

    # -- reads (memory) ----------------------------------------------------------------
    def holds(self, worker_id: int) -> bool:
        """Whether this replica holds ``worker_id``'s lease right now."""
        with self._lock:
            return time.monotonic() < self._valid_until.get(worker_id, 0.0)

    def held(self) -> set[int]:
        """The workers whose leases this replica holds right now."""
        now = time.monotonic()
        with self._lock:
            return {w for w, until in self._valid_until.items() if now < until}

    # -- database (blocking) ---------------------------------------------------------------
    def _now(self, s: Session) -> datetime:
        if self.db.dialect == "postgresql":  # the server's clock, as naive UTC like every column
            return s.execute(select(func.timezone("UTC", func.now()))).scalar_one()  # type: ignore[no-any-return]
        return utcnow()

    def renew(self, worker_ids: Iterable[int]) -> set[int]:
        """Renew this replica's leases on ``worker_ids`` and take those that are free or
        expired; return the ones of ``worker_ids`` held now. Leases on other ids are not
        renewed: they lapse (removed workers)."""
        ids = sorted(set(worker_ids))
        started = time.monotonic()
        if not ids:
            with self._lock:
                self._valid_until.clear()
            return set()
        try:
            got = self._claim(ids)
        except Exception as exc:  # database unreachable: keep what is still valid
            self.failures += 1
            log.warning("could not renew poll leases (%s); they lapse in %.0f s", exc, self.period_s)
            return self.held()
        deadline = started + self.period_s
        with self._lock:
            before = {w for w in ids if started < self._valid_until.get(w, 0.0)}
            for w in ids:  # others (a claim made meanwhile) are left as they are
                if w in got:
                    self._valid_until[w] = deadline
                else:
                    self._valid_until.pop(w, None)
        taken = got - before
        if taken:
            self.acquired += len(taken)
            log.info("%s took the poll leases of workers %s", self.holder, sorted(taken))
        lost = before - got
        if lost:
            log.info("%s no longer polls workers %s", self.holder, sorted(lost))
        return got

    def claim(self, worker_id: int) -> bool:
        """Take (or renew) one worker's lease, e.g. at its registration; True if held."""
        started = time.monotonic()
        try:
            got = worker_id in self._claim([worker_id])
        except Exception as exc:
            self.failures += 1
            log.warning("could not take the poll lease of worker %s: %s", worker_id, exc)
            return self.holds(worker_id)
        with self._lock:
            if got:
                if self._valid_until.get(worker_id, 0.0) <= started:
                    self.acquired += 1
                self._valid_until[worker_id] = started + self.period_s
            else:
                self._valid_until.pop(worker_id, None)
        return got

    def _claim(self, ids: list[int]) -> set[int]:
        period = timedelta(seconds=self.period_s)
        with self.db.session() as s:
            now = self._now(s)
            renewed = s.execute(
                update(PollLease)
                .where(
                    PollLease.worker_id.in_(ids),
                    or_(PollLease.holder == self.holder, PollLease.expires_at < now),
                )
                .values(
                    holder=self.holder,
                    expires_at=now + period,
                    # a takeover restarts the clock; a renewal keeps it
                    acquired_at=case((PollLease.holder == self.holder, PollLease.acquired_at), else_=now),
                )
                .returning(PollLease.worker_id)
                .execution_options(synchronize_session=False)
            ).scalars()
            got = set(renewed)
            existing = set(s.scalars(select(PollLease.worker_id).where(PollLease.worker_id.in_(ids))))
            free = [w for w in ids if w not in existing]
            if free:
                dialect_insert = postgresql.insert if self.db.dialect == "postgresql" else sqlite.insert
                inserted = s.execute(
                    dialect_insert(PollLease)
                    .values(
                        [
                            {
                                "worker_id": w,
                                "holder": self.holder,
                                "acquired_at": now,
                                "expires_at": now + period,
                            }
                            for w in free
                        ]
                    )
                    .on_conflict_do_nothing(index_elements=[PollLease.worker_id])
                    .returning(PollLease.worker_id)
                ).scalars()
                got.update(inserted)
        return got

    def release(self, worker_ids: Iterable[int]) -> None:
        """Give up the leases on ``worker_ids`` (e.g. removed workers)."""
        ids = list(worker_ids)
        with self._lock:
            for w in ids:
                self._valid_until.pop(w, None)
        if ids:
            with self.db.session() as s:
                s.execute(
                    delete(PollLease).where(PollLease.worker_id.in_(ids), PollLease.holder == self.holder)
                )

    def release_all(self) -> int:
        """Give up every lease this replica holds (at a clean shutdown)."""
        with self._lock:
            self._valid_until.clear()
        with self.db.session() as s:
            result = s.execute(delete(PollLease).where(PollLease.holder == self.holder))
            return int(getattr(result, "rowcount", 0) or 0)

    def describe(self) -> dict[str, Any]:
        """Lease statistics, for the admin API."""
        return {
            "holder": self.holder,
            "period_s": self.period_s,
            "held": sorted(self.held()),
            "acquired": self.acquired,
            "renewal_failures": self.failures,
        }
