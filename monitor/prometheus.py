"""Prometheus text exposition (format 0.0.4) of a :class:`~monitor.state.MonitorState`.

Metric names follow Prometheus conventions: base units (seconds), ``_total``
for counters, one histogram per latency. Histograms are built at scrape time
from the fold's distributions (whole run): counts and sums are exact; a value
within the fold's relative accuracy (1 %) of a bucket bound may be counted on
either side of it (the monitor keeps sketches, not every value).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable

from core.metrics import CACHE_STATUSES
from core.quantiles import Samples
from monitor.state import MonitorState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets in seconds (TTFT of an emulated engine spans ~10 ms to tens of seconds).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _fmt(value: float) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "+Inf" if value > 0 else "-Inf"
        return repr(value)
    return str(value)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: dict[str, str]) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


class _Writer:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            self.lines.append(f"{name}{_labels(labels)} {_fmt(value)}")

    def histogram(self, name: str, help_text: str, series: dict[str, Samples], label: str) -> None:
        """One histogram family; ``series`` maps a label value ('' = no label) to a distribution."""
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} histogram")
        for value, samples in series.items():
            base = {label: value} if value else {}
            values, counts = samples.weighted()
            cumulative = list(itertools.accumulate(counts))
            for le in LATENCY_BUCKETS_S:
                k = bisect.bisect_right(values, le)
                count = cumulative[k - 1] if k else 0
                self.lines.append(f"{name}_bucket{_labels({**base, 'le': _fmt(le)})} {count}")
            self.lines.append(f"{name}_bucket{_labels({**base, 'le': '+Inf'})} {len(samples)}")
            self.lines.append(f"{name}_sum{_labels(base)} {_fmt(float(samples.total()))}")
            self.lines.append(f"{name}_count{_labels(base)} {len(samples)}")


def _target(sample: dict) -> dict[str, str]:
    return {"worker": sample["worker"], "dp_rank": str(sample["dp_rank"])}


def render(state: MonitorState) -> str:
    """The exposition text for ``state`` (call under the state's lock)."""
    fold = state.fold
    c = fold.counters
    w = _Writer()
    by_status = {st: len(fold.ttft_by_status[st]) for st in CACHE_STATUSES}
    w.family(
        "kvr_requests_total", "counter", "Finished requests by cache status (engine-reported cached tokens).",
        [({"cache_status": st}, n) for st, n in by_status.items()],
    )
    w.family(
        "kvr_request_errors_total", "counter", "Requests that ended in an error, by error code.",
        [({"code": code}, n) for code, n in sorted(state.errors_by_code.items())],
    )
    w.family("kvr_prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [({}, c["prompt_tokens"])])
    w.family("kvr_cached_tokens_total", "counter", "Prompt tokens served from the KV cache.",
             [({}, c["cached_tokens"])])
    w.family("kvr_output_tokens_total", "counter", "Generated tokens.", [({}, c["output_tokens"])])
    hit = c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else math.nan
    predicted = (c["predicted_cached_tokens"] / c["predicted_prompt_tokens"] if c["predicted_prompt_tokens"]
                 else math.nan)
    w.family("kvr_token_hit_rate", "gauge", "Cached prompt tokens / prompt tokens since the monitor started.",
             [({}, hit)])
    w.family(
        "kvr_predicted_token_hit_rate", "gauge", "The router's predicted cached tokens / prompt tokens.",
        [({}, predicted)]
    )
    w.histogram("kvr_ttft_seconds", "Time to first token.", {"": fold.ttft_s}, "cache_status")
    w.histogram(
        "kvr_ttft_by_cache_status_seconds", "Time to first token by cache status.",
        {st: fold.ttft_by_status[st] for st in CACHE_STATUSES}, "cache_status",
    )
    w.histogram("kvr_e2e_seconds", "End-to-end request latency.", {"": fold.e2e_s}, "cache_status")
    w.histogram("kvr_tpot_seconds", "Time per output token after the first.", {"": fold.tpot_s}, "cache_status")
    w.family(
        "kvr_prefix_match_requests_total", "counter",
        "Requests by matched prefix length in blocks (power-of-two bucket lower bound).",
        [({"match_blocks": str(k)}, v) for k, v in sorted(fold.match_blocks_hist.items())],
    )
    w.family("kvr_evictions_total", "counter", "KV blocks evicted on all workers.", [({}, c["blocks_evicted"])])
    w.family("kvr_event_gaps_total", "counter", "Sequence gaps on the KV-event plane.", [({}, c["event_gaps"])])
    w.family("kvr_event_replays_total", "counter", "Replays requested after gaps.", [({}, c["event_replays"])])
    per = sorted(state.workers.items())
    for key, name, kind, help_text in (
        ("running", "kvr_worker_running", "gauge", "Running sequences."),
        ("waiting", "kvr_worker_waiting", "gauge", "Waiting sequences."),
        ("queued_prefill_tokens", "kvr_worker_queued_prefill_tokens", "gauge", "Prefill tokens queued."),
        ("kv_usage", "kvr_worker_kv_usage_ratio", "gauge", "Fraction of KV blocks in use."),
        ("num_gpu_blocks", "kvr_worker_gpu_blocks", "gauge", "KV-cache capacity in blocks."),
        ("indexed_blocks", "kvr_worker_indexed_blocks", "gauge", "Blocks the router's index holds for the worker."),
        ("event_lag_s", "kvr_worker_event_lag_seconds", "gauge", "Last KV-event batch lag at the router."),
        ("gaps", "kvr_worker_event_gaps_total", "counter", "KV-event sequence gaps."),
        ("replays", "kvr_worker_event_replays_total", "counter", "KV-event replays."),
        ("resets", "kvr_worker_index_resets_total", "counter", "Index resets (restart, cache clear, lost gap)."),
        ("evictions", "kvr_worker_evictions_total", "counter", "KV blocks evicted."),
    ):
        w.family(name, kind, help_text, [(_target(v), v[key]) for _, v in per])
    w.family(
        "kvr_worker_index_confidence", "gauge", "1 for the worker's current index confidence.",
        [({**_target(v), "confidence": v["confidence"]}, 1) for _, v in per],
    )
    w.family(
        "kvr_worker_requests_total", "counter", "Finished requests per worker.",
        [({"worker": wid}, int(v["requests"])) for wid, v in sorted(fold.workers.items())],
    )
    w.family("kvr_monitor_records_total", "counter", "Metrics records received.", [({}, state.records)])
    w.family("kvr_monitor_decode_errors_total", "counter", "Undecodable metrics frames.", [({}, state.decode_errors)])
    return "\n".join(w.lines) + "\n"

