"""Smoke tests of ``kvr bench overhead`` and its event generator (tiny sizes; not measurements)."""

from __future__ import annotations

import json
import shutil

import pytest

from bench.fleet_events import FleetEvents
from bench.overhead import OverheadConfig, display_tables, plot, run
from bench.results import percentile, spread, write_result
from core.prefix_index import PrefixIndex, WorkerKey, request_block_hashes


def test_fleet_events_fill_exactly_what_they_report_and_requests_hit_the_index() -> None:
    fleet = FleetEvents(n_workers=3, seed=5, events_per_batch=2)
    index = PrefixIndex(block_size=16)
    targets = [WorkerKey(f"w{i}") for i in range(3)]
    workers_seen = []
    for w, batch in fleet.batches_until(3000):
        workers_seen.append(w)
        for event in batch.events:
            index.apply(targets[w], event, now=0.0)
    assert fleet.stored_blocks >= 3000
    assert index.total_blocks() == fleet.stored_blocks  # every event links (no orphans, no duplicates)
    assert index.counters["orphan_events"] == 0
    assert workers_seen[:6] == [0, 1, 2, 0, 1, 2]
    follow_ups = fleet.requests(50, seed=2, follow_up_share=1.0)
    overlaps = [index.overlap(request_block_hashes(p, block_size=16)) for p in follow_ups]
    # A follow-up's whole conversation so far is cached on the worker that served it.
    tails = [(len(p) // 16) - max(o.values()) for p, o in zip(follow_ups, overlaps, strict=True)]
    assert all(1 <= t <= 16 for t in tails)
    again = FleetEvents(n_workers=3, seed=5, events_per_batch=2)
    first = next(iter(again.batches_until(1)))
    same_seed = next(iter(FleetEvents(n_workers=3, seed=5).batches_until(1)))
    assert first[1].events[0].block_hashes == same_seed[1].events[0].block_hashes


def test_percentile_interpolates_and_spread_summarises() -> None:
    samples = sorted(float(i) for i in range(1, 101))
    assert percentile(samples, 50) == 50.5  # rank 49.5: between 50 and 51 (the project's one definition)
    assert percentile(samples, 99) == pytest.approx(99.01)
    assert percentile(samples, 100) == 100.0
    assert spread([3.0, 1.0, 2.0]) == {"median": 2.0, "min": 1.0, "max": 3.0, "n": 3}
    assert spread([1.0, 4.0])["median"] == 2.5


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_overhead_suite_runs_end_to_end_with_tiny_parameters(tmp_path) -> None:
    cfg = OverheadConfig(workers=(2, 4), index_blocks=(400, 1200), requests=40, repeats=2, ingest_workers=2,
                         ingest_blocks=600, memory_blocks=600, compare_policies=True)
    result = run(cfg)
    rows = result.tables["decision latency"]
    assert [(r["workers"], r["index_blocks"] >= size)
            for r, size in zip(rows, [400, 1200, 400, 1200], strict=True)] == [
        (2, True), (2, True), (4, True), (4, True)]
    assert all(r["p99_us"]["n"] == 2 and r["p99_us"]["median"] >= r["p50_us"]["median"] > 0 for r in rows)
    from core.policies import POLICY_NAMES

    assert [r["policy"] for r in result.tables["decision latency by policy"]] == list(POLICY_NAMES)
    ingest = {r["path"]: r for r in result.tables["ingestion"]}
    assert list(ingest) == ["decode only", "decode + apply (no Redis)", "decode + apply + Redis mirror",
                            "decode + apply + Redis mirror, background writer"]
    assert ingest["decode + apply + Redis mirror"]["redis_round_trips_per_batch"] == 1.0  # one pipeline per batch
    # The background writer's rounds share pipelines: never more than one round trip per batch.
    assert 0 < ingest["decode + apply + Redis mirror, background writer"]["redis_round_trips_per_batch"] <= 1.0
    assert len({r["stored_blocks"] for r in ingest.values()}) == 1
    mem = result.tables["memory"][0]
    assert mem["process_bytes_per_block"] > 0 and mem["redis_blocks_hash_bytes_per_block"] > 0
    assert [g.unit for g in result.goals] == ["µs", "stored blocks/s"]
    paths = write_result(result, tmp_path, plot=plot, display=display_tables(result))
    assert sorted(p.name for p in paths) == ["overhead.json", "overhead.md", "overhead_decision.png",
                                             "overhead_ingestion.png"]
    data = json.loads((tmp_path / "overhead.json").read_text())
    assert data["suite"] == "overhead" and data["goals"][0]["target"] == 100.0
    assert "## decision latency" in (tmp_path / "overhead.md").read_text()


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_router_vs_raw_echo_measures_three_arms_through_real_processes() -> None:
    from bench.echo import EchoConfig, router_vs_echo

    rows = router_vs_echo(EchoConfig(requests=20, repeats=1, warmup=2, prompt_tokens=64))
    assert [r["arm"] for r in rows] == ["raw relay (2 hops)", "raw echo (1 hop)", "kvr router"]
    relay, echo, kvr = rows
    assert relay["ratio_p50"]["median"] == 1.0 and echo["ratio_p50_vs_1hop"]["median"] == 1.0
    assert kvr["rtt_p50_us"]["median"] > 0 and kvr["rtt_p99_us"]["median"] >= kvr["rtt_p50_us"]["median"]
    assert kvr["ratio_p50"]["median"] == pytest.approx(kvr["rtt_p50_us"]["median"] / relay["rtt_p50_us"]["median"])
    assert kvr["middle_cpu_us_per_request"]["n"] == 1


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server")
def test_router_vs_raw_http_relay_measures_both_fronts_through_real_processes() -> None:
    from bench.echo import EchoConfig, router_vs_http_relay

    rows = router_vs_http_relay(EchoConfig(requests=20, repeats=1, warmup=2, prompt_tokens=64))
    assert [r["arm"] for r in rows] == ["raw HTTP relay (2 hops)", "kvr router, HTTP"]
    relay, kvr = rows
    assert relay["ratio_p50"]["median"] == 1.0 and relay["requests"] == kvr["requests"] == 20
    assert kvr["rtt_p99_us"]["median"] >= kvr["rtt_p50_us"]["median"] > 0
    assert kvr["ratio_p99"]["median"] == pytest.approx(kvr["rtt_p99_us"]["median"] / relay["rtt_p99_us"]["median"])
    assert kvr["middle_cpu_us_per_request"]["n"] == relay["middle_cpu_us_per_request"]["n"] == 1


def test_every_suite_is_a_kvr_bench_command() -> None:
    from click.testing import CliRunner

    from cli.main import main

    out = CliRunner().invoke(main, ["bench", "--help"])
    assert out.exit_code == 0
    listed = {line.split()[0] for line in out.output.split("Commands:")[1].splitlines() if line.strip()}
    assert {"overhead", "basic", "scale", "stale", "peer"} <= listed
    for suite in ("overhead", "basic", "scale", "stale", "peer"):
        help_ = CliRunner().invoke(main, ["bench", suite, "--help"])
        assert help_.exit_code == 0 and "--json" in help_.output and "--out" in help_.output
