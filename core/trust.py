"""Trust from the closed loop: does a target's reported cache agree with what the router predicted?

For every finished request the router knows what it predicted the target had cached (from the
prefix index: the target's own ``BlockStored`` events, ``InFlight.predicted_cached_tokens``) and
what the engine reports it reused (``Completion.cached_tokens``). A target whose reports keep
falling short of the prediction has index entries that are wrong: it published blocks it does not
hold (a lying or broken worker), or its ``BlockRemoved`` events were lost. Either way its overlap
must count less until the evidence agrees again, or it keeps drawing traffic it cannot serve.

Evidence, per target: the *shortfall ratio* over the recent requests with a prediction,
token-weighted and exponentially decayed per request::

    short_ewma = d × short_ewma + max(0, predicted − reported)
    pred_ewma  = d × pred_ewma  + predicted             (d = 1 − 1 / window_requests)
    shortfall  = short_ewma / pred_ewma

Token-weighted, so a claim of a long prefix weighs what it would have cost; decayed, so old
agreement does not hide a new lie (the last ``window_requests`` requests carry ~63 % of the weight).
Requests predicted to hit nothing (``predicted == 0``) say nothing about the entries and are
ignored; a report above the prediction (an index that misses blocks) is no shortfall.

The same signal fires for a whole fleet of honest workers that is overloaded: requests wait in
the engines' queues long enough for the blocks they were routed for to be evicted before their
prefill (simulator, multiturn, 256 clients at 10 req/s on 8 workers: 65 % of prompt tokens
predicted cached, 6.5 % reused; every worker's shortfall near 1). Distrusting every worker then
would only throw the index away. So a target is judged against the *fleet*: its shortfall must
stand out from the median shortfall of the other trusted targets with evidence (``reference``;
0 when there are none), as a lying worker's, or one whose ``BlockRemoved`` events were lost, does.

Transitions (hysteresis, and never on fewer than ``min_samples`` requests since the last one, so
one request cannot trip it and a fresh index is judged on fresh evidence):

* trusted (weight 1) → distrusted (``distrusted_weight``, 0) once ``shortfall ≥ distrust_at``
  (0.5: over the window, at least half the predicted cached tokens were not there) and
  ``shortfall ≥ reference + distrust_excess`` (0.3);
* distrusted → trusted once ``shortfall ≤ reference + trust_at`` (0.2), no sooner than
  ``min_distrusted_s`` after the drop (the resync window: the index is being re-learned meanwhile).

An honest worker misses now and then (a block evicted before the request arrived, a sibling's
prefill not finished yet): a few full misses among agreeing requests keep the ratio well under
0.5 (``tests/core/test_trust.py``). Fed with every request of the simulator (kvr, 8 workers; gsp
at 8 and 12 req/s, multiturn 10, react 10, fanout 3, tot 4, fewshot 20) it downgrades no one.

Why 0 and not, say, 0.25: entries proven wrong are worth what a ``stale`` target's are in kvr's
confidence weights (nothing: a wrong "hit" costs a full prefill on a worker picked for nothing).
Any weight above 0 lets a liar keep every prefix it alone claims: a quarter of a long claimed
prefix still beats the honest workers' nothing, so they never learn it. At 0 the target competes
on load alone; it still gets its share of requests, whose predictions (the unscaled index claim)
keep the evidence coming, so an honest target whose index was repaired recovers.

Each transition is returned once as a ``TrustChange`` (the caller logs, counts, resyncs the
target's stream and applies the weight to routing). Pure: no clock (``now`` is an argument), no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from core.prefix_index import WorkerKey

DEFAULT_WINDOW_REQUESTS = 16
DEFAULT_MIN_SAMPLES = 8
DEFAULT_DISTRUST_AT = 0.5
DEFAULT_DISTRUST_EXCESS = 0.3
DEFAULT_TRUST_AT = 0.2
DEFAULT_DISTRUSTED_WEIGHT = 0.0
#: As ``router/ingest.py``'s ``DEFAULT_RESYNC_S``: the drop resyncs the target, which re-learns meanwhile.
DEFAULT_MIN_DISTRUSTED_S = 10.0

TRUSTED_WEIGHT = 1.0


@dataclass(frozen=True, slots=True, kw_only=True)
class TrustConfig:
    """Thresholds of ``TrustTracker`` (see the module docstring for what each one means)."""

    window_requests: int = DEFAULT_WINDOW_REQUESTS
    min_samples: int = DEFAULT_MIN_SAMPLES
    distrust_at: float = DEFAULT_DISTRUST_AT
    distrust_excess: float = DEFAULT_DISTRUST_EXCESS
    trust_at: float = DEFAULT_TRUST_AT
    distrusted_weight: float = DEFAULT_DISTRUSTED_WEIGHT
    min_distrusted_s: float = DEFAULT_MIN_DISTRUSTED_S

    def __post_init__(self) -> None:
        if self.window_requests < 1 or self.min_samples < 1:
            raise ValueError("window_requests and min_samples must be >= 1")
        if not 0.0 <= self.trust_at < min(self.distrust_at, self.distrust_excess) or self.distrust_at > 1.0:
            raise ValueError("need 0 <= trust_at < distrust_at <= 1 and trust_at < distrust_excess")
        if not 0.0 <= self.distrusted_weight < TRUSTED_WEIGHT:
            raise ValueError("distrusted_weight must be in [0, 1)")
        if self.min_distrusted_s < 0:
            raise ValueError("min_distrusted_s must be >= 0")


@dataclass(frozen=True, slots=True)
class TrustChange:
    """A target's weight changed: ``weight`` is the new one, ``shortfall`` the ratio that moved it."""

    target: WorkerKey
    weight: float
    shortfall: float
    samples: int  # requests with a prediction since the previous transition
    at_s: float
    reason: str

    @property
    def downgrade(self) -> bool:
        return self.weight < TRUSTED_WEIGHT


@dataclass(slots=True)
class _Evidence:
    weight: float = TRUSTED_WEIGHT
    short_ewma: float = 0.0  # decayed shortfall tokens
    pred_ewma: float = 0.0  # decayed predicted tokens (> 0 once a sample arrived)
    samples: int = 0  # since the last transition
    seen: int = 0  # in all
    changed_at_s: float = 0.0

    def shortfall(self) -> float:
        return self.short_ewma / self.pred_ewma if self.pred_ewma > 0 else 0.0


class TrustTracker:
    """Per-target closed-loop evidence and the trust weight it yields (in [distrusted_weight, 1])."""

    def __init__(self, *, config: TrustConfig | None = None) -> None:
        self.config = config if config is not None else TrustConfig()
        self._decay = 1.0 - 1.0 / self.config.window_requests
        self._targets: dict[WorkerKey, _Evidence] = {}

    def weight(self, target: WorkerKey) -> float:
        ev = self._targets.get(target)
        return TRUSTED_WEIGHT if ev is None else ev.weight

    def shortfall(self, target: WorkerKey) -> float:
        """The current shortfall ratio (0 with no evidence)."""
        ev = self._targets.get(target)
        return 0.0 if ev is None else ev.shortfall()

    def distrusted(self) -> dict[WorkerKey, float]:
        """Targets below full trust, with their weight."""
        return {t: ev.weight for t, ev in self._targets.items() if ev.weight < TRUSTED_WEIGHT}

    def observe(self, target: WorkerKey, *, predicted_tokens: int, reported_tokens: int,
                now: float) -> TrustChange | None:
        """One finished request on ``target``; returns the transition it caused, if any."""
        if predicted_tokens <= 0:
            return None  # predicted no hit: says nothing about the target's entries
        ev = self._targets.get(target)
        if ev is None:
            ev = self._targets[target] = _Evidence(changed_at_s=now)
        d = self._decay
        ev.short_ewma = d * ev.short_ewma + max(0, predicted_tokens - max(reported_tokens, 0))
        ev.pred_ewma = d * ev.pred_ewma + predicted_tokens
        ev.samples += 1
        ev.seen += 1
        cfg = self.config
        if ev.samples < cfg.min_samples:
            return None
        shortfall = ev.shortfall()
        # The fleet's reference only when it can matter: O(targets), and the checks above are rare to pass.
        if ev.weight >= TRUSTED_WEIGHT:
            if shortfall >= cfg.distrust_at:
                reference = self.reference(target)
                if shortfall >= reference + cfg.distrust_excess:
                    reason = (f"reported cached tokens fell {shortfall:.0%} short of the predicted over the last "
                              f"~{cfg.window_requests} requests ({ev.samples} since the last change; the fleet's "
                              f"median {reference:.0%})")
                    return self._change(target, ev, cfg.distrusted_weight, shortfall, now, reason)
        elif now - ev.changed_at_s >= cfg.min_distrusted_s:
            reference = self.reference(target)
            if shortfall <= reference + cfg.trust_at:
                reason = (f"reported cached tokens agree with the predicted again (shortfall {shortfall:.0%}, "
                          f"the fleet's median {reference:.0%})")
                return self._change(target, ev, TRUSTED_WEIGHT, shortfall, now, reason)
        return None

    def reference(self, target: WorkerKey) -> float:
        """The median shortfall of the other trusted targets with evidence (0 when there are none):
        what the fleet's own misses look like now. Any evidence counts, not ``min_samples`` of it:
        in an overloaded fleet the first target to reach ``min_samples`` must not be judged against
        an empty fleet because its peers are a request or two behind."""
        ratios = sorted(ev.shortfall() for t, ev in self._targets.items()
                        if t != target and ev.weight >= TRUSTED_WEIGHT and ev.seen > 0)
        if not ratios:
            return 0.0
        mid = len(ratios) // 2
        return ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2

    def forget(self, target: WorkerKey) -> None:
        """The target left (its worker died or restarted): a new incarnation starts trusted."""
        self._targets.pop(target, None)

    @staticmethod
    def _change(target: WorkerKey, ev: _Evidence, weight: float, shortfall: float, now: float,
                reason: str) -> TrustChange:
        change = TrustChange(target, weight, shortfall, ev.samples, now, reason)
        # A fresh window: the next transition is judged on evidence gathered after this one (after
        # a drop the target's index is resynced, so older predictions described entries now gone).
        ev.weight, ev.short_ewma, ev.pred_ewma, ev.samples, ev.changed_at_s = weight, 0.0, 0.0, 0, now
        return change
