"""Rejection causes and their one-line message; the context the simulator fits to a workload."""

from __future__ import annotations

import random

from sim.context import LONG_CONTEXT_TOKENS, fitted_max_model_len
from sim.rejections import CAPACITY, CONTEXT, OTHER, Rejections, all_rejected, rejection_message
from sim.trace import TraceRow, TraceWorkload
from sim.workloads import make_workload


def _rej(*adds: tuple[int, int, int | None]) -> Rejections:
    r = Rejections()
    for prompt, engine_mml, configured in adds:
        r.add(prompt_tokens=prompt, engine_max_model_len=engine_mml, configured_max_model_len=configured, message="m")
    return r


def test_causes():
    r = _rej((100, 64, 64), (90, 32, 64), (90, 32, None), (10, 64, 64))
    assert {c: t.count for c, t in r.by_cause.items()} == {CONTEXT: 1, CAPACITY: 2, OTHER: 1}
    assert r.by_cause[CAPACITY].longest_prompt_tokens == 90 and r.by_cause[CAPACITY].limits_tokens == {32}
    assert r.by_cause[OTHER].limits_tokens == set() and r.total == 4


def test_no_rejections_no_message():
    runs = {"kvr": (5, Rejections())}
    assert rejection_message(runs) is None and not all_rejected(runs)
    assert not all_rejected({"kvr": (0, Rejections())})


def test_single_run_message_has_no_policy_scope():
    assert rejection_message({"kvr": (5, _rej((100, 64, 64)))}) == (
        "1 of 5 requests rejected: prompt too long for max_model_len 64 tokens (longest prompt 100 tokens); "
        "raise it with --max-model-len"
    )


def test_different_counts_are_listed_per_run_and_limits_merged():
    # Mixed profiles: which worker a policy picks decides whether the request fits.
    runs = {"kvr": (10, _rej((100, 64, 64))), "random": (10, _rej((100, 64, 64), (300, 256, 256)))}
    assert rejection_message(runs) == (
        "requests rejected (kvr 1 of 10, random 2 of 10): prompt too long for max_model_len 64 or 256 tokens "
        "(longest prompt 300 tokens); raise it with --max-model-len"
    )
    assert not all_rejected(runs)


def test_several_causes_each_with_its_count_and_fix():
    r = Rejections()
    r.add(prompt_tokens=100, engine_max_model_len=64, configured_max_model_len=64, message="x")
    r.add(prompt_tokens=5, engine_max_model_len=64, configured_max_model_len=64,
          message="max_tokens must be >= 1, got 0")
    assert rejection_message({"kvr": (2, r), "random": (2, r)}) == (
        "2 of 2 requests rejected under every policy: 1 prompt too long for max_model_len 64 tokens (longest prompt "
        "100 tokens); raise it with --max-model-len; 1 refused by the engine (max_tokens must be >= 1, got 0)"
    )
    assert all_rejected({"kvr": (2, r)})


def test_fitted_max_model_len():
    assert fitted_max_model_len(longest_tokens=2434, cap_tokens=LONG_CONTEXT_TOKENS,
                                profile_max_model_lens=[2048]) == 2434
    assert fitted_max_model_len(longest_tokens=2048, cap_tokens=LONG_CONTEXT_TOKENS,
                                profile_max_model_lens=[2048]) is None
    assert fitted_max_model_len(longest_tokens=9000, cap_tokens=4096, profile_max_model_lens=[2048]) == 4096
    # one override for every worker: never below the largest profile's own context
    assert fitted_max_model_len(longest_tokens=3000, cap_tokens=LONG_CONTEXT_TOKENS,
                                profile_max_model_lens=[2048, 8192]) == 8192
    assert fitted_max_model_len(longest_tokens=3000, cap_tokens=2048, profile_max_model_lens=[2048, 8192]) is None


def test_workload_bounds_include_follow_ups():
    rng = random.Random(0)
    assert make_workload("gsp", rng).longest_request_tokens() == 2048 + 2 + 128 + 256
    assert make_workload("gsp", rng, {"num_turns": "3"}).longest_request_tokens() == 2434 + 2 * (128 + 256)
    assert make_workload("multiturn", rng).longest_request_tokens() == 512 + 64 + 4 * (512 + 64)
    assert make_workload("react", rng).longest_request_tokens() == 1200 + 100 + 80 + 5 * (150 + 80)
    assert make_workload("tot", rng).longest_request_tokens() == 300 + 200 + 32 + 256 + 3 * (32 + 256)
    assert make_workload("fanout", rng).longest_request_tokens() == 200 + 300 + 5 * 256 + 16 + 64


def test_trace_bound_and_scale():
    rows = [TraceRow(0.0, 1000, 64, (0, 1)), TraceRow(1.0, 1500, 512, (0, 1, 2))]
    compressed = TraceWorkload(rows, mapping="compressed", trace_block_tokens=512, block_size=16)
    assert compressed.longest_request_tokens() == 3 * 16 + 16  # 512 output tokens -> 16
    assert compressed.engine_tokens(LONG_CONTEXT_TOKENS) == 4096
    faithful = TraceWorkload(rows, mapping="faithful", trace_block_tokens=512, block_size=16)
    assert faithful.longest_request_tokens() == 1500 + 512
    assert faithful.engine_tokens(LONG_CONTEXT_TOKENS) == LONG_CONTEXT_TOKENS
