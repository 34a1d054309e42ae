from __future__ import annotations

import json
import math

from bus.schema import ErrorCode
from monitor.dump import dump_fold, load_dump, normalize_dump, write_dump
from monitor.state import MonitorState
from tests.monitor.records import request, sample


def test_requests_fold_by_cache_status_and_errors_stay_out_of_latency():
    st = MonitorState(block_size=16)
    st.add(request("a", cached=48))  # 64-token prompt: 48 reusable tokens → hit
    st.add(request("b", cached=16))  # partial
    st.add(request("c", cached=0))  # miss
    st.add(request("d", worker=None, prompt=64, error=ErrorCode.NO_WORKERS, ttft=0.0, e2e=0.0))
    s = st.fold.summary()
    assert s["requests"] == 3
    assert {k: v["requests"] for k, v in s["by_cache_status"].items()} == {"hit": 1, "partial": 1, "miss": 1}
    assert s["token_hit_rate"] == (48 + 16) / (3 * 64)
    assert st.errors_by_code == {"no_workers": 1}
    assert [i["kind"] for i in st.incidents] == ["error"]
    assert [r["request_id"] for r in st.recent] == ["a", "b", "c", "d"]
    assert st.records == 4


def test_unknown_prediction_is_not_counted_as_zero():
    st = MonitorState(block_size=16)
    st.add(request("a", cached=48, predicted=32))
    st.add(request("b", cached=48, predicted=None))
    s = st.fold.summary()
    assert s["predicted_hit_rate"] == 32 / 64
    assert s["token_hit_rate"] == 96 / 128


def test_cumulative_worker_counters_fold_as_increments_and_survive_a_publisher_restart():
    st = MonitorState(block_size=16)
    st.add(sample(t=1, gaps=1, replays=1, evictions=5))
    st.add(sample(t=2, gaps=1, replays=1, evictions=8))  # +0 gaps, +3 evictions
    st.add(sample(t=3, gaps=3, replays=2, evictions=8))  # +2 gaps, +1 replay
    st.add(sample(t=4, gaps=1, replays=0, evictions=2))  # restart: all new
    c = st.fold.counters
    assert (c["event_gaps"], c["event_replays"], c["blocks_evicted"]) == (1 + 2 + 1, 1 + 1, 5 + 3 + 2)
    assert st.fold.workers["w0"]["blocks_evicted"] == 10
    kinds = [(i["t_s"], i["kind"]) for i in st.incidents]
    assert kinds == [(1, "worker_seen"), (1, "gap"), (1, "replay"), (3, "gap"), (3, "replay"), (4, "stream_restart"),
                     (4, "gap")]
    assert st.incidents[5]["detail"] == "counters restarted (gaps, replays, evictions)"
    assert st.workers["w0"]["gaps"] == 1 and st.workers["w0"]["evictions"] == 2


def test_confidence_changes_and_departures_are_incidents():
    st = MonitorState()
    st.add(sample("w1", t=1, confidence="fresh"))
    st.add(sample("w1", t=2, confidence="resyncing"))
    st.add(sample("w1", t=3, confidence="resyncing"))
    st.add(sample("w1", t=4, confidence="fresh"))
    st.mark_worker_gone("w1", 9.0)
    st.mark_worker_gone("w1", 10.0)  # already gone: nothing new
    assert [(i["t_s"], i["kind"], i["detail"]) for i in st.incidents] == [
        (1, "worker_seen", "confidence fresh"),
        (2, "confidence", "fresh -> resyncing"),
        (4, "confidence", "resyncing -> fresh"),
        (9.0, "worker_gone", "no samples"),
    ]
    assert st.workers == {}


def test_incident_log_is_bounded_and_counts_what_it_drops():
    st = MonitorState(max_incidents=3)
    for i in range(5):
        st.add(request(f"e{i}", worker=None, error=ErrorCode.TIMEOUT))
    assert [i["detail"] for i in st.incidents] == ["timeout e2", "timeout e3", "timeout e4"]
    assert st.incidents_dropped == 2


def test_series_points_window_the_hit_rate_and_skip_stalls():
    st = MonitorState(block_size=16, sample_interval_s=1.0)
    assert st.tick(10.0)  # first point
    st.add(request("a", cached=48, predicted=48, ttft=0.2))
    st.add(sample("w0", t=10.2, kv=0.25, indexed=7))
    assert not st.tick(10.5)
    assert st.tick(11.0)
    st.add(request("b", cached=0, predicted=16, ttft=0.4))
    assert st.tick(14.7)  # a stall: one point, next due at 15.0
    assert not st.tick(14.9)
    assert st.tick(15.0)
    pts = list(st.series)
    assert [p["t_s"] for p in pts] == [10.0, 11.0, 14.7, 15.0]
    assert [p["window_requests"] for p in pts] == [0, 1, 1, 0]
    assert pts[1]["window_hit_rate"] == 48 / 64 and pts[2]["window_hit_rate"] == 0.0
    assert pts[1]["window_predicted_hit_rate"] == 0.75 and pts[2]["window_predicted_hit_rate"] == 0.25
    assert pts[2]["token_hit_rate"] == 48 / 128
    assert pts[1]["window_ttft_p50_s"] == 0.2
    assert math.isnan(pts[0]["window_hit_rate"])
    assert pts[1]["kv_usage"] == {"w0": 0.25} and pts[1]["indexed_blocks"] == {"w0": 7}


def test_dump_is_strict_json_and_reads_back(tmp_path):
    st = MonitorState(block_size=16, label="cache-aware")
    st.tick(1.0)  # NaN hit rate in the series
    st.add(request("a", cached=48))
    st.add(sample())
    path = write_dump(tmp_path / "d" / "m.json", st.dump(now_s=5.0))
    text = path.read_text()
    json.loads(text)  # strict: NaN became null
    assert "NaN" not in text
    d = load_dump(path)
    assert d["label"] == "cache-aware" and d["summary"]["requests"] == 1
    assert d["series"][0]["window_hit_rate"] is None
    assert dump_fold(d).to_dict() == st.fold.to_dict()
    assert [p.name for p in path.parent.iterdir()] == ["m.json"]  # no temp file left


def test_a_fold_only_json_reads_as_a_dump(tmp_path):
    st = MonitorState(block_size=16)
    st.add(request("a", cached=16))
    d = normalize_dump({"fold": st.fold.to_dict()}, source=str(tmp_path / "sim-run.json"))
    assert d["label"] == "sim-run" and d["series"] == [] and d["summary"]["requests"] == 1


def test_bad_dumps_are_refused_with_a_reason(tmp_path):
    import pytest

    from monitor.dump import DumpError

    bad = tmp_path / "x.json"
    bad.write_text("{nope")
    with pytest.raises(DumpError, match="not JSON"):
        load_dump(bad)
    bad.write_text("[]")
    with pytest.raises(DumpError, match="JSON object"):
        load_dump(bad)
    bad.write_text('{"a": 1}')
    with pytest.raises(DumpError, match="no 'fold'"):
        load_dump(bad)
    with pytest.raises(DumpError, match="No such file"):
        load_dump(tmp_path / "missing.json")


def test_samples_named_by_target_fold_into_their_worker():
    from monitor.state import split_target

    assert split_target("w1/2") == ("w1", 2)
    assert split_target("w1") == ("w1", 0)
    assert split_target("a/b") == ("a/b", 0)
    st = MonitorState(block_size=16)
    st.add(request("a", worker="w1", cached=48))
    st.add(sample("w1/0", kv=0.2, evictions=3))
    st.add(sample("w1/1", kv=0.4))
    assert sorted(st.fold.workers) == ["w1"]  # one worker: the load CV is not diluted by targets
    assert st.fold.workers["w1"]["load_samples"] == 2 and st.fold.workers["w1"]["blocks_evicted"] == 3
    assert sorted(st.workers) == ["w1/0", "w1/1"]
    assert (st.workers["w1/1"]["worker"], st.workers["w1/1"]["dp_rank"]) == ("w1", 1)


def test_light_dump_leaves_out_the_fold_and_old_series_points():
    st = MonitorState(block_size=16, sample_interval_s=1.0)
    for t in range(10):
        st.tick(float(t))
    st.add(request("a", cached=48))
    light = st.dump(now_s=20.0, light=True, light_series=3)
    assert "fold" not in light and light["light"] is True
    assert [p["t_s"] for p in light["series"]] == [7.0, 8.0, 9.0]
    assert light["summary"] == st.dump(now_s=20.0)["summary"]
    assert normalize_dump(light)["label"] == "live"


def test_the_routers_mirror_health_is_kept_and_its_changes_are_incidents():
    import msgspec

    from bus.schema import MirrorStatus
    from monitor.dashboard import render_dashboard

    def with_mirror(t: float, status: MirrorStatus | None, worker: str = "w0"):
        return msgspec.structs.replace(sample(worker, t=t), mirror=status)

    st = MonitorState(block_size=16)
    st.add(with_mirror(100.0, None))
    assert st.mirror is None and st.dump(now_s=100.0, light=True)["mirror"] is None
    st.add(with_mirror(101.0, MirrorStatus()))  # ok from the first report: no incident
    st.add(with_mirror(102.0, MirrorStatus("degraded", "out_of_memory", 101.5, 3)))
    st.add(with_mirror(102.0, MirrorStatus("degraded", "out_of_memory", 101.5, 3), worker="w1"))  # same news
    st.add(with_mirror(101.9, MirrorStatus()))  # an older sample arriving late changes nothing
    st.add(with_mirror(103.0, MirrorStatus("degraded", "out_of_memory", 101.5, 9)))
    assert st.mirror == {"state": "degraded", "cause": "out_of_memory", "since_s": 101.5, "failed_writes": 9,
                         "t_s": 103.0}
    st.add(with_mirror(104.0, MirrorStatus("ok", None, 104.0, 0)))
    assert [(i["t_s"], i["detail"]) for i in st.incidents if i["kind"] == "mirror"] == [
        (102.0, "degraded (out_of_memory)"), (104.0, "ok")]
    st.add(with_mirror(105.0, MirrorStatus("degraded", "unreachable", 105.0, 1)))
    d = st.dump(now_s=106.0, light=True)
    assert d["mirror"]["cause"] == "unreachable"
    from rich.console import Console

    console = Console(width=200, record=True)
    console.print(render_dashboard(normalize_dump(d), width=200, height=60))
    assert "mirror degraded (unreachable since 1970-01-01 00:01:45 UTC, 1 failed writes)" in console.export_text()


def test_router_replicas_samples_of_one_target_are_folded_per_replica():
    """Two replicas publish their own cumulative counters for the same target: interleaved, they
    must not read as restarts, and each replica's gaps count once; both replicas are listed."""
    st = MonitorState(block_size=16)
    st.add(sample("w0/0", t=100.0, router="r1", applied=50, gaps=1))
    st.add(sample("w0/0", t=100.1, router="r2", applied=10))
    st.add(sample("w0/0", t=101.0, router="r1", applied=60, gaps=1))
    st.add(sample("w0/0", t=101.1, router="r2", applied=20, gaps=2, confidence="resyncing"))
    kinds = [i["kind"] for i in st.incidents]
    assert "stream_restart" not in kinds
    assert [i["detail"] for i in st.incidents if i["kind"] == "gap"] == ["1 gap(s)", "2 gap(s)"]
    assert [i["detail"] for i in st.incidents if i["kind"] == "confidence"] == ["fresh -> resyncing (router r2)"]
    st.add(sample("w0/0", t=102.0, router="r2", applied=25, trust=0.0))
    st.add(sample("w0/0", t=102.1, router="r1", applied=70))  # r1 still trusts it: the lowest is shown
    assert st.trust["w0/0"] == 0.0
    assert [i["detail"].split(":")[0] for i in st.incidents if i["kind"] == "trust"] == ["distrusted"]
    d = st.dump(now_s=103.0)
    assert d["routers"] == {"r1": {"last_sample_s": 102.1}, "r2": {"last_sample_s": 102.0}}


def test_the_dashboard_lists_router_replicas():
    from rich.console import Console

    from monitor.dashboard import render_dashboard
    from monitor.dump import normalize_dump

    st = MonitorState(block_size=16)
    st.add(sample("w0/0", t=100.0, router="r1"))
    st.add(sample("w0/0", t=101.0, router="r2"))
    console = Console(width=200, record=True)
    console.print(render_dashboard(normalize_dump(st.dump(now_s=103.0)), width=200, height=60))
    assert "routers r1 (3 s), r2 (2 s)" in console.export_text()
