"""A model of llm-d's endpoint picker in its precise-prefix-cache configuration.

Follows the weighted sum of scorers and the picker the llm-d "precise prefix cache aware" guide
deploys (``llm-d/llm-d``, ``guides/precise-prefix-cache-aware/scheduler/
precise-prefix-cache-aware.values.yaml``, the same profile as ``llm-d/llm-d-inference-scheduler``,
``deploy/config/epp-precise-prefix-cache-config.yaml``): ``precise-prefix-cache-scorer`` weight
2.0, ``kv-cache-utilization-scorer`` 1.0, ``queue-scorer`` 1.0, then ``max-score-picker``. Each
scorer, read in its source and written here from that reading (not translated):

* **precise-prefix-cache-scorer** (``llm-d-inference-scheduler``,
  ``pkg/plugins/scorer/precise_prefix_cache.go`` and ``utils.go``; the match is
  ``llm-d-kv-cache``'s ``LongestPrefixScorer``): a pod's raw score is the number of the prompt's
  blocks it holds contiguously from the first, from an index fed by vLLM KV events (GPU tier
  weight 1.0). Only pods holding the *first* block enter the score map. The map is min-max
  normalised over its own members: ``(s − min) / (max − min)``, or 1.0 for every member when min
  = max; a pod outside the map scores 0. So with matches 0, 3 and 5 blocks, the 3-block pod scores
  0 like the pod with none, and a lone holder of one block scores 1.0 like a full hit.
* **kv-cache-utilization-scorer** (``gateway-api-inference-extension``,
  ``pkg/epp/framework/plugins/scheduling/scorer/kvcacheutilization/kvcache_utilization.go``):
  ``1 − KV-cache usage`` (vLLM's ``kv_cache_usage_perc``, a fraction).
* **queue-scorer** (same repository, ``.../scorer/queuedepth/queue.go``): the waiting-queue size
  min-max normalised over the candidates, ``(max − q) / (max − min)``, 1.0 for all when equal.
* **load-aware-scorer** (``llm-d-inference-scheduler``, ``pkg/plugins/scorer/load_aware.go``), in
  older llm-d sample profiles at weight 1.0 beside the prefix scorer at 2.0: ``0.5`` with an
  empty waiting queue, else ``0.5 × (1 − min(q, threshold) / threshold)``, threshold 128. Off in
  the guide's profile (``load_aware_weight=0``); ``load_aware_weight=1, kv_utilization_weight=0,
  queue_weight=0`` gives the older one.
* **max-score-picker** (``gateway-api-inference-extension``,
  ``pkg/epp/scheduling/framework/plugins/picker/max_score_picker.go``): shuffle, stable-sort by
  the weighted total (each scorer's value clamped to [0, 1] and multiplied by its weight), take
  the first: the highest total, ties broken uniformly at random.

Where the simulator differs, and the closest thing modelled:

* **Match.** The raw prefix score is ``WorkerState.overlap_blocks``, kvr's exact index fed by the
  simulated workers' KV events with the same event delay: the precise scorer's own index, in
  kvr's block size (the guide sets 64 tokens to match vLLM; normalisation makes the two alike).
  "Holds the first block" is ``overlap_blocks > 0``.
* **Metrics.** Queue size and KV usage are ``WorkerLoad.waiting`` and ``WorkerLoad.kv_usage``,
  the engine's last report. The endpoint picker scrapes every pod's metrics every 50 ms
  (``gateway-api-inference-extension``, ``--refresh-metrics-interval``, default 50 ms);
  ``load_scrape_interval_s = 0.05`` asks the simulator to hand this policy the engines' load at
  that interval when its heartbeat is slower (at kvr's 1 s heartbeat the picker piles requests on
  a prefix holder whose queue it cannot see yet).
* **No predict-on-route.** The scorer's speculative indexing is off unless configured
  (``speculativeIndexing: false``), and the guide does not turn it on, so a request's blocks count
  only once its worker's events arrive. ``tentative_window_s = 0.0`` asks the simulator to run
  this policy without kvr's predict-on-route (an explicit ``--tentative-s`` still wins).
* **Filters.** The guide's ``decode-filter`` passes every worker of a pool without P/D roles,
  which is every simulated worker; the tokenizer plugin only supplies tokens.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from core.policies.base import Decision, LazyScores, RouteRequest, WorkerState, pick_min
from core.prefix_index import WorkerKey

#: The load-aware scorer's default queue threshold (``QueueThresholdDefault``).
LOAD_AWARE_THRESHOLD = 128


def prefix_scores(overlaps: Sequence[int]) -> list[float]:
    """The precise prefix scorer's normalised scores: min-max over the workers holding the first
    block only; 0 for the others."""
    held = [o for o in overlaps if o > 0]
    if not held:
        return [0.0] * len(overlaps)
    lo, hi = min(held), max(held)
    if lo == hi:
        return [1.0 if o > 0 else 0.0 for o in overlaps]
    return [(o - lo) / (hi - lo) if o > 0 else 0.0 for o in overlaps]


def queue_scores(waiting: Sequence[int]) -> list[float]:
    """The queue scorer: shorter waiting queue, higher score; 1.0 for all when equal."""
    lo, hi = min(waiting), max(waiting)
    if lo == hi:
        return [1.0] * len(waiting)
    return [(hi - q) / (hi - lo) for q in waiting]


def load_aware_score(waiting: int, threshold: int = LOAD_AWARE_THRESHOLD) -> float:
    """The load-aware scorer: 0.5 with an empty queue, falling to 0 at ``threshold`` waiting."""
    if waiting <= 0:
        return 0.5
    return 0.5 * (1.0 - min(waiting, threshold) / threshold)


def _clamp(x: float) -> float:
    return 0.0 if x < 0.0 else 1.0 if x > 1.0 else x


class LlmdPolicy:
    name = "llmd"
    #: Speculative indexing is off in llm-d's default: the simulator runs this without kvr's.
    tentative_window_s = 0.0
    #: The endpoint picker's metrics refresh (GIE ``--refresh-metrics-interval``).
    load_scrape_interval_s = 0.05

    def __init__(
        self,
        *,
        prefix_weight: float = 2.0,
        kv_utilization_weight: float = 1.0,
        queue_weight: float = 1.0,
        load_aware_weight: float = 0.0,
        load_aware_threshold: int = LOAD_AWARE_THRESHOLD,
    ) -> None:
        if min(prefix_weight, kv_utilization_weight, queue_weight, load_aware_weight) < 0:
            raise ValueError("llmd scorer weights must be >= 0")
        if load_aware_threshold <= 0:
            raise ValueError("llmd load_aware_threshold must be > 0")
        self.prefix_weight = prefix_weight
        self.kv_utilization_weight = kv_utilization_weight
        self.queue_weight = queue_weight
        self.load_aware_weight = load_aware_weight
        self.load_aware_threshold = load_aware_threshold

    def totals(self, candidates: Sequence[WorkerState]) -> list[float]:
        """Each candidate's weighted score (higher wins), in candidate order."""
        prefix = prefix_scores([w.overlap_blocks for w in candidates])
        waiting = [w.load.waiting for w in candidates]
        queue = queue_scores(waiting)
        out = []
        for i, w in enumerate(candidates):
            total = self.prefix_weight * _clamp(prefix[i])
            total += self.kv_utilization_weight * _clamp(1.0 - w.load.kv_usage)
            total += self.queue_weight * _clamp(queue[i])
            if self.load_aware_weight:
                total += self.load_aware_weight * _clamp(load_aware_score(waiting[i], self.load_aware_threshold))
            out.append(total)
        return out

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        totals = self.totals(candidates)
        # Highest total; ties uniformly at random, as the picker's shuffle-then-stable-sort.
        chosen = pick_min([(-t, w) for t, w in zip(totals, candidates, strict=True)], rng)
        best = max(totals)
        reason = (f"max score {best:.3f} (prefix {chosen.overlap_blocks} blocks, waiting {chosen.load.waiting},"
                  f" kv {chosen.load.kv_usage:.2f})")
        scores = LazyScores(lambda: {w.target: t for w, t in zip(candidates, totals, strict=True)})
        return Decision(chosen.target, scores, reason, self.name, "weighted score (higher wins)",
                        chosen.overlap_blocks)

    def forget(self, target: WorkerKey) -> None:
        pass
