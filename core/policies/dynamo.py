"""NVIDIA Dynamo's KV-router cost ("linear" selector), faithful to its published formula.

Per target (``docs/anchors.md`` §1a, ``lib/kv-router/src/scheduling/selector/default.rs``)::

    raw_prefill  = active_prefill_tokens / block_size + request_blocks
    credit       = overlap_score_credit × overlap_blocks × decay
    decay        = 1 / (1 + credit_decay × (active_prefill − min active_prefill) / block_size / request_blocks)
    cost         = prefill_load_scale × max(raw_prefill − credit, 0) + decode_blocks
    decode_blocks = active_blocks + new_blocks

``request_blocks`` is the prompt length in blocks (fractional, ISL / block_size); ``active_blocks``
the distinct blocks of the requests in flight on the target, and ``new_blocks`` the request's blocks
not among them (Dynamo's ``potential_blocks``), taken as the blocks beyond the target's overlap. Temperature 0
picks the minimum cost, ties uniformly at random; T > 0 min-max normalises the costs to [0, 1] and
samples with p ∝ exp(−c / T). Defaults: credit 1.0, decay 0 (off), prefill scale 1, T 0.

Inputs: ``active_prefill_tokens`` is ``WorkerLoad.queued_prefill_tokens`` and ``active_blocks``
the router's own in-flight blocks, as Dynamo tracks them itself. Overlap is the index's, used as
is (Dynamo does not discount it by confidence).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from core.policies.base import Decision, RouteRequest, WorkerState, pick_min
from core.prefix_index import WorkerKey


def softmax_pick(costs: Sequence[float], temperature: float, u: float) -> int:
    """Index drawn with p ∝ exp(−normalised cost / T), using the uniform draw ``u`` in [0, 1)."""
    lo, hi = min(costs), max(costs)
    if lo == hi:
        return min(int(u * len(costs)), len(costs) - 1)
    weights = [math.exp(-((c - lo) / (hi - lo)) / temperature) for c in costs]
    target = u * sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if target < acc:
            return i
    return len(costs) - 1


class DynamoPolicy:
    name = "dynamo"

    def __init__(
        self,
        *,
        block_size: int = 16,
        overlap_score_credit: float = 1.0,
        credit_decay: float = 0.0,
        prefill_load_scale: float = 1.0,
        temperature: float = 0.0,
    ) -> None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        self.block_size = block_size
        self.overlap_score_credit = overlap_score_credit
        self.credit_decay = credit_decay
        self.prefill_load_scale = prefill_load_scale
        self.temperature = temperature

    def cost(self, request: RouteRequest, w: WorkerState, min_active_prefill_tokens: int) -> float:
        bs = self.block_size
        request_blocks = request.prompt_tokens / bs
        raw_prefill = w.load.queued_prefill_tokens / bs + request_blocks
        decay = 1.0
        if self.credit_decay > 0 and request_blocks > 0:
            excess = (w.load.queued_prefill_tokens - min_active_prefill_tokens) / bs
            decay = 1.0 / (1.0 + self.credit_decay * excess / request_blocks)
        credit = self.overlap_score_credit * w.overlap_blocks * decay
        new_blocks = max(len(request.block_hashes) - w.overlap_blocks, 0)
        return self.prefill_load_scale * max(raw_prefill - credit, 0.0) + w.load.active_blocks + new_blocks

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        floor = min(w.load.queued_prefill_tokens for w in candidates)
        costs = [self.cost(request, w, floor) for w in candidates]
        if self.temperature == 0:
            chosen = pick_min(list(zip(costs, candidates, strict=True)), rng)
            reason = f"min cost {min(costs):.2f} blocks (overlap {chosen.overlap_blocks})"
        else:
            chosen = candidates[softmax_pick(costs, self.temperature, rng.random())]
            reason = f"softmax T={self.temperature} drew cost {costs[candidates.index(chosen)]:.2f}"
        scores = {w.target: c for w, c in zip(candidates, costs, strict=True)}
        return Decision(chosen.target, scores, reason, self.name, "cost (blocks)", chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass
