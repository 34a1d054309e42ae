"""A long monitor run in memory: the state's containers stop growing, its figures stay right.

200,000 synthetic request records (30 req/s for ~1.9 h of publisher time) with
worker samples every second, a series point every second and an error every
500 requests. The state's stored sizes (values, sketch bins, buckets, entries:
deterministic, unlike RSS) after 100k and 200k records are the same; counts are
exact and quantiles within the stated 1 % of numpy's.
"""

from __future__ import annotations

import math

import numpy as np

from bus.schema import ErrorCode
from monitor.state import MonitorState
from tests.monitor.records import request, sample

N = 200_000
RATE_PER_S = 30.0
WORKERS = ("w0", "w1", "w2", "w3")


def _feed(st: MonitorState, ttft: np.ndarray, e2e: np.ndarray, start: int, stop: int) -> None:
    for i in range(start, stop):
        t = i / RATE_PER_S
        error = ErrorCode.NO_WORKERS if i % 500 == 499 else None
        st.add(request(f"r{i}", worker=None if error else WORKERS[i % 4], t=t, prompt=64 + i % 7, cached=16 * (i % 3),
                       ttft=float(ttft[i]), e2e=float(e2e[i]), output=1 + i % 9, error=error))
        if i % 30 == 0:
            st.add(sample(WORKERS[(i // 30) % 4], t=t, kv=0.5, evictions=i // 30))
            st.tick(t)


def test_state_sizes_stop_growing_and_quantiles_stay_within_one_percent():
    rng = np.random.default_rng(7)
    # Log-uniform latencies: every sketch's range (2 ms..20 s, 10 ms..60 s) is reached early,
    # so its bins stop growing; the count keeps rising.
    ttft = np.exp(rng.uniform(math.log(0.002), math.log(20.0), N))
    e2e = ttft + np.exp(rng.uniform(math.log(0.01), math.log(60.0), N))
    st = MonitorState(bucket_s=5.0, max_series=600, max_incidents=100, max_timeline_buckets=64)
    _feed(st, ttft, e2e, 0, N // 2)
    half = st.stored_sizes()
    _feed(st, ttft, e2e, N // 2, N)
    full = st.stored_sizes()
    # The window holds the requests since the last series point: at most one interval's (30 here).
    assert half.pop("window_ttft") <= 30 and full.pop("window_ttft") <= 30
    # The series is thinned when it passes 600 points: between 451 and 600 from then on.
    assert 451 <= half.pop("series") <= 600 and 451 <= full.pop("series") <= 600
    assert full == half
    assert half["incidents"] == 100 and half["recent_requests"] == 50
    assert half["fold_timeline_buckets"] <= 64 and half["fold_distribution_values"] <= 9 * 2 * 2048

    ok = np.array([i % 500 != 499 for i in range(N)])
    s = st.fold.summary()
    assert s["requests"] == int(ok.sum()) and sum(st.errors_by_code.values()) == N - int(ok.sum())
    assert s["prompt_tokens"] == sum(64 + i % 7 for i in range(N) if ok[i])
    assert s["output_tokens"] == sum(1 + i % 9 for i in range(N) if ok[i])
    assert math.isclose(s["ttft_mean_s"], float(ttft[ok].mean()), rel_tol=1e-9)
    for name, values in (("ttft", ttft[ok]), ("e2e", e2e[ok])):
        ordered = np.sort(values)
        for q in (50, 99):
            exact = float(np.percentile(values, q))
            rank = (len(values) - 1) * q / 100
            step = ordered[math.ceil(rank)] - ordered[math.floor(rank)]
            assert abs(s[f"{name}_p{q}_s"] - exact) <= 0.01 * exact + step, (name, q)


def test_series_thins_its_older_half_when_full():
    st = MonitorState(sample_interval_s=1.0, max_series=8)
    for t in range(9):
        st.tick(float(t))
    # 9 points > 8: the older half (t = 0..3) keeps t = 0 and 2; the newer half stays whole.
    assert [p["t_s"] for p in st.series] == [0.0, 2.0, 4.0, 5.0, 6.0, 7.0, 8.0]
    for t in range(9, 11):
        st.tick(float(t))
    # t = 10 makes 9 again: the older half (0, 2, 4, 5) keeps 0 and 4.
    assert [p["t_s"] for p in st.series] == [0.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0]
    st.tick(11.0)
    assert [p["t_s"] for p in st.series] == [0.0, 4.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0]
