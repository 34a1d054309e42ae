"""kvr's default policy: the lowest predicted time to first token, under a load bound.

Per candidate::

    cached_tokens = overlap_blocks × confidence weight × block_size   (≤ the prompt's last full block
                                                                     before its last token, as vLLM)
    ttft_s        = prefill_s(new_tokens = queued + prompt − cached, cached_tokens = cached)
    queue_s       = ttft_s − prefill_s(new_tokens = prompt − cached, cached_tokens = cached)

``queued`` is the prefill work already waiting on that worker: with continuous batching it is
computed in the same steps as ours (FCFS), so the step overhead is paid once, not twice. A worker
with requests in flight also makes ours wait for the step in progress and share its prefill step
with their decodes (``batch_wait_s``, counted in ``queue_s``): at light load that sends a short
shared prefix to an idle worker rather than behind its busy holder.

The policy minimises ``score = ttft_s + miss_weight × prefill_s(uncached part alone)``. Greedy
TTFT alone (``miss_weight`` 0) ignores that an uncached prefill is work every later request on
that worker queues behind, and that it evicts other prefixes: once queues build, the cached
worker's longer queue wins against the cache and groups scatter, hit rate falls, capacity falls,
queues grow (a death spiral). Charging the uncached prefill ``miss_weight`` times more keeps
prefixes where they are cached unless the queue difference is large. Measured on the simulator
(8 workers, ``simple`` profile, SGLang gsp 64 groups × 2048-token prompts, Poisson), TTFT p50 /
p99 in s: at 8 req/s 0.345 / 2.16 with weight 0, 0.072 / 0.67 with 3, 0.071 / 0.60 with 10; at
12 req/s 20.8 / 52.2 with 0, 12.6 / 38.8 with 3, 2.28 / 8.7 with 10 (SGLang's rule: 1.12 /
35.8). On ReAct (shared 1200-token instruction, 10 req/s) weight 3 did best (p99 1.34 s vs
2.73 s with 10; SGLang 15.2 s). 10 is the default for overload robustness.

KV pressure: when the blocks this request needs on a target (its uncached prompt blocks plus
its output blocks) exceed what that target's requests in flight leave free of its capacity
(``active_blocks`` + ``decode_blocks`` of this router's accounting; output estimated as
``max_tokens`` capped at 512 tokens, ``decode_blocks_estimate``), vLLM must hold it waiting or
preempt a running request and recompute it. The overflow is charged ``kv_weight`` × the prefill
time of that many blocks. Without it the policy piles a prefix's whole family on the worker that
caches it until that worker preempts (simulator, fan-out workload: 5 chains + a 113-block judge
per question on 200-block workers, 3 questions/s; TTFT p99 / hit rate / preemptions): weight 0
1.28 s / 0.646 / 96, weight 3 0.36 s / 0.664 / 33, weight 10 0.45 s / 0.642 / 36 (dynamo 0.92 s
/ 0.542 / 114). It never fires on gsp, multi-turn or the Mooncake traces at ~80 % load, and
weight 3 leaves them unchanged.

Times come from the engine's own latency model (``core/latency.py``; ``LinearPrefillModel`` when none is
given). Overlap from a ``resyncing`` target counts half, from a ``stale`` one not at all: a
wrong "hit" costs a full prefill on a worker picked for nothing.

Bounded-load guard (against hot-prefix monopoly): a target may take the request only if, with it,
its in-flight count stays within ``max(load_factor × mean, mean + min_slack)`` where mean is the
fleet's in-flight average including this request (consistent hashing with bounded loads, as
KubeAI). A hot prefix therefore spills to the next-best worker, which then caches it too:
replication emerges when a prefix is hot, without a separate rule. The slack keeps a burst of
siblings together at low load (they share one prefill). If the bound excludes everyone (it
cannot, since someone is at or below the mean) all candidates stay.

Ties (equal predicted TTFT) go to fewer in flight, then uniformly at random.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import numpy as np

from core.policies.base import (
    CONFIDENCE_CODES,
    Decision,
    FleetColumns,
    LatencyModel,
    LazyScores,
    LinearPrefillModel,
    RouteRequest,
    WorkerState,
    decode_blocks_estimate,
)  # fmt: skip
from core.prefix_index import Confidence, WorkerKey

#: Extra weight of a request's own uncached prefill in the score (see the module docstring).
DEFAULT_MISS_WEIGHT = 10.0
#: Weight of the KV-pressure charge (see the module docstring).
DEFAULT_KV_WEIGHT = 3.0
DEFAULT_CONFIDENCE_WEIGHTS = {Confidence.FRESH: 1.0, Confidence.RESYNCING: 0.5, Confidence.STALE: 0.0}


def _within_bound(raw: Sequence[float], flights: Sequence[int], bound: float) -> tuple[list[int], list[int]]:
    """When the best candidate is over the load bound: (the candidates over it, the best of the
    others, tied), compared in the Decision's unit (ms, as the scores a reader sees), then by fewer
    in flight. If every candidate is over the bound (it cannot be: someone is at or below the mean),
    all stay."""
    n = len(flights)
    over = [i for i in range(n) if flights[i] + 1 > bound]
    excluded = set(over)
    allowed = [i for i in range(n) if i not in excluded] or list(range(n))
    keyed = [(raw[i] * 1e3, flights[i], i) for i in allowed]
    best = min(k[:2] for k in keyed)
    return over, [i for s_, f_, i in keyed if (s_, f_) == best]


class KvrPolicy:
    name = "kvr"

    def __init__(
        self,
        *,
        block_size: int = 16,
        latency: LatencyModel | None = None,
        load_factor: float = 2.0,
        min_slack: float = 4.0,
        miss_weight: float = DEFAULT_MISS_WEIGHT,
        kv_weight: float = DEFAULT_KV_WEIGHT,
        confidence_weights: dict[Confidence, float] | None = None,
    ) -> None:
        if load_factor < 1.0 or min_slack < 0:
            raise ValueError("load_factor must be >= 1 and min_slack >= 0")
        self.block_size = block_size
        self.latency = latency if latency is not None else LinearPrefillModel()
        self.load_factor = load_factor
        self.min_slack = min_slack
        self.miss_weight = miss_weight
        self.kv_weight = kv_weight
        self.confidence_weights = dict(DEFAULT_CONFIDENCE_WEIGHTS)
        if confidence_weights:
            self.confidence_weights.update({Confidence(k): v for k, v in confidence_weights.items()})
        self._weights_cache: tuple[tuple[float, ...], np.ndarray, bool, bool] | None = None
        self._batch_waits: tuple[LatencyModel | None, dict[int, float]] = (None, {})

    def cached_tokens(self, request: RouteRequest, w: WorkerState) -> int:
        """Tokens the engine would reuse, as far as the router can tell."""
        usable_blocks = int(w.overlap_blocks * self.confidence_weights[w.confidence])
        max_blocks = max(request.prompt_tokens - 1, 0) // self.block_size  # the last token is always computed
        return min(usable_blocks, max_blocks) * self.block_size

    def predict(self, request: RouteRequest, w: WorkerState) -> tuple[float, float, int, float]:
        """(predicted TTFT s, of which queue wait s, cached tokens, score s) on one candidate."""
        cached = self.cached_tokens(request, w)
        new = request.prompt_tokens - cached
        alone_s = self.latency.prefill_s(new_tokens=new, cached_tokens=cached)
        queued = w.load.queued_prefill_tokens
        if queued <= 0:
            ttft_s, queue_s = alone_s, 0.0
        else:
            ttft_s = self.latency.prefill_s(new_tokens=queued + new, cached_tokens=cached)
            queue_s = ttft_s - alone_s
        score = ttft_s + self.miss_weight * alone_s
        busy_s = self.batch_wait_s(w.load.in_flight)
        if busy_s:
            ttft_s += busy_s
            queue_s += busy_s
            score += busy_s
        if self.kv_weight and w.capacity_blocks > 0:
            # KV pressure: blocks this request needs beyond what the requests in flight there
            # leave free. vLLM then holds it waiting or preempts a running request, whose prefill
            # is recomputed: priced as prefilling the overflow again.
            bs = self.block_size
            need = -(-request.prompt_tokens // bs) - cached // bs + decode_blocks_estimate(request.max_tokens, bs)
            load = w.load
            overflow = load.active_blocks + load.decode_blocks + need - w.capacity_blocks
            if overflow > 0:
                score += self.kv_weight * self.latency.prefill_s(new_tokens=overflow * bs)
        return ttft_s, queue_s, cached, score

    def batch_wait_s(self, in_flight: int) -> float:
        """What ``in_flight`` sequences already in a target's batch add to this request's TTFT.

        The request waits for the step in progress (half a decode step on average), and the step
        that prefills it also advances those sequences by one token each (continuous batching mixes
        them in one forward pass). Both come from the engine's latency model; a model with no step
        (``LinearPrefillModel``) charges nothing. Without this an idle worker and one busy decoding
        looked alike, and at light load every request of a shared prefix went to its one holder
        while the others idled: in a ``kvr up -n 4`` session 36 of 40 overlapping ``kvr send``
        requests went to one worker, their hits slower (62 ms) than a miss on an idle worker (29 ms).
        """
        if in_flight <= 0:
            return 0.0
        waits = self._batch_wait_table()
        wait = waits.get(in_flight)
        if wait is None:  # latency models are pure: one computation per count (~1.7 µs each)
            latency = self.latency
            step = getattr(latency, "step_s", None)
            decode = getattr(latency, "decode_token_s", None)
            if step is None or decode is None:
                wait = 0.0
            else:
                with_batch = step(prefill_tokens=1, decode_seqs=in_flight, kv_tokens=0)
                alone = step(prefill_tokens=1, decode_seqs=0, kv_tokens=0)
                wait = float(0.5 * decode(batch_size=in_flight, kv_tokens=0) + (with_batch - alone))
            waits[in_flight] = wait
        return wait

    def _batch_wait_table(self) -> dict[int, float]:
        """``batch_wait_s`` by in-flight count for the current latency model (``latency`` is
        replaced once a worker names its profile: the table starts again then)."""
        model, waits = self._batch_waits
        if model is not self.latency:
            waits = {}
            self._batch_waits = (self.latency, waits)
        return waits

    def load_bound(self, candidates: Sequence[WorkerState]) -> float:
        mean = (sum(w.load.in_flight for w in candidates) + 1) / len(candidates)
        return max(self.load_factor * mean, mean + self.min_slack)

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        # One pass over the fleet, tuple indexing only: this loop is the cost of a 512-worker
        # decision. It computes exactly ``predict(...)[3]`` per candidate (same operations, same
        # order, so the same floats; ``tests/core/test_policy_equivalence.py`` pins it against
        # the plain per-candidate version), sharing work between candidates:
        # * the part of the score that depends only on (cached tokens, queued prefill) is memoised:
        #   a large, mostly idle fleet costs a handful of latency-model calls;
        # * cached tokens depend on (overlap, confidence); overlap 0 (most of a fleet) is 0 cached
        #   whatever the confidence, without a lookup;
        # * the KV-pressure charge is per candidate (its capacity and KV in use), priced only when
        #   it overflows.
        # The load bound needs the fleet's total, so the best candidate is found first and checked
        # against the bound afterwards. Scores reach the Decision as a LazyScores (built if read).
        bs = self.block_size
        prompt = request.prompt_tokens
        max_blocks = max(prompt - 1, 0) // bs  # the last token is always computed
        weights = self.confidence_weights
        prefill = self.latency.prefill_s
        miss_weight = self.miss_weight
        kv_weight = self.kv_weight
        # Blocks the request needs on a target, less its cached ones: need0 - cached // bs.
        need0 = -(-prompt // bs) + decode_blocks_estimate(request.max_tokens, bs)
        fresh = Confidence.FRESH
        weight_fresh = weights[fresh]
        cached_fresh: dict[int, int] = {}  # overlap -> cached tokens, for fresh targets
        cached_of: dict[tuple[int, Confidence], int] = {}  # the other confidences
        idle_memo: dict[int, float] = {}  # cached tokens -> score, for targets with no queued prefill
        memo: dict[tuple[int, int], float] = {}  # (cached tokens, queued prefill) -> score
        kv_charge: dict[int, float] = {}
        batch_waits = self._batch_wait_table()  # in flight -> batch_wait_s, shared across decisions
        batch_wait = self.batch_wait_s
        raw: list[float] = []
        append = raw.append
        total = 0
        best_s: float | None = None
        best_if = 0  # in flight on the best so far (read only once best_s is set)
        tied: list[int] = []
        for i, w in enumerate(candidates):
            load = w[2]
            in_flight = load[0]
            total += in_flight
            overlap = w[1]
            if overlap:
                if w[3] is fresh:  # the common confidence: keyed by the overlap alone (an int hash)
                    cached = cached_fresh.get(overlap)
                    if cached is None:
                        cached = cached_fresh[overlap] = min(int(overlap * weight_fresh), max_blocks) * bs
                else:
                    ck = (overlap, w[3])
                    cached = cached_of.get(ck)
                    if cached is None:
                        cached = cached_of[ck] = min(int(overlap * weights[w[3]]), max_blocks) * bs
            else:
                cached = 0
            queued = load[3]
            if queued <= 0:  # predict treats every queued <= 0 alike: keyed by cached tokens alone
                score = idle_memo.get(cached)
                if score is None:
                    alone_s = prefill(new_tokens=prompt - cached, cached_tokens=cached)
                    score = idle_memo[cached] = alone_s + miss_weight * alone_s
            else:
                key = (cached, queued)
                score = memo.get(key)
                if score is None:
                    new = prompt - cached
                    alone_s = prefill(new_tokens=new, cached_tokens=cached)
                    score = memo[key] = prefill(new_tokens=queued + new, cached_tokens=cached) + miss_weight * alone_s
            if in_flight > 0:
                busy_s = batch_waits.get(in_flight)
                if busy_s is None:
                    busy_s = batch_wait(in_flight)  # (fills batch_waits)
                if busy_s:
                    score += busy_s
            capacity = w[4]
            if kv_weight and capacity > 0:
                overflow = load[4] + load[6] + need0 - cached // bs - capacity
                if overflow > 0:
                    charge = kv_charge.get(overflow)
                    if charge is None:
                        charge = kv_charge[overflow] = kv_weight * prefill(new_tokens=overflow * bs)
                    score += charge
            append(score)
            if best_s is None or score < best_s or (score == best_s and in_flight < best_if):
                best_s, best_if, tied = score, in_flight, [i]
            elif score == best_s and in_flight == best_if:
                tied.append(i)
        mean = (total + 1) / len(candidates)
        bound = max(self.load_factor * mean, mean + self.min_slack)
        over: list[int] = []
        if best_if + 1 > bound:  # the best is over the bound: the best of the others instead
            over, tied = _within_bound(raw, [w[2][0] for w in candidates], bound)
        pick = tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]
        sooner = None
        if candidates[pick][2][0] > 0 and candidates[pick][2][3] <= 0 and total < len(candidates):  # _sooner_idle
            idle = [i for i, w in enumerate(candidates) if w[2][0] <= 0 and w[2][3] <= 0]
            if idle:
                pick, sooner = self._sooner_idle(request, candidates.__getitem__, pick, idle, raw, rng)
        scores = LazyScores(lambda: {w[0]: s * 1e3 for w, s in zip(candidates, raw, strict=True)})
        return self._decision(request, candidates[pick], [candidates[i].target for i in over], bound, scores,
                              sooner_than=sooner)

    def choose_columns(self, request: RouteRequest, cols: FleetColumns, *, now: float,
                       rng: random.Random) -> Decision:
        """``choose`` on the candidates as columns (``RouterCore`` passes them): the same decision.

        Same target, reason, scores (as floats) and random draws as ``choose`` on
        ``[cols.state(i) ...]`` (``tests/core/test_fast_paths.py`` pins it), with numpy doing the
        per-candidate arithmetic: the same IEEE operations on the same values in the same order per
        candidate, and the latency model called once per distinct (cached, queued) and per
        distinct KV overflow, as ``choose``'s memos do. Worth it from tens of candidates on.
        """
        bs = self.block_size
        prompt = request.prompt_tokens
        max_blocks = max(prompt - 1, 0) // bs  # the last token is always computed
        prefill = self.latency.prefill_s
        miss_weight = self.miss_weight
        kv_weight = self.kv_weight
        n = len(cols.states)
        overlap = cols.overlap
        if overlap.any():
            weights, negative, finite = self._weight_column()
            if negative:  # a negative weight (nonsense, but allowed): the plain loop
                return self.choose(request, [cols.state(i) for i in range(n)], now=now, rng=rng)
            if weights[0] == 1.0 and not cols.confidence.any():
                usable = overlap  # all fresh at weight 1: int(overlap × 1.0) is the overlap
            else:
                usable = (overlap * weights[cols.confidence]).astype(np.int64)  # int(): truncation, as choose
            if finite:
                # Weights >= 0 and finite: overlap 0 gives usable 0, so the mask of ``choose``'s
                # ``if overlap`` changes nothing (and min(.) * bs // bs is min(.) exactly).
                cached_blocks = np.minimum(usable, max_blocks)
                cached = cached_blocks * bs
            else:
                cached = np.where(overlap > 0, np.minimum(usable, max_blocks) * bs, 0)
                cached_blocks = cached // bs
        else:
            cached = np.zeros(n, dtype=np.int64)
            cached_blocks = cached
        # Candidates with no queued prefill (most of a fleet): their score depends on the cached
        # blocks alone, one latency-model call per distinct value, looked up by index.
        table = np.zeros(max_blocks + 1, dtype=np.float64)
        for c_blocks in np.flatnonzero(np.bincount(cached_blocks, minlength=1)).tolist():
            c = c_blocks * bs
            alone_s = prefill(new_tokens=prompt - c, cached_tokens=c)
            table[c_blocks] = alone_s + miss_weight * alone_s
        score = table[cached_blocks]
        # The rest (queued > 0: this router's requests before their first token, engines' reports).
        busy = np.flatnonzero(cols.queued_prefill_tokens > 0)
        if len(busy):
            memo: dict[tuple[int, int], float] = {}
            values = []
            for c, q in zip(cached[busy].tolist(), cols.queued_prefill_tokens[busy].tolist(), strict=True):
                value = memo.get((c, q))
                if value is None:
                    new = prompt - c
                    alone_s = prefill(new_tokens=new, cached_tokens=c)
                    value = memo[(c, q)] = prefill(new_tokens=q + new, cached_tokens=c) + miss_weight * alone_s
                values.append(value)
            score[busy] = values
        in_flight = cols.in_flight
        if in_flight.any():  # the batch a request joins (``batch_wait_s``), per distinct count
            counts, which_count = np.unique(in_flight, return_inverse=True)
            waits = np.array([self.batch_wait_s(c) for c in counts.tolist()], dtype=np.float64)
            if waits.any():
                wait_col = waits[which_count.reshape(-1)]
                charged = wait_col != 0.0  # (adding 0.0 is exact too; this keeps choose's order explicit)
                score[charged] += wait_col[charged]
        capacity = cols.capacity_blocks
        if kv_weight and capacity.max() > 0:  # (no target with a known capacity: no charge)
            need0 = -(-prompt // bs) + decode_blocks_estimate(request.max_tokens, bs)
            overflow = cols.active_blocks + cols.decode_blocks + need0 - cached_blocks - capacity
            hit = (capacity > 0) & (overflow > 0)
            if hit.any():
                overflows, which = np.unique(overflow[hit], return_inverse=True)
                charges = np.array([kv_weight * prefill(new_tokens=v * bs) for v in overflows.tolist()],
                                   dtype=np.float64)
                score[hit] += charges[which.reshape(-1)]
        at_best = score == score.min()
        best_if = int(in_flight[at_best].min())
        tied = np.flatnonzero(at_best & (in_flight == best_if)).tolist()
        mean = (int(in_flight.sum()) + 1) / n
        bound = max(self.load_factor * mean, mean + self.min_slack)
        over: list[int] = []
        if best_if + 1 > bound:  # the best is over the bound: the best of the others instead (as choose)
            over, tied = _within_bound(score.tolist(), in_flight.tolist(), bound)
        pick = tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]
        sooner = None
        if in_flight[pick] > 0 and cols.queued_prefill_tokens[pick] <= 0 and int(in_flight.sum()) < n:  # _sooner_idle
            idle = np.flatnonzero((in_flight <= 0) & (cols.queued_prefill_tokens <= 0)).tolist()
            if idle:
                pick, sooner = self._sooner_idle(request, cols.state, pick, idle, score.tolist(), rng)
        states = cols.states
        scores = LazyScores(lambda: {w[0]: s * 1e3 for w, s in zip(states, score.tolist(), strict=True)})
        return self._decision(request, cols.state(pick), [states[i].target for i in over], bound, scores,
                              sooner_than=sooner)

    def _sooner_idle(self, request: RouteRequest, state_of: Callable[[int], WorkerState], pick: int,
                     idle: list[int], scores: Sequence[float], rng: random.Random) -> tuple[int, WorkerKey | None]:
        """At light load, a busy pick must answer first (both ``choose`` paths).

        Called when the fleet has fewer requests in flight than candidates, ``pick`` has some of them
        but no queued prefill (only decodes), and ``idle`` (candidate indices, ascending) have none
        and no queued prefill. The score charges
        an uncached prefill ``miss_weight`` times again because later requests queue behind it;
        while workers idle, nothing does, and that charge alone can keep a short shared prefix on
        its busy holder although an idle worker would answer sooner (issue 16: a cache hit slower
        than a miss, most requests on one worker). So when the best-scored idle candidate's
        predicted TTFT is below the pick's, it takes the request instead (ties drawn from ``rng``,
        as the main rule). Returns ``(pick, the target it replaced or None)``.

        Not behind queued prefill: the router counts a request's whole uncached prompt as queued
        until its first token, though the engine is already computing it, so a queued pick's TTFT
        is overestimated and it would yield a hit for a miss that is no sooner (``kvr bench peer``,
        seed 0: 0.8 points of hit rate and +5 ms TTFT p99 lost that way). Only at light load: with as
        many requests in flight as workers, balancing honest workers
        this way keeps every one under the load bound, and a distrusted target (``core/trust.py``),
        which competes on load alone, then gets no spill and no evidence to regain trust with.
        """
        best = min(scores[i] for i in idle)
        tied = [i for i in idle if scores[i] == best]
        busy_ttft_s = self.predict(request, state_of(pick))[0]
        if self.predict(request, state_of(tied[0]))[0] >= busy_ttft_s:
            return pick, None
        replaced = state_of(pick).target
        return (tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]), replaced

    def _decision(self, request: RouteRequest, chosen: WorkerState, over: list[WorkerKey], bound: float,
                  scores: LazyScores, *, sooner_than: WorkerKey | None = None) -> Decision:
        """The Decision for ``chosen`` (both ``choose`` paths): its prediction as the reason, the
        targets the load bound excluded, if any, and the busy best-scored target an idle one
        replaced (``_sooner_idle``), if any."""
        ttft_s, queue_s, cached, _ = self.predict(request, chosen)
        reason = (f"predicted TTFT {ttft_s * 1e3:.3f} ms = queue {queue_s * 1e3:.3f} + prefill "
                  f"{(ttft_s - queue_s) * 1e3:.3f} (cached {cached}/{request.prompt_tokens} tokens, "
                  f"{chosen.confidence.value})")
        if over:
            reason += f"; over the load bound {bound:.1f}: {', '.join(str(t) for t in over)}"
        if sooner_than is not None:
            reason += f"; idle, sooner than {sooner_than} (busy)"
        unit = "predicted TTFT ms" if not self.miss_weight else f"TTFT + {self.miss_weight:g} x own prefill, ms"
        return Decision(chosen.target, scores, reason, self.name, unit, chosen.overlap_blocks)

    def _weight_column(self) -> tuple[np.ndarray, bool, bool]:
        """The confidence weights by ``CONFIDENCE_CODES`` row, whether one is negative, and whether
        all are finite: rebuilt only when ``confidence_weights`` changed."""
        values = tuple(map(self.confidence_weights.__getitem__, CONFIDENCE_CODES))
        if self._weights_cache is None or self._weights_cache[0] != values:
            column = np.array(values, dtype=np.float64)
            self._weights_cache = (values, column, bool(column.min() < 0), bool(np.isfinite(column).all()))
        return self._weights_cache[1:]

    def forget(self, target: WorkerKey) -> None:
        pass
