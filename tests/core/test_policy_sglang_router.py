"""The model of sglang-router 0.3.2's cache_aware policy: its own token tree, thresholds and timer."""

from __future__ import annotations

import random

import pytest

from core.policies import RouteRequest, SglangRouterPolicy, WorkerLoad, WorkerState, get_policy
from core.prefix_index import WorkerKey

T = [WorkerKey(f"w{i}", 0) for i in range(4)]
PROMPT = list(range(100))


def req(tokens: list[int], rid: str = "r") -> RouteRequest:
    return RouteRequest(rid, len(tokens), (), tokens)  # no block hashes: the model never reads them


def ws(i: int, overlap: int = 0, in_flight: int = 0) -> WorkerState:
    return WorkerState(T[i], overlap, WorkerLoad(in_flight=in_flight), capacity_blocks=1000)


def test_registered_with_the_real_defaults():
    p = get_policy("sglang_router", block_size=16, latency=None)
    assert isinstance(p, SglangRouterPolicy) and p.name == "sglang_router"
    assert (p.cache_threshold, p.balance_abs_threshold, p.balance_rel_threshold, p.eviction_interval_s,
            p.max_tree_size_tokens) == (0.3, 64, 1.5, 60.0, 2**24)


@pytest.mark.parametrize(("loads", "imbalanced"), [
    ((0, 65), True), ((0, 64), False), ((100, 165), True), ((200, 265), False), ((200, 301), True),
])
def test_imbalance_sends_to_the_least_loaded_and_still_inserts(loads, imbalanced):
    p = SglangRouterPolicy()
    p.insert(PROMPT, T[1])  # the tree says w1 holds the prompt
    d = p.choose(req(PROMPT), [ws(0, in_flight=loads[0]), ws(1, in_flight=loads[1])], now=1, rng=None)
    assert d.target == (T[0] if imbalanced else T[1])
    assert d.reason.startswith("imbalanced") == imbalanced
    assert p.tree_tokens(T[0]) == (100 if imbalanced else 0)


def test_match_rate_threshold_is_strict_counts_tokens_and_ignores_the_index():
    p = SglangRouterPolicy()
    p.insert(PROMPT[:30], T[1])  # 30 of 100 tokens: rate 0.30, not above 0.3
    cands = [ws(0, overlap=6), ws(1, in_flight=1)]  # the exact index's overlap plays no part
    d = p.choose(req(PROMPT), cands, now=1, rng=None)
    assert d.target == T[0] and "0.30 <= 0.3" in d.reason
    q = SglangRouterPolicy()
    q.insert(PROMPT[:31], T[1])  # 31 tokens, not a whole 16-token block more: rate 0.31
    d = q.choose(req(PROMPT), cands, now=1, rng=None)
    assert d.target == T[1] and "(31 tokens)" in d.reason


def test_a_partly_matched_edge_counts_its_matched_part():
    p = SglangRouterPolicy()
    p.insert(PROMPT, T[2])
    assert p.match(PROMPT[:40] + [999] * 60) == (40, T[2])
    assert p.match([999] + PROMPT) == (0, None)


def test_low_match_falls_back_on_load_first_worker_on_ties():
    p = SglangRouterPolicy()
    p.insert(PROMPT, T[0])  # w0 holds the prompt: the largest tree, and most loaded
    fresh = [7] * 50
    d = p.choose(req(fresh), [ws(0, in_flight=3), ws(1, in_flight=2), ws(2, in_flight=2)], now=1, rng=None)
    assert d.target == T[1]  # least loaded, first on the tie; not w2 or w3's smaller trees
    assert [p.choose(req([k] * 20), [ws(0), ws(1), ws(2)], now=2, rng=None).target for k in (1, 2)] == [T[0]] * 2


def test_insertion_splits_edges_and_counts_each_workers_tokens():
    p = SglangRouterPolicy()
    p.insert(PROMPT, T[0])
    p.insert(PROMPT[:60] + [500] * 10, T[1])  # shares 60 tokens, then 10 of its own
    assert (p.tree_tokens(T[0]), p.tree_tokens(T[1])) == (100, 70)
    assert p.match(PROMPT) == (100, T[0])
    assert p.match(PROMPT[:60] + [500] * 10) == (70, T[1])
    p.insert(PROMPT, T[0])  # again: nothing new
    assert p.tree_tokens(T[0]) == 100
    p.forget(T[0])
    assert p.tree_tokens(T[0]) == 0 and p.match(PROMPT) == (60, T[1])


def test_the_routed_prompt_is_inserted_for_the_chosen_worker():
    p = SglangRouterPolicy()
    cands = [ws(0), ws(1, in_flight=1)]
    first = p.choose(req(PROMPT, "a"), cands, now=0, rng=random.Random(1))
    assert first.target == T[0] and p.tree_tokens(T[0]) == 100
    # The same prompt comes back while w0 is busier: the tree, not the load, decides.
    again = p.choose(req(PROMPT + [5] * 20, "b"), [ws(0, in_flight=9), ws(1)], now=1, rng=random.Random(1))
    assert again.target == T[0] and p.tree_tokens(T[0]) == 120


def test_timer_prunes_each_worker_to_the_bound_lru_leaves_first():
    p = SglangRouterPolicy(max_tree_size_tokens=50, eviction_interval_s=60)
    old, new = [1] * 30, [2] * 30
    p.insert(old, T[0])
    p.insert(new, T[0])
    p.insert([3] * 40, T[1])  # within the bound: kept
    assert p.tree_tokens(T[0]) == 60
    cands = [ws(0), ws(1)]
    p.choose(req([9] * 10), cands, now=10, rng=None)  # arms the timer at 10 (first tick at 70); w0 gets 10
    p.choose(req([8] * 10), cands, now=69.9, rng=None)  # before the tick: nothing pruned
    assert (p.tree_tokens(T[0]), p.tree_tokens(T[1])) == (80, 40)
    p.choose(req([7] * 10), cands, now=70, rng=None)  # the tick: w0 80 -> 50, oldest leaves first
    assert (p.tree_tokens(T[0]), p.tree_tokens(T[1])) == (60, 40)  # 50 + the 10 just inserted
    assert p.match(old) == (0, None)  # the oldest leaf alone brings w0 to the bound
    assert [p.match(t)[0] for t in (new, [9] * 10, [8] * 10, [7] * 10, [3] * 40)] == [30, 10, 10, 10, 40]


def test_missed_ticks_run_once_and_keep_the_phase():
    p = SglangRouterPolicy(max_tree_size_tokens=10, eviction_interval_s=60)
    cands = [ws(0), ws(1)]  # equal load: every low-match request goes to w0
    p.choose(req([1] * 20), cands, now=0, rng=None)  # the timer runs from 0
    p.choose(req([2] * 20), cands, now=250, rng=None)  # the ticks at 60..240 cut w0 to 0 (a leaf goes whole)
    assert p.tree_tokens(T[0]) == 20 and p.match([1] * 20) == (0, None)
    p.choose(req([3] * 20), cands, now=299, rng=None)  # the next tick is at 300, on the timer's phase
    assert p.tree_tokens(T[0]) == 40
    p.choose(req([4] * 20), cands, now=300, rng=None)  # not at 310 (250 + 60)
    assert p.tree_tokens(T[0]) == 20 and p.match([4] * 20) == (20, T[0])


def test_every_eighth_walk_stamps_the_reported_tenant_even_when_the_request_goes_elsewhere():
    p = SglangRouterPolicy(max_tree_size_tokens=25, eviction_interval_s=60)
    p.insert([1] * 20, T[0])
    p.insert([2] * 20, T[0])  # [1]*20 is w0's least recently used
    cands = [ws(0, in_flight=1), ws(1)]  # low-match requests go to w1
    for k in range(7):
        p.choose(req([100 + k] * 10), cands, now=k, rng=None)  # walks 1-7 (the first arms the timer)
    # Walk 8 ends on w0's [1]*20 with 5 of 100 tokens: w1 gets the request, w0 gets the stamp.
    assert p.choose(req([1] * 5 + [6] * 95), cands, now=30, rng=None).target == T[1]
    p.choose(req([7] * 5), cands, now=60, rng=None)  # the tick cuts w0 from 40 to 20: [2]*20 goes
    assert p.match([1] * 20) == (20, T[0]) and p.match([2] * 20) == (0, None)


def test_a_node_reports_its_creator_not_the_latest_worker_sent_there():
    p = SglangRouterPolicy()
    system = list(range(1000, 1040))
    p.insert(system + [1] * 60, T[0])  # w0 made the node
    spill = p.choose(req(system + [2] * 60), [ws(0, in_flight=100), ws(1)], now=0, rng=None)
    assert spill.target == T[1] and spill.reason.startswith("imbalanced")  # w1 now holds the system prompt too
    # 40 of 100 tokens match the shared node: it reports w0, although w1 was sent there last.
    d = p.choose(req(system + [3] * 60), [ws(0, in_flight=3), ws(1)], now=1, rng=None)
    assert d.target == T[0] and "(40 tokens)" in d.reason


def test_a_tenant_that_is_not_a_candidate_sends_to_the_first_and_records_nothing():
    p = SglangRouterPolicy()
    p.insert(PROMPT, T[3])
    d = p.choose(req(PROMPT), [ws(1, in_flight=2), ws(2)], now=1, rng=None)
    assert d.target == T[1] and p.tree_tokens(T[1]) == 0


def test_once_the_creator_is_gone_the_node_reports_a_seeded_arbitrary_holder_and_sticks_to_it():
    def run(seed: int) -> list[WorkerKey]:
        p = SglangRouterPolicy()
        rng = random.Random(seed)
        cands = [ws(1), ws(2), ws(3)]
        p.choose(req([42] * 8, "warm"), cands, now=0, rng=rng)  # draws the node salts from rng
        for i in range(4):
            p.insert(PROMPT, T[i])  # w0 made the node; all four hold it
        p.forget(T[0])
        return [p.choose(req(PROMPT + [k], f"r{k}"), cands, now=1 + k, rng=rng).target for k in range(6)]

    a = run(1)
    assert len(set(a)) == 1 and a[0] != T[0]  # one holder keeps getting the prefix
    assert run(1) == a
    assert len({run(s)[0] for s in range(12)}) > 1  # which one depends on the seed
