"""vLLM's Prometheus metrics for the emulated worker's ``/metrics`` (vLLM V1 names and labels).

Every series carries ``model_name`` and ``engine="0"`` as vLLM V1's do, so tools that
scrape vLLM (``worker/vllm/metrics.py``, Grafana dashboards, vllm-router) read an
emulated worker unchanged. Counters are cumulative since start; histograms use
vLLM's buckets for TTFT and request latency.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

TTFT_BUCKETS_S = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                  20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
LATENCY_BUCKETS_S = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                     240.0, 480.0, 960.0, 1920.0, 7680.0)


@dataclass
class Histogram:
    """A Prometheus histogram (cumulative buckets rendered at scrape time)."""

    buckets: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.total += value
        self.n += 1


@dataclass
class RequestMetrics:
    """What finished requests add to ``/metrics``."""

    success: dict[str, int] = field(default_factory=dict)  # finished_reason -> count
    prompt_tokens: int = 0
    generation_tokens: int = 0
    ttft: Histogram = field(default_factory=lambda: Histogram(TTFT_BUCKETS_S))
    e2e: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    queue: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    prefill: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    decode: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))

    def record(self, *, reason: str, prompt_tokens: int, output_tokens: int, ttft_s: float, e2e_s: float,
               queue_s: float, prefill_s: float, decode_s: float) -> None:
        self.success[reason] = self.success.get(reason, 0) + 1
        self.prompt_tokens += prompt_tokens
        self.generation_tokens += output_tokens
        self.ttft.observe(ttft_s)
        self.e2e.observe(e2e_s)
        self.queue.observe(queue_s)
        self.prefill.observe(prefill_s)
        self.decode.observe(decode_s)


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine state one scrape renders (taken on the worker's loop thread)."""

    model: str
    running: int
    waiting: int
    kv_usage: float
    prefix_queries_tokens: int
    prefix_hits_tokens: int
    preemptions: int
    block_size: int
    num_gpu_blocks: int
    enable_prefix_caching: bool
    requests: RequestMetrics


def _fmt(v: float) -> str:
    return repr(float(v)) if not float(v).is_integer() else f"{float(v):.1f}"


def render(snapshots: EngineSnapshot | list[EngineSnapshot]) -> str:
    """Prometheus text exposition format (version 0.0.4); one ``engine`` label per DP rank."""
    snaps = snapshots if isinstance(snapshots, list) else [snapshots]
    families: dict[str, list[str]] = {}
    for rank, snap in enumerate(snaps):
        for family, lines in _render_one(snap, rank).items():
            if family in families:
                families[family].extend(lines[2:])  # HELP and TYPE once per family
            else:
                families[family] = list(lines)
    return "\n".join(line for lines in families.values() for line in lines) + "\n"


def _render_one(s: EngineSnapshot, rank: int) -> dict[str, list[str]]:
    """Lines of each metric family (HELP and TYPE first) for one engine."""
    base = f'model_name="{s.model}",engine="{rank}"'
    families: dict[str, list[str]] = {}
    out: list[str] = []

    def family(name: str, kind: str, help_: str) -> None:
        nonlocal out
        out = families.setdefault(name, [])
        out.append(f"# HELP {name} {help_}")
        out.append(f"# TYPE {name} {kind}")

    def metric(name: str, kind: str, help_: str, value: float, labels: str = base) -> None:
        family(name, kind, help_)
        out.append(f"{name}{{{labels}}} {_fmt(value)}")

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.", s.running)
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.", s.waiting)
    metric("vllm:kv_cache_usage_perc", "gauge", "KV-cache usage. 1 means 100 percent usage.", s.kv_usage)
    metric("vllm:gpu_cache_usage_perc", "gauge", "GPU KV-cache usage (deprecated name).", s.kv_usage)
    metric("vllm:prefix_cache_queries_total", "counter", "Prefix cache queries, in terms of number of queried tokens.",
           s.prefix_queries_tokens)
    metric("vllm:prefix_cache_hits_total", "counter", "Prefix cache hits, in terms of number of cached tokens.",
           s.prefix_hits_tokens)
    metric("vllm:num_preemptions_total", "counter", "Cumulative number of preemption from the engine.", s.preemptions)
    r = s.requests
    metric("vllm:prompt_tokens_total", "counter", "Number of prefill tokens processed.", r.prompt_tokens)
    metric("vllm:generation_tokens_total", "counter", "Number of generation tokens processed.", r.generation_tokens)
    family("vllm:request_success_total", "counter", "Count of successfully processed requests.")
    for reason in sorted(r.success) or ["length"]:
        out.append(f'vllm:request_success_total{{{base},finished_reason="{reason}"}} {_fmt(r.success.get(reason, 0))}')
    metric("vllm:cache_config_info", "gauge", "Information of the LLMEngine CacheConfig", 1,
           labels=f'block_size="{s.block_size}",num_gpu_blocks="{s.num_gpu_blocks}",'
                  f'enable_prefix_caching="{s.enable_prefix_caching}",engine="{rank}"')
    for name, help_, h in (
        ("vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.", r.ttft),
        ("vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.", r.e2e),
        ("vllm:request_queue_time_seconds", "Histogram of time spent in WAITING phase for request.", r.queue),
        ("vllm:request_prefill_time_seconds", "Histogram of time spent in PREFILL phase for request.", r.prefill),
        ("vllm:request_decode_time_seconds", "Histogram of time spent in DECODE phase for request.", r.decode),
    ):
        family(name, "histogram", help_)
        cumulative = 0
        # counts[-1] is the +Inf bucket, rendered below from n.
        for le, count in zip(h.buckets, h.counts[:-1], strict=True):
            cumulative += count
            out.append(f'{name}_bucket{{{base},le="{le}"}} {_fmt(cumulative)}')
        out.append(f'{name}_bucket{{{base},le="+Inf"}} {_fmt(h.n)}')
        out.append(f"{name}_count{{{base}}} {_fmt(h.n)}")
        out.append(f"{name}_sum{{{base}}} {_fmt(h.total)}")
    return families
