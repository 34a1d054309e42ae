"""NVIDIA Dynamo's KV-router cost (the default "linear" selector) with its current defaults.

Follows ``ai-dynamo/dynamo``, ``lib/kv-router/src/scheduling/selector/default.rs``
(``DefaultWorkerScorer::worker_logit``, ``softmax_sample_index``, ``minimum_cost_index``), with the
defaults of ``lib/kv-router/src/scheduling/config.rs`` (``KvRouterConfig::default``) and the
formula as Dynamo's router docs state it ("cost function"; ``docs/anchors.md`` §1a)::

    raw_prefill  = active_prefill_tokens / block_size + request_blocks
    credit       = overlap_score_credit × decay × overlap_blocks
    decay        = 1 / (1 + credit_decay × (active_prefill − min active_prefill) / block_size / request_blocks)
    cost         = prefill_load_scale × max(raw_prefill − credit, 0) + decode_blocks
                   + decode_active_request_weight × active_requests
    decode_blocks = active_blocks + new_blocks

Defaults, checked against ``config.rs``: ``overlap_score_credit`` 1.0 (validated to [0, 1]; the
old ``overlap_score_weight`` is a deprecated alias that sets ``prefill_load_scale``),
``overlap_score_credit_decay`` 0.0 (off), ``prefill_load_scale`` 1.0,
``decode_active_request_weight`` 0.0 (off), ``router_temperature`` 0.0,
``router_track_active_blocks`` and ``router_track_prefill_tokens`` true,
``router_track_output_blocks`` false (so ``decode_blocks`` does not grow with output). The zero
floor on the adjusted prefill is in the selector. Temperature 0 picks the minimum cost, ties
uniformly at random (a reservoir draw over the tied rows); T > 0 min-max normalises the costs to
[0, 1] and samples with p ∝ exp(−c / T), all equal: uniform.

``request_blocks`` is the prompt length in blocks (fractional, ISL / block_size); ``active_blocks``
the distinct blocks of the requests in flight on the target (shared prefixes once, as Dynamo's
slot tracker counts them with ``router_assume_kv_reuse``), and ``active_prefill_tokens`` the
uncached prompt tokens of requests not past their first token: ``WorkerLoad.active_blocks`` and
``WorkerLoad.queued_prefill_tokens``, kept by kvr's router core the same way. ``active_requests``
is ``WorkerLoad.in_flight``.

Differences from the real router, kept on purpose or for want of the information:

* ``new_blocks`` (Dynamo's potential blocks: the request's blocks not already among the target's
  active sequences) is taken as the blocks beyond the target's cache overlap; the policy does not
  see the active set's hashes. The two agree when the cached prefix is also in flight.
* The overlap is kvr's exact index, used as is (Dynamo does not discount by confidence), and it
  includes kvr's predict-on-route entries; Dynamo's own side index for predictions
  (``router_predicted_ttl_secs``) is off by default, so this ``dynamo`` is the better-informed
  variant. The simulator's ``--tentative-s 0`` gives the default behaviour.
* Host / disk / shared-cache credits (0.75 / 0.25 / 0) never apply: simulated workers hold KV on
  the device only.
* The router-side admission queue (``router_queue_threshold`` 16.0 × a worker's batched-token
  budget) is not modelled; it holds requests only when every worker is that far behind.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from core.policies.base import Decision, RouteRequest, WorkerState, pick_min, shifted_softmax_index
from core.prefix_index import WorkerKey


def softmax_pick(costs: Sequence[float], temperature: float, u: float) -> int:
    """Index drawn with p ∝ exp(−normalised cost / T), using the uniform draw ``u`` in [0, 1)."""
    lo, hi = min(costs), max(costs)
    if lo == hi:
        return min(int(u * len(costs)), len(costs) - 1)
    return shifted_softmax_index([(c - lo) / (hi - lo) for c in costs], temperature, u)


class DynamoPolicy:
    name = "dynamo"

    def __init__(
        self,
        *,
        block_size: int = 16,
        overlap_score_credit: float = 1.0,
        credit_decay: float = 0.0,
        prefill_load_scale: float = 1.0,
        decode_active_request_weight: float = 0.0,
        temperature: float = 0.0,
    ) -> None:
        if temperature < 0:
            raise ValueError("temperature must be >= 0")
        self.block_size = block_size
        self.overlap_score_credit = overlap_score_credit
        self.credit_decay = credit_decay
        self.prefill_load_scale = prefill_load_scale
        self.decode_active_request_weight = decode_active_request_weight
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
        cost = self.prefill_load_scale * max(raw_prefill - credit, 0.0) + w.load.active_blocks + new_blocks
        if self.decode_active_request_weight:
            cost += self.decode_active_request_weight * w.load.in_flight
        return cost

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
