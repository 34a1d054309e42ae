"""``kvr demo`` end to end on a tiny workload: two fresh clusters, the table, dumps, report and plots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cli.main import main

pytestmark = pytest.mark.integration


def test_demo_compares_policies_and_writes_everything(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "--log-level", "WARNING", "demo", "--out", str(out), "--workers", "2",
         "--speedup", "10", "--rate", "20", "--param", "num_groups=2", "--param", "prompts_per_group=4",
         "--param", "system_prompt_len=256", "--param", "output_len=4", "--no-plots"],  # plots: test_results_plots
        capture_output=True, text=True, timeout=120, cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert any("Metric" in ln and "round_robin" in ln and "kvr" in ln for ln in lines), proc.stdout
    total = [ln for ln in lines if "Total requests" in ln][0]
    assert total.replace("│", " ").split()[-2:] == ["8", "8"]
    errors = [ln for ln in lines if ln.startswith("│ Errors")][0]
    assert errors.replace("│", " ").split()[-2:] == ["0", "0"]
    assert "Mean TTFT vs round_robin" in proc.stdout
    for policy in ("round_robin", "kvr"):
        dump = json.loads((out / f"{policy}.json").read_text())
        assert dump["label"] == policy and dump["summary"]["requests"] == 8
        assert dump["client"]["sent"] == 8 and dump["client"]["timed_out"] == 0
        assert {r["policy"] for r in dump["recent_requests"]} == {policy}
        assert sorted(p.name for p in (out / "runs" / policy / "logs").iterdir()) == [
            "monitor.log", "redis.log", "router.log", "worker-0.log", "worker-1.log"]
    report = (out / "report.md").read_text()
    assert report.startswith("# kvr demo: cache-blind vs cache-aware routing")
    assert "| Metric | round_robin | kvr |" in report and "## Run: kvr" in report
    assert "![" not in report and not (out / "plots").exists()


def test_demo_without_out_writes_a_fresh_run_under_the_state_dir_and_says_where(tmp_path, state_dir):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-m", "cli.main", "--log-level", "WARNING", "demo", "--workers", "1", "--policy", "kvr",
         "--speedup", "10", "--rate", "20", "--param", "num_groups=1", "--param", "prompts_per_group=2",
         "--param", "system_prompt_len=64", "--param", "output_len=2", "--no-plots"],
        capture_output=True, text=True, timeout=120, cwd=cwd,
        env={**os.environ, "COLUMNS": "400"},  # rich wraps stderr at 80 columns otherwise
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    (out,) = (state_dir / "runs").iterdir()
    assert out.name.startswith("demo-")
    assert proc.stderr.splitlines()[-1] == f"output: {out}"
    assert (out / "report.md").exists() and json.loads((out / "kvr.json").read_text())["summary"]["requests"] == 2
    assert list(cwd.iterdir()) == []  # nothing written where it was started


def test_demo_usage_error_leaves_no_run_behind(state_dir):
    res = CliRunner().invoke(main, ["demo", "--workload", "no-such-workload"])
    assert res.exit_code == 2
    assert not (state_dir / "runs").exists()
