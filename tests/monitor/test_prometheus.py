from __future__ import annotations

from bus.schema import ErrorCode
from monitor.prometheus import render
from monitor.state import MonitorState
from tests.monitor.records import request, sample


def _lines(text: str, prefix: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.startswith(prefix)]


def test_exposition_has_counters_rates_histograms_and_worker_gauges():
    st = MonitorState(block_size=16)
    st.add(request("a", cached=48, predicted=48, ttft=0.02))
    st.add(request("b", cached=0, predicted=16, ttft=0.3, worker="w1"))
    st.add(request("c", worker=None, error=ErrorCode.OVERLOADED))
    st.add(sample("w0", kv=0.5, indexed=12, gaps=2, confidence="resyncing"))
    text = render(st)
    assert _lines(text, "kvr_requests_total{") == [
        'kvr_requests_total{cache_status="hit"} 1',
        'kvr_requests_total{cache_status="partial"} 0',
        'kvr_requests_total{cache_status="miss"} 1',
    ]
    assert _lines(text, "kvr_request_errors_total{") == ['kvr_request_errors_total{code="overloaded"} 1']
    assert "kvr_token_hit_rate 0.375" in text.splitlines()
    assert "kvr_predicted_token_hit_rate 0.5" in text.splitlines()
    ttft = _lines(text, "kvr_ttft_seconds_")
    assert 'kvr_ttft_seconds_bucket{le="0.025"} 1' in ttft
    assert 'kvr_ttft_seconds_bucket{le="0.25"} 1' in ttft
    assert 'kvr_ttft_seconds_bucket{le="0.5"} 2' in ttft
    assert 'kvr_ttft_seconds_bucket{le="+Inf"} 2' in ttft
    assert "kvr_ttft_seconds_count 2" in ttft
    assert 'kvr_ttft_by_cache_status_seconds_count{cache_status="miss"} 1' in text
    assert 'kvr_worker_kv_usage_ratio{worker="w0",dp_rank="0"} 0.5' in text
    assert 'kvr_worker_indexed_blocks{worker="w0",dp_rank="0"} 12' in text
    assert 'kvr_worker_event_gaps_total{worker="w0",dp_rank="0"} 2' in text
    assert 'kvr_worker_index_confidence{worker="w0",dp_rank="0",confidence="resyncing"} 1' in text
    assert 'kvr_worker_requests_total{worker="w1"} 1' in text
    assert "kvr_event_gaps_total 2" in text.splitlines()
    # every sample line belongs to a declared family
    declared = {ln.split()[2] for ln in text.splitlines() if ln.startswith("# TYPE")}
    for ln in text.splitlines():
        if ln and not ln.startswith("#"):
            name = ln.split("{")[0].split()[0]
            assert name in declared or name.rsplit("_", 1)[0] in declared, ln


def test_empty_state_renders_nan_rates_and_label_escaping():
    st = MonitorState()
    text = render(st)
    assert "kvr_token_hit_rate NaN" in text.splitlines()
    st.add(sample('w"x\\y/3'))
    assert 'kvr_worker_running{worker="w\\"x\\\\y",dp_rank="3"} 1' in render(st)
