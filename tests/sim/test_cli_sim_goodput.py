"""``kvr sim --goodput`` end to end through click: the table, JSON with every probe (same seed,
same bytes), the plot, an impossible SLO ("none", one note line, exit 0) and usage errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import main

# 96 requests on 2 workers; 4-token answers keep the drain short against the arrival span.
SMALL = ["--workload", "gsp", "--gsp-num-groups", "6", "--gsp-prompts-per-group", "16", "--gsp-system-prompt-len",
         "512", "--gsp-question-len", "32", "--gsp-output-len", "4", "--workers", "2", "--profile", "h100-8b",
         "--num-gpu-blocks", "200", "--no-progress", "--goodput", "--goodput-start", "8"]


def _sim(*args: str):
    # WARNING: keeps the per-probe INFO lines out of stderr, so it holds exactly what the command says.
    return CliRunner().invoke(main, ["--log-level", "WARNING", "sim", *args])


def test_table_with_data_and_plot(tmp_path):
    res = _sim(*SMALL, "--policy", "kvr,round_robin", "--slo-ttft-p99", "0.05", "--plots", str(tmp_path))
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "## gsp: goodput at TTFT p99 ≤ 0.05 s, 2 workers, profile h100-8b"
    assert lines[2] == ("| policy | goodput (roots/s) | served req/s | TTFT p99 s "
                        "| TPOT p99 ms | hit | probes | vs kvr |")
    rows = {ln.split(" | ")[0][2:]: ln.split(" | ")[1:] for ln in lines[4:6]}
    assert list(rows) == ["kvr", "round_robin"]
    for cells in rows.values():
        assert float(cells[0]) >= 8 and float(cells[2]) <= 0.05 and int(cells[5]) >= 4
    assert rows["kvr"][6] == "1.00× |"
    assert res.stderr.splitlines()[0].startswith("note: kvr / best other policy (round_robin): ")
    assert [p.name for p in tmp_path.glob("*.png")] == ["goodput.png"]


def test_json_has_every_probe_and_same_seed_same_bytes():
    args = [*SMALL, "--policy", "round_robin", "--slo-ttft-p99", "0.05", "--slo-tpot-p99", "0.02", "--json"]
    r1, r2 = _sim(*args), _sim(*args)
    assert r1.exit_code == 0, r1.output
    assert r1.stdout == r2.stdout
    rep = json.loads(r1.stdout)
    assert rep["search"] == {"load": "rate_per_s",
                             "slo": {"ttft_p99_s": 0.05, "tpot_p99_s": 0.02, "min_throughput_fraction": 0.95},
                             "start": 8.0, "tolerance": 0.05, "seed": 0}
    row = rep["policies"]["round_robin"]
    probes = row["probes"]
    assert row["probes_count"] == len(probes) and probes[0]["load"] == 8.0
    assert set(probes[0]) == {"load", "met", "failed", "ttft_p99_s", "tpot_p99_s", "token_hit_rate", "throughput_rps",
                              "sustained_fraction", "requests", "rejected", "unfinished", "arrival_span_s",
                              "completion_span_s"}
    met = [p["load"] for p in probes if p["met"]]
    assert row["goodput"] == max(met) and row["at_goodput"]["load"] == row["goodput"]
    assert all(p["met"] == (not p["failed"]) for p in probes)
    assert all(p["load"] > row["goodput"] for p in probes if not p["met"])  # monotone here
    # within the tolerance: the lowest failing load is at most 5 % above the goodput
    assert min(p["load"] for p in probes if not p["met"]) <= row["goodput"] * 1.05


def test_impossible_slo_says_none_in_one_line_and_exits_0():
    res = _sim(*SMALL, "--policy", "kvr,round_robin", "--slo-ttft-p99", "1e-6")
    assert res.exit_code == 0, res.output
    assert "| kvr | none | - | - | - | - | 7 | - |" in res.stdout
    assert "| round_robin | none | - | - | - | - | 7 | - |" in res.stdout
    note = "note: no load meets the SLO for kvr, round_robin (lowest probed: 0.125 roots/s)"
    assert res.stderr.splitlines() == [note, res.stderr.splitlines()[-1]]
    assert res.stderr.splitlines()[-1].startswith("simulated in ")
    rep = json.loads(_sim(*SMALL, "--policy", "kvr", "--slo-ttft-p99", "1e-6", "--json").stdout)
    assert rep["policies"]["kvr"]["goodput"] is None and rep["policies"]["kvr"]["at_goodput"] is None


def test_trace_searches_the_speedup(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 1000 * i, "input_length": 1000, "output_length": 64, "hash_ids": [0, 1 + i % 3]}
            for i in range(40)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = _sim("--trace", str(trace), "--policy", "kvr", "--workers", "2", "--profile", "h100-8b", "--no-progress",
               "--goodput", "--slo-ttft-p99", "0.05", "--json")
    assert res.exit_code == 0, res.output
    rep = json.loads(res.stdout)
    assert rep["search"]["load"] == "speedup"
    assert rep["policies"]["kvr"]["goodput"] >= 1.0


def test_usage_errors():
    for extra, needle in ((["--goodput"], "--slo-ttft-p99"),
                          (["--goodput", "--slo-ttft-p99", "0.5", "--rate", "4"], "--rate"),
                          (["--goodput", "--slo-ttft-p99", "0.5", "--concurrency", "4"], "--concurrency"),
                          (["--goodput", "--slo-ttft-p99", "0"], "--slo-ttft-p99"),
                          (["--goodput", "--slo-ttft-p99", "0.5", "--goodput-tolerance", "1.5"], "--goodput-tolerance"),
                          (["--slo-ttft-p99", "0.5"], "--goodput")):
        res = _sim("--workload", "gsp", *extra)
        assert res.exit_code == 2, (extra, res.output)
        assert needle in res.output and "Traceback" not in res.output


def test_rejections_fail_every_load_and_say_why():
    res = _sim(*SMALL, "--policy", "kvr", "--slo-ttft-p99", "10", "--max-model-len", "300")
    assert res.exit_code == 0, res.output
    assert "| kvr | none |" in res.stdout
    err = res.stderr.splitlines()
    assert err[0] == "note: no load meets the SLO for kvr (lowest probed: 0.125 roots/s)"
    assert err[1].startswith("warning: 96 of 96 requests rejected: prompt too long for max_model_len 300 tokens")
