"""KubeAI's PrefixHash policy: consistent hashing with bounded load (CHWBL).

Published rule (``docs/anchors.md`` §7, KubeAI ``docs/concepts/load-balancing.md``): hash the
start of the prompt plus the LoRA adapter name onto a ring holding ``replication`` (256) virtual
nodes per endpoint; walk clockwise to the first endpoint whose in-flight load stays within
``mean_load_factor`` (125 %) of the average. Stateless apart from the ring: no index, no events.

Adaptation: KubeAI hashes the first ``prefixCharLength`` = 100 *characters*; kvr routes token
ids, so we hash the first ``prefix_tokens`` tokens (25 ≈ 100 characters at ~4 characters per
token). The bound is the consistent-hashing-with-bounded-loads rule evaluated as if this request
were already placed: ``in_flight + 1 ≤ factor × (total_in_flight + 1) / n``.
"""

from __future__ import annotations

import bisect
import random
from array import array
from collections.abc import Sequence

import xxhash

from core.policies.base import Decision, RouteRequest, WorkerState
from core.prefix_index import WorkerKey

_SEED = 0x6B7672


def _point(data: bytes) -> int:
    return xxhash.xxh3_64_intdigest(data, seed=_SEED)


class ChwblPolicy:
    name = "chwbl"

    def __init__(self, *, replication: int = 256, mean_load_factor: float = 1.25, prefix_tokens: int = 25) -> None:
        if replication < 1 or mean_load_factor < 1.0 or prefix_tokens < 1:
            raise ValueError("chwbl needs replication >= 1, mean_load_factor >= 1, prefix_tokens >= 1")
        self.replication = replication
        self.mean_load_factor = mean_load_factor
        self.prefix_tokens = prefix_tokens
        self._ring_targets: tuple[WorkerKey, ...] = ()
        self._points: list[int] = []
        self._owners: list[WorkerKey] = []

    def _ring(self, targets: tuple[WorkerKey, ...]) -> None:
        if targets == self._ring_targets:
            return
        entries = sorted(
            (_point(f"{t.worker_id}/{t.dp_rank}#{v}".encode()), t) for t in targets for v in range(self.replication)
        )
        self._points = [p for p, _ in entries]
        self._owners = [t for _, t in entries]
        self._ring_targets = targets

    def key(self, request: RouteRequest) -> int:
        """Ring position of a request: its first ``prefix_tokens`` tokens and its adapter."""
        head = array("I", request.token_ids[: self.prefix_tokens]).tobytes()
        return _point(head + b"\0" + (request.lora_name or "").encode())

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        by_target = {w.target: w for w in candidates}
        self._ring(tuple(by_target))
        total = sum(w.load.in_flight for w in candidates)
        bound = self.mean_load_factor * (total + 1) / len(candidates)
        start = bisect.bisect_left(self._points, self.key(request)) % len(self._points)
        scores: dict[WorkerKey, float] = {}
        chosen = None
        hops = 0
        n = len(self._owners)
        for step in range(n):
            owner = self._owners[(start + step) % n]
            if owner in scores:
                continue
            scores[owner] = float(hops)
            hops += 1
            if chosen is None and by_target[owner].load.in_flight + 1 <= bound:
                chosen = by_target[owner]
            if len(scores) == len(by_target):
                break
        if chosen is None:  # cannot happen (someone is at or below the mean); stay safe
            chosen = by_target[self._owners[start]]
        skipped = int(scores[chosen.target])
        reason = (f"ring owner {self._owners[start]}" if skipped == 0 else
                  f"{skipped} endpoint(s) over the load bound {bound:.2f}, next clockwise")
        return Decision(chosen.target, scores, reason, self.name, "ring hops from the key", chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass
