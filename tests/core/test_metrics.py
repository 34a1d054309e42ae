"""The metrics fold: exact values on hand-computed records, merge and JSON round trip."""

from __future__ import annotations

import json
import math

import msgspec
import numpy as np
import pytest

from core.events import AllBlocksCleared, BlockRemoved, BlockStored
from core.metrics import (
    MetricsFold,
    RequestRecord,
    cache_status,
    infinite_cache_upper_bound,
    percentile,
)


def rec(i: int, worker: str, *, arrival: float, ttft: float, e2e: float, prompt: int, cached: int, out: int,
        pred=None, pre=0):
    return RequestRecord(
        request_id=f"r{i}",
        worker_id=worker,
        arrival_s=arrival,
        ttft_s=ttft,
        e2e_s=e2e,
        prompt_tokens=prompt,
        cached_tokens=cached,
        output_tokens=out,
        predicted_cached_tokens=pred,
        preemptions=pre,
    )


RECORDS = [
    rec(0, "w0", arrival=0.0, ttft=0.5, e2e=1.5, prompt=100, cached=0, out=11, pred=0),
    rec(1, "w1", arrival=1.0, ttft=0.1, e2e=0.6, prompt=100, cached=96, out=6, pred=96),
    rec(2, "w0", arrival=2.0, ttft=0.3, e2e=0.3, prompt=200, cached=32, out=1, pred=64, pre=2),
    rec(3, "w0", arrival=12.0, ttft=0.2, e2e=2.2, prompt=64, cached=48, out=3),
]


def test_percentile_matches_numpy_linear():
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0])
    for q in (0, 10, 50, 90, 99, 100):
        assert percentile(values, q) == pytest.approx(float(np.percentile(values, q)), abs=1e-12)
    assert math.isnan(percentile([], 50))


def test_cache_status_boundaries():
    # 100 prompt tokens: 6 full blocks reusable (96), last token recomputed.
    assert cache_status(100, 0, 16) == "miss"
    assert cache_status(100, 80, 16) == "partial"
    assert cache_status(100, 96, 16) == "hit"
    # Exactly 64 tokens: only 3 blocks (48) reusable since token 64 is recomputed.
    assert cache_status(64, 48, 16) == "hit"
    assert cache_status(64, 32, 16) == "partial"


def test_summary_values_by_hand():
    f = MetricsFold(block_size=16, timeline_bucket_s=10.0)
    for w in ("w0", "w1", "w2"):
        f.register_worker(w)
    for r in RECORDS:
        f.add_request(r)
    s = f.summary()
    assert s["requests"] == 4
    assert s["token_hit_rate"] == pytest.approx((0 + 96 + 32 + 48) / (100 + 100 + 200 + 64))
    assert s["predicted_hit_rate"] == pytest.approx((0 + 96 + 64) / 400)
    assert s["prefill_tokens_computed"] == 464 - 176
    assert s["ttft_p50_s"] == pytest.approx(0.25)
    assert s["ttft_p99_s"] == pytest.approx(float(np.percentile([0.5, 0.1, 0.3, 0.2], 99)))
    # TPOT only for >= 2 output tokens: (1.0/10, 0.5/5, 2.0/2)
    assert s["tpot_p50_s"] == pytest.approx(0.1)
    assert s["tpot_mean_s"] == pytest.approx((0.1 + 0.1 + 1.0) / 3)
    assert s["duration_s"] == pytest.approx(14.2)
    assert s["throughput_rps"] == pytest.approx(4 / 14.2)
    assert s["output_tokens_per_s"] == pytest.approx(21 / 14.2)
    assert s["by_cache_status"]["miss"]["requests"] == 1
    assert s["by_cache_status"]["hit"]["requests"] == 2  # r1 (96 of 96) and r3 (48 of 48)
    assert s["by_cache_status"]["partial"]["requests"] == 1
    assert s["by_cache_status"]["hit"]["ttft_p50_s"] == pytest.approx(0.15)
    counts = [3, 1, 0]
    mean = sum(counts) / 3
    assert s["load_cv"] == pytest.approx(math.sqrt(sum((c - mean) ** 2 for c in counts) / 3) / mean)
    assert s["max_over_mean_load"] == pytest.approx(3 / mean)
    assert s["preemptions"] == 2
    # cached blocks 0, 6, 2, 3 -> buckets 0, 4, 2, 2
    assert s["match_blocks_hist"] == {"0": 1, "2": 2, "4": 1}
    assert s["per_worker"]["w2"]["requests"] == 0
    assert s["per_worker"]["w1"]["token_hit_rate"] == pytest.approx(0.96)


def test_load_samples_events_and_lag():
    f = MetricsFold()
    f.observe_load("w0", 1.0, kv_usage=0.2, queued_prefill_tokens=100)
    f.observe_load("w0", 2.0, kv_usage=0.6)
    f.observe_load("w1", 15.0, kv_usage=1.0)
    stored = BlockStored(block_hashes=[1, 2, 3], parent_block_hash=None, token_ids=[0] * 48, block_size=16,
                         lora_id=None, medium="GPU", lora_name=None)
    f.observe_kv_events("w0", [stored, BlockRemoved(block_hashes=[1, 2], medium="GPU"), AllBlocksCleared()])
    for lag in (0.01, 0.02, 0.5):
        f.observe_event_lag(lag)
    f.count_gap()
    f.count_replay(2)
    f.add_request(rec(0, "w0", arrival=0.0, ttft=1.0, e2e=10.0, prompt=32, cached=0, out=2))
    s = f.summary()
    assert s["kv_usage_mean"] == pytest.approx(1.8 / 3)
    assert s["kv_usage_max"] == 1.0
    assert (s["blocks_stored"], s["evictions"], s["cache_clears"]) == (3, 2, 1)
    assert s["eviction_rate_per_s"] == pytest.approx(0.2)
    assert s["per_worker"]["w0"]["evictions"] == 2
    assert s["event_lag_p50_s"] == pytest.approx(0.02)
    assert s["event_lag_max_s"] == 0.5
    assert (s["event_gaps"], s["event_replays"]) == (1, 2)
    ts = f.timeline_series()
    assert ts["t_s"] == [0.0, 10.0]
    assert ts["kv_usage"]["w0"][0] == pytest.approx(0.4)
    assert math.isnan(ts["kv_usage"]["w0"][1])
    assert ts["kv_usage"]["w1"][1] == 1.0
    assert ts["requests"]["w0"] == [1, 0]


def test_merge_equals_single_fold_and_json_round_trip():
    whole = MetricsFold()
    a, b = MetricsFold(), MetricsFold()
    for i, r in enumerate(RECORDS):
        whole.add_request(r)
        (a if i % 2 else b).add_request(r)
    whole.observe_load("w0", 3.0, kv_usage=0.5)
    b.observe_load("w0", 3.0, kv_usage=0.5)
    merged = MetricsFold.from_dict(json.loads(json.dumps(a.to_dict()))).merge(b)
    assert json.dumps(merged.summary(), sort_keys=True) == json.dumps(whole.summary(), sort_keys=True)
    assert merged.timeline_series() == whole.timeline_series()
    again = MetricsFold.from_dict(json.loads(json.dumps(whole.to_dict())))
    assert again.to_dict() == whole.to_dict()


def test_merge_rejects_other_block_size():
    with pytest.raises(ValueError):
        MetricsFold(block_size=16).merge(MetricsFold(block_size=32))


def test_empty_fold_summary_is_nan_not_error():
    s = MetricsFold().summary()
    assert s["requests"] == 0
    assert math.isnan(s["token_hit_rate"]) and math.isnan(s["ttft_p99_s"]) and math.isnan(s["load_cv"])


def test_infinite_cache_upper_bound():
    reqs = [
        (["a", "b", "c"], 50),  # nothing seen
        (["a", "b", "x"], 48),  # prefix a,b = 32; vLLM cap floor(47/16)*16 = 32
        (["a", "b", "c"], 49),  # all 3 = 48; cap floor(48/16)*16 = 48
        (["q", "b", "c"], 60),  # chain broken at first block: 0
    ]
    assert infinite_cache_upper_bound(reqs, block_size=16) == pytest.approx((0 + 32 + 48 + 0) / 207)
    # Without vLLM's recomputed last token, a fully cached 48-token prompt hits 48.
    reqs2 = [(["a", "b", "c"], 48), (["a", "b", "c"], 48)]
    assert infinite_cache_upper_bound(reqs2, block_size=16, last_token_recomputed=False) == pytest.approx(0.5)
    assert infinite_cache_upper_bound(reqs2, block_size=16) == pytest.approx(32 / 96)
    assert math.isnan(infinite_cache_upper_bound([], block_size=16))


def test_upper_bound_zero_token_entries_only_add_blocks():
    # a decode's blocks ("d") become reusable by a later prompt
    reqs = [(["a"], 20), (["a", "d"], 0), (["a", "d", "e"], 50)]
    assert infinite_cache_upper_bound(reqs, block_size=16) == pytest.approx(32 / 70)


def test_exact_fold_dict_has_lists_and_no_bounded_keys():
    f = MetricsFold()
    for r in RECORDS:
        f.add_request(r)
    d = f.to_dict()
    assert d["ttft_s"] == [0.5, 0.1, 0.3, 0.2] and isinstance(d["ttft_s"], list)
    assert "relative_accuracy" not in d and "max_timeline_buckets" not in d


def test_bounded_fold_keeps_exact_counts_and_quantiles_within_its_accuracy():
    exact = MetricsFold()
    bounded = MetricsFold(relative_accuracy=0.01, max_timeline_buckets=8)
    for f in (exact, bounded):
        for r in RECORDS:
            f.add_request(r)
        f.observe_event_lag(0.004)
        f.observe_event_lag(0.0)
    se, sb = exact.summary(), bounded.summary()
    for key in ("requests", "prompt_tokens", "cached_tokens", "output_tokens", "token_hit_rate", "load_cv"):
        assert sb[key] == se[key]
    assert sb["ttft_mean_s"] == pytest.approx(se["ttft_mean_s"], rel=1e-12)
    assert sb["event_lag_max_s"] == 0.004 and sb["by_cache_status"]["miss"]["requests"] == 1
    for key in ("ttft_p50_s", "ttft_p90_s", "e2e_p50_s", "tpot_p50_s"):
        # 4 values: linear interpolation puts p50 between two of them; the sketch returns the lower one.
        assert sb[key] <= se[key] * 1.01
    again = MetricsFold.from_dict(json.loads(json.dumps(bounded.to_dict())))
    assert again.to_dict() == bounded.to_dict() and again.max_timeline_buckets == 8
    assert json.dumps(again.summary(), sort_keys=True) == json.dumps(sb, sort_keys=True)


def test_bounded_timeline_coarsens_by_doubling_and_keeps_totals():
    f = MetricsFold(timeline_bucket_s=1.0, max_timeline_buckets=4, relative_accuracy=0.01)
    for i in range(10):  # one request per second, t = 0..9
        f.add_request(rec(i, "w0", arrival=float(i), ttft=0.1, e2e=0.2, prompt=10, cached=i, out=2))
    # 4 buckets of 1 s fill at t = 3; t = 4 doubles to 2 s (2 buckets) ... t = 8 doubles to 4 s.
    assert f.timeline_bucket_s == 4.0 and sorted(f.timeline) == [0, 1, 2]
    assert [f.timeline[i]["requests"] for i in (0, 1, 2)] == [4, 4, 2]
    assert [f.timeline[i]["cached_tokens"] for i in (0, 1, 2)] == [6, 22, 17]
    assert f.timeline_series()["t_s"] == [0.0, 4.0, 8.0]


def test_merge_coarsens_the_finer_timeline():
    fine = MetricsFold(timeline_bucket_s=1.0)
    wide = MetricsFold(timeline_bucket_s=4.0)
    for i in range(6):
        fold = fine if i % 2 else wide
        fold.add_request(rec(i, "w0", arrival=float(i), ttft=0.1, e2e=0.2, prompt=10, cached=0, out=1))
    merged = MetricsFold.from_dict(fine.to_dict()).merge(wide)
    assert merged.timeline_bucket_s == 4.0 and {k: b["requests"] for k, b in merged.timeline.items()} == {0: 4, 1: 2}
    assert MetricsFold.from_dict(wide.to_dict()).merge(fine).timeline == merged.timeline
    with pytest.raises(ValueError):
        fine.merge(MetricsFold(timeline_bucket_s=3.0))
    with pytest.raises(ValueError):
        fine.merge(MetricsFold(timeline_bucket_s=1.0, relative_accuracy=0.01))


def test_the_fold_refuses_a_failed_request():
    """One record for served and failed requests; the fold's figures are of served ones only."""
    fold = MetricsFold(block_size=16)
    failed = msgspec.structs.replace(RECORDS[0], error="timeout")
    no_worker = msgspec.structs.replace(RECORDS[0], worker_id=None)
    for bad in (failed, no_worker):
        with pytest.raises(ValueError):
            fold.add_request(bad)
    assert fold.counters["requests"] == 0 and RECORDS[0].finish_s == RECORDS[0].arrival_s + RECORDS[0].e2e_s
