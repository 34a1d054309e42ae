from __future__ import annotations

from click.testing import CliRunner

from cli.main import main
from monitor.dump import write_dump
from tests.monitor.synthetic import synthetic_dump


def test_plot_and_report_commands(tmp_path):
    a = write_dump(tmp_path / "rr.json", synthetic_dump("rr", aware=False, n=60))
    b = write_dump(tmp_path / "kvr.json", synthetic_dump("kvr", aware=True, n=60))
    runner = CliRunner()
    res = runner.invoke(main, ["plot", str(b)])
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in (tmp_path / "kvr-plots").iterdir()) == [
        "block_utilisation.png", "hit_rate_over_time.png", "latency_by_cache_status.png",
        "latency_distribution.png", "recovery_timeline.png", "worker_load_heatmap.png",
    ]
    res = runner.invoke(main, ["report", str(a), "--out", str(tmp_path / "rep"), "--label", "blind"])
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[:2] == ["| Metric | blind |", "|:---|---:|"]
    assert res.stdout.splitlines()[2] == "| Total requests | 60 |"
    assert (tmp_path / "rep" / "report.md").exists()
    res = runner.invoke(main, ["report", str(a), str(b), "--label", "x"])
    assert res.exit_code == 2 and "1 --label for 2 dumps" in res.output
    (tmp_path / "bad.json").write_text("{}")
    res = runner.invoke(main, ["plot", str(tmp_path / "bad.json")])
    assert res.exit_code == 1 and "no 'fold' key" in res.output
