"""Trust incidents on the monitor: the router's per-target trust weight arrives with each
WorkerSample; drops and recoveries are incidents in the dump, the dashboard, the report and the plot."""

from __future__ import annotations

import pytest

from core.prefix_index import WorkerKey
from monitor.dump import normalize_dump
from monitor.state import MonitorState
from tests.monitor.records import sample


def test_drops_and_recoveries_are_incidents_and_full_trust_at_first_sight_is_not() -> None:
    st = MonitorState()
    st.add(sample("w0/0", t=100.0))
    st.add(sample("w0/0", t=100.5))
    st.add(sample("liar/0", t=101.0, trust=0.0))  # first seen distrusted: the monitor came late
    st.add(sample("w0/0", t=102.0, trust=0.0))
    st.add(sample("w0/0", t=103.0, trust=0.0))  # unchanged: nothing new
    st.add(sample("w0/0", t=104.0))
    trust = [(i["t_s"], i["worker_id"], i["detail"].split(":")[0]) for i in st.incidents if i["kind"] == "trust"]
    assert trust == [(101.0, "liar/0", "distrusted"), (102.0, "w0/0", "distrusted"), (104.0, "w0/0", "trusted again")]
    assert st.workers["w0/0"]["trust"] == 1.0 and st.workers["liar/0"]["trust"] == 0.0
    d = st.dump(now_s=105.0)
    assert d["trust"] == {"liar/0": 0.0, "w0/0": 1.0}
    st.mark_worker_gone("liar/0", 106.0)
    assert "liar/0" not in st.trust  # a new incarnation starts trusted


def test_the_routers_samples_carry_its_trust_weight() -> None:
    """router/stats.py fills WorkerSample.trust from RouterCore (what the monitor reads)."""
    from core.policies import get_policy
    from core.prefix_index import PrefixIndex
    from core.routing import RouterCore
    from router.stats import worker_samples

    class _Stream:  # what worker_samples reads of an ingest stream
        events_applied = event_lag_s = gaps = resets = removed_blocks = 0

        class subscriber:  # noqa: N801
            class counters:  # noqa: N801
                replays = 0

    core = RouterCore(policy=get_policy("kvr", block_size=16), index=PrefixIndex(block_size=16), block_size=16)
    a, b = WorkerKey("a", 0), WorkerKey("b", 0)
    for t in (a, b):
        core.register(t)
    core.set_trust(b, 0.0)
    samples = worker_samples(core=core, index=core.index, streams={a: _Stream(), b: _Stream()}, t_s=1.0, mirror=None)
    assert {s.worker_id: s.trust for s in samples} == {"a/0": 1.0, "b/0": 0.0}


def test_trust_shows_in_dashboard_report_and_incidents_plot(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    from rich.console import Console

    from monitor.dashboard import render_dashboard
    from monitor.plots import INCIDENT_COLOURS
    from monitor.report import write_report

    st = MonitorState(label="trust")
    st.add(sample("liar/0", t=100.0))
    st.add(sample("liar/0", t=101.0, trust=0.0))
    st.add(sample("liar/0", t=102.0, confidence="resyncing", trust=0.0))
    d = normalize_dump(st.dump(now_s=103.0))
    console = Console(width=200, record=True)
    console.print(render_dashboard(d, width=200, height=60))
    screen = console.export_text()
    assert "resyncing trust 0.00" in screen and "distrusted: weight 1.00 -> 0.00" in screen
    report = write_report([d], tmp_path).read_text()
    assert "trust 1" in report and "`liar/0`: distrusted: weight 1.00 -> 0.00" in report
    assert "trust" in INCIDENT_COLOURS
