"""Prometheus exposition of a :class:`~monitor.state.MonitorState`, through ``prometheus_client``.

Why the library: it owns the text format (escaping, ``_total``/``_bucket`` naming, NaN and
infinities, the ``le`` label) and its parser lets tests read the output back as Prometheus would;
the monitor's numbers come from its own state, so a custom collector builds every family at
scrape time from the state (nothing is registered globally, nothing is kept twice).

Metric names follow Prometheus conventions: base units (seconds), ``_total`` for counters, one
histogram per latency. Histograms are built from the fold's distributions (whole run): counts and
sums are exact; a value within the fold's relative accuracy (1 %) of a bucket bound may be counted
on either side of it (the monitor keeps sketches, not every value).
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.utils import floatToGoString

from core.metrics import CACHE_STATUSES
from core.quantiles import Samples
from monitor.state import MonitorState

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Latency buckets in seconds (TTFT of an emulated engine spans ~10 ms to tens of seconds).
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


def _family(name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]) -> Metric:
    """One counter or gauge family; every sample of it carries the same label names."""
    rows = [(labels, value) for labels, value in samples]
    label_names = list(rows[0][0]) if rows else []
    cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
    family = cls(name, help_text, labels=label_names)
    for labels, value in rows:
        family.add_metric([str(labels[k]) for k in label_names], value)
    return family


def _histogram(name: str, help_text: str, series: dict[str, Samples], label: str) -> Metric:
    """One histogram family; ``series`` maps a label value ('' = no label) to a distribution."""
    labelled = any(series)
    family = HistogramMetricFamily(name, help_text, labels=[label] if labelled else [])
    for value, samples in series.items():
        values, counts = samples.weighted()
        cumulative = list(itertools.accumulate(counts))
        buckets: list[tuple[str, float]] = []
        for le in LATENCY_BUCKETS_S:
            k = bisect.bisect_right(values, le)
            buckets.append((floatToGoString(le), cumulative[k - 1] if k else 0))
        buckets.append(("+Inf", len(samples)))
        family.add_metric([value] if labelled else [], buckets=buckets, sum_value=float(samples.total()))
    return family


def _target(sample: dict) -> dict[str, str]:
    return {"worker": sample["worker"], "dp_rank": str(sample["dp_rank"])}


def _families(state: MonitorState) -> Iterator[Metric]:
    fold = state.fold
    c = fold.counters
    by_status = {st: len(fold.ttft_by_status[st]) for st in CACHE_STATUSES}
    yield _family(
        "kvr_requests_total", "counter", "Finished requests by cache status (engine-reported cached tokens).",
        [({"cache_status": st}, n) for st, n in by_status.items()],
    )
    yield _family(
        "kvr_request_errors_total", "counter", "Requests that ended in an error, by error code.",
        [({"code": code}, n) for code, n in sorted(state.errors_by_code.items())],
    )
    yield _family("kvr_prompt_tokens_total", "counter", "Prompt tokens of finished requests.",
                  [({}, c["prompt_tokens"])])
    yield _family("kvr_cached_tokens_total", "counter", "Prompt tokens served from the KV cache.",
                  [({}, c["cached_tokens"])])
    yield _family("kvr_output_tokens_total", "counter", "Generated tokens.", [({}, c["output_tokens"])])
    hit = c["cached_tokens"] / c["prompt_tokens"] if c["prompt_tokens"] else math.nan
    predicted = (c["predicted_cached_tokens"] / c["predicted_prompt_tokens"] if c["predicted_prompt_tokens"]
                 else math.nan)
    yield _family("kvr_token_hit_rate", "gauge", "Cached prompt tokens / prompt tokens since the monitor started.",
                  [({}, hit)])
    yield _family(
        "kvr_predicted_token_hit_rate", "gauge", "The router's predicted cached tokens / prompt tokens.",
        [({}, predicted)]
    )
    yield _histogram("kvr_ttft_seconds", "Time to first token.", {"": fold.ttft_s}, "cache_status")
    yield _histogram(
        "kvr_ttft_by_cache_status_seconds", "Time to first token by cache status.",
        {st: fold.ttft_by_status[st] for st in CACHE_STATUSES}, "cache_status",
    )
    yield _histogram("kvr_e2e_seconds", "End-to-end request latency.", {"": fold.e2e_s}, "cache_status")
    yield _histogram("kvr_tpot_seconds", "Time per output token after the first.", {"": fold.tpot_s}, "cache_status")
    yield _family(
        "kvr_prefix_match_requests_total", "counter",
        "Requests by matched prefix length in blocks (power-of-two bucket lower bound).",
        [({"match_blocks": str(k)}, v) for k, v in sorted(fold.match_blocks_hist.items())],
    )
    yield _family("kvr_evictions_total", "counter", "KV blocks evicted on all workers.", [({}, c["blocks_evicted"])])
    yield _family("kvr_event_gaps_total", "counter", "Sequence gaps on the KV-event plane.", [({}, c["event_gaps"])])
    yield _family("kvr_event_replays_total", "counter", "Replays requested after gaps.", [({}, c["event_replays"])])
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
        yield _family(name, kind, help_text, [(_target(v), v[key]) for _, v in per])
    yield _family(
        "kvr_worker_index_confidence", "gauge", "1 for the worker's current index confidence.",
        [({**_target(v), "confidence": v["confidence"]}, 1) for _, v in per],
    )
    yield _family(
        "kvr_worker_requests_total", "counter", "Finished requests per worker.",
        [({"worker": wid}, int(v["requests"])) for wid, v in sorted(fold.workers.items())],
    )
    yield _family("kvr_monitor_records_total", "counter", "Metrics records received.", [({}, state.records)])
    yield _family("kvr_monitor_decode_errors_total", "counter", "Undecodable metrics frames.",
                  [({}, state.decode_errors)])


class _StateCollector:
    """A one-scrape collector over ``state`` (the registry asks it once, under the caller's lock)."""

    def __init__(self, state: MonitorState) -> None:
        self._state = state

    def collect(self) -> Iterator[Metric]:
        return _families(self._state)


def render(state: MonitorState) -> str:
    """The exposition text for ``state`` (call under the state's lock)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_StateCollector(state))
    return generate_latest(registry).decode()

