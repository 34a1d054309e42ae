"""RouterCore: overlap → policy → in-flight accounting → predict-on-route, on explicit times."""

from __future__ import annotations

import random
from collections import OrderedDict

import pytest

from core.events import BlockRemoved, BlockStored
from core.own_block_hash import block_hashes
from core.policies import get_policy
from core.prefix_index import Confidence, PrefixIndex, WorkerKey
from core.routing import NoTargetsError, RouterCore, RoutingInput

BS = 16
W = [WorkerKey(f"w{i}", 0) for i in range(3)]


def make(policy: str = "kvr", window_s: float = 5.0, seed: int = 0) -> RouterCore:
    core = RouterCore(policy=get_policy(policy, block_size=BS), index=PrefixIndex(block_size=BS), block_size=BS,
                      tentative_window_s=window_s, rng=random.Random(seed))
    for w in W:
        core.register(w, capacity_blocks=100)
    return core


def store_prompt(core: RouterCore, target: WorkerKey, tokens: list[int], now: float = 0.0) -> None:
    """What an engine reports after prefilling ``tokens`` (all full blocks, from the root)."""
    n = len(tokens) // BS
    ext = [hash(("e", tuple(tokens[: (i + 1) * BS]))) & 0xFFFFFFFF for i in range(n)]
    core.index.apply(target, BlockStored(ext, None, tokens[: n * BS], BS, None, "GPU", None), now=now)


def test_routes_to_the_worker_holding_the_prefix_and_accounts_load():
    core = make(window_s=0)
    prompt = list(range(100))  # 6 full blocks + 4 tokens
    store_prompt(core, W[2], prompt[:80])  # 5 blocks on w2
    res = core.route(RoutingInput("r1", prompt), now=1.0)
    assert res.decision.target == W[2] and res.decision.overlap_blocks == 5
    assert res.in_flight.predicted_cached_tokens == 80 and res.in_flight.pending_prefill_tokens == 20
    assert res.block_hashes == block_hashes(prompt, block_size=BS)
    load = core.load(W[2])
    assert (load.in_flight, load.queued_prefill_tokens, load.active_blocks) == (1, 20, 6)
    assert load.decode_blocks == 1  # max_tokens 16: one block of output
    # Its 3 blocks are r1's too.
    core.route(RoutingInput("r0", prompt[:48], max_tokens=33), now=1.0, exclude=[W[0], W[1]])
    assert core.load(W[2]).active_blocks == 6  # distinct blocks: a shared prefix counts once
    assert core.load(W[2]).decode_blocks == 1 + 3  # output blocks are each request's own
    core.on_finish("r0")
    core.update_load(W[2], running=1, waiting=3, queued_prefill_tokens=500, kv_usage=0.5)
    assert core.load(W[2]).queued_prefill_tokens == 500  # the engine knows of more work (another router)
    core.update_load(W[2], queued_prefill_tokens=0)
    core.on_first_token("r1", now=1.1)
    assert core.load(W[2]).queued_prefill_tokens == 0 and core.in_flight("r1").first_token_at == 1.1
    rec = core.on_finish("r1")
    assert rec.target == W[2] and core.on_finish("r1") is None
    assert (core.load(W[2]).in_flight, core.load(W[2]).active_blocks, core.num_in_flight()) == (0, 0, 0)
    assert core.load(W[2]).decode_blocks == 0


def test_prediction_never_covers_the_last_prompt_token():
    core = make(window_s=0)
    prompt = list(range(64))  # exactly 4 blocks: at most 3 can be reused
    store_prompt(core, W[0], prompt)
    res = core.route(RoutingInput("r", prompt), now=0)
    assert res.decision.target == W[0] and res.in_flight.predicted_cached_tokens == 48


def test_predict_on_route_keeps_a_burst_of_siblings_together_until_the_window_ends():
    core = make(window_s=2.0, seed=3)
    prefix = list(range(1000, 1160))  # 10 shared blocks
    first = core.route(RoutingInput("a", prefix + [1, 2, 3]), now=0.0).decision.target
    core.on_first_token("a", now=0.05)  # its prefix is computed: no prefill left to wait for
    for i, t in enumerate([0.1, 0.5, 1.9]):
        d = core.route(RoutingInput(f"s{i}", prefix + [i] * 20), now=t).decision
        assert d.target == first and d.overlap_blocks == 10
    for rid in ("a", "s0", "s1", "s2"):
        core.on_finish(rid)
    # Each sibling renewed the prediction (last at 1.9 s, so until 3.9 s); no event ever came.
    assert core.route(RoutingInput("still", prefix), now=3.8).decision.overlap_blocks == 10
    core.on_finish("still")
    late = core.route(RoutingInput("late", prefix), now=5.9).decision
    assert late.overlap_blocks == 0 and core.index.num_tentative() == 10  # its own prediction only


def test_tentative_window_zero_scatters_siblings():
    core = make(policy="kvr", window_s=0.0, seed=1)
    prefix = list(range(1000, 1160))
    picks = {core.route(RoutingInput(f"s{i}", prefix + [i]), now=0.0).decision.target for i in range(6)}
    assert len(picks) > 1 and core.index.num_tentative() == 0


def test_unregister_returns_in_flight_and_drops_index_entries():
    core = make(window_s=0)
    prompt = list(range(48))
    store_prompt(core, W[1], prompt)
    core.route(RoutingInput("x", prompt), now=0)
    lost = core.unregister(W[1])
    assert [r.request_id for r in lost] == ["x"] and core.in_flight("x") is None
    assert W[1] not in core.targets() and W[1] not in core.index
    assert core.unregister(W[1]) == []


def test_exclude_pin_and_errors():
    core = make(window_s=0)
    prompt = list(range(48))
    store_prompt(core, W[1], prompt)
    assert core.route(RoutingInput("r", prompt), now=0, exclude=[W[1]]).decision.target != W[1]
    d = core.route(RoutingInput("p", prompt, pinned_worker_id="w2"), now=0).decision
    assert d.target == W[2] and d.policy == "pinned"
    with pytest.raises(NoTargetsError):
        core.route(RoutingInput("q", prompt, pinned_worker_id="nope"), now=0)
    with pytest.raises(NoTargetsError):
        core.route(RoutingInput("q", prompt), now=0, exclude=W)
    with pytest.raises(ValueError, match="already in flight"):
        core.route(RoutingInput("r", prompt), now=0)
    with pytest.raises(ValueError, match="empty"):
        core.route(RoutingInput("e", []), now=0)
    with pytest.raises(ValueError):
        RouterCore(policy=get_policy("kvr"), index=PrefixIndex(block_size=8), block_size=16)


def test_policy_sees_index_confidence():
    core = make(window_s=0)
    prompt = list(range(160))
    store_prompt(core, W[0], prompt)
    core.index.set_confidence(W[0], Confidence.STALE)
    d = core.route(RoutingInput("r", prompt), now=0).decision
    assert d.overlap_blocks == (10 if d.target == W[0] else 0)
    assert "stale" not in d.reason or d.target != W[0]
    assert d.scores[W[0]] == max(d.scores.values())  # a stale hit is worth nothing, like a miss


def _hit_rate(policy: str, capacity_blocks: int = 32, n_groups: int = 9) -> float:
    """Shared-prefix workload on ideal LRU engines whose events reach the index at once.

    9 groups × 8 prefix blocks = 72 blocks: no worker can hold every group (32 blocks), so a
    cache-blind policy thrashes while a prefix-aware one partitions the groups (3 per worker).
    """
    core = make(policy=policy, window_s=0, seed=7)
    rnd = random.Random(11)
    groups = [[g * 10_000 + t for t in range(8 * BS)] for g in range(n_groups)]
    lru: dict[WorkerKey, OrderedDict[int, int]] = {w: OrderedDict() for w in W}  # own -> external
    hits = total = 0
    for i in range(300):
        prompt = groups[rnd.randrange(n_groups)] + [rnd.randrange(1, 9999) for _ in range(2 * BS)]
        res = core.route(RoutingInput(f"r{i}", prompt), now=float(i))
        target, own = res.decision.target, res.block_hashes
        cache = lru[target]
        k = 0
        while k < len(own) - 1 and own[k] in cache:
            k += 1
        hits += k * BS
        total += len(prompt)
        for h in own:
            cache[h] = h & 0xFFFFFFFF
            cache.move_to_end(h)
        evicted = []
        while len(cache) > capacity_blocks:
            evicted.append(cache.popitem(last=False)[1])
        if evicted:
            core.index.apply(target, BlockRemoved(evicted, "GPU"), now=float(i))
        core.index.apply(target, BlockStored([h & 0xFFFFFFFF for h in own], None, prompt[: len(own) * BS], BS, None,
                                             "GPU", None), now=float(i))
        core.on_finish(f"r{i}")
    return hits / total


def test_kvr_doubles_round_robin_hit_rate_on_shared_prefixes():
    rates = {p: _hit_rate(p) for p in ("kvr", "round_robin", "dynamo")}
    assert rates["kvr"] >= 2 * rates["round_robin"]
    assert rates["dynamo"] >= 2 * rates["round_robin"]
