from __future__ import annotations

import io

import zmq
from click.testing import CliRunner
from rich.console import Console

from cli.main import main
from monitor.dashboard import RATE_WINDOW_S, render_dashboard, request_rate, sparkline
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
    assert "aware-run" in out and _headline(out.splitlines())[-2:] == ["0", "40"]  # errors, requests
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
        res = CliRunner().invoke(main,
                                 ["dash", "--source", f"http://127.0.0.1:{svc.http_port}/json?light=1", "--once",
                                  "--width", "160"])
        assert res.exit_code == 0, res.output
        assert "req-xyz" in res.stdout and "gpu-7" in res.stdout and "stale" in res.stdout
        assert "─ live · kvr monitor ─" in res.stdout and _headline(res.stdout.splitlines())[-1] == "1"
    finally:
        svc.close()
        ctx.term()
    res = CliRunner().invoke(main, ["dash", "--source", f"http://127.0.0.1:{free_port()}/json", "--once"])
    assert res.exit_code == 1 and "cannot read" in res.output


def _headline(lines: list[str]) -> list[str]:
    """The headline's figures (the row under its labels), split on blanks.

    In order: rate, hit, p50, ms, p99, ms, errors, requests.
    """
    header = "req/s   token hit   TTFT p50   TTFT p99   errors   requests"
    labels = next(k for k, ln in enumerate(lines) if header in ln)
    return lines[labels + 1].strip("│ ").split()


def _frame(d: dict, width: int, height: int) -> list[str]:
    console = Console(width=width, height=height, record=True, file=io.StringIO())
    console.print(render_dashboard(d, width=width, height=height))
    return console.export_text().splitlines()


def _expected_headline(d: dict) -> list[str]:
    s = d["summary"]
    rate, _ = request_rate(d)
    return [f"{rate:.2f}", f"{100 * s['token_hit_rate']:.1f}%", f"{1000 * s['ttft_p50_s']:.1f}", "ms",
            f"{1000 * s['ttft_p99_s']:.1f}", "ms", "1", "200"]


def test_an_80x24_frame_fits_and_leads_with_the_headline_then_the_workers():
    d = synthetic_dump("fleet", aware=True)  # 200 requests, one error, three workers
    lines = _frame(d, 80, 24)
    assert len(lines) <= 24 and max(len(ln) for ln in lines) <= 80
    assert lines[0].startswith("╭─ fleet · kvr monitor ─")
    assert _headline(lines) == _expected_headline(d)
    workers = lines.index("workers" + " " * 73)
    assert workers < 8  # right under the headline panel
    rows = [ln.split() for ln in lines[workers + 3: workers + 6]]
    assert [r[0] for r in rows] == ["w0", "w1", "w2"] and all(r[5] == "fresh" for r in rows)
    per = d["summary"]["per_worker"]
    assert [r[-2:] for r in rows] == [[str(per[w]["requests"]), f"{100 * per[w]['token_hit_rate']:.1f}%"]
                                      for w in ("w0", "w1", "w2")]
    assert lines[-1].rstrip() == "more on a larger terminal: incidents, recent requests"
    assert not any("recent requests" == ln.strip() for ln in lines)


def test_a_200x50_frame_shows_every_panel_with_the_wide_columns():
    d = synthetic_dump("fleet", aware=True)
    lines = _frame(d, 200, 50)
    assert len(lines) <= 50 and max(len(ln) for ln in lines) <= 200
    assert _headline(lines) == _expected_headline(d)
    headings = [ln.strip() for ln in lines if ln.strip() in ("workers", "latency (ms)", "incidents", "recent requests")]
    assert headings == ["workers", "latency (ms)", "incidents", "recent requests"]
    assert sum("gaps/replays/resets" in ln for ln in lines) == 1 and not any(ln.startswith("more on a") for ln in lines)


def test_every_frame_fits_its_height_and_many_workers_are_cut_with_a_count():
    st = MonitorState(label="big")
    for k in range(30):
        st.add(sample(f"w{k:02d}", t=100.0 + k, kv=0.3))
        st.add(request(f"r{k}", worker=f"w{k:02d}", t=100.0 + k, cached=16))
    d = st.dump(now_s=140.0)
    for width, height in ((80, 24), (80, 12), (100, 40), (200, 30), (200, 60)):
        lines = _frame(d, width, height)
        assert len(lines) <= height and max(len(ln) for ln in lines) <= width, (width, height)
    lines = _frame(d, 80, 24)
    cut = [ln.strip() for ln in lines if ln.startswith("… ")]
    shown = sum(1 for ln in lines if ln.startswith("w") and ln.split()[0][1:].isdigit())
    assert cut == [f"… {30 - shown} more (taller terminal)"] and shown == 24 - 6 - 4 - 1
    assert len(_frame(d, 80, 1000)) < 1000  # all 30 fit: no cut line
    assert not any(ln.startswith("… ") for ln in _frame(d, 80, 1000))


def test_request_rate_is_over_the_last_window_of_the_series_else_the_whole_run():
    series = [{"t_s": 100.0 + k, "requests": 3 * k} for k in range(30)]  # 3 req/s
    d = {"series": series, "summary": {"throughput_rps": 0.5}}
    assert request_rate(d) == (3.0, f"last {RATE_WINDOW_S:.0f} s")
    assert request_rate({"series": series[:4], "summary": {}}) == (3.0, "last 3 s")  # shorter than the window
    assert request_rate({"series": series[:1], "summary": {"throughput_rps": 0.5}}) == (0.5, "whole run")


def test_dash_once_fits_the_given_height(tmp_path):
    path = write_dump(tmp_path / "d.json", synthetic_dump("aware-run", aware=True))
    res = CliRunner().invoke(main, ["dash", "--source", str(path), "--once", "--width", "80", "--height", "24"])
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert len(lines) <= 24 and max(len(ln) for ln in lines) <= 80 and _headline(lines)[-2:] == ["1", "200"]
