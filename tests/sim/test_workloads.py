"""Workload generators: SGLang gsp shape and bound, determinism, follow-ups, arrivals."""

from __future__ import annotations

import random
import statistics
from itertools import pairwise

import pytest

from core.metrics import infinite_cache_upper_bound
from core.own_block_hash import block_hashes
from sim.workload import AllAtOnce, Bursty, Poisson, TraceTimes, assign_arrivals, pick_groups
from sim.workloads import WORKLOADS, config_fields, make_workload
from sim.workloads.gsp import SEPARATOR_TOKENS


def _all_requests(wl):
    return [q for i in range(wl.num_roots()) for q in wl.root_requests(i)]


def test_gsp_defaults_match_sglang_and_bound_formula():
    wl = make_workload("gsp", random.Random(7))
    reqs = _all_requests(wl)
    assert len(reqs) == 64 * 16
    assert {len(q.token_ids) for q in reqs} == {2048 + 2 + 128}
    assert {q.max_tokens for q in reqs} == {256}
    by_group: dict[int, int] = {}
    for q in reqs:
        by_group[q.group] = by_group.get(q.group, 0) + 1
        assert q.token_ids[:2048] == wl.system_prompts[q.group]
        assert q.token_ids[2048:2050] == SEPARATOR_TOKENS
    assert set(by_group.values()) == {16}
    # shuffled: the first 16 requests are not all one group
    assert len({q.group for q in reqs[:16]}) > 1
    bound = infinite_cache_upper_bound(((block_hashes(q.token_ids, block_size=16), len(q.token_ids)) for q in reqs),
                                       block_size=16)
    assert bound == pytest.approx(15 / 16 * 2048 / 2178, abs=1e-9)


def test_gsp_ordered_range_ratio_and_zipf():
    wl = make_workload("gsp", random.Random(1),
                       {"num_groups": "8", "prompts_per_group": "10", "ordered": "true", "range_ratio": "0.5",
                        "system_prompt_len": "200"})
    reqs = _all_requests(wl)
    assert [q.group for q in reqs] == sorted(q.group for q in reqs)
    assert all(100 <= len(s) <= 200 for s in wl.system_prompts)
    assert len({len(s) for s in wl.system_prompts}) > 1
    z = make_workload("gsp", random.Random(1),
                      {"num_groups": 20, "group_distribution": "zipf", "zipf_alpha": 1.5, "system_prompt_len": 16,
                       "question_len": 4})
    counts = [0] * 20
    for q in _all_requests(z):
        counts[q.group] += 1
    assert counts[0] > counts[5] > 0 and sum(counts) == 320


def test_same_seed_same_workload_other_seed_differs():
    for name in WORKLOADS:
        params = {"scale": 0.05} if name.startswith("preble") else {}
        a = _all_requests(make_workload(name, random.Random(3), params))
        b = _all_requests(make_workload(name, random.Random(3), params))
        c = _all_requests(make_workload(name, random.Random(4), params))
        assert ([(q.request_id, q.token_ids, q.max_tokens) for q in a]
                == [(q.request_id, q.token_ids, q.max_tokens) for q in b]), name
        assert [q.token_ids for q in a] != [q.token_ids for q in c], name


def test_multiturn_follow_up_contains_history_and_answer():
    wl = make_workload("multiturn", random.Random(0),
                       {"num_clients": 3, "num_rounds": 3, "request_length": 50, "sub_question_length": 20,
                        "output_length": 5})
    r1 = wl.root_requests(1)[0]
    assert len(r1.token_ids) == 50
    (r2,) = wl.follow_ups(r1, [9, 9, 9, 9, 9])
    assert r2.request_id == "chat-1/r2" and r2.token_ids[:55] == r1.token_ids + [9] * 5 and len(r2.token_ids) == 75
    (r3,) = wl.follow_ups(r2, [8] * 5)
    assert wl.follow_ups(r3, [1] * 5) == []


def test_tree_of_thought_makes_30_calls_per_question():
    wl = make_workload("tot", random.Random(0), {"num_questions": 1, "output_len": 4})
    frontier = list(wl.root_requests(0))
    assert len(frontier) == 2 and frontier[0].token_ids == frontier[1].token_ids
    total = 0
    while frontier:
        total += len(frontier)
        nxt = []
        for q in frontier:
            kids = wl.follow_ups(q, [1, 2, 3, 4])
            for k in kids:
                assert k.token_ids[: len(q.token_ids) + 4] == q.token_ids + [1, 2, 3, 4]
            nxt += kids
        frontier = nxt
    assert total == 2 + 4 + 8 + 16


def test_fanout_judge_waits_for_every_chain():
    wl = make_workload("fanout", random.Random(0), {"num_questions": 2, "num_chains": 3, "output_len": 2})
    chains = wl.root_requests(1)
    assert len(chains) == 3
    assert wl.follow_ups(chains[2], [7, 7]) == []
    assert wl.follow_ups(chains[0], [5, 5]) == []
    (judge,) = wl.follow_ups(chains[1], [6, 6])
    q = chains[0].token_ids
    assert judge.token_ids[: len(q) + 6] == q + [5, 5, 6, 6, 7, 7]
    assert wl.follow_ups(judge, [1]) == []


def test_preble_shared_fraction_statistics():
    wl = make_workload("preble-toolbench", random.Random(5), {"num_requests": 2000})
    reqs = _all_requests(wl)
    lens = [len(q.token_ids) for q in reqs]
    assert statistics.mean(lens) == pytest.approx(1835, rel=0.05)
    assert statistics.pstdev(lens) == pytest.approx(742, rel=0.15)
    # two requests of a group share a prefix; requests of different groups share nothing
    g = {}
    for q in reqs:
        g.setdefault(q.group, []).append(q)
    a, b = next(v for v in g.values() if len(v) >= 2)[:2]
    # The sentinels (-1 vs -2) differ at the shorter prompt's end at the latest: zip may stop there.
    common = next(i for i, (x, y) in enumerate(zip(a.token_ids + [-1], b.token_ids + [-2], strict=False)) if x != y)
    assert common > 0.4 * min(len(a.token_ids), len(b.token_ids))
    assert len(g) == 300


def test_fewshot_shares_examples_per_subject():
    wl = make_workload("fewshot", random.Random(2),
                       {"num_subjects": 4, "questions_per_subject": 3, "num_shots": 2, "shot_len": 10,
                        "question_len": 5})
    reqs = _all_requests(wl)
    assert len(reqs) == 12
    for q in reqs:
        same = [r for r in reqs if r.group == q.group]
        assert all(r.token_ids[:20] == q.token_ids[:20] for r in same)


def test_unknown_workload_and_parameter_are_clear_errors():
    with pytest.raises(ValueError, match="unknown workload"):
        make_workload("nope", random.Random(0))
    with pytest.raises(ValueError, match="no parameter"):
        make_workload("gsp", random.Random(0), {"bogus": 1})
    assert config_fields("gsp")["num_groups"] == 64


def test_arrival_processes():
    rng = random.Random(11)
    t = Poisson(rate_per_s=50.0).times(20000, rng)
    gaps = [b - a for a, b in pairwise([0.0, *t])]
    assert statistics.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    assert statistics.pstdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, rel=0.05)
    tb = Bursty(rate_per_s=50.0, burstiness=0.25).times(20000, rng)
    gb = [b - a for a, b in pairwise([0.0, *tb])]
    assert statistics.mean(gb) == pytest.approx(1 / 50, rel=0.05)
    assert statistics.pstdev(gb) / statistics.mean(gb) == pytest.approx(2.0, rel=0.08)
    assert AllAtOnce(max_concurrency=4).times(3, rng) == [0.0, 0.0, 0.0]
    assert all(a <= b for a, b in pairwise(t))
    wl = make_workload("gsp", random.Random(0), {"num_groups": 1, "prompts_per_group": 2})
    with pytest.raises(ValueError, match="no timestamps"):
        assign_arrivals(wl, TraceTimes(speedup=2.0), rng)


def test_pick_groups_uniform_is_balanced():
    out = pick_groups(random.Random(0), 4, 10, "uniform", 1.0)
    assert sorted(out) == [0, 0, 0, 1, 1, 1, 2, 2, 3, 3]
