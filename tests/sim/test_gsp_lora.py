"""gsp with LoRA adapters: one system prompt under several adapters, each pair a prefix of its own."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from sim.cluster import ClusterConfig
from sim.report import comparison_report, run_policies
from sim.workload import Poisson
from sim.workloads import make_workload

SMALL = {"num_groups": 4, "prompts_per_group": 12, "system_prompt_len": 256, "question_len": 16, "output_len": 4}


def _requests(params):
    wl = make_workload("gsp", random.Random(5), params)
    return [wl.root_requests(i)[0] for i in range(wl.num_roots())]


def test_each_request_names_one_of_the_adapters_and_prompts_are_shared_across_them():
    reqs = _requests({**SMALL, "lora_adapters": 3})
    assert Counter(r.lora_name for r in reqs).keys() == {"lora-0", "lora-1", "lora-2"}
    by_group = {g: {r.lora_name for r in reqs if r.group == g} for g in range(4)}
    assert all(len(adapters) >= 2 for adapters in by_group.values())  # 12 draws over 3 adapters per group
    # The adapters are drawn after everything else: the prompts are those of the plain workload.
    plain = _requests(SMALL)
    assert [r.token_ids for r in reqs] != [] and all(r.lora_name is None for r in plain)
    assert sorted(map(tuple, (r.token_ids for r in reqs))) == sorted(map(tuple, (r.token_ids for r in plain)))


def test_a_follow_up_turn_keeps_its_conversations_adapter():
    wl = make_workload("gsp", random.Random(5), {**SMALL, "lora_adapters": 3, "num_turns": 2})
    first = wl.root_requests(0)[0]
    (second,) = wl.follow_ups(first, [7, 8, 9])
    assert second.lora_name == first.lora_name is not None
    assert second.token_ids[:len(first.token_ids)] == first.token_ids


def test_negative_adapters_are_refused():
    with pytest.raises(ValueError, match="lora_adapters"):
        make_workload("gsp", random.Random(0), {**SMALL, "lora_adapters": -1})


def test_the_router_predicts_exactly_what_the_engines_cache_under_adapters():
    """vLLM hashes the adapter into every block: a prompt cached under one adapter is a miss
    under another. kvr's index keys blocks the same way, so its predictions equal the engines'
    hits; the adapters split every prefix four ways, so the hit rate falls."""
    cfg = ClusterConfig(num_workers=3, profile="h100-8b", engine_overrides={"num_gpu_blocks": 400})

    def run(params):
        results = run_policies(make_workload=lambda: make_workload("gsp", random.Random(2), params),
                               make_arrivals=lambda: Poisson(rate_per_s=20.0), policies=["kvr"], config=cfg, seed=2)
        return comparison_report(results)["policies"]["kvr"]

    with_adapters, without = run({**SMALL, "lora_adapters": 4}), run(SMALL)
    assert with_adapters["predicted_hit_rate"] == pytest.approx(with_adapters["token_hit_rate"])
    assert 0 < with_adapters["token_hit_rate"] < without["token_hit_rate"]
