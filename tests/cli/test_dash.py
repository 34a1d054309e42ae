from __future__ import annotations

import zmq
from click.testing import CliRunner

from cli.main import main
from monitor.dashboard import sparkline
from monitor.dump import write_dump
from monitor.service import MonitorService
from monitor.state import MonitorState
from tests.conftest import free_port
from tests.monitor.records import request, sample
from tests.monitor.synthetic import synthetic_dump


def test_sparkline_scales_and_marks_missing_points():
    assert sparkline([0.0, 0.5, 1.0, None, float("nan"), 2.0]) == "▁▅█  █"
    assert sparkline([0.0] * 50, width=4) == "▁▁▁▁"


def test_dash_once_from_a_dump_file(tmp_path):
    path = write_dump(tmp_path / "d.json", synthetic_dump("aware-run", aware=True, n=40))
    res = CliRunner().invoke(main, ["dash", "--source", str(path), "--once", "--width", "160"])
    assert res.exit_code == 0, res.output
    out = res.stdout
    assert "aware-run" in out and "requests 40" in out and "errors 0" in out
    for heading in ("latency (ms)", "workers", "recent requests", "incidents", "match length (blocks)"):
        assert heading in out
    assert "TTFT miss (n=" in out and "worker_seen" in out
    assert sum(1 for ln in out.splitlines() if " fresh " in ln and ln.startswith("│ w")) == 3  # a row per worker


def test_dash_once_from_a_live_monitor_over_http():
    import time

    ctx = zmq.Context()
    svc = MonitorService(metrics_endpoints=[f"tcp://127.0.0.1:{free_port()}"], state=MonitorState(),
                         http_port=0, ctx=ctx)
    try:
        svc.start()
        with svc.lock:
            svc.state.add(request("req-xyz", cached=48))
            svc.state.add(sample("gpu-7", t=time.time(), confidence="stale"))
        import json
        import urllib.request

        light = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{svc.http_port}/json?light=1", timeout=5).read())
        assert light["light"] is True and "fold" not in light and light["summary"]["requests"] == 1
        res = CliRunner().invoke(main, ["dash", "--source", f"http://127.0.0.1:{svc.http_port}/json?light=1", "--once", "--width", "160"])
        assert res.exit_code == 0, res.output
        assert "req-xyz" in res.stdout and "gpu-7" in res.stdout and "stale" in res.stdout
        assert "│ live  requests 1" in res.stdout
    finally:
        svc.close()
        ctx.term()
    res = CliRunner().invoke(main, ["dash", "--source", f"http://127.0.0.1:{free_port()}/json", "--once"])
    assert res.exit_code == 1 and "cannot read" in res.output
