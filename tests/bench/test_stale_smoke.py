"""Smoke tests of ``kvr bench stale``: the recovery analysis, the worker's truth and fault endpoints, a run."""

from __future__ import annotations

import json
import shutil
import urllib.request

import pytest

from bench.stale import StaleConfig, analyse, run


def test_analyse_finds_recovery_from_divergence_and_hit_rate_windows() -> None:
    cfg = StaleConfig(sample_s=0.5, window_s=1.0, pre_window_s=3.0, pre_s=3.0, hit_tolerance=0.05)
    fault = 100.0
    samples = [(97.0, 0.01), (98.0, 0.0), (99.0, 0.01), (100.0, 0.6), (100.5, 0.3), (101.0, 0.01), (101.5, 0.0)]
    # 10 hits per 0.5 s before the fault, then misses for 1.5 s, then hits again.
    records = [(t / 10, 100, 100 if not (1000 <= t < 1015) else 0, False) for t in range(970, 1040)]
    out = analyse(cfg, "clear", fault, samples, records, lost=0)
    assert out["index_threshold"] == 0.02
    assert out["index_recovered_s"] == 1.0 and out["peak_divergence"] == 0.6
    assert out["pre_hit_rate"] == 1.0 and out["hit_dip"] == 0.0
    assert out["hit_recovered_s"] == pytest.approx(2.5)  # first 1 s window free of misses ends at 102.5


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_clear_fault_run_reports_recovery(tmp_path) -> None:
    cfg = StaleConfig.quick()
    cfg.out_dir = str(tmp_path)
    result = run(cfg)
    (row,) = result.tables["runs"]
    assert row["fault"] == "clear" and row["requests"] > 20 and row["lost_requests"] == 0
    assert row["pre_hit_rate"] > 0.5  # two system prompts, warm before the fault
    assert row["index_recovered_s"] is not None  # the router saw AllBlocksCleared
    assert row["divergence_timeline"] and row["hit_timeline"]


@pytest.mark.integration
def test_worker_serves_its_cached_blocks_and_takes_faults(tmp_path) -> None:
    from worker.runner import WorkerOptions, WorkerRunner

    runner = WorkerRunner(WorkerOptions(worker_id="w", router_endpoint="none", http_port=0, speedup=100.0, seed=1))
    import threading

    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    try:
        url = runner.http_url
        assert runner.backend.hello(epoch=1).http_url == url  # the router learns where the HTTP API is
        body = json.dumps({"prompt": list(range(1, 65)), "max_tokens": 1}).encode()
        req = urllib.request.Request(f"{url}/v1/completions", data=body, headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).read()
        with urllib.request.urlopen(f"{url}/kvr/cached_blocks", timeout=5) as resp:
            blocks = json.loads(resp.read())["blocks"]
        assert len(blocks) == 4 and blocks == sorted(blocks)  # 64 prompt tokens = 4 full blocks
        fault = urllib.request.Request(f"{url}/kvr/faults", data=b'{"drop_rate": 0.5}',
                                       headers={"Content-Type": "application/json"})
        assert json.loads(urllib.request.urlopen(fault, timeout=5).read()) == {"success": True}
        assert runner.backend.publisher.faults.drop_rate == 0.5
        bad = urllib.request.Request(f"{url}/kvr/faults", data=b'{"drop_rate": 2}',
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(bad, timeout=5)
        assert exc.value.code == 400
    finally:
        runner.stop()
        thread.join(timeout=10)
