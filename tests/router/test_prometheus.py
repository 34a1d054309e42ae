"""The router's /metrics exposition, read back with prometheus_client's parser."""

from __future__ import annotations

from bus.mirror_status import Cause
from router.prometheus import TARGET_FIELDS, render_metrics
from tests.prometheus_text import metric_samples, metric_value


def _target(confidence: str = "fresh", **kw) -> dict:
    return {"confidence": confidence, **{f: 0 for f in TARGET_FIELDS}, **kw}


STATS = {
    "counters": {"requests": 7, "trust_downgrades": 1},
    "workers": 2, "pending": 3, "indexed_blocks": 40,
    "targets": {"w1/0": _target(indexed_blocks=30, trust=1.0), 'odd"id\\x/1': _target("stale", indexed_blocks=10)},
    "mirror": {"state": "degraded", "cause": "out_of_memory", "since_s": 1.0, "failed_writes": 4},
}


def test_every_counter_and_gauge_reads_back_with_its_value() -> None:
    text = render_metrics(STATS)
    assert metric_value(text, "kvr_router_requests_total") == 7
    assert metric_value(text, "kvr_router_trust_downgrades_total") == 1
    assert (metric_value(text, "kvr_router_workers"), metric_value(text, "kvr_router_pending_requests"),
            metric_value(text, "kvr_router_indexed_blocks")) == (2, 3, 40)
    assert metric_value(text, "kvr_router_mirror_failed_writes") == 4
    degraded = {labels["cause"]: v for labels, v in metric_samples(text, "kvr_router_mirror_degraded")}
    assert degraded == {c.value: float(c is Cause.OUT_OF_MEMORY) for c in Cause}


def test_target_labels_survive_any_worker_id() -> None:
    """A worker id is whatever a worker says: quotes and backslashes are escaped, not mangled."""
    text = render_metrics(STATS)
    blocks = sorted((labels["worker"], labels["dp_rank"], labels["confidence"], v)
                    for labels, v in metric_samples(text, "kvr_router_target_indexed_blocks"))
    assert blocks == [("odd\"id\\x", "1", "stale", 10.0), ("w1", "0", "fresh", 30.0)]
    for field in TARGET_FIELDS:
        assert len(metric_samples(text, f"kvr_router_target_{field}")) == 2


def test_no_mirror_no_mirror_families() -> None:
    text = render_metrics({**STATS, "mirror": None, "targets": {}})
    assert metric_samples(text, "kvr_router_mirror_degraded") == []
    assert metric_samples(text, "kvr_router_target_trust") == []
