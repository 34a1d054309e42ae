"""Cache-blind baselines: round-robin, random, least-loaded."""

from __future__ import annotations

import random
from collections.abc import Sequence

from core.policies.base import Decision, RouteRequest, WorkerState, pick_min
from core.prefix_index import WorkerKey


class RoundRobinPolicy:
    """Each request to the next candidate in target order (the counter survives fleet changes)."""

    name = "round_robin"

    def __init__(self) -> None:
        self._counter = 0

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        i = self._counter % len(candidates)
        self._counter += 1
        chosen = candidates[i]
        scores = {w.target: float((j - i) % len(candidates)) for j, w in enumerate(candidates)}
        return Decision(chosen.target, scores, f"turn {self._counter} of {len(candidates)}", self.name,
                        "turns until picked", chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass


class RandomPolicy:
    """A uniformly random candidate."""

    name = "random"

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        chosen = candidates[rng.randrange(len(candidates))]
        scores = {w.target: 1.0 / len(candidates) for w in candidates}
        return Decision(chosen.target, scores, "uniform draw", self.name, "probability", chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass


class LeastLoadedPolicy:
    """Fewest requests in flight from this router, then fewest queued prefill tokens; ties random."""

    name = "least_loaded"

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        # One scalar that orders by in-flight first: prefill tokens only break ties.
        keyed = [(w.load.in_flight + w.load.queued_prefill_tokens / (w.load.queued_prefill_tokens + 1.0), w)
                 for w in candidates]
        chosen = pick_min(keyed, rng)
        return Decision(chosen.target, {w.target: s for s, w in keyed},
                        f"{chosen.load.in_flight} in flight, {chosen.load.queued_prefill_tokens} queued prefill tokens",
                        self.name, "in-flight (+ prefill tie-break)", chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass
