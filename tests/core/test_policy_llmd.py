"""The model of llm-d's precise-prefix-cache profile: its scorers, their weights and the picker."""

from __future__ import annotations

import random

import pytest

from core.policies import LlmdPolicy, RouteRequest, WorkerLoad, WorkerState, get_policy
from core.policies.llmd import load_aware_score, prefix_scores, queue_scores
from core.prefix_index import WorkerKey

T = [WorkerKey(f"w{i}", 0) for i in range(4)]
PROMPT = list(range(160))


def req() -> RouteRequest:
    return RouteRequest("r", len(PROMPT), tuple(range(10)), PROMPT)


def ws(i: int, overlap: int = 0, waiting: int = 0, kv_usage: float = 0.0) -> WorkerState:
    return WorkerState(T[i], overlap, WorkerLoad(waiting=waiting, kv_usage=kv_usage), capacity_blocks=1000)


def test_registered_with_the_guide_weights():
    p = get_policy("llmd", block_size=16, latency=None)
    assert isinstance(p, LlmdPolicy) and p.name == "llmd"
    assert (p.prefix_weight, p.kv_utilization_weight, p.queue_weight, p.load_aware_weight,
            p.load_aware_threshold) == (2.0, 1.0, 1.0, 0.0, 128)
    assert p.tentative_window_s == 0.0  # speculative indexing is off by default
    assert p.load_scrape_interval_s == 0.05  # GIE refreshes metrics every 50 ms
    with pytest.raises(ValueError):
        LlmdPolicy(queue_weight=-1.0)
    with pytest.raises(ValueError):
        LlmdPolicy(load_aware_threshold=0)


def test_prefix_scores_normalise_over_the_holders_of_the_first_block_only():
    assert prefix_scores([0, 3, 5]) == [0.0, 0.0, 1.0]  # 3 blocks score like none
    assert prefix_scores([0, 3, 5, 4]) == [0.0, 0.0, 1.0, 0.5]
    assert prefix_scores([0, 1]) == [0.0, 1.0]  # a lone holder of one block: a full score
    assert prefix_scores([7, 7]) == [1.0, 1.0]
    assert prefix_scores([0, 0]) == [0.0, 0.0]


def test_queue_and_load_aware_scores():
    assert queue_scores([0, 2, 4]) == [1.0, 0.5, 0.0]
    assert queue_scores([3, 3]) == [1.0, 1.0]
    assert [load_aware_score(q) for q in (0, 64, 128, 500)] == [0.5, 0.25, 0.0, 0.0]
    assert load_aware_score(5, threshold=10) == 0.25


def test_weighted_sum_for_a_constructed_fleet():
    p = LlmdPolicy()
    cands = [ws(0, overlap=10, waiting=4, kv_usage=0.5),  # 2*1 + 1*0.5 + 1*0 = 2.5
             ws(1, overlap=5, waiting=0, kv_usage=0.2),   # 2*0 + 0.8 + 1 = 1.8
             ws(2, overlap=0, waiting=2, kv_usage=0.0)]   # 0 + 1 + 0.5 = 1.5
    d = p.choose(req(), cands, now=0.0, rng=random.Random(0))
    assert dict(d.scores) == pytest.approx({T[0]: 2.5, T[1]: 1.8, T[2]: 1.5})
    assert d.target == T[0] and d.score_unit == "weighted score (higher wins)"
    assert d.reason == "max score 2.500 (prefix 10 blocks, waiting 4, kv 0.50)"
    # The older sample profile: prefix 2.0 beside the load-aware scorer 1.0.
    older = LlmdPolicy(kv_utilization_weight=0.0, queue_weight=0.0, load_aware_weight=1.0)
    d = older.choose(req(), cands, now=0.0, rng=random.Random(0))
    # 2*1 + 0.5*(1 - 4/128) ; 2*0 + 0.5 ; 0 + 0.5*(1 - 2/128)
    assert dict(d.scores) == pytest.approx({T[0]: 2.484375, T[1]: 0.5, T[2]: 0.4921875})


def test_ties_are_broken_uniformly_with_the_callers_rng():
    p = LlmdPolicy()
    cands = [ws(0), ws(1), ws(2, waiting=1)]  # w0 and w1 tie at 2.0, w2 scores 1.0
    for seed in range(30):
        expected = T[random.Random(seed).randrange(2)]
        assert p.choose(req(), cands, now=0.0, rng=random.Random(seed)).target == expected
    picks = {p.choose(req(), cands, now=0.0, rng=random.Random(s)).target for s in range(30)}
    assert picks == {T[0], T[1]}


def test_a_clear_winner_draws_nothing():
    p = LlmdPolicy()
    rng = random.Random(3)
    state = rng.getstate()
    assert p.choose(req(), [ws(0, overlap=2), ws(1)], now=0.0, rng=rng).target == T[0]
    assert rng.getstate() == state
