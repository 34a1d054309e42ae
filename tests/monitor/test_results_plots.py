from __future__ import annotations

import math

import pytest

from core.metrics import dense_timeline
from monitor.plots import (
    RUN_FIGURES,
    RUN_PLOTS,
    _hit_rate_series,
    _per_worker_over_time,
    block_utilisation_figure,
    block_utilisation_series,
    hit_rate_over_time_figure,
    recovery_timeline_figure,
    worker_load_grid,
    worker_load_heatmap_figure,
)
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


# ----------------------------------------------------------------------------- plots tell the truth

T0 = 1001.3  # not on a 5 s bucket boundary


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _bursty_dump() -> dict:
    """A request a second for 3 s (75% hit), 11 idle seconds, then 5 s more (50% hit); a sample at the start."""
    st = MonitorState(block_size=16, bucket_s=5.0, sample_interval_s=1.0, label="bursty")
    st.add(sample("w0", t=T0, kv=0.2, indexed=50))
    st.tick(T0)
    for k in range(1, 20):
        if k <= 3 or k >= 15:  # arrives half a second before the tick, finishes on it
            st.add(request(f"r{k}", t=T0 + k - 0.5, e2e=0.5, prompt=64, cached=48 if k <= 3 else 32))
        st.tick(T0 + k)
    return st.dump(now_s=T0 + 20)


def _none_for_nan(values) -> list:
    return [None if math.isnan(v) else round(float(v), 9) for v in values]


def test_hit_rate_breaks_over_idle_intervals_instead_of_bridging_them():
    fig = hit_rate_over_time_figure(_bursty_dump())
    (actual,) = fig.axes[0].lines  # no prediction in these records
    assert list(actual.get_xdata()) == [float(k) for k in range(20)]
    assert _none_for_nan(actual.get_ydata()) == [None] + [75.0] * 3 + [None] * 11 + [50.0] * 5
    assert math.isnan(_hit_rate_series(_bursty_dump())[2][5])  # the prediction breaks too


def test_a_folds_timeline_gets_its_idle_buckets_back():
    tl = {"t_s": [10.0, 15.0, 30.0], "token_hit_rate": [0.5, None, 0.25], "requests": {"w0": [1, 0, 2]},
          "kv_usage": {"w0": [0.1, 0.2, 0.3]}}
    dense = dense_timeline(tl, 5.0)
    assert dense["t_s"] == [10.0, 15.0, 20.0, 25.0, 30.0]
    assert _none_for_nan(dense["token_hit_rate"]) == [0.5, None, None, None, 0.25]
    assert dense["requests"] == {"w0": [1.0, 0.0, 0.0, 0.0, 2.0]}
    assert _none_for_nan(dense["kv_usage"]["w0"]) == [0.1, 0.2, None, None, 0.3]
    no_series = {**_bursty_dump(), "series": []}  # a plot falls back on the fold's buckets
    assert _none_for_nan(_hit_rate_series(no_series)[1]) == [0.75, None, None, 0.5]


def test_plots_of_the_folds_buckets_start_at_the_run_not_before_it():
    """A dump whose live series has no request (a run shorter than one sample interval) is drawn
    from the fold's buckets, which are aligned to multiples of 5 s: the first began 1.3 s before
    the run and is clipped to its start, as the heatmap's first bin is."""
    no_series = {**_bursty_dump(), "series": []}
    t, _, _ = _hit_rate_series(no_series)
    assert t == pytest.approx([0.0, 3.7, 8.7, 13.7])
    t_kv, kv = _per_worker_over_time(no_series, "kv_usage")
    assert t_kv == pytest.approx([0.0, 3.7, 8.7, 13.7]) and list(kv) == ["w0"]
    assert hit_rate_over_time_figure(no_series).axes[0].get_xlim()[0] >= -1.0  # matplotlib's margin, not -1.3 s
    timeline = recovery_timeline_figure(no_series).axes[0]
    assert min(min(line.get_xdata()) for line in timeline.lines) == 0.0


def test_heatmap_bins_start_at_the_first_record_and_end_at_the_last():
    d = _bursty_dump()
    edges, workers, grid = worker_load_grid(d)
    # Buckets [1000, 1005), ..., [1015, 1020), clipped to the run [T0, T0 + 19].
    assert edges == pytest.approx([0.0, 3.7, 8.7, 13.7, 18.7])
    assert workers == ["w0"]
    assert grid[0] == pytest.approx([3 / 3.7, 0.0, 0.0, 5 / 5.0])  # requests started per second of each bin
    fig = worker_load_heatmap_figure(d)
    assert fig.axes[0].get_xlim() == pytest.approx((0.0, 18.7))
    synthetic = synthetic_dump("s", aware=True)
    assert worker_load_grid(synthetic)[0][0] == 0.0
    assert worker_load_heatmap_figure(synthetic).axes[0].get_xlim()[0] == 0.0


def test_block_panels_say_in_use_vs_cached_in_one_unit():
    d = synthetic_dump("s", aware=True)
    d["workers"]["w1"]["num_gpu_blocks"] = 200  # capacity differs per worker
    u = block_utilisation_series(d)
    assert u["cached_unit"] == "%" and u["capacity_blocks"] == {"w0": 100, "w1": 200, "w2": 100}
    for k, point in enumerate(d["series"]):
        assert sorted(point["kv_usage"]) in ([], ["w0", "w1", "w2"])  # none before the first samples
        for w in point["kv_usage"]:
            assert u["in_use_pct"][w][k] == pytest.approx(100 * point["kv_usage"][w])
            assert u["cached"][w][k] == pytest.approx(100 * point["indexed_blocks"][w] / u["capacity_blocks"][w])
    fig = block_utilisation_figure(d)
    in_use, cached = fig.axes[:2]
    assert in_use.get_title() == "in use by running requests"
    assert cached.get_title().startswith("cached: in use or idle")
    assert in_use.get_ylabel() == cached.get_ylabel().replace("cached", "in use")  # the same unit
    assert [t.get_text() for t in cached.get_legend().get_texts()] == [
        "w0 (100 blocks)", "w1 (200 blocks)", "w2 (100 blocks)"]
    d["workers"]["w1"]["num_gpu_blocks"] = 0  # a router that does not report capacity: counts, said so
    u = block_utilisation_series(d)
    assert u["cached_unit"] == "blocks" and _none_for_nan(u["cached"]["w1"]) == [
        p["indexed_blocks"].get("w1") for p in d["series"]]
    assert block_utilisation_figure(d).axes[1].get_ylabel() == "blocks cached (count; capacity not reported)"


def _data_points_under_legends(fig) -> list[tuple[str, float, float]]:
    """Every plotted vertex and marker (display coordinates) that falls inside some legend's box."""
    import numpy as np

    fig.canvas.draw()
    boxes = [ax.get_legend().get_window_extent() for ax in fig.axes if ax.get_legend() is not None]
    points = []
    for ax in fig.axes:
        for line in ax.lines:
            xy = np.column_stack([np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)])
            points += [(line.get_label(), *p) for p in ax.transData.transform(xy)]
        for coll in ax.collections:
            offsets = coll.get_offsets()
            if len(offsets):
                points += [(coll.get_label(), *p) for p in coll.get_offset_transform().transform(offsets)]
    return [p for p in points
            if math.isfinite(p[1]) and math.isfinite(p[2]) and any(b.contains(p[1], p[2]) for b in boxes)]


@pytest.mark.parametrize("name", RUN_PLOTS)
def test_no_legend_hides_data(name):
    for dump in (synthetic_dump("s", aware=True), _bursty_dump()):
        fig = RUN_FIGURES[name](dump)
        assert _data_points_under_legends(fig) == []
        legends = [ax.get_legend().get_window_extent() for ax in fig.axes if ax.get_legend() is not None]
        titles = [ax.title.get_window_extent() for ax in fig.axes if ax.get_title()]
        assert not any(leg.overlaps(title) for leg in legends for title in titles)


def test_time_series_legends_sit_above_or_beside_their_axes():
    fig = recovery_timeline_figure(synthetic_dump("s", aware=True))
    hit, index, incidents = fig.axes[:3]
    fig.canvas.draw()
    legend = hit.get_legend().get_window_extent()
    assert legend.y0 >= hit.bbox.y1 and [t.get_text() for t in hit.get_legend().get_texts()] == [
        "hit rate (engine)", "predicted (router)", "errors"]
    for ax in (index, incidents):
        assert ax.get_legend().get_window_extent().x0 >= ax.bbox.x1
    fig = hit_rate_over_time_figure(_bursty_dump())
    fig.canvas.draw()
    assert fig.axes[0].get_legend().get_window_extent().y0 >= fig.axes[0].bbox.y1


def test_sim_over_time_breaks_lines_over_idle_buckets():
    from core.metrics import MetricsFold, RequestRecord
    from sim.plots import over_time

    fold = MetricsFold(block_size=16, timeline_bucket_s=5.0)
    for k, t in enumerate((1.0, 2.0, 21.0)):
        fold.add_request(RequestRecord(request_id=f"r{k}", worker_id="w0", arrival_s=t, ttft_s=0.1, e2e_s=0.2,
                                       prompt_tokens=64, cached_tokens=32, output_tokens=4))
    fig = over_time({"kvr": fold})
    (hit,) = fig.axes[0].lines
    assert list(hit.get_xdata()) == [0.0, 5.0, 10.0, 15.0, 20.0]
    assert _none_for_nan(hit.get_ydata()) == [0.5, None, None, None, 0.5]


def test_incidents_of_different_kinds_at_one_time_do_not_cover_each_other() -> None:
    """A worker seen again while its stream replays logs both at one instant: each kind has its own
    lane inside the worker's row, all lanes inside the row."""
    from monitor.plots import INCIDENT_COLOURS, incident_lane

    lanes = [incident_lane(k) for k in INCIDENT_COLOURS]
    assert len(set(lanes)) == len(lanes)
    assert all(-0.45 < x < 0.45 for x in lanes)
    assert incident_lane("worker_seen") != incident_lane("replay")
    assert incident_lane("something new") == 0.0
