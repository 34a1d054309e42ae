"""What the monitor knows: the shared metrics fold plus the live-only series around it.

Every metric is computed by :class:`core.metrics.MetricsFold` (DESIGN §8), the
same fold the simulator uses. This module only adds what a *live* view needs
and a fold has no notion of:

* the latest :class:`~bus.schema.WorkerSample` per worker (load, index size,
  index confidence, cumulative event-plane counters);
* a **series** of snapshots taken every ``sample_interval_s`` (cumulative
  and windowed hit rate, predicted hit rate, TTFT p50/p99 of the window, per
  worker KV usage and indexed blocks) — the hit-rate and recovery plots;
* an **incident log** (gaps, replays, resets, confidence changes, worker
  arrivals and departures, request errors) — the recovery timeline;
* the most recent requests and error counts by code;
* the router's Redis mirror health (``WorkerSample.mirror``, latest; changes are incidents);
* each target's closed-loop trust weight (core/trust.py; ``WorkerSample.trust``): a drop or a
  recovery is an incident, the latest weight shows with the worker.

Worker samples carry *cumulative* counters; the state folds their increments.
A counter that goes down means its publisher restarted: the new value is taken
as the increment (nothing is lost, nothing is counted twice).

Times are the publishers' wall-clock seconds; the state never reads a clock.

Memory is bounded whatever the run's length (a monitor runs for days):

* the fold keeps latency distributions as DDSketches (``relative_accuracy``,
  default 1 %: every reported quantile within 1 % of a true order statistic;
  counts, token totals, means and maxima exact) and at most
  ``max_timeline_buckets`` timeline buckets (default 1024; past that the bucket
  width doubles, so the whole run stays, coarser);
* the series holds at most ``max_series`` points (default 4,096): when full, its
  older half is thinned to every other point, so the last ~``max_series / 2``
  intervals are at full resolution and older history gets sparser (each kept
  point is unchanged: its ``window_*`` fields describe its own interval);
* the incident log keeps the last ``max_incidents`` (default 2,000; dropped ones
  are counted) and the recent-request table the last ``recent`` (default 50);
* a window's TTFTs are kept only until the next series point (one
  ``sample_interval_s`` of requests).

What grows is per worker and per error code: the fleet's size, not the run's length.
"""

from __future__ import annotations

import logging
import math
from collections import deque
from typing import Any

from bus.schema import RequestRecord, WorkerSample
from core.blocks import DEFAULT_BLOCK_SIZE
from core.events import BlockRemoved
from core.metrics import MetricsFold
from core.quantiles import DEFAULT_RELATIVE_ACCURACY, ExactSamples

logger = logging.getLogger(__name__)

DUMP_VERSION = 1
DUMP_KIND = "kvr.monitor.dump"
_EVENT_COUNTERS = ("gaps", "replays", "resets", "evictions", "events_applied")


def split_target(name: str) -> tuple[str, int]:
    """``"w1/2"`` → ``("w1", 2)``; a plain worker id is rank 0.

    The router names a sample by its target (worker and data-parallel rank,
    ``WorkerKey.__str__``) and a request by its worker: the fold keys both by
    worker so per-worker load and per-worker requests line up.
    """
    worker, sep, rank = name.rpartition("/")
    if sep and worker and rank.isdigit():
        return worker, int(rank)
    return name, 0


def finite_or_none(value: Any) -> Any:
    """Recursively replace NaN / ±inf by ``None`` so a dump is strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


class _Window:
    """Request totals since the last series point (a windowed hit rate and TTFT)."""

    def __init__(self) -> None:
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.predicted_prompt_tokens = 0
        self.predicted_cached_tokens = 0
        self.requests = 0
        self.errors = 0
        self.ttft_s = ExactSamples()  # one sample interval's worth: bounded by the request rate


class MonitorState:
    """Folds metrics records; renders the dump that dash, plot and report read.

    ``label`` names the run in reports; ``recent`` bounds the recent-request list
    and ``max_incidents`` the incident log (oldest dropped first, counted);
    ``max_series`` the series (thinned when full). ``relative_accuracy`` and
    ``max_timeline_buckets`` bound the fold (see the module docstring).
    """

    def __init__(
        self,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        bucket_s: float = 5.0,
        sample_interval_s: float = 1.0,
        label: str = "",
        recent: int = 50,
        max_incidents: int = 2000,
        max_series: int = 4096,
        relative_accuracy: float = DEFAULT_RELATIVE_ACCURACY,
        max_timeline_buckets: int = 1024,
    ) -> None:
        self.fold = MetricsFold(
            block_size=block_size,
            timeline_bucket_s=bucket_s,
            relative_accuracy=relative_accuracy,
            max_timeline_buckets=max_timeline_buckets,
        )
        self.label = label
        self.sample_interval_s = sample_interval_s
        self.recent: deque[dict[str, Any]] = deque(maxlen=recent)
        self.incidents: deque[dict[str, Any]] = deque(maxlen=max_incidents)
        self.incidents_dropped = 0
        if max_series < 2:
            raise ValueError("max_series must be at least 2")
        self.max_series = max_series
        self.series: list[dict[str, Any]] = []
        self.workers: dict[str, dict[str, Any]] = {}  # latest sample per worker, JSON-ready
        self.mirror: dict[str, Any] | None = None  # the router's mirror health, latest (None: not told)
        self.trust: dict[str, float] = {}  # target → the router's trust weight, latest (none: not told)
        self.errors_by_code: dict[str, int] = {}
        self.records = 0
        self.decode_errors = 0
        self.started_s: float | None = None
        self.last_record_s: float | None = None
        # (router id, target) → last cumulative event counters, confidence and trust: each router
        # replica publishes its own view of every target, so each is compared with its own last.
        self._counters: dict[tuple[str, str], dict[str, int]] = {}
        self._confidence: dict[tuple[str, str], str] = {}
        self._trust_by: dict[str, dict[str, float]] = {}  # target → router id → its weight
        self.routers: dict[str, float] = {}  # router id → wall time of its latest sample
        self._window = _Window()
        self._next_sample_s: float | None = None

    # ------------------------------------------------------------------ inputs

    def add(self, record: RequestRecord | WorkerSample) -> None:
        """Fold one metrics record of either kind."""
        self.records += 1
        if isinstance(record, RequestRecord):
            self.add_request(record)
        else:
            self.add_worker_sample(record)

    def add_request(self, rec: RequestRecord) -> None:
        self._seen(rec.finish_s)
        w = self._window
        if rec.error is not None:
            code = rec.error
            self.errors_by_code[code] = self.errors_by_code.get(code, 0) + 1
            w.errors += 1
            self._incident(rec.finish_s, rec.worker_id or "", "error", f"{code} {rec.request_id}")
        if rec.error is None and rec.worker_id is not None:
            self.fold.add_request(rec)
            w.requests += 1
            w.prompt_tokens += rec.prompt_tokens
            w.cached_tokens += rec.cached_tokens
            w.ttft_s.append(rec.ttft_s)
            if rec.predicted_cached_tokens is not None:
                w.predicted_prompt_tokens += rec.prompt_tokens
                w.predicted_cached_tokens += rec.predicted_cached_tokens
        self.recent.append(
            {
                "request_id": rec.request_id,
                "worker_id": rec.worker_id,
                "finish_s": rec.finish_s,
                "prompt_tokens": rec.prompt_tokens,
                "cached_tokens": rec.cached_tokens,
                "predicted_cached_tokens": rec.predicted_cached_tokens,
                "output_tokens": rec.output_tokens,
                "ttft_s": rec.ttft_s,
                "e2e_s": rec.e2e_s,
                "policy": rec.policy,
                "error": rec.error,
            }
        )

    def add_worker_sample(self, s: WorkerSample) -> None:
        self._seen(s.t_s)
        wid = s.worker_id  # the target's name: the key of live state, series and incidents
        worker, dp_rank = split_target(wid)
        key = (s.router_id, wid)
        if s.router_id:
            self.routers[s.router_id] = max(s.t_s, self.routers.get(s.router_id, s.t_s))
        if wid not in self.workers:
            self._incident(s.t_s, wid, "worker_seen", f"confidence {s.confidence}")
        elif key in self._confidence and self._confidence[key] != s.confidence:
            who = f" (router {s.router_id})" if len(self.routers) > 1 else ""
            self._incident(s.t_s, wid, "confidence", f"{self._confidence[key]} -> {s.confidence}{who}")
        self._confidence[key] = s.confidence
        self.fold.observe_load(
            worker, s.t_s, kv_usage=s.load.kv_usage, queued_prefill_tokens=s.load.queued_prefill_tokens
        )
        if s.event_lag_s > 0 or s.events_applied:
            self.fold.observe_event_lag(s.event_lag_s)
        self._observe_mirror(s)
        self.observe_trust(wid, s.trust, s.t_s, router_id=s.router_id)
        deltas = self._counter_deltas(key, s)
        if deltas["gaps"]:
            self.fold.count_gap(deltas["gaps"])
            self._incident(s.t_s, wid, "gap", f"{deltas['gaps']} gap(s)")
        if deltas["replays"]:
            self.fold.count_replay(deltas["replays"])
            self._incident(s.t_s, wid, "replay", f"{deltas['replays']} replay(s)")
        if deltas["resets"]:
            self._incident(s.t_s, wid, "reset", f"{deltas['resets']} reset(s)")
        if deltas["evictions"]:
            # The fold counts evictions from BlockRemoved events; the hashes are not needed.
            self.fold.observe_kv_events(worker, [BlockRemoved(block_hashes=[0] * deltas["evictions"], medium=None)])
        self.workers[wid] = {
            "worker_id": wid,
            "worker": worker,
            "dp_rank": dp_rank,
            "t_s": s.t_s,
            "running": s.load.running,
            "waiting": s.load.waiting,
            "queued_prefill_tokens": s.load.queued_prefill_tokens,
            "kv_usage": s.load.kv_usage,
            "num_free_blocks": s.load.num_free_blocks,
            "num_gpu_blocks": s.load.num_gpu_blocks,
            "indexed_blocks": s.indexed_blocks,
            "confidence": s.confidence,
            "event_lag_s": s.event_lag_s,
            "trust": self.trust.get(wid),
            **{k: self._counters[key][k] for k in _EVENT_COUNTERS},
        }

    def _observe_mirror(self, s: WorkerSample) -> None:
        if s.mirror is None:
            return
        mirror = {"state": s.mirror.state, "cause": s.mirror.cause, "since_s": s.mirror.since_s,
                  "failed_writes": s.mirror.failed_writes, "t_s": s.t_s}
        was = self.mirror
        # Samples arrive per target and can interleave across a change: only a newer one counts.
        if was is not None and s.t_s < was["t_s"]:
            return
        before = was or {"state": "ok", "cause": None}  # no report yet: assumed ok (not an incident)
        if (before["state"], before["cause"]) != (mirror["state"], mirror["cause"]):
            detail = "ok" if mirror["cause"] is None else f"{mirror['state']} ({mirror['cause']})"
            self._incident(s.t_s, "", "mirror", detail)
        self.mirror = mirror

    def observe_trust(self, target: str, weight: float, t_s: float, *, router_id: str = "") -> None:
        """A router's trust weight of ``target`` (1: trusted; less: its overlap counts that much).

        A change is an incident (``trust``); so is a first report below 1 (the monitor started
        after the drop). A first report of full trust is the normal case, not an incident. With
        several router replicas each is compared with its own last report; the weight shown is the
        lowest of theirs.
        """
        self._seen(t_s)
        by_router = self._trust_by.setdefault(target, {})
        before = by_router.get(router_id, 1.0)
        by_router[router_id] = weight
        self.trust[target] = min(by_router.values())
        if target in self.workers:
            self.workers[target]["trust"] = self.trust[target]
        if weight < before:
            self._incident(t_s, target, "trust", f"distrusted: weight {before:.2f} -> {weight:.2f} "
                                                 "(reported cached tokens fell short; index resynced)")
        elif weight > before:
            self._incident(t_s, target, "trust", f"trusted again: weight {before:.2f} -> {weight:.2f}")

    def mark_worker_gone(self, worker_id: str, t_s: float) -> None:
        """The worker stopped sending samples (the service decides after how long)."""
        self.trust.pop(worker_id, None)  # a new incarnation starts trusted (the router forgets it too)
        self._trust_by.pop(worker_id, None)
        for table in (self._confidence, self._counters):
            for key in [k for k in table if k[1] == worker_id]:
                del table[key]
        if self.workers.pop(worker_id, None) is not None:
            self._incident(t_s, worker_id, "worker_gone", "no samples")

    def _counter_deltas(self, key: tuple[str, str], s: WorkerSample) -> dict[str, int]:
        wid = key[1]
        last = self._counters.get(key)
        now = {k: int(getattr(s, k)) for k in _EVENT_COUNTERS}
        self._counters[key] = now
        if last is None:
            return now
        # A decrease means the counters restarted (a new worker incarnation, a router
        # restart): the new value is all new.
        restarted = [k for k in _EVENT_COUNTERS if now[k] < last[k]]
        if restarted:
            self._incident(s.t_s, wid, "stream_restart", f"counters restarted ({', '.join(restarted)})")
        return {k: (now[k] - last[k] if now[k] >= last[k] else now[k]) for k in _EVENT_COUNTERS}

    def _incident(self, t_s: float, worker_id: str, kind: str, detail: str) -> None:
        if len(self.incidents) == self.incidents.maxlen:
            self.incidents_dropped += 1
        self.incidents.append({"t_s": t_s, "worker_id": worker_id, "kind": kind, "detail": detail})

    def _seen(self, t_s: float) -> None:
        if self.started_s is None or t_s < self.started_s:
            self.started_s = t_s
        self.last_record_s = t_s if self.last_record_s is None else max(self.last_record_s, t_s)

    # ------------------------------------------------------------------ series

    def tick(self, now_s: float) -> bool:
        """Append a series point if ``sample_interval_s`` has passed; True when one was taken."""
        if self._next_sample_s is None:
            self._next_sample_s = now_s
        if now_s < self._next_sample_s:
            return False
        self.series.append(self._series_point(now_s))
        if len(self.series) > self.max_series:
            # Keep the first point (the run's start) and every other one of the older half.
            half = len(self.series) // 2
            self.series = self.series[:half:2] + self.series[half:]
        self._window = _Window()
        # Skip missed intervals instead of bursting points after a stall.
        steps = math.floor((now_s - self._next_sample_s) / self.sample_interval_s) + 1
        self._next_sample_s += steps * self.sample_interval_s
        return True

    def _series_point(self, now_s: float) -> dict[str, Any]:
        c = self.fold.counters
        w = self._window
        ttft = w.ttft_s
        return {
            "t_s": now_s,
            "requests": int(c["requests"]),
            "errors": sum(self.errors_by_code.values()),
            "token_hit_rate": c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else math.nan,
            "window_requests": w.requests,
            "window_errors": w.errors,
            "window_hit_rate": w.cached_tokens / w.prompt_tokens if w.prompt_tokens else math.nan,
            "window_predicted_hit_rate": (
                w.predicted_cached_tokens / w.predicted_prompt_tokens if w.predicted_prompt_tokens else math.nan
            ),
            "window_ttft_p50_s": ttft.quantile(50),
            "window_ttft_p99_s": ttft.quantile(99),
            "evictions": int(c["blocks_evicted"]),
            "gaps": int(c["event_gaps"]),
            "replays": int(c["event_replays"]),
            "kv_usage": {wid: v["kv_usage"] for wid, v in sorted(self.workers.items())},
            "indexed_blocks": {wid: v["indexed_blocks"] for wid, v in sorted(self.workers.items())},
            "running": {wid: v["running"] + v["waiting"] for wid, v in sorted(self.workers.items())},
        }

    # ------------------------------------------------------------------ output

    def stored_sizes(self) -> dict[str, int]:
        """Entries held, by container: flat once the run is past its warm-up (what the soak test pins)."""
        return {
            **{f"fold_{k}": v for k, v in self.fold.stored_sizes().items()},
            "series": len(self.series),
            "incidents": len(self.incidents),
            "recent_requests": len(self.recent),
            "window_ttft": len(self._window.ttft_s),
            "live_workers": len(self.workers),
            "worker_counters": len(self._counters),
            "trust": len(self.trust),
            "error_codes": len(self.errors_by_code),
        }

    def dump(self, *, now_s: float, light: bool = False, light_series: int = 120) -> dict[str, Any]:
        """The whole state as strict JSON data (NaN → null); :func:`monitor.dump.load_dump` reads it.

        ``light`` (what a dashboard polls): no fold (its sketches and timeline are
        bounded but not small) and only the last ``light_series`` series points.
        """
        series = list(self.series)
        data = {
            "kind": DUMP_KIND,
            "version": DUMP_VERSION,
            "label": self.label,
            "light": light,
            "dumped_s": now_s,
            "started_s": self.started_s,
            "last_record_s": self.last_record_s,
            "records": self.records,
            "decode_errors": self.decode_errors,
            "summary": self.fold.summary(),
            "timeline": self.fold.timeline_series(),
            "errors_by_code": dict(sorted(self.errors_by_code.items())),
            "workers": {k: self.workers[k] for k in sorted(self.workers)},
            "mirror": self.mirror,
            "trust": dict(sorted(self.trust.items())),
            "routers": {r: {"last_sample_s": t} for r, t in sorted(self.routers.items())},
            "series": series[-light_series:] if light else series,
            "incidents": list(self.incidents),
            "incidents_dropped": self.incidents_dropped,
            "recent_requests": list(self.recent),
        }
        if not light:
            data["fold"] = self.fold.to_dict()
        return finite_or_none(data)
