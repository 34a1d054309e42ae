"""core/trust.py: the closed-loop shortfall ratio and the trust weight it yields."""

from __future__ import annotations

import pytest

from core.prefix_index import WorkerKey
from core.trust import TrustChange, TrustConfig, TrustTracker

W = WorkerKey("w", 0)
OTHER = WorkerKey("o", 0)


def feed(tracker: TrustTracker, pairs: list[tuple[int, int]], *, target: WorkerKey = W,
         now: float = 0.0) -> list[TrustChange]:
    changes = []
    for predicted, reported in pairs:
        change = tracker.observe(target, predicted_tokens=predicted, reported_tokens=reported, now=now)
        if change is not None:
            changes.append(change)
    return changes


def test_a_liar_drops_after_min_samples_not_before() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=8))
    assert feed(tracker, [(1024, 0)] * 7) == []
    assert tracker.weight(W) == 1.0
    assert tracker.shortfall(W) == 1.0
    [change] = feed(tracker, [(1024, 0)], now=3.0)
    assert (change.target, change.weight, change.shortfall, change.samples, change.at_s) == (W, 0.0, 1.0, 8, 3.0)
    assert change.downgrade
    assert tracker.weight(W) == 0.0
    assert tracker.distrusted() == {W: 0.0}
    assert tracker.weight(OTHER) == 1.0  # per target


def test_one_request_cannot_trip_it() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=2))
    assert feed(tracker, [(4096, 0)]) == []
    assert tracker.weight(W) == 1.0


def test_threshold_is_on_the_token_weighted_ratio() -> None:
    # window 1: the ratio is the last request's own; 0.5 short trips it, just under does not.
    tracker = TrustTracker(config=TrustConfig(window_requests=1, min_samples=1))
    assert feed(tracker, [(1000, 501)]) == []  # 49.9 % short
    [change] = feed(tracker, [(1000, 500)])  # 50 % short
    assert change.shortfall == 0.5


def test_an_honest_worker_with_a_few_misses_stays_trusted() -> None:
    tracker = TrustTracker()
    # Two full misses in every 16 requests, for a long time, and one short report.
    pattern = [(512, 512)] * 7 + [(512, 0)] + [(512, 512)] * 7 + [(512, 0)] + [(2048, 1024)]
    assert feed(tracker, pattern * 20) == []
    assert tracker.weight(W) == 1.0
    assert 0.0 < tracker.shortfall(W) < 0.3


def test_requests_predicted_to_miss_and_reports_above_the_prediction_are_no_shortfall() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=1))
    assert feed(tracker, [(0, 0)] * 50 + [(0, 512)] * 50) == []
    assert tracker.shortfall(W) == 0.0  # no evidence at all
    assert feed(tracker, [(512, 2048)] * 50) == []
    assert tracker.shortfall(W) == 0.0


def test_recovery_needs_agreement_fresh_samples_and_the_hold() -> None:
    cfg = TrustConfig(min_samples=4, min_distrusted_s=10.0, distrusted_weight=0.25)
    tracker = TrustTracker(config=cfg)
    assert [c.weight for c in feed(tracker, [(1024, 0)] * 4, now=100.0)] == [0.25]
    # Agreement before the hold is over: still distrusted.
    assert feed(tracker, [(1024, 1024)] * 20, now=105.0) == []
    assert tracker.weight(W) == 0.25
    [change] = feed(tracker, [(1024, 1024)], now=110.0)
    assert (change.weight, change.shortfall, change.samples, change.downgrade) == (1.0, 0.0, 21, False)
    assert tracker.weight(W) == 1.0
    # A fresh window: lying again needs min_samples again.
    assert feed(tracker, [(1024, 0)] * 3, now=111.0) == []
    assert len(feed(tracker, [(1024, 0)], now=111.0)) == 1


def test_a_liar_that_keeps_lying_stays_distrusted_without_repeating_the_change() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=4, min_distrusted_s=0.0))
    assert len(feed(tracker, [(1024, 0)] * 4)) == 1
    assert feed(tracker, [(1024, 0)] * 100, now=1000.0) == []
    assert tracker.weight(W) == 0.0


def test_recovery_sits_between_the_two_thresholds() -> None:
    tracker = TrustTracker(config=TrustConfig(window_requests=1, min_samples=1, min_distrusted_s=0.0))
    assert len(feed(tracker, [(1000, 0)])) == 1
    assert feed(tracker, [(1000, 700)]) == []  # 30 % short: above trust_at 0.2, below distrust_at
    assert tracker.weight(W) == 0.0
    assert len(feed(tracker, [(1000, 800)])) == 1  # 20 % short: trusted again
    assert tracker.weight(W) == 1.0


def test_forget_starts_a_target_afresh() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=1))
    feed(tracker, [(1024, 0)])
    tracker.forget(W)
    assert tracker.weight(W) == 1.0 and tracker.shortfall(W) == 0.0 and tracker.distrusted() == {}


@pytest.mark.parametrize("kwargs", [
    {"window_requests": 0}, {"min_samples": 0}, {"trust_at": 0.5, "distrust_at": 0.5},
    {"distrust_at": 1.5}, {"distrusted_weight": 1.0}, {"distrusted_weight": -0.1}, {"min_distrusted_s": -1.0},
])
def test_config_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        TrustConfig(**kwargs)  # type: ignore[arg-type]


def test_a_fleet_short_alike_is_an_overloaded_fleet_and_nobody_is_distrusted() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=4))
    fleet = [WorkerKey(f"w{i}", 0) for i in range(4)]
    for _ in range(20):
        for t in fleet:  # every worker reuses 1 in 10 predicted tokens (evicted while queued)
            assert feed(tracker, [(1000, 100)], target=t) == []
    assert tracker.reference(fleet[0]) == pytest.approx(0.9)
    assert tracker.distrusted() == {}


def test_a_liar_stands_out_from_the_fleets_median_and_recovers_to_it() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=4, min_distrusted_s=0.0))
    fleet = [WorkerKey(f"w{i}", 0) for i in range(3)]
    for t in fleet:  # the honest fleet misses 40 %: a liar at 100 % still stands out by more than 0.3
        feed(tracker, [(1000, 600)] * 8, target=t)
    assert feed(tracker, [(1000, 0)] * 3) == []
    [change] = feed(tracker, [(1000, 0)])
    assert change.weight == 0.0 and tracker.reference(W) == pytest.approx(0.4)
    assert change.reason.endswith("the fleet's median 40%)")
    # Its misses fall to the fleet's (within trust_at of its median): trusted again.
    assert feed(tracker, [(1000, 300)] * 4) == []  # 70 %: 0.3 over the median
    assert tracker.weight(W) == 0.0
    [change] = feed(tracker, [(1000, 500)] * 20)
    assert change.weight == 1.0 and change.shortfall <= 0.6


def test_the_reference_leaves_out_distrusted_targets_and_those_without_evidence() -> None:
    tracker = TrustTracker(config=TrustConfig(min_samples=4))
    feed(tracker, [(1000, 0)] * 4, target=OTHER)  # distrusted: not part of the fleet's norm
    feed(tracker, [(0, 0)] * 9, target=WorkerKey("new", 0))  # no request with a prediction yet
    assert tracker.weight(OTHER) == 0.0 and tracker.reference(W) == 0.0
