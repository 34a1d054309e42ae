"""kvr bench goodput: the live probe's statistics by hand, and a short live search."""

from __future__ import annotations

import math

import pytest

from bench.goodput import GoodputConfig, live_probe_stats, plot, run
from bus.client import RequestResult
from bus.schema import Completion, ErrorCode, ErrorReply
from sim.goodput import Slo, slo_verdict


def _done(rid: str, sent: float, first: float, end: float, *, prompt: int, cached: int, out: int) -> RequestResult:
    r = RequestResult(rid, sent)
    r.first_token_s, r.finished_s = first, end
    r.completion = Completion(rid, "w0", prompt, cached, out, "length")
    return r


def test_live_probe_stats_are_the_clients_view() -> None:
    results = [_done("a", 0.0, 0.1, 0.5, prompt=100, cached=0, out=5),  # TPOT (0.5 - 0.1) / 4 = 0.1
               _done("b", 1.0, 1.3, 1.4, prompt=100, cached=80, out=1),  # one token: no TPOT
               RequestResult("c", 2.0)]
    results[2].error, results[2].finished_s = ErrorReply("c", ErrorCode.OVERLOADED, "full"), 2.0
    stats = live_probe_stats(results, sent=4, unanswered=1)
    assert math.isclose(stats.tpot_p99_s, 0.1) and stats.token_hit_rate == 0.4
    assert (stats.requests, stats.rejected, stats.unfinished) == (4, 1, 1)
    assert (stats.arrival_span_s, stats.completion_span_s) == (2.0, 1.4)
    assert stats.ttft_p99_s == pytest.approx(0.1 + 0.99 * (0.3 - 0.1))
    assert slo_verdict(stats, Slo(ttft_p99_s=1.0)) == ["rejected", "unfinished"]
    empty = live_probe_stats([], sent=0, unanswered=0)
    assert math.isnan(empty.ttft_p99_s) and slo_verdict(empty, Slo(ttft_p99_s=1.0))[0] == "ttft_p99"


@pytest.mark.timeout(180)
def test_a_short_live_search_finds_a_goodput_and_plots_it(tmp_path) -> None:
    cfg = GoodputConfig.quick()
    cfg.policies = ("kvr",)
    cfg.out_dir = str(tmp_path / "runs")
    result = run(cfg)
    [row] = result.tables["goodput"]
    probes = result.tables["probes"]
    assert row["policy"] == "kvr" and row["probes"] == len(probes) >= 2
    assert [p["rate_workload"] for p in probes][:2] == [cfg.start_rate, 2 * cfg.start_rate]
    met = [p["rate_workload"] for p in probes if p["ttft_p99_s"] <= cfg.slo_ttft_p99_s and not p["rejected"]
           and not p["unfinished"] and p["sustained_fraction"] >= 0.95]
    assert row["goodput_rps_workload"] == (max(met) if met else None)
    [png] = plot(result, tmp_path)
    assert png.stat().st_size > 10_000
