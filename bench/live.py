"""Shared machinery of the live suites: one supervised local cluster per run, one workload drive.

A run is: a fresh :class:`cluster.local.LocalCluster` (fresh Redis, cold caches), the same
seeded simulator workload and arrivals for every arm, driven through a real ``RouterClient``
(``cluster.loadgen.drive_workload``), and the router process's CPU time read from
``/proc/<pid>/stat`` before and after the drive. Every metric comes from the client's side
(:func:`request_metrics`): the engine's own ``cached_tokens`` for hit rate, the client's wall
clock for TTFT and end-to-end latency, so every policy and every router is measured alike.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.results import percentile
from router.background_mirror import MIRROR_ROUND_S

logger = logging.getLogger(__name__)


@dataclass
class WorkloadSpec:
    """A simulator workload, its parameters and a Poisson arrival rate (requests/s of workload time)."""

    name: str = "gsp"
    params: dict = field(default_factory=dict)
    rate_per_s: float = 20.0

    def build(self, seed: int):
        """(workload, arrival times): the same for every arm given the same seed."""
        from sim.workload import Poisson, assign_arrivals
        from sim.workloads import make_workload

        rng = random.Random(seed)
        wl = make_workload(self.name, rng, dict(self.params))
        return wl, assign_arrivals(wl, Poisson(self.rate_per_s), rng)


@dataclass
class DriveOutcome:
    """One drive against one router: what the client saw, plus the router's CPU time."""

    results: list  # bus.client.RequestResult, in finishing order
    sent: int
    timed_out: int
    wall_s: float
    router_cpu_s: float | None = None
    redis_commands: int | None = None  # commands Redis processed during the drive (all clients)


def proc_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds of a process (Linux ``/proc``); None if unreadable."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive_cluster(cluster, spec: WorkloadSpec, seed: int, *, speedup: float, timeout_s: float, id_prefix: str,
                  max_in_flight: int | None = None) -> DriveOutcome:
    """Drive ``spec`` (seeded) through a started cluster's router; router CPU measured around it."""
    from bus.client import RouterClient
    from cluster.loadgen import drive_workload

    wl, arrivals = spec.build(seed)
    pid = cluster.supervisor.pid("router")
    cmd0 = redis_commands(cluster.redis_url)
    cpu0 = proc_cpu_s(pid)
    with RouterClient(endpoint=cluster.client_endpoint) as client:
        res = drive_workload(client, wl, arrivals, speedup=speedup, timeout_s=timeout_s, id_prefix=id_prefix,
                             max_in_flight=max_in_flight, should_stop=lambda: bool(cluster.supervisor.failed()))
    cpu1 = proc_cpu_s(pid)
    # The router's mirror writes event batches in rounds (router/background_mirror.py): the drive's
    # last ones reach Redis up to a round later.
    time.sleep(MIRROR_ROUND_S)
    cmd1 = redis_commands(cluster.redis_url)
    cluster.check()
    cpu = None if cpu0 is None or cpu1 is None else cpu1 - cpu0
    # Two INFO calls of ours are in the difference: take them out.
    cmds = None if cmd0 is None or cmd1 is None else cmd1 - cmd0 - 2
    return DriveOutcome(res.results, res.sent, res.timed_out, res.wall_s, cpu, cmds)


def redis_commands(url: str) -> int | None:
    """``total_commands_processed`` of a Redis (None if unreachable)."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=2.0)
    try:
        return int(client.info("stats")["total_commands_processed"])
    except (redis.RedisError, OSError, KeyError, ValueError):
        return None
    finally:
        client.close()


def request_metrics(results: list, *, warmup: int = 0) -> dict:
    """Client-side metrics of finished requests; the first ``warmup`` sent are left out.

    Hit rate = engine-reported cached prompt tokens / prompt tokens. A *hit* is a request with
    any cached token. Latencies are wall-clock ms as the client saw them (router included).
    """
    ordered = sorted(results, key=lambda r: r.sent_s)[warmup:]
    done = [r for r in ordered if r.completion is not None]
    errors = sum(1 for r in ordered if r.error is not None)
    prompt = sum(r.completion.prompt_tokens for r in done)
    cached = sum(r.completion.cached_tokens for r in done)
    predicted = sum(max(0, r.completion.predicted_cached_tokens) for r in done)
    ttft = sorted(r.ttft_s * 1e3 for r in done if r.ttft_s is not None)
    e2e = sorted(r.e2e_s * 1e3 for r in done if r.e2e_s is not None)
    hits = [r.ttft_s * 1e3 for r in done if r.completion.cached_tokens > 0 and r.ttft_s is not None]
    misses = [r.ttft_s * 1e3 for r in done if r.completion.cached_tokens == 0 and r.ttft_s is not None]
    span = (max(r.finished_s for r in done) - min(r.sent_s for r in done)) if done else 0.0
    per_worker: dict[str, int] = {}
    for r in done:
        per_worker[r.completion.worker_id] = per_worker.get(r.completion.worker_id, 0) + 1
    counts = list(per_worker.values())
    mean = sum(counts) / len(counts) if counts else 0.0
    cv = (sum((c - mean) ** 2 for c in counts) / len(counts)) ** 0.5 / mean if mean else 0.0
    return {
        "requests": len(ordered), "completed": len(done), "errors": errors,
        "hit_rate": cached / prompt if prompt else 0.0,
        "predicted_hit_rate": predicted / prompt if prompt else 0.0,
        "hit_share": len(hits) / len(done) if done else 0.0,
        "ttft_p50_ms": percentile(ttft, 50), "ttft_p99_ms": percentile(ttft, 99),
        "ttft_hit_mean_ms": sum(hits) / len(hits) if hits else float("nan"),
        "ttft_miss_mean_ms": sum(misses) / len(misses) if misses else float("nan"),
        "e2e_p50_ms": percentile(e2e, 50), "e2e_p99_ms": percentile(e2e, 99),
        "throughput_rps": len(done) / span if span > 0 else 0.0,
        "workers_used": len(per_worker), "load_cv": cv,
    }


def cluster_config(*, workers: int, policy: str, speedup: float, run_dir: Path, namespace: str, seed: int,
                   worker_args: list[str] | None = None, router_args: list[str] | None = None, profile: str = ""):
    from cluster.local import ClusterConfig

    return ClusterConfig(workers=workers, policy=policy, speedup=speedup, run_dir=run_dir, namespace=namespace,
                         monitor=False, redis_kind="redis-server", profile=profile, log_level="WARNING",
                         worker_args=["--seed", str(seed), *(worker_args or [])], router_args=list(router_args or []),
                         ready_timeout_s=90.0, label=namespace)


def settle(seconds: float) -> None:
    """Let the previous cluster's processes leave the CPU before the next run starts."""
    time.sleep(seconds)
