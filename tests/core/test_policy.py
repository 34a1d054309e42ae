"""Routing policies: each baseline's published rule, and kvr's predicted-TTFT choice."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from core.own_block_hash import block_hashes
from core.policies import (
    POLICY_NAMES,
    ChwblPolicy,
    DynamoPolicy,
    KvrPolicy,
    LinearPrefillModel,
    RouteRequest,
    SglangCacheAwarePolicy,
    WorkerLoad,
    WorkerState,
    get_policy,
)
from core.policies.dynamo import softmax_pick
from core.prefix_index import Confidence, WorkerKey

BS = 16
T = [WorkerKey(f"w{i}", 0) for i in range(4)]


def req(tokens: list[int], rid: str = "r", lora: str | None = None) -> RouteRequest:
    return RouteRequest(rid, len(tokens), block_hashes(tokens, block_size=BS), tokens, lora)


def ws(i: int, overlap: int = 0, conf: Confidence = Confidence.FRESH, **load) -> WorkerState:
    return WorkerState(T[i], overlap, WorkerLoad(**load), conf, 1000)


PROMPT = list(range(160))  # 10 blocks


def test_registry_names_and_unknown():
    assert POLICY_NAMES == ("kvr", "round_robin", "random", "least_loaded", "chwbl", "sglang", "sglang_router",
                            "dynamo", "llmd", "vllm_kv_aware")
    for name in POLICY_NAMES:
        assert get_policy(name, block_size=BS, latency=None).name == name
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        get_policy("nope")


def test_every_policy_explains_its_decision():
    rnd = random.Random(0)
    cands = [ws(0, 3, in_flight=1), ws(1, 0), ws(2, 10, in_flight=2)]
    for name in POLICY_NAMES:
        d = get_policy(name, block_size=BS).choose(req(PROMPT), cands, now=0.0, rng=rnd)
        assert set(d.scores) == {T[0], T[1], T[2]} and d.reason and d.policy == name
        assert d.explain().startswith(f"[{name}] → {d.target}: ")


def test_round_robin_cycles_in_target_order():
    p = get_policy("round_robin")
    cands = [ws(0), ws(1), ws(2)]
    picks = [p.choose(req(PROMPT), cands, now=0, rng=random.Random(0)).target for _ in range(7)]
    assert picks == [T[0], T[1], T[2], T[0], T[1], T[2], T[0]]


def test_random_uses_the_given_rng():
    cands = [ws(0), ws(1), ws(2), ws(3)]
    p = get_policy("random")
    a = [p.choose(req(PROMPT), cands, now=0, rng=r).target for r in [random.Random(5)] for _ in range(20)]
    r = random.Random(5)
    assert a == [T[r.randrange(4)] for _ in range(20)]


def test_least_loaded_prefers_fewer_in_flight_then_less_prefill():
    p = get_policy("least_loaded")
    rnd = random.Random(0)
    assert p.choose(req(PROMPT), [ws(0, in_flight=2), ws(1, in_flight=1, queued_prefill_tokens=5000)],
                    now=0, rng=rnd).target == T[1]
    assert p.choose(req(PROMPT),
                    [ws(0, in_flight=1, queued_prefill_tokens=10), ws(1, in_flight=1, queued_prefill_tokens=9)],
                    now=0, rng=rnd).target == T[1]
    picks = Counter(p.choose(req(PROMPT), [ws(0), ws(1)], now=0, rng=rnd).target for _ in range(200))
    assert set(picks) == {T[0], T[1]}  # exact ties are broken at random


def test_chwbl_is_sticky_bounded_and_consistent():
    p = ChwblPolicy()
    cands = [ws(i) for i in range(4)]
    prompts = [[k] * 40 for k in range(200)]
    owner = {k: p.choose(req(pr), cands, now=0, rng=None).target for k, pr in enumerate(prompts)}
    assert len(set(owner.values())) == 4
    # Same first 25 tokens, different tail: same owner. A LoRA name moves the key.
    assert p.choose(req([0] * 25 + [9] * 30), cands, now=0, rng=None).target == owner[0]
    assert p.key(req(prompts[0], lora="x")) != p.key(req(prompts[0]))
    # Owner over the bound (in_flight+1 > 1.25 × (total+1)/n): the next endpoint clockwise.
    loaded = [ws(i, in_flight=(6 if T[i] == owner[0] else 0)) for i in range(4)]
    d = p.choose(req(prompts[0]), loaded, now=0, rng=None)
    assert d.target != owner[0] and d.scores[owner[0]] == 0.0 and d.scores[d.target] == 1.0
    # Removing one endpoint remaps only the keys it owned.
    gone = T[3]
    rest = [ws(i) for i in range(3)]
    after = {k: p.choose(req(pr), rest, now=0, rng=None).target for k, pr in enumerate(prompts)}
    assert all(after[k] == owner[k] for k in owner if owner[k] != gone)


@pytest.mark.parametrize(("loads", "imbalanced"), [
    ((0, 65), True), ((0, 64), False), ((100, 165), True), ((200, 265), False), ((200, 301), True),
])
def test_sglang_imbalance_rule(loads, imbalanced):
    p = SglangCacheAwarePolicy(block_size=BS)
    p.insert(block_hashes(PROMPT, block_size=BS), T[1], now=0)  # the tree says w1 holds the prompt
    d = p.choose(req(PROMPT), [ws(0, in_flight=loads[0]), ws(1, in_flight=loads[1])], now=1, rng=None)
    assert d.target == (T[0] if imbalanced else T[1])
    assert d.reason.startswith("imbalanced") == imbalanced


def test_sglang_match_rate_threshold_is_strict_and_index_is_ignored():
    p = SglangCacheAwarePolicy(block_size=BS)
    p.insert(block_hashes(PROMPT[:48], block_size=BS), T[1], now=0)  # 3 of 10 blocks: rate 0.3
    cands = [ws(0, overlap=10), ws(1, in_flight=1)]  # the exact index's overlap plays no part
    d = p.choose(req(PROMPT), cands, now=1, rng=None)
    assert d.target == T[0] and "0.30 <= 0.3" in d.reason
    # That request was inserted for w0: now w0 matches all 10 blocks.
    assert p.match(block_hashes(PROMPT, block_size=BS))[0] == 10
    q = SglangCacheAwarePolicy(block_size=BS)
    q.insert(block_hashes(PROMPT[:64], block_size=BS), T[1], now=0)  # 4 of 10: rate 0.4
    assert q.choose(req(PROMPT), cands, now=1, rng=None).target == T[1]


def test_sglang_least_loaded_takes_the_first_on_ties_and_forgets():
    p = SglangCacheAwarePolicy(block_size=BS)
    cands = [ws(0), ws(1), ws(2)]
    assert [p.choose(req([k] * 32), cands, now=0, rng=None).target for k in range(3)] == [T[0]] * 3
    p.forget(T[0])
    assert p.tree_blocks(T[0]) == 0 and p.match(block_hashes([0] * 32, block_size=BS))[0] == 0


def test_sglang_tree_eviction_keeps_the_most_recent_and_shallowest():
    p = SglangCacheAwarePolicy(block_size=BS, max_tree_size_tokens=4 * BS, eviction_interval_s=10)
    old, new = list(range(48)), list(range(1000, 1048))
    p.insert(block_hashes(old, block_size=BS), T[0], now=0)
    p.insert(block_hashes(new, block_size=BS), T[0], now=5)
    assert p.tree_blocks(T[0]) == 6
    p.choose(req([7] * 16), [ws(0), ws(1)], now=1, rng=None)  # arms the timer; inserts 1 block for w0
    p.choose(req([8] * 16), [ws(0), ws(1)], now=10.5, rng=None)  # before the interval: no eviction
    assert p.tree_blocks(T[0]) == 8
    p.choose(req([9] * 16), [ws(0), ws(1)], now=11, rng=None)  # evicts 8 -> 4, then inserts 1
    assert p.tree_blocks(T[0]) == 5
    assert p.match(block_hashes(new, block_size=BS))[0] == 3
    assert p.match(block_hashes(old, block_size=BS))[0] == 0  # oldest first
    assert p.match(block_hashes([7] * 16, block_size=BS))[0] == 0
    assert p.match(block_hashes([8] * 16, block_size=BS))[0] == 1


def test_dynamo_cost_formula():
    p = DynamoPolicy(block_size=BS)
    r = req(PROMPT)  # 10 blocks
    w = ws(0, overlap=4, queued_prefill_tokens=32, active_blocks=7)
    # prefill max(2 + 10 - 4, 0) + decode (7 active + 6 new blocks)
    assert p.cost(r, w, 0) == pytest.approx(8 + 7 + 6)
    assert p.cost(r, ws(0, overlap=30), 0) == pytest.approx(0 + 0 + 0)  # prefill floors at 0, nothing new
    decayed = DynamoPolicy(block_size=BS, credit_decay=1.0)
    # excess = (32 - 0)/16 = 2 blocks; normalised 2/10; decay 1/1.2; credit 4/1.2
    assert decayed.cost(r, w, 0) == pytest.approx(12 - 4 / 1.2 + 13)
    d = p.choose(r, [w, ws(1, overlap=0)], now=0, rng=random.Random(0))
    assert d.target == T[1] and d.scores == {T[0]: pytest.approx(21.0), T[1]: pytest.approx(20.0)}


def test_dynamo_defaults_and_active_request_weight():
    p = get_policy("dynamo", block_size=BS, latency=None)
    assert (p.overlap_score_credit, p.credit_decay, p.prefill_load_scale, p.decode_active_request_weight,
            p.temperature) == (1.0, 0.0, 1.0, 0.0, 0.0)
    r = req(PROMPT)
    w = ws(0, overlap=4, queued_prefill_tokens=32, active_blocks=7, in_flight=3)
    assert p.cost(r, w, 0) == pytest.approx(21.0)  # the in-flight count plays no part by default
    weighted = DynamoPolicy(block_size=BS, decode_active_request_weight=2.0)
    assert weighted.cost(r, w, 0) == pytest.approx(21.0 + 2.0 * 3)


def test_dynamo_softmax_sampling():
    assert softmax_pick([1.0, 1.0, 1.0], 0.5, 0.7) == 2
    # costs 0 and 1, T=1: weights 1 and e^-1 -> p0 = 1/(1+e^-1) = 0.731
    assert softmax_pick([0.0, 1.0], 1.0, 0.73) == 0
    assert softmax_pick([0.0, 1.0], 1.0, 0.74) == 1
    p = DynamoPolicy(block_size=BS, temperature=1.0)
    rnd = random.Random(3)
    picks = Counter(p.choose(req(PROMPT), [ws(0, overlap=10), ws(1)], now=0, rng=rnd).target for _ in range(2000))
    assert 0.68 < picks[T[0]] / 2000 < 0.78


def test_kvr_prefers_cache_until_queue_outweighs_it():
    lat = LinearPrefillModel(base_s=0.010, per_token_s=0.001)
    p = KvrPolicy(block_size=BS, latency=lat, miss_weight=0)  # pure predicted TTFT
    rnd = random.Random(0)
    r = req(PROMPT)  # 160 tokens; at most 9 blocks (144 tokens) can hit
    d = p.choose(r, [ws(0, overlap=10), ws(1)], now=0, rng=rnd)
    assert d.target == T[0]
    assert d.scores == {T[0]: pytest.approx(10 + 16), T[1]: pytest.approx(10 + 160)}
    assert "cached 144/160 tokens" in d.reason
    # 150 queued prefill tokens on w0, computed in the same steps: 10 + 150 + 16 ms > 170 ms on the idle w1.
    d = p.choose(r, [ws(0, overlap=10, queued_prefill_tokens=150), ws(1)], now=0, rng=rnd)
    assert d.target == T[1] and d.scores[T[0]] == pytest.approx(176)
    assert "queue 150.000 + prefill 26.000" in p.choose(r, [ws(0, overlap=10, queued_prefill_tokens=150)], now=0,
                                                       rng=rnd).reason
    d = p.choose(r, [ws(0, overlap=10, queued_prefill_tokens=140), ws(1)], now=0, rng=rnd)
    assert d.target == T[0] and d.scores[T[0]] == pytest.approx(166)


def test_kvr_discounts_overlap_by_confidence():
    lat = LinearPrefillModel(base_s=0.0, per_token_s=0.001)
    p = KvrPolicy(block_size=BS, latency=lat, miss_weight=0)
    r = req(PROMPT)
    d = p.choose(r, [ws(0, overlap=8, conf=Confidence.RESYNCING), ws(1, overlap=5)], now=0, rng=random.Random(0))
    assert d.target == T[1] and d.scores[T[0]] == pytest.approx(160 - 64)
    d = p.choose(r, [ws(0, overlap=9, conf=Confidence.STALE), ws(1, overlap=1)], now=0, rng=random.Random(0))
    assert d.target == T[1] and d.scores[T[0]] == pytest.approx(160)


def test_kvr_load_bound_spills_a_hot_prefix_and_ties_prefer_fewer_in_flight():
    p = KvrPolicy(block_size=BS, load_factor=2.0, min_slack=1.0)
    r = req(PROMPT)
    # total 6 in flight over 2 targets: mean with this request 3.5, bound max(7, 4.5) = 7.
    d = p.choose(r, [ws(0, overlap=10, in_flight=6), ws(1)], now=0, rng=random.Random(0))
    assert d.target == T[0]
    # Against 3 idle workers the bound is max(2 × 9/4, 9/4 + 1) = 4.5: 8 in flight spills.
    d = p.choose(r, [ws(0, overlap=10, in_flight=8), ws(1), ws(2), ws(3)], now=0, rng=random.Random(0))
    assert d.target != T[0] and "over the load bound 4.5: w0/0" in d.reason
    d = p.choose(r, [ws(0, in_flight=2), ws(1, in_flight=1), ws(2, in_flight=1)], now=0, rng=random.Random(0))
    assert d.target in (T[1], T[2])
    picks = {p.choose(r, [ws(0, in_flight=2), ws(1, in_flight=1), ws(2, in_flight=1)], now=0,
                      rng=random.Random(s)).target
             for s in range(30)}
    assert picks == {T[1], T[2]}


def test_kvr_miss_weight_charges_uncached_prefill_again():
    lat = LinearPrefillModel(base_s=0.0, per_token_s=0.001)
    r = req(PROMPT)  # 160 tokens
    cands = [ws(0, overlap=9, queued_prefill_tokens=300), ws(1)]
    greedy = KvrPolicy(block_size=BS, latency=lat, miss_weight=0).choose(r, cands, now=0, rng=random.Random(0))
    # TTFT: w0 = 300 + 16 ms, w1 = 160 ms: greedy TTFT leaves the cache.
    assert greedy.target == T[1] and greedy.scores == {T[0]: pytest.approx(316), T[1]: pytest.approx(160)}
    sticky = KvrPolicy(block_size=BS, latency=lat, miss_weight=10).choose(r, cands, now=0, rng=random.Random(0))
    # Score: w0 = 316 + 10 × 16 = 476, w1 = 160 + 10 × 160 = 1760.
    assert sticky.target == T[0] and sticky.scores == {T[0]: pytest.approx(476), T[1]: pytest.approx(1760)}
    assert "predicted TTFT 316.000 ms" in sticky.reason
    assert KvrPolicy().miss_weight == 10.0 and KvrPolicy().kv_weight == 3.0


def test_kvr_kv_pressure_prices_blocks_beyond_what_the_requests_in_flight_leave_free():
    lat = LinearPrefillModel(base_s=0.0, per_token_s=0.001)
    # 160 prompt tokens (10 blocks) and 40 output tokens (3 blocks); w0 holds 9 of the prompt's blocks,
    # so it needs 1 + 3 new blocks, out of a capacity of 1000.
    r = RouteRequest("r", len(PROMPT), block_hashes(PROMPT, block_size=BS), PROMPT, None, max_tokens=40)
    full = ws(0, overlap=9, active_blocks=990, decode_blocks=8)  # 998 in use: 2 blocks short
    idle = ws(1)

    def choose(weight, *cands):
        return KvrPolicy(block_size=BS, latency=lat, miss_weight=0, kv_weight=weight).choose(
            r, list(cands), now=0, rng=random.Random(0))

    assert choose(0, full, idle).scores == {T[0]: pytest.approx(16), T[1]: pytest.approx(160)}
    # The 2 missing blocks cost their prefill again (32 ms) × the weight.
    d = choose(10, full, idle)
    assert d.target == T[1] and d.scores == {T[0]: pytest.approx(16 + 320), T[1]: pytest.approx(160)}
    assert choose(3, full, idle).target == T[0]  # 16 + 96 ms: still worth the cache
    # Exactly full after this request: no overflow, no charge.
    assert choose(10, ws(0, overlap=9, active_blocks=994, decode_blocks=2), idle).scores[T[0]] == pytest.approx(16)
    # A target of unknown capacity is never charged.
    unknown = WorkerState(T[0], 9, WorkerLoad(active_blocks=990, decode_blocks=8), Confidence.FRESH, 0)
    assert choose(10, unknown, idle).scores[T[0]] == pytest.approx(16)


def test_kvr_prices_the_decode_batch_a_request_joins():
    """Light load: a short prefix's holder busy decoding loses to an idle worker; a long one does not."""
    from core.latency import SimpleLatencyModel

    lat = SimpleLatencyModel(prefill_base_s=0.015, prefill_per_block_s=0.002, decode_per_token_s=0.020, block_size=BS)
    p = KvrPolicy(block_size=BS, latency=lat)
    # Waiting for the step in progress (half a decode step) + the decodes sharing our prefill step.
    assert p.batch_wait_s(0) == 0.0
    assert p.batch_wait_s(3) == pytest.approx(0.5 * 0.020 + 0.020)
    assert KvrPolicy(block_size=BS).batch_wait_s(3) == 0.0  # LinearPrefillModel has no step: no charge
    # 44 tokens: 3 blocks to prefill (21 ms) on an idle worker, 2 (19 ms) on the holder of the first.
    short = req(list(range(44)))
    d = p.choose(short, [ws(0, overlap=1, in_flight=3), ws(1), ws(2)], now=0, rng=random.Random(0))
    assert d.target in (T[1], T[2])
    assert d.scores == {T[0]: pytest.approx(19 + 10 * 19 + 30), T[1]: pytest.approx(21 + 10 * 21),
                        T[2]: pytest.approx(21 + 10 * 21)}
    alone = p.choose(short, [ws(0, overlap=1, in_flight=3)], now=0, rng=random.Random(0)).reason
    assert "predicted TTFT 49.000 ms = queue 30.000 + prefill 19.000" in alone
    assert p.predict(short, ws(0, overlap=1, in_flight=3))[:2] == (pytest.approx(0.049), pytest.approx(0.030))
    # The same holder idle: the cache wins, as before.
    assert p.choose(short, [ws(0, overlap=1), ws(1), ws(2)], now=0, rng=random.Random(0)).target == T[0]
    # A long cached prefix is worth joining a busy batch: 39 of 40 blocks cached, 17 + 30 ms against 95.
    long = req(list(range(640)))
    assert p.choose(long, [ws(0, overlap=40, in_flight=3), ws(1)], now=0, rng=random.Random(0)).target == T[0]


def test_kvr_busy_holder_yields_to_an_idle_worker_that_answers_sooner_at_light_load():
    """The miss charge (later requests queue behind a prefill) must not keep a request on a busy
    holder while an idle worker would answer it sooner: at light load nothing queues."""
    from core.latency import SimpleLatencyModel

    lat = SimpleLatencyModel(prefill_base_s=0.015, prefill_per_block_s=0.002, decode_per_token_s=0.020, block_size=BS)
    p = KvrPolicy(block_size=BS, latency=lat)
    r = req(PROMPT)  # 160 tokens: 9 blocks cached on w0 leave 1 to prefill
    # Scores: busy holder 17 + 30 + 10 × 17 = 217 ms, idle miss 35 + 10 × 35 = 385: the holder scores best,
    # but answers in 47 ms against 35. Three requests in flight on four workers: light load.
    cands = [ws(0, overlap=9, in_flight=2), ws(1), ws(2, in_flight=1), ws(3, queued_prefill_tokens=16)]
    d = p.choose(r, cands, now=0, rng=random.Random(0))
    assert d.target == T[1] and d.scores[T[0]] == pytest.approx(217) and d.scores[T[1]] == pytest.approx(385)
    assert d.reason.endswith("; idle, sooner than w0/0 (busy)") and "predicted TTFT 35.000 ms" in d.reason
    # No idle worker (w1 has prefill queued too): the best score stands.
    cands[1] = ws(1, queued_prefill_tokens=16)
    d = p.choose(r, cands, now=0, rng=random.Random(0))
    assert d.target == T[0] and "sooner" not in d.reason
    # As many requests in flight as workers: not light load, the best score stands.
    d = p.choose(r, [ws(0, overlap=9, in_flight=3), ws(1), ws(2)], now=0, rng=random.Random(0))
    assert d.target == T[0] and "sooner" not in d.reason
    # Idle but slower (a cold 640-token prompt: 95 ms against 17 + 30): the busy holder keeps it.
    long = req(list(range(640)))
    assert p.choose(long, [ws(0, overlap=40, in_flight=1), ws(1)], now=0, rng=random.Random(0)).target == T[0]
    # Ties among the idle ones are drawn, as the main rule's.
    picks = {p.choose(r, [ws(0, overlap=9, in_flight=2), ws(1), ws(2)], now=0, rng=random.Random(s)).target
             for s in range(20)}
    assert picks == {T[1], T[2]}


def test_output_blocks_are_estimated_from_max_tokens_capped_at_512_tokens():
    from core.policies.base import decode_blocks_estimate

    assert [decode_blocks_estimate(n, 16) for n in (-5, 0, 1, 16, 17, 512, 513, 10**9)] == [0, 0, 1, 1, 2, 32, 32, 32]
