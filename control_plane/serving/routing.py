"""Dispatch policies: which healthy node, with the model ready, takes a request.

All read the live in-memory view only; none touches the database. Each choice is a
:class:`Decision`: the node, why it was chosen (:data:`REASONS`) and the candidates as
they looked (recorded as a ``routing_decisions`` row by :mod:`control_plane.serving.records`).

``cache_aware`` sends a request to the candidate most likely to hold its prefix in its KV
cache (:mod:`control_plane.serving.affinity`): among the candidates whose load is within
``load_threshold`` of the least loaded one's, the one with the longest expected hit (ties:
the least loaded, then at random). A request whose best-affinity node is too loaded goes to
the best within the threshold (reason ``load``); with no affinity anywhere it goes to the
least loaded (``least_loaded``), as ``shortest_queue`` does. An expected hit counts only
from ``min_match`` of the request's estimated prompt on (SGLang's router has the same
rule): every conversation's first turn shares the system prompt, a tenth of its prompt,
and would otherwise pile the new conversations onto one node.
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from control_plane.config import DispatchPolicy
from control_plane.fleet.workers import WorkerInfo
from control_plane.serving.affinity import AffinityIndex, Prefix, request_prefix

__all__ = ["MAX_RECORDED_CANDIDATES", "REASONS", "Decision", "Router"]

# Why a node was chosen: its prefix (affinity); passed over its best-affinity node for load
# (load); nothing to be affine to, the least loaded (least_loaded); the only node with room
# (only_choice); the client named it (pinned); after another node failed the request before
# its first token (retry), or mid-stream (migration: the stream goes on there); the other
# policies' own draws (lottery, round_robin, power_of_two).
REASONS = (
    "affinity",
    "load",
    "least_loaded",
    "only_choice",
    "pinned",
    "retry",
    "migration",
    "lottery",
    "round_robin",
    "power_of_two",
)
# Candidates kept in a decision (the longest expected hits, then the least loaded; the
# chosen one always): a row stays small in a fleet of hundreds of nodes.
MAX_RECORDED_CANDIDATES = 16


def _load(w: WorkerInfo) -> float:
    # This control plane's own open streams to the node, per unit of speed.
    return w.inflight / max(1, w.speed)


@dataclass(frozen=True)
class Decision:
    """One routing decision: the node, why, and the candidates as they were then."""

    worker: WorkerInfo
    reason: str
    policy: str
    hits: Mapping[int, int] = field(default_factory=dict)  # worker id -> expected hit tokens
    candidates: tuple[dict[str, Any], ...] = ()  # see :func:`_snapshot`
    candidate_count: int = 1

    @property
    def expected_hit_tokens(self) -> int:
        """The chosen node's expected hit."""
        return self.hits.get(self.worker.id, 0)

    @property
    def affinity(self) -> tuple[int | None, int]:
        """The candidate with the longest expected hit (the chosen one among equals) and
        that hit; ``(None, 0)`` when no candidate had one."""
        best = max(self.hits.items(), key=lambda kv: (kv[1], kv[0] == self.worker.id), default=None)
        return best if best is not None and best[1] > 0 else (None, 0)

    def but(self, reason: str) -> Decision:
        """The same choice, recorded with another reason."""
        return Decision(self.worker, reason, self.policy, self.hits, self.candidates, self.candidate_count)


def _snapshot(
    worker: WorkerInfo, pool: Sequence[WorkerInfo], hits: Mapping[int, int]
) -> tuple[dict[str, Any], ...]:
    """The candidates as recorded, before the chosen one counts its new stream:
    ``{worker_id, load, expected_hit_tokens}``, the chosen one first, then the longest
    expected hits and the least loaded, at most :data:`MAX_RECORDED_CANDIDATES`."""
    ranked = sorted((w for w in pool if w is not worker), key=lambda w: (-hits.get(w.id, 0), _load(w), w.id))
    return tuple(
        {"worker_id": w.id, "load": round(_load(w), 3), "expected_hit_tokens": hits.get(w.id, 0)}
        for w in [worker, *ranked][:MAX_RECORDED_CANDIDATES]
    )


class Router:
    """Chooses a worker by the configured policy (``cache_aware`` with an affinity index)."""

    def __init__(
        self,
        policy: DispatchPolicy,
        rng: random.Random | None = None,
        *,
        index: AffinityIndex | None = None,
        load_threshold: float = 4.0,
        block_chars: int = 64,
        min_match: float = 0.5,
    ) -> None:
        self.policy = policy
        self.rng = rng or random.Random()
        self.index = index if index is not None else AffinityIndex(100_000)
        self.load_threshold = load_threshold
        self.min_match = min_match
        self.block_chars = block_chars
        self._rr = itertools.count()

    @property
    def cache_aware(self) -> bool:
        """Whether requests are routed by their prefixes (and their prefixes computed)."""
        return self.policy is DispatchPolicy.CACHE_AWARE

    def describe(self) -> dict[str, Any]:
        """The policy and the affinity index, for ``/admin/status``."""
        return {
            "policy": self.policy.value,
            "load_threshold": self.load_threshold,
            "min_match": self.min_match,
            "affinity": self.index.describe() if self.cache_aware else None,
        }

    async def prefix(
        self,
        model: str,
        prompt: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        images: Sequence[bytes],
    ) -> Prefix | None:
        """A request's prefix keys (``cache_aware`` only: None with the other policies)."""
        if not self.cache_aware:
            return None
        return await request_prefix(model, prompt, messages, images, self.block_chars)

    def choose(
        self, candidates: Sequence[WorkerInfo], exclude: set[int] | frozenset[int] = frozenset()
    ) -> WorkerInfo | None:
        """One of ``candidates`` (minus ``exclude``), or None if there is none."""
        decision = self.decide([w for w in candidates if w.id not in exclude])
        return decision.worker if decision is not None else None

    def decide(self, pool: Sequence[WorkerInfo], prefix: Prefix | None = None) -> Decision | None:
        """The node for a request whose leading content is ``prefix`` (None: unknown), from
        ``pool`` (the candidates with room); None if the pool is empty. A decision is final:
        with ``cache_aware``, the chosen node is recorded as holding ``prefix``."""
        if not pool:
            return None
        keyed = self._keyed(prefix)
        hits = self.index.expected_hits(keyed, pool) if keyed is not None else {}
        floor = self.min_match * self.index.expected_total(keyed) if keyed is not None else 0.0
        worker, reason = self._pick(pool, {k: v for k, v in hits.items() if v >= floor})
        if keyed is not None:
            self.index.record(keyed, worker)
        return Decision(worker, reason, self.policy.value, hits, _snapshot(worker, pool, hits), len(pool))

    def pinned(self, worker: WorkerInfo, prefix: Prefix | None = None) -> Decision:
        """The node the client named (the decision is recorded as ``pinned``)."""
        keyed = self._keyed(prefix)
        hits = self.index.expected_hits(keyed, [worker]) if keyed is not None else {}
        if keyed is not None:
            self.index.record(keyed, worker)
        return Decision(worker, "pinned", self.policy.value, hits, _snapshot(worker, [worker], hits))

    def served(
        self, decision: Decision, prefix: Prefix | None, cached: int, prompt_tokens: int | None
    ) -> None:
        """What the node reported once the request was served (corrects the index)."""
        keyed = self._keyed(prefix)
        if keyed is not None:
            self.index.report(keyed, decision.worker, decision.expected_hit_tokens, cached, prompt_tokens)

    def _keyed(self, prefix: Prefix | None) -> Prefix | None:
        """``prefix`` when the policy routes by prefixes and it has a block to route by."""
        return prefix if self.cache_aware and prefix is not None and not prefix.empty else None

    def _pick(self, pool: Sequence[WorkerInfo], hits: Mapping[int, int]) -> tuple[WorkerInfo, str]:
        if len(pool) == 1:
            return pool[0], "only_choice"
        policy = self.policy
        if policy is DispatchPolicy.LOTTERY:
            return self.rng.choices(pool, weights=[max(1, w.speed) for w in pool])[0], "lottery"
        if policy is DispatchPolicy.ROUND_ROBIN:
            ordered = sorted(pool, key=lambda w: w.id)
            return ordered[next(self._rr) % len(ordered)], "round_robin"
        if policy is DispatchPolicy.POWER_OF_TWO:
            a, b = self.rng.sample(list(pool), 2)
            return (a if _load(a) <= _load(b) else b), "power_of_two"
        least = min(_load(w) for w in pool)
        best_hit = max(hits.values(), default=0)
        if best_hit > 0:
            # Affinity, among the nodes not too loaded next to the least loaded one.
            within = [w for w in pool if _load(w) - least <= self.load_threshold]
            hit = max(hits.get(w.id, 0) for w in within)
            if hit > 0:
                return self._least_loaded([w for w in within if hits.get(w.id, 0) == hit]), (
                    "affinity" if hit == best_hit else "load"
                )
            return self._least_loaded(pool), "load"
        # shortest_queue: least loaded; ties broken at random so equal nodes share work
        return self._least_loaded(pool), "least_loaded"

    def _least_loaded(self, pool: Sequence[WorkerInfo]) -> WorkerInfo:
        best = min(_load(w) for w in pool)
        return self.rng.choice([w for w in pool if _load(w) == best])
