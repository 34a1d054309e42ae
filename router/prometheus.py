"""Prometheus exposition of the router's stats snapshot (``RouterService.stats``), through
``prometheus_client``.

Why the library (as the monitor, ``monitor/prometheus.py``): it owns the text format (escaping of
label values such as worker ids, ``_total`` naming, HELP/TYPE lines) and its parser lets tests read
the output back as Prometheus would. The numbers are the snapshot's: a collector builds every
family at scrape time (nothing is registered globally, nothing kept twice).

Families:

* ``kvr_router_<counter>_total``: every counter of the service (``RouterService.counters``, and the
  CURVE handshakes refused), so a new counter is exported without touching this module;
* ``kvr_router_workers``, ``kvr_router_pending_requests``, ``kvr_router_indexed_blocks``;
* ``kvr_router_target_<field>{worker, dp_rank, confidence}`` per live target: indexed blocks, in
  flight, queued prefill tokens, KV events applied, gaps, resets, replays, event lag, trust;
* ``kvr_router_mirror_degraded{cause}``: one series per cause, 1 for the current one (alert on
  ``max(kvr_router_mirror_degraded) == 1``), and ``kvr_router_mirror_failed_writes``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from bus.mirror_status import Cause

CONTENT_TYPE = CONTENT_TYPE_LATEST

#: Per-target fields exported as gauges (keys of the snapshot's ``targets`` entries).
TARGET_FIELDS = ("indexed_blocks", "in_flight", "queued_prefill_tokens", "events_applied", "gaps", "resets",
                 "replays", "event_lag_s", "trust")
_TARGET_LABELS = ["worker", "dp_rank", "confidence"]


def _families(stats: dict[str, Any]) -> Iterator[Metric]:
    for name, value in sorted((stats.get("counters") or {}).items()):
        yield CounterMetricFamily(f"kvr_router_{name}", f"Router counter {name}.", value=value)
    for metric, key, what in (("kvr_router_workers", "workers", "Registered workers."),
                              ("kvr_router_pending_requests", "pending", "Requests in flight."),
                              ("kvr_router_indexed_blocks", "indexed_blocks", "Blocks in the prefix index.")):
        yield GaugeMetricFamily(metric, what, value=stats.get(key, 0))
    targets = sorted((stats.get("targets") or {}).items())
    for field in TARGET_FIELDS:
        family = GaugeMetricFamily(f"kvr_router_target_{field}", f"Per target (worker, dp rank): {field}.",
                                   labels=_TARGET_LABELS)
        for name, t in targets:
            wid, _, rank = name.rpartition("/")
            family.add_metric([wid, rank, t["confidence"]], t[field])
        yield family
    mirror = stats.get("mirror")
    if mirror is not None:
        degraded = GaugeMetricFamily("kvr_router_mirror_degraded", "1 for the cause the Redis mirror is degraded "
                                     "by, 0 for the others.", labels=["cause"])
        for cause in Cause:
            degraded.add_metric([cause.value], int(mirror["cause"] == cause.value))
        yield degraded
        yield GaugeMetricFamily("kvr_router_mirror_failed_writes", "Redis writes that failed since the mirror "
                                "degraded.", value=mirror["failed_writes"])


class _Collector:
    def __init__(self, stats: dict[str, Any]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Metric]:
        return _families(self._stats)


def render_metrics(stats: dict[str, Any]) -> bytes:
    """The text exposition of one stats snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(stats))  # type: ignore[arg-type]  # a collector is anything with collect()
    return generate_latest(registry)
