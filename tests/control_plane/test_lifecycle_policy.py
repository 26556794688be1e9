"""The lifecycle policy's pure parts, without nodes: placement ranking, states, error text."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest

from control_plane.config import Settings
from control_plane.fleet.store import WorkerStore
from control_plane.fleet.workers import ModelStatus, WorkerInfo, WorkerState
from control_plane.lifecycle.events import ModelEventLog
from control_plane.lifecycle.manager import ModelManager
from control_plane.lifecycle.placement import Failure, labels_match, placement_state
from control_plane.nodes.parsing import clean_node_error
from control_plane.storage.db import Database
from control_plane.storage.writer import BatchWriter

TRACEBACK_ERROR = json.dumps(
    {
        "error": "load failed for model 'broken': version 1 is at UNAVAILABLE state: Internal: "
        "ValueError: checkpoint directory /x has no config.json (is it a llava-hf checkpoint?)\n\nAt:\n"
        "  /src/llava_node/engine/loading.py(28): checkpoint_from_env\n"
        "  /repo/broken_engine/1/model.py(118): initialize\n;\n"
    }
)


def test_clean_node_error_keeps_the_cause_and_drops_the_traceback() -> None:
    assert clean_node_error(TRACEBACK_ERROR) == (
        "load failed for model 'broken': version 1 is at UNAVAILABLE state: Internal: ValueError: "
        "checkpoint directory /x has no config.json (is it a llava-hf checkpoint?)"
    )
    assert clean_node_error("plain text") == "plain text"
    assert clean_node_error("") == "(the node gave no reason)"


def test_labels_match() -> None:
    assert labels_match({"gpu": "h100", "zone": "a"}, {"gpu": "h100"})
    assert labels_match({"n": 2}, {"n": "2"})
    assert not labels_match({"gpu": "a10"}, {"gpu": "h100"})
    assert not labels_match({}, {"gpu": "h100"})


@pytest.mark.parametrize(
    ("status", "steps", "expected"),
    [
        (ModelStatus(True, "READY"), [], "loaded"),
        (ModelStatus(False, ""), [], "unloaded"),
        (ModelStatus(False, "UNAVAILABLE", "unloaded"), [], "unloaded"),
        (ModelStatus(False, "UNREACHABLE"), [], "unreachable"),
        (ModelStatus(False, "UNLOADING"), [], "unloading"),
        (ModelStatus(False, ""), [ModelStatus(False, "LOADING")], "unloaded"),
        (ModelStatus(False, ""), [ModelStatus(False, "UNAVAILABLE", "Internal: ValueError")], "failed"),
    ],
)
def test_placement_state(status: ModelStatus, steps: list[ModelStatus], expected: str) -> None:
    assert placement_state(status, steps) == expected


@pytest.fixture
def store(tmp_path: Path) -> Iterator[WorkerStore]:
    db = Database(f"sqlite:///{tmp_path / 'cp.db'}")
    db.create_schema()
    writer = BatchWriter(db, 0.05)
    try:
        yield WorkerStore(db, writer)
    finally:
        writer.close()
        db.dispose()


def worker(store: WorkerStore, wid: int, models: dict[str, bool], **kwargs: Any) -> WorkerInfo:
    info = WorkerInfo(
        id=wid,
        name=f"http://127.0.0.1:{8000 + wid}",
        http_url=f"http://127.0.0.1:{8000 + wid}",
        grpc_url=f"127.0.0.1:{9000 + wid}",
        metrics_url="",
        models={m: ModelStatus(ready, "READY" if ready else "") for m, ready in models.items()},
        **{"state": WorkerState.HEALTHY, **kwargs},
    )
    store._add(info)
    return info


def manager(store: WorkerStore, **settings: Any) -> ModelManager:
    return ModelManager(Settings(**settings), store, cast(Any, None), ModelEventLog(store.writer))


def test_best_node_prefers_fewer_models_then_less_load_and_honours_labels(store: WorkerStore) -> None:
    busy_empty = worker(store, 1, {"a": False, "b": False}, inflight=3)
    idle_empty = worker(store, 2, {"a": False, "b": False})
    one_model = worker(store, 3, {"a": False, "b": True})
    m = manager(store)
    assert m.best_node("a") is idle_empty
    idle_empty.inflight = 5
    assert m.best_node("a") is busy_empty
    busy_empty.queue_length = 10
    assert m.best_node("a") is idle_empty
    # b is loaded on 3 already: a new replica goes elsewhere
    assert m.best_node("b") in (busy_empty, idle_empty)
    one_model.labels = {"gpu": "h100"}
    labelled = manager(store, model_labels={"a": {"gpu": "h100"}})
    assert labelled.best_node("a") is one_model


def test_best_node_skips_unhealthy_non_explicit_and_unlisting_workers(store: WorkerStore) -> None:
    worker(store, 1, {"a": False}, state=WorkerState.UNHEALTHY)
    static = worker(store, 2, {"a": False})
    worker(store, 3, {"other": False})
    m = manager(store)
    m._explicit[static.id] = False
    assert m.best_node("a") is None
    m._explicit[static.id] = True
    assert m.best_node("a") is static


def test_a_recent_failure_ranks_a_node_last_and_backs_off_when_all_failed(store: WorkerStore) -> None:
    first = worker(store, 1, {"a": False})
    second = worker(store, 2, {"a": False})
    m = manager(store, load_retry_after_s=30)
    now = time.monotonic()
    m._failed[("a", first.id)] = Failure(now, first.id, "boom")
    assert m.best_node("a") is second and not m._backing_off("a")
    m._failed[("a", second.id)] = Failure(now, second.id, "boom")
    assert m._backing_off("a")
    m._failed[("a", first.id)] = Failure(now - 60, first.id, "long ago")
    assert m.best_node("a") is first and not m._backing_off("a")


def test_replica_bounds_and_the_default_model(store: WorkerStore) -> None:
    m = manager(store, model_min_replicas={"b": 2}, model_max_replicas={"b": 3}, default_max_replicas=0)
    assert (m.min_replicas("llava"), m.min_replicas("a"), m.min_replicas("b")) == (1, 0, 2)
    assert (m.max_replicas("a"), m.max_replicas("b")) == (None, 3)
    assert manager(store, model_min_replicas={"llava": 0}).min_replicas("llava") == 0


class Recorder:
    """Stands in for the manager's background work: records what a round decides."""

    def __init__(self, m: ModelManager) -> None:
        self.loads: list[tuple[str, int, str]] = []
        self.unloads: list[str] = []

        def start_load(model: str, w: WorkerInfo, reason: str) -> Any:
            self.loads.append((model, w.id, reason))

        def spawn(coro: Any, name: str) -> Any:
            coro.close()
            self.unloads.append(name)

        m._start_load = start_load  # type: ignore[method-assign,assignment]
        m._spawn = spawn  # type: ignore[method-assign,assignment]


def check(m: ModelManager, model: str) -> None:
    healthy = [w for w in m.store.all() if w.state is WorkerState.HEALTHY]
    m._check(model, healthy, time.monotonic())


def test_a_round_loads_the_default_model_when_it_is_loaded_nowhere(store: WorkerStore) -> None:
    worker(store, 1, {"llava": False, "a": False})
    m = manager(store)
    rec = Recorder(m)
    check(m, "llava")
    check(m, "a")  # minimum 0: nothing to do
    assert rec.loads == [("llava", 1, "below its minimum of 1 replica(s)")]


def test_a_round_scales_out_above_the_threshold_up_to_the_maximum(store: WorkerStore) -> None:
    busy = worker(store, 1, {"a": True})
    worker(store, 2, {"a": False})
    m = manager(store, scale_out_inflight=2)
    rec = Recorder(m)
    busy.model_inflight["a"] = 2
    check(m, "a")
    assert rec.loads == []  # 2 per replica: not above 2
    busy.model_inflight["a"] = 3
    check(m, "a")
    assert rec.loads == [("a", 2, "scale out: 3 requests in flight on 1 replica(s)")]
    capped = manager(store, scale_out_inflight=2, model_max_replicas={"a": 1})
    rec = Recorder(capped)
    check(capped, "a")
    assert rec.loads == []


def test_a_round_unloads_idle_replicas_down_to_the_minimum_and_never_a_pinned_model(
    store: WorkerStore,
) -> None:
    old = time.monotonic() - 100
    a1 = worker(store, 1, {"a": True, "b": True, "llava": True})
    a2 = worker(store, 2, {"a": True, "b": True, "llava": True})
    m = manager(store, idle_ttl_s=10, pinned_models="b")
    for w in (a1, a2):
        m._explicit[w.id] = True
        for name in ("a", "b", "llava"):
            m._ready_since[(name, w.id)] = old
    a2.model_last_used["a"] = time.monotonic()  # used just now: not idle
    rec = Recorder(m)
    for name in ("a", "b", "llava"):
        check(m, name)
    # a: the idle replica goes; b: pinned; llava: one of two goes, the minimum of 1 stays
    assert sorted(rec.unloads) == ["unload a from 1", "unload llava from 1"]
    assert not a1.models["a"].ready and a1.models["a"].state == "UNLOADING"  # out of routing at once
    assert a2.models["a"].ready and a1.models["b"].ready
