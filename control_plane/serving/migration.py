"""Continuing a stream on another node when its node fails mid-stream (migration).

What a client has been sent is all the control plane needs: the request's own inputs plus
the token ids streamed so far. The next node takes them as ``prior_token_ids`` (the
``llava`` interface, :mod:`llava_wire.protocol`): it prefills prompt and prior tokens,
primes its text state with them and streams what the broken stream would have sent next,
so no token is lost or repeated and the counts go on (``completion_tokens`` counts the
prior tokens). Greedy streams continue exactly as one node would have generated them (the
same tokens, up to the last bits of floating point in a prefill against decode steps).
Sampled ones draw each later token from the same random numbers, a hash of (seed, step):
the control plane gives every request a seed (the client's, else its own), so a sampled
stream continues on the same random stream, not merely from the same distribution.
"""

from __future__ import annotations

import dataclasses
import random
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

from control_plane.nodes.client import Chunk, GenerationInputs, NodeStreamError
from control_plane.storage.schema import utcnow

__all__ = ["Break", "StreamProgress", "seeded"]


def seeded(inputs: GenerationInputs) -> GenerationInputs:
    """``inputs`` with a seed: the client's, else a fresh one (so that a continuation
    samples on from the same random stream)."""
    if inputs.seed is not None:
        return inputs
    return dataclasses.replace(inputs, seed=random.getrandbits(63))


@dataclass
class Break:
    """A stream's node failed after it had sent tokens: its ``migrations`` row to be."""

    from_worker: int
    after_tokens: int
    reason: str  # NodeStreamError.kind
    error: str
    last_token: float  # monotonic: the last token before the break
    key: str = field(default_factory=lambda: uuid.uuid4().hex)
    at: datetime = field(default_factory=utcnow)
    to_worker: int | None = None


@dataclass
class StreamProgress:
    """What a stream has sent its client, and its migrations so far."""

    token_ids: list[int] = field(default_factory=list)
    last_token: float = 0.0  # monotonic
    migrations: int = 0
    pending: Break | None = None  # a break whose continuation has sent nothing yet

    @property
    def streaming(self) -> bool:
        """Whether tokens reached the client (a failure now needs a continuation)."""
        return bool(self.token_ids)

    def sent(self, chunk: Chunk) -> None:
        """``chunk`` goes to the client."""
        if chunk.token_ids:
            self.token_ids += chunk.token_ids
            self.last_token = time.monotonic()

    def inputs(self, inputs: GenerationInputs) -> GenerationInputs:
        """The next attempt's inputs: a continuation once tokens were sent."""
        if not self.token_ids:
            return inputs
        return dataclasses.replace(inputs, prior_token_ids=tuple(self.token_ids))

    def broke(self, worker_id: int, exc: NodeStreamError) -> Break:
        """The stream's node failed: the break to continue from."""
        self.migrations += 1
        self.pending = Break(worker_id, len(self.token_ids), exc.kind, exc.message, self.last_token)
        return self.pending
