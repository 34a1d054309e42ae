"""Smoke test of ``kvr bench basic`` (two policies, a tiny workload, one run each)."""

from __future__ import annotations

import shutil

import pytest

from bench.basic import BasicConfig, display_tables, plot, run
from bench.results import write_result

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")]


def test_basic_suite_runs_a_policy_on_a_live_cluster(tmp_path) -> None:
    cfg = BasicConfig.quick()
    cfg.policies = ("kvr",)  # one cluster start keeps the smoke test short
    cfg.out_dir = str(tmp_path / "runs")
    result = run(cfg)
    rows = {r["policy"]: r for r in result.tables["policies"]}
    assert list(rows) == ["kvr"]
    (run_,) = result.tables["runs"]
    # 8 requests sent, the first 2 (warm-up) left out, every one answered, prefixes shared.
    assert (run_["requests"], run_["completed"], run_["errors"], run_["timed_out"]) == (6, 6, 0, 0)
    assert 0.3 < run_["hit_rate"] <= 1.0
    assert run_["redis_commands_per_request"] > 0  # event batches and heartbeats write Redis
    assert rows["kvr"]["ttft_p99_vs_round_robin"] == 1.0  # no round_robin arm: the first row is the baseline
    paths = write_result(result, tmp_path, plot=plot, display=display_tables(result))
    assert sorted(p.name for p in paths) == ["basic.json", "basic.md", "basic.png"]
