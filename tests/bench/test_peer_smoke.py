"""Smoke tests of ``kvr bench peer``: its workload, its metrics, and the kvr arm over HTTP."""

from __future__ import annotations

import shutil
from itertools import pairwise

import pytest

from bench.peer import PeerConfig, http_metrics, run, text_workload


def test_text_workload_is_seeded_shared_prefix_and_poisson() -> None:
    cfg = PeerConfig(groups=3, prompts_per_group=4, system_words=20, question_words=5, rate_per_s=10.0)
    a, b = text_workload(cfg, 7), text_workload(cfg, 7)
    assert a == b and a != text_workload(cfg, 8)
    assert len(a) == 12 and all(t1 < t2 for (t1, _), (t2, _) in pairwise(a))
    groups = sorted({p.split("\n")[0] for _, p in a})
    assert len(groups) == 3 and all(g.startswith(f"[group {i}] ") for i, g in enumerate(groups))


def test_http_metrics_drop_the_warmup_and_count_errors() -> None:
    rows = [{"sent_s": float(i), "ttft_s": 0.01 * (i + 1), "e2e_s": 0.5, "prompt_tokens": 100,
             "cached_tokens": 50 if i else 0, "error": None} for i in range(4)]
    rows.append({"sent_s": 9.0, "ttft_s": None, "e2e_s": None, "prompt_tokens": 0, "cached_tokens": 0,
                 "error": "HTTP 503"})
    m = http_metrics(rows, warmup=1)
    assert (m["requests"], m["completed"], m["errors"]) == (4, 3, 1)
    assert m["hit_rate"] == 0.5
    # Linear between closest ranks: p99 of 20, 30, 40 ms is at rank 1.98 (nearest rank said 40).
    assert m["ttft_p50_ms"] == pytest.approx(30.0) and m["ttft_p99_ms"] == pytest.approx(39.8)
    assert m["router_cpu_ms_per_request"] != m["router_cpu_ms_per_request"]  # NaN: no CPU reading given


def test_router_cpu_is_divided_by_every_request_and_chunk_warmup_included() -> None:
    rows = [{"sent_s": float(i), "ttft_s": 0.01, "e2e_s": 0.5, "prompt_tokens": 100, "cached_tokens": 0,
             "chunks": 3 + i, "error": None} for i in range(4)]
    m = http_metrics(rows, warmup=2, router_cpu_s=0.018)
    assert m["requests"] == 2  # the warm-up is out of the latency figures, not out of the CPU drive
    assert m["router_cpu_ms_per_request"] == pytest.approx(18.0 / 4)
    assert m["router_cpu_us_per_chunk"] == pytest.approx(18_000.0 / (3 + 4 + 5 + 6))


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_kvr_arm_answers_every_request_over_http(tmp_path) -> None:
    cfg = PeerConfig.quick()
    cfg.arms = ("kvr",)
    cfg.workers = 1
    cfg.out_dir = str(tmp_path)
    result = run(cfg)
    (row,) = result.tables["runs"]
    assert (row["requests"], row["completed"], row["errors"]) == (6, 6, 0)
    assert row["hit_rate"] > 0.5  # one worker holds both system prompts after their first request
    assert result.goals == []  # no peer arm, no comparison
    # The router and its Redis were read from /proc around the drive: a real figure (NaN when unread).
    # Not > 0: /proc counts in clock ticks (10 ms), more than 6 quick requests may cost.
    cpu = row["router_cpu_ms_per_request"]
    assert cpu == cpu and 0.0 <= cpu < 1_000.0


def test_core_burner_spins_until_closed() -> None:
    from bench.live import proc_cpu_s
    from bench.peer import CoreBurner
    from tests.waiting import eventually

    with CoreBurner() as burner:
        pid = burner.process.pid
        assert burner.process.is_alive()
        eventually(lambda: (proc_cpu_s(pid) or 0.0) >= 0.05, timeout_s=30.0)  # it burns CPU, not sleeps
    assert not burner.process.is_alive()
