"""The emulated engine: continuous batching, chunked prefill, preemption, stats, events."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.engine import EmulatedEngine, EngineConfig, EngineRequest, RequestRejected
from core.events import BlockRemoved, BlockStored
from core.latency import SimpleLatencyModel
from core.profiles import get_profile
from core.tokenizer import default_output_vocab

BS = 4
LAT = SimpleLatencyModel(prefill_base_s=0.010, prefill_per_block_s=0.001, decode_per_token_s=0.005, block_size=BS)


def engine(seed: int = 1, **kw) -> EmulatedEngine:
    cfg = dict(num_gpu_blocks=65, block_size=BS, max_num_seqs=8, max_num_batched_tokens=64, latency=LAT)
    cfg.update(kw)
    return EmulatedEngine(profile_or_config=EngineConfig(**cfg), rng=random.Random(seed))


def run(e: EmulatedEngine, now: float = 0.0, max_steps: int = 10_000):
    """Step until idle; returns (trace of (start, result), finished stats by id, tokens by id, end)."""
    trace, stats, tokens = [], {}, {}
    for _ in range(max_steps):
        if not e.has_work():
            break
        res = e.step(now)
        trace.append((now, res))
        for o in res.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                assert o.request_id not in stats
                stats[o.request_id] = o.stats
        now += res.duration_s
    return trace, stats, tokens, now


def test_one_request_prefills_then_decodes_with_exact_timing_and_tokens() -> None:
    e = engine()
    e.add_request(EngineRequest("a", list(range(10)), max_tokens=3), now=1.0)
    trace, stats, tokens, end = run(e, now=2.0)
    durations = [round(r.duration_s, 9) for _, r in trace]
    assert durations == [0.013, 0.005, 0.005]  # 10 + 3 blocks x 1 ms, then 2 decode steps
    draw = random.Random(1)
    assert tokens == {"a": [draw.choices(default_output_vocab(), k=1)[0] for _ in range(3)]}  # one draw per step
    s = stats["a"]
    assert (s.queue_s, s.num_prompt_tokens, s.num_cached_tokens, s.num_output_tokens, s.preemptions) == (
        1.0, 10, 0, 3, 0)
    assert s.prefill_s == pytest.approx(0.013) and s.ttft_s == pytest.approx(1.013)
    assert s.decode_s == pytest.approx(0.010) and s.e2e_s == pytest.approx(1.023) and end == pytest.approx(2.023)
    assert e.load().kv_usage == 0.0 and not e.has_work()


def test_chunked_prefill_splits_a_long_prompt_by_the_token_budget_and_samples_only_at_the_end() -> None:
    e = engine(max_num_batched_tokens=64)
    e.add_request(EngineRequest("a", list(range(150)), max_tokens=2), now=0.0)
    trace, stats, tokens, _ = run(e)
    assert [(r.prefill_tokens, r.decode_seqs, len(r.outputs)) for _, r in trace] == [
        (64, 0, 0), (64, 0, 0), (22, 0, 1), (0, 1, 1),
    ]  # fmt: skip
    assert stats["a"].prefill_s == pytest.approx(0.026 + 0.026 + 0.016)


def test_without_chunked_prefill_a_prompt_over_the_budget_waits_for_an_empty_budget() -> None:
    e = engine(max_num_batched_tokens=16, enable_chunked_prefill=False)
    e.add_request(EngineRequest("small", list(range(8)), max_tokens=1), now=0.0)
    e.add_request(EngineRequest("big", list(range(100, 120)), max_tokens=1), now=0.0)
    first = e.step(0.0)
    assert [o.request_id for o in first.outputs] == ["small"] and first.prefill_tokens == 8
    assert e.load().waiting == 1


def test_decode_and_prefill_share_a_step_and_new_requests_join_the_running_batch() -> None:
    e = engine()
    e.add_request(EngineRequest("a", list(range(8)), max_tokens=4), now=0.0)
    r1 = e.step(0.0)
    e.add_request(EngineRequest("b", list(range(100, 108)), max_tokens=1), now=r1.duration_s)
    r2 = e.step(r1.duration_s)
    assert (r2.prefill_tokens, r2.decode_seqs) == (8, 1)
    assert r2.duration_s == pytest.approx(0.010 + 2 * 0.001 + 0.005)
    assert [o.request_id for o in r2.outputs] == ["a", "b"]


def test_max_num_seqs_caps_the_batch_and_the_rest_queue() -> None:
    e = engine(max_num_seqs=2)
    for i in range(3):
        e.add_request(EngineRequest(f"r{i}", [i] * 5, max_tokens=2), now=0.0)
    first = e.step(0.0)
    assert first.num_scheduled == 2 and e.load().running == 2 and e.load().waiting == 1
    _, stats, _, _ = run(e, now=first.duration_s)
    assert stats["r2"].queue_s == pytest.approx(first.duration_s + 0.005)


def test_a_repeated_prompt_hits_all_but_its_last_block_and_prefills_faster() -> None:
    e = engine()
    prompt = list(range(40))
    e.add_request(EngineRequest("a", prompt, max_tokens=1), now=0.0)
    _, first, _, t = run(e)
    e.add_request(EngineRequest("b", prompt, max_tokens=1), now=t)
    _, second, _, _ = run(e, now=t)
    assert first["a"].num_cached_tokens == 0
    assert second["b"].num_cached_tokens == 36  # 40 tokens: the last block is recomputed
    assert second["b"].prefill_s == pytest.approx(0.011)  # 4 tokens = 1 block
    assert first["a"].prefill_s == pytest.approx(0.020)
    assert (e.pool.stats.queries_tokens, e.pool.stats.hits_tokens) == (80, 36)


def test_preemption_recomputes_the_newest_request_and_keeps_its_output() -> None:
    e = engine(num_gpu_blocks=5, max_num_seqs=4)  # 4 usable blocks
    e.add_request(EngineRequest("a", list(range(7)), max_tokens=6), now=0.0)
    e.add_request(EngineRequest("b", list(range(100, 107)), max_tokens=6), now=0.0)
    trace, stats, tokens, _ = run(e)
    steps = [(r.num_scheduled, r.prefill_tokens, r.decode_seqs, r.preempted, [o.request_id for o in r.outputs])
             for _, r in trace]
    assert steps == [
        (2, 14, 0, 0, ["a", "b"]),
        (2, 0, 2, 0, ["a", "b"]),
        (1, 0, 1, 1, ["a"]),  # a needs a 3rd block: b (newest) is preempted
        (1, 0, 1, 0, ["a"]),
        (1, 0, 1, 0, ["a"]),
        (1, 0, 1, 0, ["a"]),
        (1, 5, 0, 0, ["b"]),  # b recomputes 9 tokens, 4 of them a prefix hit on its own block
        (1, 0, 1, 0, ["b"]),
        (1, 0, 1, 0, ["b"]),
        (1, 0, 1, 0, ["b"]),
    ]
    assert (stats["b"].preemptions, stats["b"].num_output_tokens, len(tokens["b"])) == (1, 6, 6)
    assert stats["b"].num_cached_tokens == 0  # the first scheduling's figure, as vLLM keeps it
    assert e.counters.preemptions == 1 and e.pool.num_free_blocks == 4


def test_abort_frees_blocks_and_returns_abort_stats() -> None:
    e = engine()
    e.add_request(EngineRequest("a", list(range(30)), max_tokens=50), now=0.0)
    e.step(0.0)
    assert e.pool.num_used_blocks == 8
    out = e.abort("a", now=0.5)
    assert out.finished and out.stats.finish_reason == "abort" and out.stats.e2e_s == 0.5
    assert e.pool.num_used_blocks == 0 and not e.has_work()
    assert e.abort("a") is None


@pytest.mark.parametrize(
    "req",
    [
        EngineRequest("x", []),
        EngineRequest("x", list(range(256))),  # 64 usable blocks x 4 = max_model_len 256
        EngineRequest("x", [1, 2], max_tokens=0),
        EngineRequest("x", [-1, 2]),
    ],
)
def test_requests_that_can_never_run_are_rejected(req: EngineRequest) -> None:
    e = engine()
    with pytest.raises(RequestRejected):
        e.add_request(req, now=0.0)
    assert not e.has_work()


def test_duplicate_ids_are_rejected_and_output_is_capped_at_max_model_len() -> None:
    e = engine(max_model_len=12)
    e.add_request(EngineRequest("a", list(range(10)), max_tokens=100), now=0.0)
    with pytest.raises(RequestRejected):
        e.add_request(EngineRequest("a", [1], max_tokens=1), now=0.0)
    _, stats, _, _ = run(e)
    assert stats["a"].num_output_tokens == 2


def test_load_reports_queued_prefill_tokens() -> None:
    e = engine(max_num_batched_tokens=16)
    e.add_request(EngineRequest("a", list(range(40)), max_tokens=2), now=0.0)
    e.add_request(EngineRequest("b", list(range(100, 110)), max_tokens=2), now=0.0)
    assert e.load().queued_prefill_tokens == 50
    e.step(0.0)  # a takes the whole 16-token budget
    load = e.load()
    assert (load.running, load.waiting, load.queued_prefill_tokens) == (1, 1, 24 + 10)
    assert load.num_free_blocks == 60 and load.kv_usage == pytest.approx(4 / 64)


def test_drawn_output_lengths_come_from_the_rng_and_the_engine_is_deterministic() -> None:
    def go(seed: int):
        e = engine(seed=seed, mean_output_tokens=5)
        for i in range(6):
            e.add_request(EngineRequest(f"r{i}", [i % 2] * 9 + [i], max_tokens=None), now=0.01 * i)
        trace, stats, tokens, end = run(e)
        return [(s.num_output_tokens, s.num_cached_tokens) for s in stats.values()], tokens, end, e.pool.stats

    assert go(7) == go(7)
    assert go(7)[1] != go(8)[1]


def test_profiles_build_engines() -> None:
    e = EmulatedEngine(profile_or_config=get_profile("h100-8b"), rng=random.Random(0), max_num_seqs=4)
    assert e.config.max_num_seqs == 4 and e.config.num_gpu_blocks == get_profile("h100-8b").num_gpu_blocks
    e.add_request(EngineRequest("a", list(range(2000)), max_tokens=2), now=0.0)
    _, stats, _, _ = run(e)
    assert stats["a"].ttft_s == pytest.approx(get_profile("h100-8b").latency.prefill_s(new_tokens=2000))


@settings(max_examples=40)
@given(
    st.lists(
        st.tuples(st.integers(0, 2), st.integers(1, 40), st.integers(1, 12), st.floats(0, 0.05)),
        min_size=1, max_size=25,
    ),
    st.integers(6, 40),
    st.integers(1, 5),
)
def test_every_request_finishes_once_and_the_event_stream_matches_the_pool(reqs, num_blocks, max_seqs) -> None:
    e = engine(num_gpu_blocks=num_blocks, max_num_seqs=max_seqs, max_num_batched_tokens=24)
    prefixes = [list(range(1000 * p, 1000 * p + 40)) for p in range(3)]
    arrivals = []
    t = 0.0
    for i, (p, n, out, gap) in enumerate(reqs):
        t += gap
        prompt = (prefixes[p][:n] + [i])[: e.max_model_len - 1]
        arrivals.append((t, EngineRequest(f"r{i}", prompt, max_tokens=out)))
    now, index, stats, tokens = 0.0, Counter(), {}, Counter()
    pending = list(arrivals)
    for _ in range(5000):
        while pending and pending[0][0] <= now:
            e.add_request(pending.pop(0)[1], now=now)
        if not e.has_work():
            if not pending:
                break
            now = pending[0][0]
            continue
        res = e.step(now)
        assert res.duration_s > 0
        for o in res.outputs:
            assert o.request_id not in stats
            tokens[o.request_id] += len(o.new_token_ids)
            if o.finished:
                stats[o.request_id] = o.stats
        for ev in e.drain_events():
            if isinstance(ev, BlockStored):
                index.update(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                index.subtract(ev.block_hashes)
        now += res.duration_s
    assert sorted(stats) == sorted(r.request_id for _, r in arrivals)
    for _, r in arrivals:
        s = stats[r.request_id]
        cap = e.max_model_len - len(r.token_ids)
        assert s.num_output_tokens == tokens[r.request_id] == min(r.max_tokens, cap)
        assert 0 <= s.queue_s <= s.ttft_s <= s.e2e_s and s.num_cached_tokens < s.num_prompt_tokens
    assert e.pool.num_used_blocks == 0
    assert +index == Counter(e.pool.hasher.external(b.block_hash) for b in e.pool.cached_blocks())


def test_reset_with_running_requests_preempts_them_in_order_then_clears() -> None:
    e = engine()
    for i in range(3):
        e.add_request(EngineRequest(f"r{i}", [i] * 20, max_tokens=5), now=0.0)
    first = e.step(0.0)  # every prompt prefilled, one token each
    e.drain_events()
    assert e.reset_prefix_cache() is False
    assert e.reset_prefix_cache(reset_running_requests=True) is True
    assert [type(ev).__name__ for ev in e.drain_events()] == ["AllBlocksCleared"]
    assert [r.request_id for r in e._waiting] == ["r0", "r1", "r2"] and e.pool.num_used_blocks == 0
    _, stats, tokens, _ = run(e, now=1.0)
    assert all(s.preemptions == 1 and s.num_output_tokens == 5 for s in stats.values())
    assert all(len(first_tokens) == 1 for first_tokens in (o.new_token_ids for o in first.outputs))
    assert all(len(t) == 4 for t in tokens.values())  # the rest after recomputing prompt + first token
