"""``EmulatedEngine.decode_steps`` (the simulator's fast path) equals stepping one by one."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from core.engine import EmulatedEngine, EngineConfig, EngineRequest
from core.events import BlockRemoved, BlockStored
from core.latency import StepLatencyModel

BS = 4
# kv-dependent decode cost, so per-step durations differ inside a window
LAT = StepLatencyModel(step_overhead_s=0.001, prefill_base_s=0.01, prefill_per_token_s=1e-4, decode_floor_s=0.005,
                       decode_per_seq_s=1e-4, kv_read_per_token_s=1e-6)


def _engine(seed: int, **kw) -> EmulatedEngine:
    cfg = dict(num_gpu_blocks=40, block_size=BS, max_num_seqs=3, max_num_batched_tokens=32, latency=LAT)
    cfg.update(kw)
    return EmulatedEngine(profile_or_config=EngineConfig(**cfg), rng=random.Random(seed))


def _requests(seed: int) -> list[tuple[float, EngineRequest]]:
    rng = random.Random(seed)
    shared = [rng.randrange(1000) for _ in range(12)]
    out = []
    t = 0.0
    for i in range(7):
        t += rng.expovariate(20.0)
        prompt = (shared if i % 2 else []) + [rng.randrange(1000) for _ in range(rng.randint(3, 14))]
        out.append((t, EngineRequest(f"r{i}", prompt, max_tokens=rng.randint(1, 25))))
    return out


def _drive(e: EmulatedEngine, arrivals, *, fast: bool):
    """Run to completion; with ``fast`` try decode_steps up to the next arrival first."""
    now, i = 0.0, 0
    tokens: dict[str, list[int]] = {}
    stats = {}
    events = []
    windows = 0
    while i < len(arrivals) or e.has_work():
        while i < len(arrivals) and arrivals[i][0] <= now:
            e.add_request(arrivals[i][1], now)
            i += 1
        if not e.has_work():
            now = arrivals[i][0]
            continue
        nxt = arrivals[i][0] if i < len(arrivals) else math.inf
        res = e.decode_steps(now, until_s=nxt) if fast else None
        if res is not None:
            windows += 1
        else:
            res = e.step(now)
        for o in res.outputs:
            tokens.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                stats[o.request_id] = o.stats
        events += e.drain_events()
        now += res.duration_s
    return tokens, stats, events, now, windows


def _event_summary(events):
    stored = Counter(h for ev in events if isinstance(ev, BlockStored) for h in ev.block_hashes)
    removed = [h for ev in events if isinstance(ev, BlockRemoved) for h in ev.block_hashes]
    return stored, removed


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("blocks", [40, 14])  # 14: decode evicts cached blocks and preempts
def test_decode_steps_equals_single_steps(seed: int, blocks: int) -> None:
    arrivals = _requests(seed)
    slow = _drive(_engine(seed, num_gpu_blocks=blocks), arrivals, fast=False)
    fast_engine = _engine(seed, num_gpu_blocks=blocks)
    fast = _drive(fast_engine, arrivals, fast=True)
    assert fast[0] == slow[0]  # every token of every request
    assert fast[4] > 0  # the fast path was taken
    for rid, s in slow[1].items():
        f = fast[1][rid]
        assert (f.num_cached_tokens, f.num_output_tokens, f.preemptions) == (
            s.num_cached_tokens, s.num_output_tokens, s.preemptions)
        assert f.ttft_s == pytest.approx(s.ttft_s, abs=1e-9) and f.e2e_s == pytest.approx(s.e2e_s, abs=1e-9)
    assert fast[3] == pytest.approx(slow[3], abs=1e-9)
    assert _event_summary(fast[2]) == _event_summary(slow[2])


def test_decode_steps_declines_when_a_step_is_not_pure_decode() -> None:
    e = _engine(0)
    assert e.decode_steps(0.0, until_s=1.0) is None  # idle
    e.add_request(EngineRequest("a", list(range(10)), max_tokens=5), 0.0)
    assert e.decode_steps(0.0, until_s=1.0) is None  # prefill pending
    res = e.step(0.0)
    now = res.duration_s
    assert e.decode_steps(now, until_s=now) is None  # no time before the next arrival
    e.add_request(EngineRequest("b", list(range(50, 60)), max_tokens=5), now)
    assert e.decode_steps(now, until_s=1.0) is None  # "b" waits and could be admitted
    e.step(now)
    res = e.decode_steps(now + 1.0, until_s=100.0)
    # "a" has 3 tokens left, "b" 4: the window stops where "a" finishes
    assert res is not None
    assert [(o.request_id, len(o.new_token_ids), o.finished) for o in res.outputs] == [("a", 3, True), ("b", 3, False)]
    assert e.decode_steps(now + 2.0, until_s=100.0) is None  # "b" has 1 token left: k < 2
