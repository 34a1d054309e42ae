"""Goodput (sim/goodput.py): the SLO predicate's clauses, the bracketing and bisection on a
known threshold, and the search against a brute-force scan of real simulator runs."""

from __future__ import annotations

import math
import random

import pytest

from sim import goodput as gp
from sim.cluster import ClusterConfig
from sim.report import run_policies
from sim.workload import Poisson
from sim.workloads import make_workload


def _stats(**kw) -> gp.ProbeStats:
    base = dict(ttft_p99_s=0.1, tpot_p99_s=0.01, token_hit_rate=0.5, throughput_rps=10.0, requests=100, rejected=0,
                unfinished=0, arrival_span_s=95.0, completion_span_s=100.0)
    return gp.ProbeStats(**{**base, **kw})


SLO = gp.Slo(ttft_p99_s=0.1)


def test_predicate_latency_clauses():
    assert gp.slo_verdict(_stats(), SLO) == []  # TTFT p99 at the bound meets it
    assert gp.slo_verdict(_stats(ttft_p99_s=0.1001), SLO) == [gp.TTFT]
    assert gp.slo_verdict(_stats(ttft_p99_s=math.nan), SLO) == [gp.TTFT]  # nothing finished: no latency to trust
    with_tpot = gp.Slo(ttft_p99_s=0.1, tpot_p99_s=0.01)
    assert gp.slo_verdict(_stats(), with_tpot) == []
    assert gp.slo_verdict(_stats(tpot_p99_s=0.011), with_tpot) == [gp.TPOT]
    assert gp.slo_verdict(_stats(tpot_p99_s=math.nan), with_tpot) == []  # no request decoded 2 tokens
    assert gp.slo_verdict(_stats(tpot_p99_s=5.0), SLO) == []  # no TPOT bound given


def test_predicate_rejections_and_unfinished_fail_whatever_the_latency():
    assert gp.slo_verdict(_stats(ttft_p99_s=0.001, rejected=1), SLO) == [gp.REJECTED]
    assert gp.slo_verdict(_stats(unfinished=2), SLO) == [gp.UNFINISHED]
    assert gp.slo_verdict(_stats(ttft_p99_s=1.0, rejected=1, unfinished=1, arrival_span_s=10.0), SLO) == [
        gp.TTFT, gp.REJECTED, gp.UNFINISHED, gp.THROUGHPUT]


def test_predicate_throughput_shortfall():
    # A / C: 95 of 100 s sustains exactly 95 % of the offered rate (met); 94.9 s does not.
    assert _stats(arrival_span_s=95.0).sustained_fraction == 0.95
    assert gp.slo_verdict(_stats(arrival_span_s=95.0), SLO) == []
    assert gp.slo_verdict(_stats(arrival_span_s=94.9), SLO) == [gp.THROUGHPUT]
    # Every request at once, or nothing finished: no sustained rate at all.
    assert _stats(arrival_span_s=0.0).sustained_fraction == 0.0
    assert _stats(arrival_span_s=0.0, completion_span_s=0.0).sustained_fraction == 0.0
    assert gp.slo_verdict(_stats(arrival_span_s=0.0, completion_span_s=0.0), SLO) == [gp.THROUGHPUT]
    assert gp.slo_verdict(_stats(arrival_span_s=50.0), gp.Slo(ttft_p99_s=0.1, min_throughput_fraction=0.5)) == []


def _threshold_run(threshold: float, calls: list[float]):
    """A fake probe: met iff load ≤ threshold (monotone)."""

    def run(load: float) -> gp.ProbeStats:
        calls.append(load)
        return _stats(ttft_p99_s=0.05 if load <= threshold else 0.2)

    return run


def test_search_brackets_up_checks_then_bisects():
    calls: list[float] = []
    res = gp.find_goodput(_threshold_run(5.3, calls), slo=SLO, start=1.0, tolerance=0.05)
    # double 1..8; check probe at 16; bisect [4, 8] until hi - lo <= 5 % of lo
    assert calls == [1.0, 2.0, 4.0, 8.0, 16.0, 6.0, 5.0, 5.5, 5.25]
    assert res.goodput == 5.25 and res.bracketed and res.non_monotone == []
    assert [p.met for p in res.probes] == [True, True, True, False, False, False, True, False, True]
    assert res.at_goodput.load == 5.25 and res.floor == 1.0


@pytest.mark.parametrize("threshold", [0.03, 0.3, 0.77, 1.0, 3.3, 100.0, 1000.0])
@pytest.mark.parametrize("tolerance", [0.01, 0.05, 0.2])
def test_search_lands_within_tolerance_below_the_threshold(threshold, tolerance):
    calls: list[float] = []
    res = gp.find_goodput(_threshold_run(threshold, calls), slo=SLO, start=1.0, tolerance=tolerance)
    assert res.goodput <= threshold < res.goodput * (1 + tolerance)
    assert len(calls) == len(set(calls)) == len(res.probes)  # no load probed twice


def test_search_none_when_nothing_meets():
    calls: list[float] = []
    res = gp.find_goodput(_threshold_run(0.001, calls), slo=SLO, start=1.0, max_halvings=3)
    assert res.goodput is None and res.at_goodput is None
    assert calls == [1.0, 0.5, 0.25, 0.125] and res.floor == 0.125
    rep = gp.goodput_report({"round_robin": res}, load=gp.LOAD_RATE, slo=SLO, start=1.0, tolerance=0.05, seed=0)
    assert "| round_robin | none | - | - | - | - | 4 | - |" in gp.goodput_table(rep)
    assert gp.summary_lines(rep) == ["no load meets the SLO for round_robin (lowest probed: 0.125 roots/s)"]


def test_search_unbracketed_is_a_lower_bound():
    calls: list[float] = []
    res = gp.find_goodput(_threshold_run(math.inf, calls), slo=SLO, start=2.0, max_doublings=3)
    assert calls == [2.0, 4.0, 8.0, 16.0] and res.goodput == 16.0 and not res.bracketed
    rep = gp.goodput_report({"kvr": res}, load=gp.LOAD_SPEEDUP, slo=SLO, start=2.0, tolerance=0.05, seed=0)
    assert "| kvr | ≥ 16 |" in gp.goodput_table(rep)
    assert gp.summary_lines(rep) == ["kvr: the SLO was still met at 16 × speed-up, the search's ceiling"]


def test_non_monotone_check_probe_is_reported_not_used():
    # Met below 3 and again at 8 (the check probe, twice the first failure at 4).
    res = gp.find_goodput(lambda x: _stats(ttft_p99_s=0.05 if x < 3 or x == 8 else 0.2), slo=SLO, start=1.0)
    assert res.goodput < 3 and res.non_monotone == [8.0]
    rep = gp.goodput_report({"kvr": res}, load=gp.LOAD_RATE, slo=SLO, start=1.0, tolerance=0.05, seed=0)
    note = f"kvr: not monotone: the SLO was met at 8 roots/s, above the goodput {res.goodput:.3g}"
    assert note in gp.summary_lines(rep)


def test_report_ratios():
    a = gp.find_goodput(_threshold_run(4.0, []), slo=SLO, start=1.0)
    b = gp.find_goodput(_threshold_run(2.0, []), slo=SLO, start=1.0)
    c = gp.find_goodput(_threshold_run(3.0, []), slo=SLO, start=1.0)
    assert (a.goodput, b.goodput, c.goodput) == (4.0, 2.0, 3.0)
    rep = gp.goodput_report({"round_robin": b, "kvr": a, "dynamo": c}, load=gp.LOAD_RATE, slo=SLO, start=1.0,
                            tolerance=0.05, seed=3)
    assert [row["vs_first"] for row in rep["policies"].values()] == [1.0, 2.0, 1.5]
    assert rep["kvr_vs_best_other"] == {"policy": "dynamo", "ratio": 4.0 / 3.0}
    assert gp.summary_lines(rep) == ["kvr / best other policy (dynamo): 1.33×"]
    assert rep["search"] == {"load": "rate_per_s",
                             "slo": {"ttft_p99_s": 0.1, "tpot_p99_s": None, "min_throughput_fraction": 0.95},
                             "start": 1.0, "tolerance": 0.05, "seed": 3}


def test_bad_search_settings():
    with pytest.raises(ValueError):
        gp.find_goodput(_threshold_run(1.0, []), slo=SLO, start=0.0)
    with pytest.raises(ValueError):
        gp.find_goodput(_threshold_run(1.0, []), slo=SLO, start=1.0, tolerance=1.0)


# ---- against real simulator runs --------------------------------------------

_GSP = {"num_groups": 6, "prompts_per_group": 16, "system_prompt_len": 512, "question_len": 32, "output_len": 8}
_CFG = ClusterConfig(num_workers=2, profile="h100-8b", engine_overrides={"num_gpu_blocks": 200})


def _sim_probe(policy: str):
    def run(rate: float) -> gp.ProbeStats:
        res = run_policies(make_workload=lambda: make_workload("gsp", random.Random(1), _GSP),
                           make_arrivals=lambda: Poisson(rate_per_s=rate), policies=[policy], config=_CFG, seed=1)
        return gp.probe_stats(res[policy])

    return run


def test_search_matches_a_brute_force_scan():
    # 96 requests on 2 workers; TTFT p99 crosses 35 ms between 60 and 70 req/s (the
    # throughput clause binds only near 80). The scan walks a 0.5 req/s grid up to its first
    # failure; the search must land within its tolerance (plus one grid step) of that.
    slo, tol = gp.Slo(ttft_p99_s=0.035), 0.05
    run = _sim_probe("round_robin")
    grid = [40 + 0.5 * k for k in range(61)]
    scan = None
    for rate in grid:
        if gp.slo_verdict(run(rate), slo):
            break
        scan = rate
    assert scan is not None and scan < grid[-1]
    res = gp.find_goodput(run, slo=slo, start=4.0, tolerance=tol)
    assert abs(res.goodput - scan) <= tol * scan + 0.5
    assert res.at_goodput.met and res.at_goodput.stats.requests == 96


def test_probe_stats_of_a_run():
    stats = _sim_probe("kvr")(20.0)
    assert stats.requests == 96 and stats.rejected == 0 and stats.unfinished == 0
    # Poisson arrivals at 20/s: 96 requests span about 95 / 20 s; the fleet keeps up.
    assert 3.0 < stats.arrival_span_s < stats.completion_span_s < stats.arrival_span_s + 1.0
    assert stats.throughput_rps == pytest.approx(96 / stats.completion_span_s)
    assert gp.slo_verdict(stats, gp.Slo(ttft_p99_s=1.0)) == []
