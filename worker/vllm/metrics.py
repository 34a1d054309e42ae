"""vLLM's Prometheus ``/metrics`` → :class:`bus.schema.WorkerLoad`, per data-parallel rank.

vLLM V1 labels every engine metric with ``model_name`` and ``engine`` (the DP rank as a
string); a series without ``engine`` belongs to rank 0. Names read, newest first:

=====================================  ==============================================
load field                             metric (older name)
=====================================  ==============================================
running                                ``vllm:num_requests_running``
waiting                                ``vllm:num_requests_waiting``
kv_usage (fraction 0..1)               ``vllm:kv_cache_usage_perc`` (``vllm:gpu_cache_usage_perc``)
prefix cache queries (tokens, counter) ``vllm:prefix_cache_queries_total`` (``vllm:gpu_prefix_cache_queries_total``)
prefix cache hits (tokens, counter)    ``vllm:prefix_cache_hits_total`` (``vllm:gpu_prefix_cache_hits_total``)
preemptions (counter)                  ``vllm:num_preemptions_total``
block size, GPU blocks                 labels of ``vllm:cache_config_info`` (an info gauge)
=====================================  ==============================================

``vllm:cache_config_info`` is how a server exposes its block size over HTTP; the
adapter uses it, when present, to check what the router was told.

Malformed lines are skipped and counted (:attr:`MetricsText.malformed_lines`).
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field

from bus.schema import WorkerLoad

logger = logging.getLogger(__name__)

RUNNING = ("vllm:num_requests_running",)
WAITING = ("vllm:num_requests_waiting",)
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
PREFIX_QUERIES = ("vllm:prefix_cache_queries_total", "vllm:gpu_prefix_cache_queries_total",
                  "vllm:prefix_cache_queries", "vllm:gpu_prefix_cache_queries")
PREFIX_HITS = ("vllm:prefix_cache_hits_total", "vllm:gpu_prefix_cache_hits_total",
               "vllm:prefix_cache_hits", "vllm:gpu_prefix_cache_hits")
PREEMPTIONS = ("vllm:num_preemptions_total", "vllm:num_preemptions")
CACHE_CONFIG_INFO = "vllm:cache_config_info"
ENGINE_LABEL = "engine"

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})?\s+(\S+)(?:\s+\S+)?$")
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*=\s*"((?:[^"\\]|\\.)*)"\s*,?')


def _unescape(value: str) -> str:
    return value.replace("\\\\", "\x00").replace('\\"', '"').replace("\\n", "\n").replace("\x00", "\\")


def _parse_labels(text: str) -> dict[str, str] | None:
    body = text[1:-1]
    labels: dict[str, str] = {}
    pos = 0
    while pos < len(body):
        match = _LABEL.match(body, pos)
        if match is None:
            return None if body[pos:].strip() else labels
        labels[match.group(1)] = _unescape(match.group(2))
        pos = match.end()
    return labels


@dataclass
class MetricsText:
    """Parsed samples: ``name → [(labels, value)]`` in exposition order."""

    samples: dict[str, list[tuple[dict[str, str], float]]] = field(default_factory=dict)
    malformed_lines: int = 0

    def series(self, names: tuple[str, ...]) -> list[tuple[dict[str, str], float]]:
        """Samples of the first of ``names`` that is present (newest name first)."""
        for name in names:
            if name in self.samples:
                return self.samples[name]
        return []


def parse_prometheus_text(text: str) -> MetricsText:
    """Parse Prometheus text exposition (format 0.0.4) into samples; never raises."""
    out = MetricsText()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        labels = None if match is None else (_parse_labels(match.group(2)) if match.group(2) else {})
        if match is None or labels is None:
            out.malformed_lines += 1
            continue
        try:
            value = float(match.group(3))
        except ValueError:
            out.malformed_lines += 1
            continue
        out.samples.setdefault(match.group(1), []).append((labels, value))
    if out.malformed_lines:
        logger.debug("skipped %d malformed metrics lines", out.malformed_lines)
    return out


@dataclass(frozen=True)
class EngineStats:
    """One engine's (one DP rank's) view from ``/metrics``."""

    dp_rank: int
    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries_tokens: int = 0
    prefix_hits_tokens: int = 0
    preemptions: int = 0

    def to_load(self, *, num_gpu_blocks: int, queued_prefill_tokens: int = 0) -> WorkerLoad:
        """The heartbeat load; free blocks are derived from usage and the pool size.

        vLLM's ``num_gpu_blocks`` counts the null block, which is never free nor used:
        ``usage = 1 - free / (num_gpu_blocks - 1)``, so ``free = (num_gpu_blocks - 1) * (1 - usage)``.
        """
        usage = min(1.0, max(0.0, self.kv_usage))
        usable = max(0, num_gpu_blocks - 1)
        return WorkerLoad(
            running=self.running,
            waiting=self.waiting,
            queued_prefill_tokens=queued_prefill_tokens,
            kv_usage=usage,
            num_free_blocks=round(usable * (1.0 - usage)),
            num_gpu_blocks=num_gpu_blocks,
        )


@dataclass(frozen=True)
class CacheConfig:
    """Labels of ``vllm:cache_config_info`` that the router depends on (None if absent)."""

    block_size: int | None = None
    num_gpu_blocks: int | None = None
    enable_prefix_caching: bool | None = None


def _rank(labels: dict[str, str]) -> int | None:
    value = labels.get(ENGINE_LABEL, "0")
    try:
        return int(value)
    except ValueError:
        return None


def _opt_int(value: str | None) -> int | None:
    try:
        return None if value is None else int(float(value))
    except ValueError:
        return None  # "None" before the engine has profiled its memory


def engine_stats(metrics: MetricsText) -> dict[int, EngineStats]:
    """Per-rank stats; series of every model name on one rank are summed."""
    acc: dict[int, dict[str, float]] = {}
    for key, names in (("running", RUNNING), ("waiting", WAITING), ("kv_usage", KV_USAGE),
                       ("queries", PREFIX_QUERIES), ("hits", PREFIX_HITS), ("preemptions", PREEMPTIONS)):
        for labels, value in metrics.series(names):
            rank = _rank(labels)
            if rank is None or math.isnan(value):
                continue
            slot = acc.setdefault(rank, {})
            slot[key] = slot.get(key, 0.0) + value
    return {
        rank: EngineStats(
            dp_rank=rank,
            running=int(v.get("running", 0)),
            waiting=int(v.get("waiting", 0)),
            kv_usage=float(v.get("kv_usage", 0.0)),
            prefix_queries_tokens=int(v.get("queries", 0)),
            prefix_hits_tokens=int(v.get("hits", 0)),
            preemptions=int(v.get("preemptions", 0)),
        )
        for rank, v in sorted(acc.items())
    }


def cache_config(metrics: MetricsText) -> CacheConfig:
    """Block size and GPU blocks from ``vllm:cache_config_info`` (first series; rank 0)."""
    series = metrics.samples.get(CACHE_CONFIG_INFO) or []
    if not series:
        return CacheConfig()
    labels = series[0][0]
    prefix = labels.get("enable_prefix_caching")
    return CacheConfig(
        block_size=_opt_int(labels.get("block_size")),
        num_gpu_blocks=_opt_int(labels.get("num_gpu_blocks")),
        enable_prefix_caching=None if prefix is None else prefix.strip().lower() == "true",
    )
