"""kvr bench replicas, quick: 1 and 2 replicas on a 2-worker fleet, and one replica killed."""

from __future__ import annotations

import shutil

import pytest

from bench.replicas import ReplicasConfig, run

pytestmark = [pytest.mark.timeout(180),
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]


def test_replicas_quick(tmp_path) -> None:
    cfg = ReplicasConfig.quick()
    cfg.out_dir = str(tmp_path)
    rows = run(cfg).tables["replicas"]
    assert [(r["replicas"], r["case"]) for r in rows] == [
        (1, "steady"), (2, "steady"), (2, "one replica SIGKILLed half-way")]
    for r in rows:
        # Nothing lost and nothing failed, the kill included (what it had not answered failed over).
        assert r["unanswered"] == 0 and r["errors"] == 0 and r["completed"] == r["sent"] - cfg.warmup, r
        assert set(r["replica_cpu_s"]) == ({"router"} if r["replicas"] == 1 else {"router", "router-1"})
        assert 0 <= r["router_cpu_above_idle_ms_per_request"] <= r["router_cpu_ms_per_request"]
    assert rows[0]["hit_rate_vs_1"] == 0 and rows[0]["cpu_per_request_vs_1"] == 1
