"""``kvr sim`` end to end through click: table, JSON shape, plots, trace input, errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import main
from core.policies import POLICY_NAMES

SMALL = ["--workload", "gsp", "--gsp-num-groups", "3", "--gsp-prompts-per-group", "4", "--gsp-system-prompt-len", "128",
         "--gsp-question-len", "16", "--gsp-output-len", "4", "--workers", "2", "--profile", "h100-8b", "--no-progress"]


def test_json_shape_and_determinism():
    r1 = CliRunner().invoke(main, ["sim", *SMALL, "--policy", "kvr,round_robin", "--rate", "10", "--json"])
    r2 = CliRunner().invoke(main, ["sim", *SMALL, "--policy", "kvr,round_robin", "--rate", "10", "--json"])
    assert r1.exit_code == 0, r1.output
    out = json.loads(r1.stdout)
    assert list(out) == ["upper_bound", "policies"]
    assert list(out["policies"]) == ["kvr", "round_robin"]
    assert out["policies"]["kvr"]["requests"] == 12
    assert out["upper_bound"] == 3 / 4 * 128 / (128 + 2 + 16)
    assert r1.stdout == r2.stdout


def test_table_sweep_and_plots(tmp_path):
    res = CliRunner().invoke(main,
                             ["sim", *SMALL, "--policy", "all", "--rate-sweep", "5,50", "--plots", str(tmp_path),
                              "--out", str(tmp_path / "r.json")])
    assert res.exit_code == 0, res.output
    assert "| kvr |" in res.stdout and "| dynamo |" in res.stdout and "upper bound" in res.stdout
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["over_time.png", "rate_sweep.png", "ttft_cdf.png"]
    rep = json.loads((tmp_path / "r.json").read_text())
    assert [pt["rate_per_s"] for pt in rep["sweep"]] == [5.0, 50.0]
    assert list(rep["sweep"][0]["policies"]) == list(POLICY_NAMES)  # every policy, in registry order


def test_trace_input(tmp_path):
    trace = tmp_path / "t.jsonl"
    rows = [{"timestamp": 100 * i, "input_length": 1000, "output_length": 64, "hash_ids": [0, 1 + i % 2]}
            for i in range(6)]
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = CliRunner().invoke(main,
                             ["sim", "--trace", str(trace), "--policy", "kvr", "--workers", "2", "--profile", "h100-8b",
                              "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["policies"]["kvr"]
    assert row["requests"] == 6 and row["unfinished"] == 0
    # compressed: 2 blocks per row; rows 2..5 hit both blocks except the recomputed last token (16 of 32)
    assert row["token_hit_rate"] == (0 + 16 + 16 + 16 + 16 + 16) / (6 * 32)


def test_usage_errors():
    assert CliRunner().invoke(main, ["sim", "--policy", "kvr"]).exit_code != 0
    res = CliRunner().invoke(main, ["sim", "--workload", "gsp", "--policy", "nope"])
    assert res.exit_code != 0 and "unknown" in res.output
    res = CliRunner().invoke(main, ["sim", "--workload", "nope"])
    assert res.exit_code != 0 and "unknown workload" in res.output


def test_same_bytes_across_processes_with_different_hash_seeds():
    import os
    import subprocess
    import sys

    code = "import sys; from cli.main import main; main(sys.argv[1:])"
    args = ["sim", "--workload", "multiturn", "-p", "num_clients=6", "-p", "num_rounds=2", "-p", "request_length=64",
            "--workers", "2", "--profile", "h100-8b", "--num-gpu-blocks", "40", "--rate", "4", "--policy", "kvr,random",
            "--json", "--no-progress"]
    outs = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        res = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, timeout=60)
        assert res.returncode == 0, res.stderr
        outs.append(res.stdout)
    assert outs[0] == outs[1] and json.loads(outs[0])["policies"]["kvr"]["requests"] == 12
