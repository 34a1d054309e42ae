"""The model of vllm-router 0.1.17's kv_aware policy: its multiplicative cost, first-on-ties pick
and shifted softmax."""

from __future__ import annotations

import math
import random

import pytest

from core.policies import RouteRequest, VllmKvAwarePolicy, WorkerLoad, WorkerState, get_policy
from core.policies.vllm_kv_aware import prefill_tokens, shifted_softmax_index
from core.prefix_index import WorkerKey

BS = 16
T = [WorkerKey(f"w{i}", 0) for i in range(4)]
PROMPT = list(range(160))  # 10 full blocks


def req(tokens: list[int]) -> RouteRequest:
    return RouteRequest("r", len(tokens), tuple(range(len(tokens) // BS)), tokens)


def ws(i: int, overlap: int = 0, **load: int) -> WorkerState:
    return WorkerState(T[i], overlap, WorkerLoad(**load), capacity_blocks=1000)


def test_registered_with_the_release_defaults():
    p = get_policy("vllm_kv_aware", block_size=BS, latency=None)
    assert isinstance(p, VllmKvAwarePolicy) and p.name == "vllm_kv_aware"
    assert (p.block_size, p.router_temperature, p.kv_penalty_host, p.kv_penalty_external,
            p.kv_penalty_disk) == (16, 0.0, 0.8, 0.6, 0.3)
    assert p.tentative_window_s == 0.0  # no predict-on-route in 0.1.17


@pytest.mark.parametrize("bad", [
    {"router_temperature": -0.1}, {"router_temperature": math.inf}, {"kv_penalty_host": 1.5},
    {"kv_penalty_disk": -0.1}, {"kv_penalty_external": math.nan}, {"block_size": 0},
])
def test_rejects_what_the_release_rejects(bad):
    with pytest.raises(ValueError):
        VllmKvAwarePolicy(**bad)


def test_a_full_match_still_prefills_the_last_token():
    assert prefill_tokens(160, 10, BS) == 16  # 9 blocks usable: 159 // 16
    assert prefill_tokens(161, 10, BS) == 1  # 10 blocks usable, 1 token beyond
    assert prefill_tokens(160, 4, BS) == 96
    assert prefill_tokens(160, 0, BS) == 160
    assert prefill_tokens(1, 5, BS) == 1
    assert prefill_tokens(0, 0, BS) == 0


def test_cost_multiplies_prefill_work_by_the_batch_it_joins():
    p = VllmKvAwarePolicy(block_size=BS)
    r = req(PROMPT)
    hot = ws(0, overlap=10, queued_prefill_tokens=100, in_flight=3)  # (16 + 100) x 4
    cold = ws(1)  # 160 x 1
    warm = ws(2, overlap=4, in_flight=1)  # (160 - 64) x 2
    d = p.choose(r, [hot, cold, warm], now=0.0, rng=random.Random(0))
    assert dict(d.scores) == {T[0]: 464.0, T[1]: 160.0, T[2]: 192.0}
    assert d.target == T[1] and d.score_unit == "cost (tokens x requests)"
    assert d.reason == "min cost 160 = (prefill 160 + active 0) x (0 + 1)"
    # The holder of the whole prompt with one request in flight and 64 queued prefill tokens
    # costs (16 + 64) x 2 = 160, as much as an idle worker that must prefill it all.
    d = p.choose(r, [ws(0, overlap=10, queued_prefill_tokens=64, in_flight=1), cold], now=0.0,
                 rng=random.Random(0))
    assert dict(d.scores) == {T[0]: 160.0, T[1]: 160.0} and d.target == T[0]  # a tie: the first


def test_ties_go_to_the_first_candidate_without_drawing():
    p = VllmKvAwarePolicy(block_size=BS)
    for seed in range(20):
        rng = random.Random(seed)
        state = rng.getstate()
        d = p.choose(req(PROMPT), [ws(0), ws(1), ws(2)], now=0.0, rng=rng)
        assert d.target == T[0]
        assert rng.getstate() == state  # temperature 0 consumes no randomness


def test_softmax_is_shifted_by_the_minimum_not_normalised():
    # costs 100 and 260 at T=160: weights 1 and e^-1, p0 = 1 / (1 + e^-1) = 0.7311
    assert shifted_softmax_index([100.0, 260.0], 160.0, 0.73) == 0
    assert shifted_softmax_index([100.0, 260.0], 160.0, 0.74) == 1
    # the same gap at ten times the cost is ten times sharper: p0 = 1 / (1 + e^-10)
    assert shifted_softmax_index([1000.0, 2600.0], 160.0, 0.9999) == 0
    assert shifted_softmax_index([5.0, 5.0, 5.0], 1.0, 0.7) == 2


def test_softmax_pick_is_deterministic_for_a_seed():
    p = VllmKvAwarePolicy(block_size=BS, router_temperature=160.0)
    cands = [ws(0, overlap=4), ws(1)]  # costs 96 and 160: p0 = 1 / (1 + e^-0.4) = 0.5987

    def picks(seed: int) -> list[WorkerKey]:
        rng = random.Random(seed)
        return [p.choose(req(PROMPT), cands, now=0.0, rng=rng).target for _ in range(50)]

    draws = random.Random(7)
    p0 = 1.0 / (1.0 + math.exp(-64.0 / 160.0))
    expected = [T[0] if draws.random() < p0 else T[1] for _ in range(50)]
    assert picks(7) == expected == picks(7)
    assert set(expected) == {T[0], T[1]}
