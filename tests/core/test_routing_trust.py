"""RouterCore with trust weights (core/trust.py): a distrusted target's overlap counts less."""

from __future__ import annotations

import random
from collections import Counter, deque
from unittest.mock import patch

import pytest

from core.events import BlockStored
from core.policies import get_policy
from core.prefix_index import PrefixIndex, WorkerKey
from core.routing import RouterCore, RoutingInput
from core.trust import TrustConfig, TrustTracker

BS = 16
LIAR = WorkerKey("liar", 0)
HONEST = [WorkerKey(f"h{i}", 0) for i in range(3)]
FLEET = [LIAR, *HONEST]


def make(seed: int = 0) -> RouterCore:
    core = RouterCore(policy=get_policy("kvr", block_size=BS), index=PrefixIndex(block_size=BS), block_size=BS,
                      tentative_window_s=0.0, rng=random.Random(seed))
    for w in FLEET:
        core.register(w, capacity_blocks=10_000)
    return core


def store(core: RouterCore, target: WorkerKey, tokens: list[int]) -> None:
    """The ``BlockStored`` an engine publishes for ``tokens`` (full blocks, from the root)."""
    n = len(tokens) // BS
    ext: list[int | bytes] = [hash(("e", tuple(tokens[: (i + 1) * BS]))) & 0xFFFFFFFF for i in range(n)]
    core.index.apply(target, BlockStored(ext, None, tokens[: n * BS], BS, None, "GPU", None), now=0.0)


def prompt(i: int, blocks: int = 32) -> list[int]:
    return [i * 100_000 + t for t in range(blocks * BS + 1)]


@pytest.mark.parametrize("columns", [False, True])
def test_the_overlap_is_scaled_by_trust_and_the_prediction_is_not(columns: bool) -> None:
    with patch("core.routing.COLUMNS_MIN_TARGETS", 1 if columns else 10**9):
        core = make()
        p = prompt(1)
        store(core, LIAR, p)
        assert core.route(RoutingInput("a", p), now=0.0).decision.target == LIAR
        core.on_finish("a")
        core.set_trust(LIAR, 0.5)
        assert core.trust(LIAR) == 0.5 and core.trust(HONEST[0]) == 1.0
        res = core.route(RoutingInput("b", p), now=0.0)
        # Half of 32 blocks still beats nothing; the decision shows what was counted, the record
        # (and the closed loop's prediction) what the index claims.
        assert res.decision.target == LIAR and res.decision.overlap_blocks == 16
        assert res.in_flight.overlap_blocks == 32 and res.in_flight.predicted_cached_tokens == 32 * BS
        core.on_finish("b")
        core.set_trust(LIAR, 0.0)  # counts for nothing: all four tie, fewer in flight, then random
        targets: Counter[WorkerKey] = Counter()
        for i in range(200):
            targets[core.route(RoutingInput(f"c{i}", p), now=0.0).decision.target] += 1
            core.on_finish(f"c{i}")
        assert set(targets) == set(FLEET)
        core.set_trust(LIAR, 1.0)
        assert core.route(RoutingInput("d", p), now=0.0).decision.target == LIAR
        with pytest.raises(ValueError):
            core.set_trust(LIAR, 1.5)


def test_unregister_forgets_trust() -> None:
    core = make()
    core.set_trust(LIAR, 0.0)
    core.unregister(LIAR)
    core.register(LIAR)
    assert core.trust(LIAR) == 1.0


def run(core: RouterCore, tracker: TrustTracker, rng: random.Random, *, requests: int, start: int, now: float,
        liar_lies: bool, prompts: int = 8, apply: bool = True) -> tuple[float, int]:
    """A closed loop: requests for ``prompts`` prompts, the first 8 of them hot (half the traffic
    with more), at most 8 requests in flight (the oldest finishes first).

    Honest workers cache what they serve (and publish it); the liar, while ``liar_lies``, reports
    nothing cached whatever the index claims. Returns the liar's share of the requests and the
    number of trust changes (applied to the core as the router would, unless not ``apply``)."""
    hot = [prompt(i) for i in range(8)]
    others = [prompt(i) for i in range(8, prompts)]
    in_flight: deque[str] = deque()
    routed: Counter[WorkerKey] = Counter()
    changes = 0

    def finish(key: str) -> None:
        nonlocal changes
        rec = core.on_finish(key)
        assert rec is not None
        reported = 0 if (rec.target == LIAR and liar_lies) else rec.predicted_cached_tokens
        change = tracker.observe(rec.target, predicted_tokens=rec.predicted_cached_tokens,
                                 reported_tokens=reported, now=now)
        if change is not None:
            changes += 1
            if apply:
                core.set_trust(change.target, change.weight)

    for n in range(start, start + requests):
        p = rng.choice(others if others and rng.random() < 0.5 else hot)
        key = f"r{n}"
        res = core.route(RoutingInput(key, p), now=now)
        routed[res.decision.target] += 1
        if res.decision.target != LIAR or not liar_lies:
            store(core, res.decision.target, p)
        in_flight.append(key)
        if len(in_flight) >= 8:
            finish(in_flight.popleft())
    while in_flight:
        finish(in_flight.popleft())
    return routed[LIAR] / requests, changes


def test_a_liar_loses_its_traffic_after_its_shortfall_and_recovers_once_honest() -> None:
    core = make(seed=1)
    tracker = TrustTracker(config=TrustConfig(min_samples=8, min_distrusted_s=10.0))
    rng = random.Random(7)
    for i in range(8):
        store(core, LIAR, prompt(i))  # claims every hot prompt, holds none
    # Trusted, it draws most of the traffic (up to the load bound) until the evidence adds up.
    share, changes = run(core, tracker, rng, requests=16, start=0, now=0.0, liar_lies=True)
    assert changes == 1 and tracker.weight(LIAR) == 0.0 and core.trust(LIAR) == 0.0
    assert share > 0.5  # 11 of 16 here
    # Distrusted: the honest workers, who learned the hot prompts from the liar's spill, take them.
    share, changes = run(core, tracker, rng, requests=400, start=100, now=1.0, liar_lies=True)
    assert changes == 0 and share < 0.05  # fair share: 0.25 (6 of 400 here)
    # It turns honest (caches what it serves); once the hold is over, agreement on the prompts it
    # gets by load (new ones, then their repeats) restores it.
    core.index.clear_target(LIAR)  # the router's resync on the downgrade
    share, changes = run(core, tracker, rng, requests=400, start=1000, now=20.0, liar_lies=False, prompts=48)
    assert share > 0.05
    assert tracker.weight(LIAR) == 1.0 and core.trust(LIAR) == 1.0 and changes == 1


def test_without_the_weight_the_liar_keeps_its_traffic() -> None:
    """The control: the same loop, the trust changes not applied."""
    core = make(seed=1)
    tracker = TrustTracker(config=TrustConfig(min_samples=8))
    for i in range(8):
        store(core, LIAR, prompt(i))
    share, changes = run(core, tracker, random.Random(7), requests=400, start=0, now=0.0, liar_lies=True,
                         apply=False)
    assert changes == 1 and share > 0.4  # 174 of 400 here, against the fair 0.25
