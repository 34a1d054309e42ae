"""``kvr bench engine`` runs its suites on tiny sizes and reports consistent figures."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bench.engine import bench_block_pool, bench_engine
from cli.main import main


def test_engine_bench_counts_every_token() -> None:
    r = bench_engine(profile="simple", batch=3, prompt_tokens=40, output_tokens=5)
    assert r["decode_tokens_per_s"] * r["wall_s"] == pytest.approx(15)
    assert r["emulated_tokens_per_s"] * r["wall_s"] == pytest.approx(3 * 40 + 15)
    assert r["cpu_share_at_speedup"] == pytest.approx(r["wall_s"] / r["emulated_s"] * 10)


def test_block_pool_bench_hits_the_shared_half_and_evicts() -> None:
    r = bench_block_pool(requests=200, prompt_tokens=64, num_blocks=40)
    assert 0.2 < r["hit_rate"] < 0.5 and r["evictions"] > 0 and r["block_ops_per_s"] > 0


def test_cli_prints_one_json_object_per_suite_run() -> None:
    out = CliRunner().invoke(main, ["bench", "engine", "--batches", "1,2", "--prompt-tokens", "32",
                                    "--output-tokens", "4", "--pool-requests", "50", "--json"])
    assert out.exit_code == 0, out.output
    suites = [json.loads(line)["suite"] for line in out.output.splitlines()]
    assert suites == ["engine", "engine", "block_pool"]


@pytest.mark.integration
def test_live_bench_runs_router_and_worker_processes() -> None:
    from bench.engine_live import bench_live

    r = bench_live(workers=1, concurrency=4, duration_s=1.0, speedup=20.0, profile="h100-8b")
    assert r["errors"] == 0 and r["requests_per_s"] > 0 and r["output_tokens_per_s"] > 0
    assert len(r["worker_cpu_cores"]) == 1 and len(r["worker_resyncs"]) == 1 and r["router_cpu_cores"] > 0
