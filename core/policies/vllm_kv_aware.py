"""A model of vllm-router 0.1.17's ``kv_aware`` policy (``--policy kv_aware``) as the release behaves.

Follows ``vllm-project/router``, ``src/policies/kv_aware.rs`` as shipped in PyPI ``vllm-router``
0.1.17. The repository revisions in the public index predate the release (their ``kv_aware`` takes
the longest prefix and falls back to the least loaded); the 0.1.17 wheel replaced that rule with a
cost, so this model follows the wheel: ``vllm_router/router_args.py`` gives the defaults
(``--router-temperature`` 0.0, ``--kv-penalty-host`` 0.8, ``--kv-penalty-external`` 0.6,
``--kv-penalty-disk`` 0.3, ``--kv-event-block-size`` 16, session affinity off), and the
``vllm_router_rs.abi3.so`` it carries was read at the symbols ``kv_aware::request_prefill_tokens``,
``MultiplicativeScorer::score``, ``TemperaturePicker::pick`` and ``InMemorySlotManager``
(``begin_prefill`` / ``begin_decode`` / ``free`` / ``sample``). Written from that reading, not
translated. ``docs/peer-routers.md`` records the live 0.1.17 router in front of kvr's workers: its
index matched kvr's overlap on most requests, yet it reached a 0.50 hit rate where kvr reached
0.85, because its cost spreads load.

What the release does, and so what this model does, per candidate ``i``:

1. **Prefill tokens.** ``isl`` is the prompt length. The device-tier match (contiguous blocks from
   the first, from the router's own index fed by vLLM KV events) is capped at ``(isl − 1) //
   block_size`` blocks: vLLM always recomputes the last token, so a full hit still prefills one.
   ``prefill_i = isl − min(block_size × matched, isl − 1)``. Blocks found only on a lower tier
   (host, external, disk) extend the match at a credit of 0.8 / 0.6 / 0.3 a block.
2. **Load.** The router's own slot counters per worker: ``active_prefill_i``, the prefill tokens
   of its requests that have not produced a first token yet (added at dispatch, removed at the
   first token), and ``requests_i``, its requests in flight (removed at the end).
3. **Cost** ``= (prefill_i + active_prefill_i) × (requests_i + 1)``: prefill work multiplied by
   the batch it joins, not added to it (``MultiplicativeScorer``). A worker holding the whole
   prompt but running one request costs about twice an idle worker's queued prefill, so a second
   request of a prefix goes wherever the first is not — the spreading seen live.
4. **Pick.** Temperature 0 (the default) takes the lowest cost, the **first** in worker order on
   ties (a strict ``<`` scan: no randomness). ``T > 0`` draws ``i`` with ``p ∝ exp(−(c_i −
   min c) / T)``: costs are shifted, not normalised, so ``T`` is in the cost's own unit (token ×
   request), unlike Dynamo's min-max-normalised softmax.

Where the simulator differs, and the closest thing modelled:

* **Tiers.** kvr's workers hold KV on the device only, so the host / external / disk credits are
  accepted and checked (0 to 1, as the release validates them) but never apply.
* **Load.** ``active_prefill_i`` is ``WorkerLoad.queued_prefill_tokens`` (this router's prompt −
  predicted cached tokens until the first token, or the engine's report if larger) and
  ``requests_i`` is ``WorkerLoad.in_flight``: the same counters, kept by kvr's router core.
* **No predict-on-route.** 0.1.17 writes nothing to its index at routing time (the older
  revisions' speculative insert is gone from the wheel), so a request's blocks count only once
  the worker's KV events arrive. ``tentative_window_s = 0.0`` asks the simulator to turn kvr's
  predict-on-route off under this policy (an explicit ``--tentative-s`` still wins).
* **Worker order** is the ``--worker-urls`` order in the release; here, the candidates' order
  (sorted by target), which plays the same part in ties.
* **Tokens.** The release tokenizes text (or takes token ids) and hashes blocks like vLLM; the
  simulator's block hashes and overlap stand for that, one to one.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from core.policies.base import Decision, LazyScores, RouteRequest, WorkerState, shifted_softmax_index
from core.prefix_index import WorkerKey

#: vllm-router 0.1.17's tier credits (``--kv-penalty-host/-external/-disk``).
KV_PENALTY_HOST = 0.8
KV_PENALTY_EXTERNAL = 0.6
KV_PENALTY_DISK = 0.3


def prefill_tokens(prompt_tokens: int, matched_blocks: int, block_size: int) -> int:
    """Tokens the worker must prefill for a prompt whose first ``matched_blocks`` blocks it holds:
    the match never covers the last token (vLLM recomputes it)."""
    if prompt_tokens <= 0:
        return 0
    usable = min(max(matched_blocks, 0), (prompt_tokens - 1) // block_size)
    return prompt_tokens - min(block_size * usable, prompt_tokens - 1)


class VllmKvAwarePolicy:
    name = "vllm_kv_aware"
    #: The release has no predict-on-route: the simulator runs this policy without kvr's.
    tentative_window_s = 0.0

    def __init__(
        self,
        *,
        block_size: int = 16,
        router_temperature: float = 0.0,
        kv_penalty_host: float = KV_PENALTY_HOST,
        kv_penalty_external: float = KV_PENALTY_EXTERNAL,
        kv_penalty_disk: float = KV_PENALTY_DISK,
    ) -> None:
        if block_size <= 0:
            raise ValueError("vllm_kv_aware needs block_size > 0")
        if not (math.isfinite(router_temperature) and router_temperature >= 0):
            raise ValueError("router_temperature must be finite and >= 0")
        for credit in (kv_penalty_host, kv_penalty_external, kv_penalty_disk):
            if not (math.isfinite(credit) and 0.0 <= credit <= 1.0):
                raise ValueError("kv_penalty_* credits must be finite and between 0.0 and 1.0")
        self.block_size = block_size
        self.router_temperature = router_temperature
        # Lower-tier credits: kept for fidelity of the configuration; the simulator's workers
        # have no lower tier, so no block ever earns them.
        self.kv_penalty_host = kv_penalty_host
        self.kv_penalty_external = kv_penalty_external
        self.kv_penalty_disk = kv_penalty_disk

    def cost(self, request: RouteRequest, w: WorkerState) -> float:
        """``(prefill + active prefill) × (requests in flight + 1)``, in token × requests."""
        work = prefill_tokens(request.prompt_tokens, w.overlap_blocks, self.block_size)
        work += max(w.load.queued_prefill_tokens, 0)
        return float(work * (max(w.load.in_flight, 0) + 1))

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        costs = [self.cost(request, w) for w in candidates]
        if self.router_temperature == 0:
            best = min(range(len(costs)), key=costs.__getitem__)  # the first of equal costs
            how = "min cost"
        else:
            best = shifted_softmax_index(costs, self.router_temperature, rng.random())
            how = f"softmax T={self.router_temperature:g} drew"
        chosen = candidates[best]
        work = prefill_tokens(request.prompt_tokens, chosen.overlap_blocks, self.block_size)
        reason = (f"{how} {costs[best]:.0f} = (prefill {work} + active {chosen.load.queued_prefill_tokens})"
                  f" x ({chosen.load.in_flight} + 1)")
        scores = LazyScores(lambda: {w.target: c for w, c in zip(candidates, costs, strict=True)})
        return Decision(chosen.target, scores, reason, self.name, "cost (tokens x requests)",
                        chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass
