from __future__ import annotations

import math

from monitor.plots import RUN_PLOTS
from monitor.report import unique_labels, write_report
from monitor.results import markdown_table, relative_change, run_results, table_rows
from monitor.state import MonitorState
from tests.monitor.records import request, sample
from tests.monitor.synthetic import synthetic_dump

PNG = b"\x89PNG\r\n\x1a\n"


def _small_dump(label: str) -> dict:
    st = MonitorState(block_size=16, label=label)
    st.add(request("a", prompt=64, cached=48, ttft=0.1))  # hit
    st.add(request("b", prompt=64, cached=16, ttft=0.2))  # partial: counts as a hit here
    st.add(request("c", prompt=64, cached=0, ttft=0.6, worker="w1"))  # miss
    st.add(sample("w0", kv=0.2))
    st.add(sample("w1", kv=0.6))
    return st.dump(now_s=200.0)


def test_results_follow_the_documented_definitions():
    r = run_results(_small_dump("x"))
    assert r.requests == 3 and r.errors == 0
    assert r.token_hit_rate == 64 / 192
    assert math.isclose(r.ttft_mean_hit_s, 0.15) and r.ttft_mean_miss_s == 0.6
    assert math.isclose(r.hit_improvement, 0.75)
    assert math.isclose(r.block_utilisation, 0.4)
    assert math.isclose(r.mean_match_blocks, (3 + 1 + 0) / 3)
    assert math.isclose(r.prefix_match_success, 2 / 3)


def test_table_puts_runs_side_by_side_with_a_baseline_row():
    a, b = _small_dump("round_robin"), synthetic_dump("kvr", aware=True)
    header, rows = table_rows([run_results(a), run_results(b)])
    assert header == ["Metric", "round_robin", "kvr"]
    assert rows[0] == ["Total requests", "3", "200"]
    assert rows[1][:2] == ["Token hit rate", "33.3%"]
    assert rows[4][:2] == ["Improvement (hits vs misses)", "75.0%"]
    vs = [r for r in rows if r[0] == "Mean TTFT vs round_robin"][0]
    expected = relative_change(run_results(b).ttft_mean_s, run_results(a).ttft_mean_s)
    assert vs == ["Mean TTFT vs round_robin", "baseline", f"{100 * expected:+.1f}%"]
    md = markdown_table(header, rows).splitlines()
    assert md[0] == "| Metric | round_robin | kvr |" and md[1] == "|:---|---:|---:|"
    assert relative_change(1.0, math.nan) != relative_change(1.0, math.nan)  # NaN
    empty = run_results(MonitorState(label="e").dump(now_s=0))
    assert table_rows([empty])[1][1] == ["Token hit rate", "–"]


def test_report_has_table_plots_and_unique_labels_and_survives_an_empty_run(tmp_path):
    dumps = [synthetic_dump("kvr", aware=True), MonitorState(label="kvr").dump(now_s=0.0)]
    assert [d["label"] for d in unique_labels(dumps)] == ["kvr", "kvr-2"]
    path = write_report(dumps, tmp_path / "rep", title="T", notes="two runs")
    text = path.read_text()
    assert text.startswith("# T\n\ntwo runs\n\n## Results\n\n| Metric | kvr | kvr-2 |")
    images = [ln.split("](")[1][:-1] for ln in text.splitlines() if ln.startswith("![")]
    assert len(images) == 3 + 2 * len(RUN_PLOTS)
    for rel in images:
        assert (path.parent / rel).read_bytes()[:8] == PNG and (path.parent / rel).stat().st_size > 5000
    assert sorted(p.name for p in (path.parent / "plots").iterdir()) == [
        "compare_hit_rate.png", "compare_mean_ttft.png", "compare_ttft_cdf.png", "kvr", "kvr-2"]
    assert sorted(p.stem for p in (path.parent / "plots" / "kvr-2").iterdir()) == sorted(RUN_PLOTS)
    assert "Errors by code: `worker_died` 1" in text
    assert "Incidents: confidence 2, error 1, gap 1, replay 1, worker_seen 3" in text
