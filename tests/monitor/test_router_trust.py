"""Trust incidents on the monitor: the router's per-target trust weight (its /metrics gauge) polled
into the state; drops and recoveries are incidents in the dump, the dashboard, the report and the plot."""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from monitor.dump import normalize_dump
from monitor.router_trust import RouterTrustPoller, parse_target_trust
from monitor.state import MonitorState
from router.prometheus import render_metrics
from tests.monitor.records import sample


def _stats(weights: dict[str, float]) -> dict:
    """A router stats snapshot as RouterService.stats has it, with only what render_metrics reads."""
    target = {"indexed_blocks": 0, "in_flight": 0, "queued_prefill_tokens": 0, "events_applied": 0, "gaps": 0,
              "resets": 0, "replays": 0, "event_lag_s": 0.0, "confidence": "fresh"}
    return {"counters": {"trust_downgrades": 1}, "workers": len(weights),
            "targets": {name: {**target, "trust": w} for name, w in weights.items()}}


def test_the_routers_metrics_text_parses_to_a_weight_per_target() -> None:
    text = render_metrics(_stats({"w0/0": 1.0, "liar/0": 0.0, "dp/1": 0.25})).decode()
    assert parse_target_trust(text) == {"w0/0": 1.0, "liar/0": 0.0, "dp/1": 0.25}
    assert parse_target_trust('kvr_router_target_trust{worker="w0",dp_rank="0"} x\nkvr_router_target_trust{} 1\n'
                              "kvr_router_target_gaps{worker=\"w0\",dp_rank=\"0\"} 3\n") == {}


def test_drops_and_recoveries_are_incidents_and_full_trust_at_first_sight_is_not() -> None:
    st = MonitorState()
    st.add(sample("w0/0", t=100.0))
    st.observe_trust("w0/0", 1.0, 100.5)
    st.observe_trust("liar/0", 0.0, 101.0)  # first seen distrusted: the monitor came late
    st.observe_trust("w0/0", 0.0, 102.0)
    st.observe_trust("w0/0", 0.0, 103.0)  # unchanged: nothing new
    st.observe_trust("w0/0", 1.0, 104.0)
    trust = [(i["t_s"], i["worker_id"], i["detail"].split(":")[0]) for i in st.incidents if i["kind"] == "trust"]
    assert trust == [(101.0, "liar/0", "distrusted"), (102.0, "w0/0", "distrusted"), (104.0, "w0/0", "trusted again")]
    assert st.workers["w0/0"]["trust"] == 1.0
    d = st.dump(now_s=105.0)
    assert d["trust"] == {"liar/0": 0.0, "w0/0": 1.0}
    st.mark_worker_gone("liar/0", 106.0)
    assert "liar/0" not in st.trust  # a new incarnation starts trusted


def test_trust_shows_in_dashboard_report_and_incidents_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from rich.console import Console

    from monitor.dashboard import render_dashboard
    from monitor.plots import INCIDENT_COLOURS
    from monitor.report import write_report

    st = MonitorState(label="trust")
    st.add(sample("liar/0", t=100.0))
    st.observe_trust("liar/0", 0.0, 101.0)
    st.add(sample("liar/0", t=102.0, confidence="resyncing"))
    d = normalize_dump(st.dump(now_s=103.0))
    console = Console(width=200, record=True)
    console.print(render_dashboard(d, width=200, height=60))
    screen = console.export_text()
    assert "resyncing trust 0.00" in screen and "distrusted: weight 1.00 -> 0.00" in screen
    report = write_report([d], tmp_path).read_text()
    assert "trust 1" in report and "`liar/0`: distrusted: weight 1.00 -> 0.00" in report
    assert "trust" in INCIDENT_COLOURS


class _FakeRouter(BaseHTTPRequestHandler):
    weights: dict[str, float] = {}

    def do_GET(self) -> None:  # noqa: N802
        body = render_metrics(_stats(self.weights))
        self.send_response(200 if self.path == "/metrics" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args) -> None:
        pass


def test_the_poller_reads_a_router_over_http_and_rides_out_one_that_is_away(caplog) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeRouter)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    dead = "http://127.0.0.1:9"  # discard port: refused
    st = MonitorState()
    clock = iter([10.0, 11.0, 12.0])
    poller = RouterTrustPoller(urls=[url, dead], state=st, lock=threading.Lock(), clock=lambda: next(clock))
    caplog.set_level(logging.WARNING, logger="monitor.router_trust")
    try:
        _FakeRouter.weights = {"w0/0": 1.0, "w1/0": 1.0}
        poller.poll_once()
        _FakeRouter.weights = {"w0/0": 1.0, "w1/0": 0.0}
        poller.poll_once()
        _FakeRouter.weights = {"w0/0": 1.0, "w1/0": 1.0}
        poller.poll_once()
    finally:
        server.shutdown()
        server.server_close()
    assert [(i["t_s"], i["worker_id"], i["kind"]) for i in st.incidents] == [(11.0, "w1/0", "trust"),
                                                                              (12.0, "w1/0", "trust")]
    assert poller.polls == 3 and poller.failures == 3
    assert len([r for r in caplog.records if dead in r.getMessage()]) == 1  # once per outage
