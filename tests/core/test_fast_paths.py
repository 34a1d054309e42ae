"""The router's hot paths equal their plain per-item versions, on random and adversarial inputs.

Each fast path (kvr's one-pass ``choose``, chained block hashing, predict-on-route, removals
released inline) is compared with a straightforward reference written here: same results,
same floats, same random draws.
"""

from __future__ import annotations

import random
from unittest.mock import patch

from hypothesis import given, settings
from hypothesis import strategies as st

from core.events import AllBlocksCleared, BlockRemoved, BlockStored
from core.own_block_hash import ROOT_PARENT_HASH, block_hashes, extra_key_bytes, hash_block, own_hashes_of_event
from core.policies import KvrPolicy, RouteRequest, WorkerLoad, WorkerState
from core.policies.base import FleetColumns, LazyScores
from core.prefix_index import Confidence, IndexDelta, PrefixIndex, SnapshotBlocks, WorkerKey
from core.profiles import get_profile
from core.tentative import TentativeEntries

BS = 16
KEYS = [WorkerKey(f"w{i}", 0) for i in range(12)]


# ------------------------------------------------------------------ kvr policy


def reference_choose(policy: KvrPolicy, request: RouteRequest, candidates, rng):
    """kvr's rule, one ``predict`` per candidate: (target, reason, scores in ms)."""
    preds = [policy.predict(request, w) for w in candidates]
    scores = [p[3] for p in preds]
    in_flight = [w.load.in_flight for w in candidates]
    mean = (sum(in_flight) + 1) / len(candidates)
    bound = max(policy.load_factor * mean, mean + policy.min_slack)
    best = min(zip(scores, in_flight, strict=True))
    tied = [i for i in range(len(candidates)) if (scores[i], in_flight[i]) == best]
    over = []
    if best[1] + 1 > bound:
        over = [i for i in range(len(candidates)) if in_flight[i] + 1 > bound]
        allowed = [i for i in range(len(candidates)) if i not in over] or list(range(len(candidates)))
        best = min((scores[i] * 1e3, in_flight[i]) for i in allowed)
        tied = [i for i in allowed if (scores[i] * 1e3, in_flight[i]) == best]
    pick = tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]
    sooner = None  # a busy pick yields to the best-scored idle candidate when that answers sooner
    idle = [i for i, w in enumerate(candidates) if w.load.in_flight <= 0 and w.load.queued_prefill_tokens <= 0]
    if in_flight[pick] > 0 and candidates[pick].load.queued_prefill_tokens <= 0 and idle \
            and sum(in_flight) < len(candidates):
        best_idle = min(scores[i] for i in idle)
        tied_idle = [i for i in idle if scores[i] == best_idle]
        if preds[tied_idle[0]][0] < preds[pick][0]:
            sooner = candidates[pick].target
            pick = tied_idle[0] if len(tied_idle) == 1 else tied_idle[rng.randrange(len(tied_idle))]
    ttft_s, queue_s, cached, _ = preds[pick]
    chosen = candidates[pick]
    reason = (f"predicted TTFT {ttft_s * 1e3:.3f} ms = queue {queue_s * 1e3:.3f} + prefill "
              f"{(ttft_s - queue_s) * 1e3:.3f} (cached {cached}/{request.prompt_tokens} tokens, "
              f"{chosen.confidence.value})")
    if over:
        reason += f"; over the load bound {bound:.1f}: {', '.join(str(candidates[i].target) for i in over)}"
    if sooner is not None:
        reason += f"; idle, sooner than {sooner} (busy)"
    return chosen.target, reason, {w.target: s * 1e3 for w, s in zip(candidates, scores, strict=True)}


# Small value ranges on purpose: they force equal keys, equal scores (ties) and the load bound.
candidate = st.tuples(
    st.sampled_from([0, 0, 0, 1, 3, 8, 40]),  # overlap blocks
    st.sampled_from(list(Confidence)),
    st.integers(0, 6),  # in flight
    st.sampled_from([0, 0, -5, 16, 500, 4096]),  # queued prefill tokens
    st.integers(0, 120),  # active blocks
    st.integers(0, 40),  # decode blocks
    st.sampled_from([0, 100, 150, 1000]),  # capacity blocks (mixed: a heterogeneous fleet)
)


@settings(max_examples=300, deadline=None)
@given(cands=st.lists(candidate, min_size=1, max_size=12), prompt=st.integers(1, 700),
       max_tokens=st.sampled_from([1, 16, 256, 4000]), seed=st.integers(0, 3),
       latency=st.sampled_from([None, "simple", "a100-80gb-8b"]), kv_weight=st.sampled_from([0.0, 3.0]),
       miss_weight=st.sampled_from([0.0, 10.0]))
def test_kvr_choose_equals_one_predict_per_candidate(cands, prompt, max_tokens, seed, latency, kv_weight, miss_weight):
    model = get_profile(latency).latency if latency else None
    policy = KvrPolicy(block_size=BS, latency=model, kv_weight=kv_weight, miss_weight=miss_weight)
    candidates = [WorkerState(KEYS[i], ov, WorkerLoad(in_flight=f, queued_prefill_tokens=q, active_blocks=a,
                                                      decode_blocks=d), conf, cap)
                  for i, (ov, conf, f, q, a, d, cap) in enumerate(cands)]
    request = RouteRequest("r", prompt, [], (), None, max_tokens)
    rng_fast, rng_ref = random.Random(seed), random.Random(seed)
    d = policy.choose(request, candidates, now=0.0, rng=rng_fast)
    target, reason, scores = reference_choose(policy, request, candidates, rng_ref)
    assert (d.target, d.reason) == (target, reason)
    assert dict(d.scores) == scores  # exact floats
    assert rng_fast.getstate() == rng_ref.getstate()  # the same draws


@settings(max_examples=300, deadline=None)
@given(cands=st.lists(candidate, min_size=1, max_size=12), prompt=st.integers(1, 700),
       max_tokens=st.sampled_from([1, 16, 256, 4000]), seed=st.integers(0, 3),
       latency=st.sampled_from([None, "simple", "a100-80gb-8b"]), kv_weight=st.sampled_from([0.0, 3.0]),
       miss_weight=st.sampled_from([0.0, 10.0]), resyncing_weight=st.sampled_from([0.5, 0.3, 1.7]))
def test_kvr_choose_columns_equals_choose(cands, prompt, max_tokens, seed, latency, kv_weight, miss_weight,
                                          resyncing_weight):
    model = get_profile(latency).latency if latency else None
    policy = KvrPolicy(block_size=BS, latency=model, kv_weight=kv_weight, miss_weight=miss_weight,
                       confidence_weights={Confidence.RESYNCING: resyncing_weight})
    candidates = [WorkerState(KEYS[i], ov, WorkerLoad(in_flight=f, queued_prefill_tokens=q, active_blocks=a,
                                                      decode_blocks=d), conf, cap)
                  for i, (ov, conf, f, q, a, d, cap) in enumerate(cands)]
    request = RouteRequest("r", prompt, [], (), None, max_tokens)
    rng_cols, rng_list = random.Random(seed), random.Random(seed)
    got = policy.choose_columns(request, FleetColumns.of(candidates), now=0.0, rng=rng_cols)
    want = policy.choose(request, candidates, now=0.0, rng=rng_list)
    assert (got.target, got.reason, got.overlap_blocks, got.score_unit) == (
        want.target, want.reason, want.overlap_blocks, want.score_unit)
    assert dict(got.scores) == dict(want.scores)  # exact floats
    assert all(type(v) is float for v in got.scores.values())
    assert rng_cols.getstate() == rng_list.getstate()  # the same draws


def test_kvr_scores_differ_by_capacity_even_when_load_is_equal():
    # Two workers alike in everything but capacity: only the small one pays the KV charge.
    policy = KvrPolicy(block_size=BS)
    load = WorkerLoad(active_blocks=90)
    small = WorkerState(KEYS[0], 0, load, Confidence.FRESH, 100)
    large = WorkerState(KEYS[1], 0, load, Confidence.FRESH, 1000)
    d = policy.choose(RouteRequest("r", 320, [], (), None, 16), [small, large], now=0.0, rng=random.Random(0))
    assert d.target == KEYS[1] and d.scores[KEYS[0]] > d.scores[KEYS[1]]
    assert d.scores[KEYS[1]] == policy.predict(RouteRequest("r", 320, [], (), None, 16), large)[3] * 1e3


def test_lazy_scores_build_once_and_compare_as_a_dict():
    calls = []

    def build():
        calls.append(1)
        return {KEYS[0]: 1.5, KEYS[1]: 2.0}

    s = LazyScores(build)
    assert calls == []
    assert s == {KEYS[0]: 1.5, KEYS[1]: 2.0} and {KEYS[0]: 1.5, KEYS[1]: 2.0} == s
    assert s[KEYS[1]] == 2.0 and len(s) == 2 and list(s) == [KEYS[0], KEYS[1]] and s != {KEYS[0]: 1.5}
    assert calls == [1]


# ------------------------------------------------------------------ block hashing


def reference_block_hashes(tokens, *, parent, extra, max_blocks=None):
    out = []
    n = len(tokens) // BS if max_blocks is None else min(len(tokens) // BS, max_blocks)
    for i in range(n):
        parent = hash_block(parent, tokens[i * BS:(i + 1) * BS], extra)
        out.append(parent)
    return out


tokens_st = st.lists(st.one_of(st.integers(0, 50), st.just(0), st.just(2**32 - 1)), max_size=6 * BS + 5)
extra_st = st.one_of(st.none(), st.just(["lora-a"]), st.lists(st.text(max_size=4), max_size=2))


@settings(max_examples=200, deadline=None)
@given(tokens=tokens_st, extra=extra_st, parent=st.one_of(st.just(ROOT_PARENT_HASH), st.integers(0, 2**64 - 1)),
       max_blocks=st.one_of(st.none(), st.integers(0, 7)))
def test_block_hashes_equal_hash_block_chained(tokens, extra, parent, max_blocks):
    got = block_hashes(tokens, block_size=BS, parent_hash=parent, extra_keys=extra, max_blocks=max_blocks)
    assert got == reference_block_hashes(tokens, parent=parent, extra=extra_key_bytes(extra), max_blocks=max_blocks)


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 5), per_block=st.lists(st.one_of(st.none(), st.just(["x"]), st.just(["x", "salt"])),
                                               min_size=5, max_size=5), same=st.booleans())
def test_event_hashes_equal_per_block_chain(n, per_block, same):
    tokens = list(range(n * BS))
    extra = [per_block[0]] * n if same else per_block[:n]
    want, parent = [], ROOT_PARENT_HASH
    for i in range(n):
        parent = hash_block(parent, tokens[i * BS:(i + 1) * BS], extra_key_bytes(extra[i]))
        want.append(parent)
    assert own_hashes_of_event(tokens, extra, BS, ROOT_PARENT_HASH) == want


# ------------------------------------------------------------------ predict-on-route


@settings(max_examples=200, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 3), st.lists(st.integers(0, 12), max_size=10), st.integers(1, 5)),
                    max_size=12),
       held=st.dictionaries(st.integers(0, 12), st.integers(0, 15), max_size=8))
def test_tentative_add_with_held_equals_filter_then_add(ops, held):
    fast, ref = TentativeEntries(), TentativeEntries()
    for slot, owns, expires in ops:
        fast.add(slot, owns, float(expires), held=held)
        ref.add(slot, [o for o in owns if not held.get(o, 0) & (1 << slot)], float(expires))
    assert fast.slots == ref.slots and fast.masks == ref.masks and fast._heap == ref._heap
    for now in (2.0, 4.0, 9.0):
        fast.expire(now)
        ref.expire(now)
        assert fast.slots == ref.slots and fast.masks == ref.masks


# ------------------------------------------------------------------ removals released inline

T3 = [WorkerKey("a", 0), WorkerKey("b", 0), WorkerKey("c", 0)]
CHAIN = list(range(5 * BS))
ALT = [1000 + t for t in range(5 * BS)]

index_op = st.one_of(
    # store blocks 0..n-1 of CHAIN under external hashes base+i (base 1 or 2: two externals per own hash)
    st.tuples(st.just("store"), st.integers(0, 2), st.integers(1, 5), st.sampled_from([100, 200])),
    st.tuples(st.just("store_alt"), st.integers(0, 2), st.integers(1, 5)),
    st.tuples(st.just("remove"), st.integers(0, 2),
              st.lists(st.sampled_from([100, 101, 102, 200, 201, 204, 300, 301, 999, -1]), max_size=4)),
    st.tuples(st.just("tentative"), st.integers(0, 2), st.integers(1, 5)),
)


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(index_op, max_size=25))
def test_removals_equal_a_naive_model(ops):
    idx = PrefixIndex(block_size=BS)
    own = block_hashes(CHAIN, block_size=BS)
    own_alt = block_hashes(ALT, block_size=BS)
    refs: dict[WorkerKey, dict[int, int]] = {t: {} for t in T3}  # external -> own, per target
    tentative: dict[tuple[WorkerKey, int], float] = {}
    batch: dict[WorkerKey, list] = {t: [] for t in T3}
    for o in ops:
        t = T3[o[1]]
        if o[0] in ("store", "store_alt"):
            base, owns, tokens = (o[3], own, CHAIN) if o[0] == "store" else (300, own_alt, ALT)
            ev = BlockStored(block_hashes=[base + i for i in range(o[2])], parent_block_hash=None,
                             token_ids=tokens[:o[2] * BS], block_size=BS, lora_id=None, medium="GPU",
                             lora_name=None)
            batch[t].append(ev)
            idx.apply_events(t, [ev], now=0.0)
            for i in range(o[2]):
                refs[t][base + i] = owns[i]
                tentative.pop((t, owns[i]), None)
        elif o[0] == "remove":
            hashes = [h & (2**64 - 1) for h in o[2]]
            idx.apply_events(t, [BlockRemoved(block_hashes=hashes, medium=None)], now=0.0)
            for h in hashes:
                gone = refs[t].pop(h, None)
                if gone is not None:
                    tentative.pop((t, gone), None)
        else:
            idx.add_tentative(t, own[:o[2]], 10.0)
            held = set(refs[t].values())
            for h in own[:o[2]]:
                if h not in held:
                    tentative[(t, h)] = 10.0
    for t in T3:
        assert dict(idx.snapshot(t)) == refs[t]
        assert idx.num_blocks(t) == len(set(refs[t].values()))
    assert idx.num_tentative() == len(tentative)
    for chain in (own, own_alt):
        want = {}
        for t in T3:
            present = set(refs[t].values()) | {h for (tt, h) in tentative if tt == t}
            k = 0
            while k < len(chain) and chain[k] in present:
                k += 1
            if k:
                want[t] = k
        assert idx.overlap(chain) == want


# ------------------------------------------------------------------ overlap walk (chunked, in C)

LONG = [10_000 + 7 * i for i in range(300)]  # own hashes of a 300-block prompt
# Depths around the walk's chunk edges (blocks 1-16, 17-48, 49-112, 113-240, 241-)
DEPTHS = [0, 1, 2, 16, 17, 18, 48, 49, 112, 113, 240, 241, 299, 300]


@settings(max_examples=200, deadline=None)
@given(real=st.lists(st.tuples(st.sampled_from(DEPTHS), st.lists(st.integers(0, 299), max_size=4)),
                     min_size=1, max_size=6),
       tentative=st.lists(st.tuples(st.integers(0, 5), st.sampled_from(DEPTHS), st.integers(0, 299)), max_size=4),
       length=st.sampled_from([1, 2, 16, 17, 49, 113, 241, 300]))
def test_overlap_equals_a_per_block_walk(real, tentative, length):
    idx = PrefixIndex(block_size=BS)
    keys = [WorkerKey(f"w{i}", 0) for i in range(len(real))]
    present: dict[WorkerKey, set[int]] = {}
    for key, (depth, extra) in zip(keys, real, strict=True):
        # blocks [0, depth) plus a few held past a gap (they must not count)
        owns = sorted(set(LONG[:depth]) | {LONG[i] for i in extra})
        idx.apply_events(key, [SnapshotBlocks(block_hashes=[o + 1 for o in owns], own_hashes=owns)], now=0.0)
        present[key] = set(owns)
    for t, depth, start in tentative:
        if t < len(keys):
            idx.add_tentative(keys[t], LONG[start:start + depth], 10.0)
            present[keys[t]] |= set(LONG[start:start + depth])
    chain = LONG[:length]
    want = {}
    for key in keys:
        k = 0
        while k < len(chain) and chain[k] in present[key]:
            k += 1
        if k:
            want[key] = k
    assert idx.overlap(chain) == want
    assert idx.overlap(chain, now=11.0) == {k: v for k, v in (
        (key, next((i for i, h in enumerate(chain) if h not in set(LONG[:d]) | {LONG[i] for i in e}), len(chain)))
        for key, (d, e) in zip(keys, real, strict=True)) if v}


def test_overlap_names_the_target_that_holds_a_reused_slot():
    # overlap remembers which targets a slot mask means; a slot freed and taken by another
    # target must name the new one.
    idx = PrefixIndex(block_size=BS)
    a, b, c = WorkerKey("a", 0), WorkerKey("b", 0), WorkerKey("c", 0)
    for t in (a, b):
        idx.apply_events(t, [SnapshotBlocks(block_hashes=[1, 2], own_hashes=LONG[:2])], now=0.0)
    assert idx.overlap(LONG[:2]) == {a: 2, b: 2}
    idx.remove_target(a)
    idx.apply_events(c, [SnapshotBlocks(block_hashes=[1, 2], own_hashes=LONG[:2])], now=0.0)  # takes a's slot
    assert idx.overlap(LONG[:2]) == {b: 2, c: 2}
    assert idx.overlap(LONG[:1]) == {b: 1, c: 1}


@settings(max_examples=30, deadline=None)
@given(depths=st.lists(st.sampled_from([0, 1, 2, 3]), min_size=17, max_size=70),
       gone=st.lists(st.integers(0, 69), max_size=5))
def test_overlap_of_many_targets_equals_a_per_target_walk(depths, gone):
    # Many targets per mask (more than the bit-by-bit decoding handles), slots freed and reused.
    idx = PrefixIndex(block_size=BS)
    keys = [WorkerKey(f"w{i}", 0) for i in range(len(depths))]
    held = {}
    for key, d in zip(keys, depths, strict=True):
        idx.apply_events(key, [SnapshotBlocks(block_hashes=list(range(1, d + 1)), own_hashes=LONG[:d])], now=0.0)
        held[key] = d
    idx.overlap(LONG[:3])
    for g in sorted(set(g for g in gone if g < len(keys))):
        idx.remove_target(keys[g])
        del held[keys[g]]
        new = WorkerKey(f"new{g}", 0)
        idx.apply_events(new, [SnapshotBlocks(block_hashes=[1, 2, 3], own_hashes=LONG[:3])], now=0.0)
        held[new] = 3
    for n in (1, 2, 3):
        assert idx.overlap(LONG[:n]) == {k: min(d, n) for k, d in held.items() if d}


# ------------------------------------------------------------------ RouterCore: columns or list


class _ListOnly:
    """kvr without ``choose_columns``: RouterCore then builds the candidate list."""

    def __init__(self, policy: KvrPolicy) -> None:
        self._policy = policy
        self.name = policy.name

    def choose(self, request, candidates, *, now, rng):
        return self._policy.choose(request, candidates, now=now, rng=rng)

    def forget(self, target):
        pass


PROMPTS = [list(range(p * 1000, p * 1000 + n)) for p, n in ((0, 70), (0, 40), (1, 100), (2, 17), (3, 5))]
router_op = st.one_of(
    st.tuples(st.just("route"), st.integers(0, len(PROMPTS) - 1), st.sampled_from([1, 16, 600])),
    st.tuples(st.just("first"), st.integers(0, 30)),
    st.tuples(st.just("finish"), st.integers(0, 30)),
    st.tuples(st.just("load"), st.integers(0, 9), st.sampled_from([0, 50, 3000])),
    st.tuples(st.just("store"), st.integers(0, 9), st.integers(0, len(PROMPTS) - 1), st.integers(0, 6)),
    st.tuples(st.just("confidence"), st.integers(0, 9), st.sampled_from(list(Confidence))),
    st.tuples(st.just("capacity"), st.integers(0, 9), st.sampled_from([0, 8, 500])),
    st.tuples(st.just("leave"), st.integers(0, 9)),
    st.tuples(st.just("foreign"), st.integers(0, len(PROMPTS) - 1)),  # a target the router does not know
)


@settings(max_examples=150, deadline=None)
@given(n_targets=st.integers(1, 10), ops=st.lists(router_op, max_size=40), seed=st.integers(0, 3))
def test_router_decisions_equal_with_columns_and_with_the_list(n_targets, ops, seed):
    with patch("core.routing.COLUMNS_MIN_TARGETS", 1):  # columns from one target on
        _compare_columns_and_list(n_targets, ops, seed)


def _compare_columns_and_list(n_targets, ops, seed):
    from core.routing import RouterCore, RoutingInput

    cores = []
    for policy in (KvrPolicy(block_size=BS), _ListOnly(KvrPolicy(block_size=BS))):
        core = RouterCore(policy=policy, index=PrefixIndex(block_size=BS), block_size=BS, rng=random.Random(seed))
        for i in range(n_targets):
            core.register(KEYS[i], capacity_blocks=0)
        cores.append(core)
    routed = []
    for step, op in enumerate(ops):
        results = []
        for core in cores:
            targets = core.targets()
            if op[0] == "route":
                if not targets:
                    continue
                r = core.route(RoutingInput(f"r{step}", PROMPTS[op[1]], max_tokens=op[2]), now=step * 0.5)
                d = r.decision
                results.append((d.target, d.reason, dict(d.scores), d.overlap_blocks,
                                r.in_flight.predicted_cached_tokens, core.index.num_tentative()))
            elif op[0] in ("first", "finish") and routed:
                rid = routed[op[1] % len(routed)]
                core.on_first_token(rid, now=step * 0.5) if op[0] == "first" else core.on_finish(rid)
            elif op[0] == "load" and op[1] < n_targets:
                core.update_load(KEYS[op[1]], running=1, queued_prefill_tokens=op[2])
            elif op[0] == "store" and op[1] < n_targets:
                owns = block_hashes(PROMPTS[op[2]], block_size=BS)[:op[3]]
                core.index.apply_events(KEYS[op[1]], [SnapshotBlocks(block_hashes=[o ^ 1 for o in owns],
                                                                     own_hashes=owns)], now=0.0)
            elif op[0] == "confidence" and op[1] < n_targets and KEYS[op[1]] in targets:
                core.index.set_confidence(KEYS[op[1]], op[2])
            elif op[0] == "capacity" and op[1] < n_targets:
                core.register(KEYS[op[1]], capacity_blocks=op[2])
            elif op[0] == "leave" and op[1] < n_targets:
                core.unregister(KEYS[op[1]])
            elif op[0] == "foreign":
                owns = block_hashes(PROMPTS[op[1]], block_size=BS)
                core.index.apply_events(WorkerKey("foreign", 0), [SnapshotBlocks(block_hashes=owns, own_hashes=owns)],
                                        now=0.0)
        if op[0] == "route" and results:
            assert results[0] == results[1]
            routed.append(f"r{step}")


def test_router_passes_columns_from_columns_min_targets_on():
    from core.routing import COLUMNS_MIN_TARGETS, RouterCore, RoutingInput

    calls = []

    class Spy(KvrPolicy):
        def choose(self, *a, **k):
            calls.append("list")
            return super().choose(*a, **k)

        def choose_columns(self, *a, **k):
            calls.append("columns")
            return super().choose_columns(*a, **k)

    core = RouterCore(policy=Spy(block_size=BS), index=PrefixIndex(block_size=BS), block_size=BS)
    for i in range(COLUMNS_MIN_TARGETS):
        core.register(WorkerKey(f"t{i:04d}", 0))
        if i >= COLUMNS_MIN_TARGETS - 2:
            core.route(RoutingInput(f"r{i}", list(range(40))), now=0.0)
    core.route(RoutingInput("excluding", list(range(40))), now=0.0, exclude=[WorkerKey("t0000", 0)])
    core.route(RoutingInput("pinned", list(range(40)), pinned_worker_id="t0001"), now=0.0)
    assert calls == ["list", "columns", "list"]  # the pinned request asks no policy


@settings(max_examples=300, deadline=None)
@given(ops=st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(0, 3), st.lists(st.integers(0, 9), max_size=6), st.integers(1, 9)),
    st.tuples(st.just("expire"), st.integers(0, 10)),
    st.tuples(st.just("drop"), st.integers(0, 9), st.integers(0, 3)),
    st.tuples(st.just("drop_slot"), st.integers(0, 3)),
), max_size=30))
def test_tentative_entries_equal_a_naive_model(ops):
    t = TentativeEntries()
    model: dict[tuple[int, int], float] = {}  # (own, slot) -> expiry
    for op in ops:
        if op[0] == "add":
            _, slot, owns, expires = op
            t.add(slot, owns, float(expires))
            for own in owns:
                model[(own, slot)] = max(model.get((own, slot), 0.0), float(expires))
        elif op[0] == "expire":
            t.expire(float(op[1]))
            model = {k: v for k, v in model.items() if v > op[1]}
        elif op[0] == "drop":
            t.drop(op[1], op[2])
            model.pop((op[1], op[2]), None)
        else:
            t.drop_slot(op[1])
            model = {k: v for k, v in model.items() if k[1] != op[1]}
        assert t.entries() == model
        masks = {}
        for o, s in model:
            masks[o] = masks.get(o, 0) | 1 << s
        assert t.masks == masks and len(t) == len(model)


# ------------------------------------------------------------------ a batch's removals applied inline

# A stream over a few chains: chained and orphan stores (two external bases per block), removals
# of one or several hashes (known, unknown, parked, of another medium or KV-cache group), clears.
batch_event = st.one_of(
    st.tuples(st.just("store"), st.integers(0, 4), st.integers(1, 3), st.sampled_from([100, 200]),
              st.sampled_from([None, 0, 1])),  # start block, blocks, external base, group
    st.tuples(st.just("remove"), st.lists(st.sampled_from([100, 101, 102, 103, 200, 202, 204, 999]),
                                          min_size=1, max_size=3),
              st.sampled_from([None, None, None, "CPU"]), st.sampled_from([None, None, 0, 1])),
    st.tuples(st.just("clear")),
)


def _batch_events(spec) -> list[object]:
    out: list[object] = []
    for e in spec:
        if e[0] == "store":
            _, start, n, base, group = e
            out.append(BlockStored(block_hashes=[base + start + i for i in range(n)],
                                   parent_block_hash=None if start == 0 else base + start - 1,
                                   token_ids=CHAIN[start * BS:(start + n) * BS], block_size=BS, lora_id=None,
                                   medium="GPU", lora_name=None, group_idx=group))
        elif e[0] == "remove":
            out.append(BlockRemoved(block_hashes=list(e[1]), medium=e[2], group_idx=e[3]))
        else:
            out.append(AllBlocksCleared())
    return out


@settings(max_examples=300, deadline=None)
@given(batches=st.lists(st.lists(batch_event, max_size=12), max_size=6), tentative=st.integers(0, 5))
def test_apply_events_equals_one_apply_per_event(batches, tentative):
    # ``apply_events`` applies a batch's removals inline; one ``apply`` per event is the plain path.
    # (orphans live 30 s and batches come 20 s apart: some expire while others are parked)
    fast, plain = PrefixIndex(block_size=BS, orphan_ttl_s=30.0), PrefixIndex(block_size=BS, orphan_ttl_s=30.0)
    own = block_hashes(CHAIN, block_size=BS)
    t = T3[0]
    deltas = []
    for idx in (fast, plain):
        idx.add_tentative(t, own[:tentative], 10.0)
    for i, spec in enumerate(batches):
        events = _batch_events(spec)
        d_fast, d_plain = IndexDelta(), IndexDelta()
        fast.apply_events(t, events, now=1.0 + 20 * i, delta=d_fast)
        for ev in events:
            plain.apply(t, ev, now=1.0 + 20 * i, delta=d_plain)
        deltas.append((d_fast, d_plain))
    for d_fast, d_plain in deltas:
        assert d_fast == d_plain
    assert fast.snapshot(t) == plain.snapshot(t)
    assert fast.num_blocks(t) == plain.num_blocks(t)
    assert fast.orphan_blocks(t) == plain.orphan_blocks(t)
    assert fast.counters == plain.counters
    assert fast.num_tentative() == plain.num_tentative()
    assert fast.overlap(own) == plain.overlap(own)
    assert fast.dump_events(t) == plain.dump_events(t)


@settings(max_examples=200, deadline=None)
@given(masks=st.lists(st.integers(0, 2**600 - 1), min_size=1, max_size=4))
def test_mask_slots_equal_the_set_bits_also_when_remembered(masks):
    idx = PrefixIndex(block_size=BS)
    for _ in range(2):  # decoded, then remembered
        for mask in masks:
            assert list(idx.mask_slots(mask)) == [i for i in range(600) if mask >> i & 1]
