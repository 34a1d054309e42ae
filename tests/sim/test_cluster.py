"""The simulated cluster: determinism, a falsifiable policy claim, transport knobs, closed loop."""

from __future__ import annotations

import random

import pytest

from sim.cluster import ClusterConfig, SimCluster
from sim.report import comparison_report, run_policies, to_json
from sim.workload import AllAtOnce, Poisson
from sim.workloads import make_workload

GSP_SMALL = {"num_groups": 6, "prompts_per_group": 8, "system_prompt_len": 512, "question_len": 32, "output_len": 8}
CFG = ClusterConfig(num_workers=3, profile="h100-8b", engine_overrides={"num_gpu_blocks": 200})


def _run(policies, *, seed=1, config=CFG, params=GSP_SMALL, rate=20.0, workload="gsp"):
    results = run_policies(
        make_workload=lambda: make_workload(workload, random.Random(seed), params),
        make_arrivals=lambda: Poisson(rate_per_s=rate),
        policies=policies,
        config=config,
        seed=seed,
    )
    return results, comparison_report(results)


def test_same_seed_same_bytes_other_seed_differs():
    _, a = _run(["kvr", "random"])
    _, b = _run(["kvr", "random"])
    _, c = _run(["kvr", "random"], seed=2)
    assert to_json(a) == to_json(b)
    assert to_json(a) != to_json(c)
    assert set(a) == {"upper_bound", "policies"}
    row = a["policies"]["kvr"]
    for key in ("token_hit_rate", "predicted_hit_rate", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "throughput_rps",
                "load_cv", "evictions", "preemptions"):
        assert key in row
    assert row["requests"] == 48 and row["unfinished"] == 0 and row["rejected"] == 0


def test_kvr_beats_round_robin_hit_rate_on_shared_prefixes():
    # 6 groups of a 512-token prefix over 3 workers with 200 blocks each: round robin
    # spreads every group over every worker (each must hold all 6 prefixes: 6*32 blocks
    # + in-flight > 200), kvr keeps a group where its prefix is cached.
    _, rep = _run(["kvr", "round_robin"])
    kvr, rr = rep["policies"]["kvr"], rep["policies"]["round_robin"]
    assert kvr["token_hit_rate"] > rr["token_hit_rate"] + 0.1
    assert kvr["token_hit_rate"] <= rep["upper_bound"] + 1e-9
    assert 0.0 <= rr["token_hit_rate"] <= rep["upper_bound"] + 1e-9


def test_upper_bound_matches_gsp_formula():
    _, rep = _run(["round_robin"])
    # (P-1)/P of the 512-token system prompt (32 full blocks) over 512+2+32 tokens.
    assert rep["upper_bound"] == pytest.approx(7 / 8 * 512 / 546)


def test_event_delay_makes_predictions_stale_but_everything_finishes():
    slow = ClusterConfig(num_workers=3, profile="h100-8b", engine_overrides={"num_gpu_blocks": 200},
                         event_delay_s=5.0, router_options={"tentative_window_s": 0.0})
    res, rep = _run(["kvr"], config=slow)
    fold = res["kvr"].fold
    assert fold.summary()["event_lag_p50_s"] == pytest.approx(5.0)
    assert rep["policies"]["kvr"]["requests"] == 48 and rep["policies"]["kvr"]["unfinished"] == 0
    _, fresh = _run(["kvr"])
    assert rep["policies"]["kvr"]["token_hit_rate"] < fresh["policies"]["kvr"]["token_hit_rate"]


def test_peer_models_without_predict_on_route_run_without_it():
    def window(policy: str, config: ClusterConfig = CFG) -> float:
        cluster = SimCluster(workload=make_workload("gsp", random.Random(1), GSP_SMALL),
                             arrivals=Poisson(rate_per_s=20.0), policy=policy, config=config, seed=1)
        return cluster.router.tentative_window_s

    kvr_window = window("kvr")
    assert kvr_window > 0 and window("dynamo") == kvr_window
    assert window("llmd") == 0.0 and window("vllm_kv_aware") == 0.0
    explicit = ClusterConfig(num_workers=3, profile="h100-8b", router_options={"tentative_window_s": 2.0})
    assert window("vllm_kv_aware", explicit) == 2.0  # --tentative-s still wins
    assert CFG.router_options == {}  # the shared config is not written


def test_llmd_sees_engine_load_at_its_scrape_interval():
    def run(policy: str, heartbeat_s: float) -> tuple[SimCluster, list[float]]:
        config = ClusterConfig(num_workers=3, profile="h100-8b", engine_overrides={"num_gpu_blocks": 200},
                               heartbeat_interval_s=heartbeat_s)
        cluster = SimCluster(workload=make_workload("gsp", random.Random(1), GSP_SMALL),
                             arrivals=Poisson(rate_per_s=20.0), policy=policy, config=config, seed=1)
        times: list[float] = []
        real = cluster.router.update_load

        def spy(target, **load):
            times.append(cluster.q.now)
            real(target, **load)

        cluster.router.update_load = spy  # type: ignore[method-assign]
        cluster.run()
        return cluster, sorted(set(times))

    (llmd, llmd_times), (kvr, kvr_times) = run("llmd", 1.0), run("kvr", 1.0)
    assert llmd._scrape_interval_s == 0.05 and kvr._scrape_interval_s is None
    assert all(t == pytest.approx(round(t)) for t in kvr_times)  # heartbeats only, once a second
    gaps = [b - a for a, b in zip(llmd_times, llmd_times[1:], strict=False) if b - a > 1e-6]
    assert min(gaps) == pytest.approx(0.05) and max(gaps) == pytest.approx(0.05)
    assert len(llmd_times) > 10 * len(kvr_times)
    assert run("llmd", 0.0)[0]._scrape_interval_s is None  # always fresh already
    assert run("llmd", 0.02)[0]._scrape_interval_s is None  # the heartbeat is faster


def test_network_latency_adds_two_hops_to_ttft():
    params = {"num_groups": 1, "prompts_per_group": 1, "system_prompt_len": 64, "question_len": 16, "output_len": 4}
    base = ClusterConfig(num_workers=1, profile="h100-8b")
    slow = ClusterConfig(num_workers=1, profile="h100-8b", network_latency_s=0.05)
    _, a = _run(["round_robin"], config=base, params=params)
    _, b = _run(["round_robin"], config=slow, params=params)
    assert b["policies"]["round_robin"]["ttft_p50_s"] - a["policies"]["round_robin"]["ttft_p50_s"] == pytest.approx(0.1)


def test_closed_loop_multiturn_caps_concurrency_and_runs_every_round():
    params = {"num_clients": 6, "num_rounds": 3, "request_length": 64, "output_length": 40}
    wl = make_workload("multiturn", random.Random(0), params)
    cluster = SimCluster(workload=wl, arrivals=AllAtOnce(max_concurrency=2), policy="kvr", config=CFG, seed=0)
    seen = []
    orig = cluster._dispatch

    def spy(req, now):
        seen.append(len(cluster._inflight))
        orig(req, now)

    cluster._dispatch = spy
    result = cluster.run()
    assert result.requests == 18 and result.unfinished == 0
    assert max(seen) <= 1  # at most one other in flight when one is sent
    s = result.fold.summary()
    # round k>1 extends round k-1's prompt and answer: kvr should reuse most of it
    assert s["token_hit_rate"] > 0.4
    # the bound counts the answers' cached blocks too, so it really bounds the engine
    assert s["token_hit_rate"] <= result.upper_bound


@pytest.mark.parametrize(
    ("workload", "params", "arrivals"),
    [
        ("gsp", GSP_SMALL, lambda: Poisson(rate_per_s=20.0)),
        ("multiturn", {"num_clients": 8, "num_rounds": 3, "request_length": 64, "output_length": 12},
         lambda: AllAtOnce(max_concurrency=3)),
        ("tot", {"num_questions": 2, "output_len": 10, "depth": 3}, lambda: Poisson(rate_per_s=2.0)),
    ],
)
def test_decode_fast_path_changes_nothing_but_speed(workload, params, arrivals):
    def run(fast: bool):
        cfg = ClusterConfig(num_workers=3, profile="h100-8b", engine_overrides={"num_gpu_blocks": 200},
                            decode_fast_path=fast)
        res = run_policies(make_workload=lambda: make_workload(workload, random.Random(3), params),
                           make_arrivals=arrivals,
                           policies=["kvr", "least_loaded"], config=cfg, seed=3)
        return res, comparison_report(res)

    slow_res, slow = run(False)
    fast_res, fast = run(True)
    assert sum(r.fast_windows for r in fast_res.values()) > 0 and sum(r.fast_windows for r in slow_res.values()) == 0
    for rep in (slow, fast):
        for row in rep["policies"].values():
            row.pop("kv_usage_mean")  # sampled by heartbeats, which see a window's end state early
    # Equal up to float rounding: a window ends at now + (end - now), k steps at now + d0 + d1 + ...
    assert to_json(_rounded(fast)) == to_json(_rounded(slow))
    for name in slow_res:
        assert fast_res[name].fold.ttft_s == pytest.approx(slow_res[name].fold.ttft_s, rel=1e-12, abs=1e-12)


def _rounded(x):
    if isinstance(x, float):
        return float(f"{x:.10g}")
    if isinstance(x, dict):
        return {k: _rounded(v) for k, v in x.items()}
    return x


def test_one_profile_per_worker():
    cfg = ClusterConfig(num_workers=2, profile=["h100-8b", "a100-80gb-8b"], engine_overrides={"max_model_len": 4096})
    wl = make_workload("gsp", random.Random(0), GSP_SMALL)
    cluster = SimCluster(workload=wl, arrivals=Poisson(rate_per_s=5.0), policy="round_robin", config=cfg, seed=0)
    assert [e.config.num_gpu_blocks for e in cluster.engines] == [28063, 28044]
    assert [e.config.max_num_seqs for e in cluster.engines] == [1024, 256]
    res = cluster.run()
    assert res.requests == 48 and res.unfinished == 0
    with pytest.raises(ValueError, match="one per worker"):
        ClusterConfig(num_workers=3, profile=["h100-8b", "h100-8b"]).profiles()
