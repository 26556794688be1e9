"""Poll leases on SQLite and on a real PostgreSQL server: one holder per worker, even
when replicas race; takeover once a lease has expired; release at shutdown."""

from __future__ import annotations

import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from control_plane.fleet.leases import LeaseManager
from control_plane.storage.db import Database
from control_plane.storage.schema import PollLease, Worker, utcnow
from tests.postgres import PostgresServer

WORKERS = 6


@pytest.fixture(params=["sqlite", "postgresql"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'leases.db'}"
    else:
        server: PostgresServer = request.getfixturevalue("postgres")
        url = server.create_database(f"leases_{uuid.uuid4().hex[:8]}")
    database = Database(url)
    database.create_schema()
    with database.session() as s:
        for i in range(WORKERS):
            s.add(Worker(name=f"http://10.0.0.{i}:8000", http_url="x", grpc_url="x", registered_at=utcnow()))
    try:
        yield database
    finally:
        database.dispose()


def worker_ids(db: Database) -> list[int]:
    with db.session() as s:
        return sorted(s.scalars(select(Worker.id)))


def holders(db: Database) -> dict[int, str]:
    with db.session() as s:
        return {lease.worker_id: lease.holder for lease in s.scalars(select(PollLease))}


def test_one_holder_per_worker_when_replicas_race(db: Database) -> None:
    ids = worker_ids(db)
    replicas = [LeaseManager(db, f"cp-{i}", period_s=30) for i in range(4)]
    for _ in range(15):
        barrier = threading.Barrier(len(replicas))
        results: dict[str, set[int]] = {}

        def renew(
            m: LeaseManager, barrier: threading.Barrier = barrier, results: dict[str, set[int]] = results
        ) -> None:
            barrier.wait()
            results[m.holder] = m.renew(ids)

        threads = [threading.Thread(target=renew, args=(m,)) for m in replicas]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for a, b in itertools.combinations(results.values(), 2):
            assert not a & b, results  # never two holders of one lease
        assert set().union(*results.values()) == set(ids), results  # every worker has one
        table = holders(db)
        for m in replicas:
            assert {w for w, h in table.items() if h == m.holder} == results[m.holder]
            assert m.held() == results[m.holder]


def test_an_expired_lease_is_taken_over_and_the_old_holder_stops(db: Database) -> None:
    ids = worker_ids(db)
    a, b = LeaseManager(db, "cp-a", period_s=1.0), LeaseManager(db, "cp-b", period_s=1.0)
    assert a.renew(ids) == set(ids)
    assert b.renew(ids) == set()
    time.sleep(0.5)
    assert a.renew(ids) == set(ids)  # renewed: still a's
    assert b.renew(ids) == set()
    # a stops renewing (it died); its leases lapse after one period, locally and in the database
    died = time.monotonic()
    while not b.renew(ids):
        time.sleep(0.05)
        assert time.monotonic() - died < 3.0, "no takeover"
    taken_s = time.monotonic() - died
    assert 0.4 <= taken_s <= 1.5, taken_s
    assert b.held() == set(ids) and b.acquired == len(ids)
    assert a.held() == set()  # a's own deadline passed before b could take over
    assert not any(a.holds(w) for w in ids)
    assert set(holders(db).values()) == {"cp-b"}
    assert a.renew(ids) == set()  # and a comes back as a follower


def test_claim_release_and_release_all(db: Database) -> None:
    ids = worker_ids(db)
    a, b = LeaseManager(db, "cp-a", period_s=30), LeaseManager(db, "cp-b", period_s=30)
    assert a.claim(ids[0]) and not b.claim(ids[0])
    assert a.holds(ids[0]) and not a.holds(ids[1])
    assert b.renew(ids) == set(ids[1:])
    a.release([ids[0]])
    assert not a.holds(ids[0])
    assert b.claim(ids[0])
    assert b.release_all() == len(ids)
    assert holders(db) == {}
    assert a.renew(ids) == set(ids)  # released leases are taken at once, not after the period


def test_renewal_without_a_database_lapses(db: Database, monkeypatch: pytest.MonkeyPatch) -> None:
    ids = worker_ids(db)
    m = LeaseManager(db, "cp-a", period_s=0.5)
    assert m.renew(ids) == set(ids)

    def unreachable(_ids: list[int]) -> set[int]:
        raise OSError("connection refused")

    monkeypatch.setattr(m, "_claim", unreachable)
    assert m.renew(ids) == set(ids)  # still within the period
    time.sleep(0.6)
    assert m.renew(ids) == set() and m.failures == 2
    assert not m.holds(ids[0])
