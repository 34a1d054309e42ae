"""Smoke test of ``kvr bench scale`` (one worker, one load point)."""

from __future__ import annotations

import shutil

import pytest

from bench.results import write_result
from bench.scale import ScaleConfig, _spec, plot, run


def test_load_points_size_the_workload_from_rate_and_duration() -> None:
    cfg = ScaleConfig(duration_s=10.0, prompts_per_group=16)
    spec = _spec(cfg, 8.0)  # 80 requests → 5 groups of 16
    assert (spec.rate_per_s, spec.params["num_groups"], spec.params["prompts_per_group"]) == (8.0, 5, 16)
    assert _spec(cfg, 0.1).params["num_groups"] == 1


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_scale_suite_measures_a_load_point(tmp_path) -> None:
    cfg = ScaleConfig.quick()
    cfg.workers = (1,)
    cfg.out_dir = str(tmp_path / "runs")
    result = run(cfg)
    (row,) = result.tables["scale"]
    assert (row["workers"], row["offered_rps_workload"], row["sent"], row["errors"], row["timed_out"]) == (
        1, 4.0, 8, 0, 0)
    assert row["completed"] == 7  # 8 sent, 1 warm-up left out
    assert row["router_cpu_ms_per_request"] >= 0.0 and row["throughput_rps"] > 0
    paths = write_result(result, tmp_path, plot=plot)
    assert sorted(p.name for p in paths) == ["scale.json", "scale.md", "scale.png"]
