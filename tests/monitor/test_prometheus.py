"""The monitor's Prometheus exposition, read back with prometheus_client's own parser (as a
scraper would), so the tests pin names, labels and values rather than number formatting."""

from __future__ import annotations

import math

from prometheus_client.parser import text_string_to_metric_families

from bus.schema import ErrorCode
from monitor.prometheus import render
from monitor.state import MonitorState
from tests.monitor.records import request, sample


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, for every sample of every family."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def _types(text: str) -> dict[str, str]:
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_exposition_has_counters_rates_histograms_and_worker_gauges():
    st = MonitorState(block_size=16)
    st.add(request("a", cached=48, predicted=48, ttft=0.02))
    st.add(request("b", cached=0, predicted=16, ttft=0.3, worker="w1"))
    st.add(request("c", worker=None, error=ErrorCode.OVERLOADED))
    st.add(sample("w0", kv=0.5, indexed=12, gaps=2, confidence="resyncing"))
    text = render(st)
    got = _samples(text)
    assert {k[1][0][1]: v for k, v in got.items() if k[0] == "kvr_requests_total"} == {
        "hit": 1, "partial": 0, "miss": 1}
    assert got[("kvr_request_errors_total", (("code", "overloaded"),))] == 1
    assert got[("kvr_token_hit_rate", ())] == 0.375
    assert got[("kvr_predicted_token_hit_rate", ())] == 0.5
    assert got[("kvr_ttft_seconds_bucket", (("le", "0.025"),))] == 1
    assert got[("kvr_ttft_seconds_bucket", (("le", "0.25"),))] == 1
    assert got[("kvr_ttft_seconds_bucket", (("le", "0.5"),))] == 2
    assert got[("kvr_ttft_seconds_bucket", (("le", "+Inf"),))] == 2
    assert got[("kvr_ttft_seconds_count", ())] == 2
    assert math.isclose(got[("kvr_ttft_seconds_sum", ())], 0.32, rel_tol=0.02)  # sketch: 1 % per value
    assert got[("kvr_ttft_by_cache_status_seconds_count", (("cache_status", "miss"),))] == 1
    w0 = (("dp_rank", "0"), ("worker", "w0"))
    assert got[("kvr_worker_kv_usage_ratio", w0)] == 0.5
    assert got[("kvr_worker_indexed_blocks", w0)] == 12
    assert got[("kvr_worker_event_gaps_total", w0)] == 2
    assert got[("kvr_worker_index_confidence", (("confidence", "resyncing"), *w0))] == 1
    assert got[("kvr_worker_requests_total", (("worker", "w1"),))] == 1
    assert got[("kvr_event_gaps_total", ())] == 2
    types = _types(text)
    assert types["kvr_requests"] == "counter" and types["kvr_ttft_seconds"] == "histogram"
    assert types["kvr_token_hit_rate"] == "gauge" and types["kvr_worker_running"] == "gauge"


def test_empty_state_renders_nan_rates_and_label_escaping():
    st = MonitorState()
    assert math.isnan(_samples(render(st))[("kvr_token_hit_rate", ())])
    st.add(sample('w"x\\y/3'))
    text = render(st)
    # The label's quote and backslash survive a round trip through the text format.
    assert _samples(text)[("kvr_worker_running", (("dp_rank", "3"), ("worker", 'w"x\\y')))] == 1
