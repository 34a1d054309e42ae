"""``kvr bench replicas``: 1, 2, 4 router replicas on one fleet, the same workload through each.

Router CPU is read from ``/proc`` for every replica: in total per request, and above each
replica's idle rate (measured for ``idle_s`` before the drive: heartbeats, the housekeeping loop,
peer sync and mirror checks cost each replica the same whatever its share of the traffic).

Every point is a fresh local cluster (``kvr up --routers N``: each worker registers with every
replica, each replica keeps its own exact index from the workers' KV events and counts the
others' requests in flight) driven by a :class:`~bus.replica_client.ReplicaClient`, which spreads
requests over the replicas (fewest pending first). The workload (gsp: shared system prompts) and
its seed are the same for every point, so hit rate, TTFT and router CPU compare directly with the
one-router point measured in the same run.

The last point kills one of two replicas (SIGKILL) half-way through the drive: the other must
lose nothing, and every request must end with its result or an explicit error (requests the dead
replica had not answered at all fail over to the survivor).
"""

from __future__ import annotations

import logging
import math
import signal
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.live import WorkloadSpec, cluster_config, proc_cpu_s, request_metrics, settle
from bench.progress import NullProgress
from bench.results import SuiteResult

logger = logging.getLogger(__name__)


@dataclass
class ReplicasConfig:
    replicas: tuple[int, ...] = (1, 2, 4)
    workers: int = 4
    rate_per_s: float = 6.0  # workload time
    duration_s: float = 30.0  # workload time
    speedup: float = 4.0
    prompts_per_group: int = 8
    system_prompt_len: int = 1024
    question_len: int = 64
    output_len: int = 8
    warmup: int = 8
    seed: int = 0
    kill_case: bool = True
    idle_s: float = 3.0  # each point first measures its replicas' CPU with no load this long
    run_timeout_s: float = 180.0
    out_dir: str = ""

    @classmethod
    def quick(cls) -> ReplicasConfig:
        return cls(replicas=(1, 2), workers=2, rate_per_s=8.0, duration_s=3.0, speedup=20.0, prompts_per_group=4,
                   system_prompt_len=128, question_len=16, output_len=4, warmup=1, idle_s=0.5)


def _spec(cfg: ReplicasConfig) -> WorkloadSpec:
    n = max(cfg.prompts_per_group, round(cfg.rate_per_s * cfg.duration_s))
    return WorkloadSpec("gsp", {"num_groups": max(1, math.ceil(n / cfg.prompts_per_group)),
                                "prompts_per_group": cfg.prompts_per_group,
                                "system_prompt_len": cfg.system_prompt_len, "question_len": cfg.question_len,
                                "output_len": cfg.output_len}, cfg.rate_per_s)


def _point(cfg: ReplicasConfig, root: Path, replicas: int, *, kill: bool) -> dict:
    from bus.replica_client import ReplicaClient
    from cluster.loadgen import drive_workload
    from cluster.local import LocalCluster

    ns = f"replicas-{replicas}{'-kill' if kill else ''}"
    config = cluster_config(workers=cfg.workers, policy="kvr", speedup=cfg.speedup, run_dir=root / ns, namespace=ns,
                            seed=cfg.seed)
    config.routers = replicas
    cluster = LocalCluster(config)
    with cluster:
        pids = {name: cluster.supervisor.pid(name) for name in cluster.router_names}
        # Each replica's CPU with no request at all (heartbeats, the housekeeping loop, peer sync,
        # mirror checks): what it pays whatever its share of the traffic.
        idle0 = {name: proc_cpu_s(pid) or 0.0 for name, pid in pids.items()}
        time.sleep(cfg.idle_s)
        idle_rate = {name: ((proc_cpu_s(pid) or idle0[name]) - idle0[name]) / cfg.idle_s for name, pid in pids.items()}
        cpu0 = {name: proc_cpu_s(pid) or 0.0 for name, pid in pids.items()}
        wl, arrivals = _spec(cfg).build(cfg.seed)
        killer = None
        if kill:
            # Half-way through the workload's arrivals (wall time): the first replica dies.
            delay_s = cfg.duration_s / cfg.speedup / 2
            killer = threading.Timer(delay_s, lambda: cluster.supervisor.signal("router", signal.SIGKILL))
            killer.start()
        t0 = time.monotonic()
        with ReplicaClient(endpoints=cluster.client_endpoints) as client:
            out = drive_workload(client, wl, arrivals, speedup=cfg.speedup, timeout_s=cfg.run_timeout_s,
                                 id_prefix=f"{ns}-")
            failovers = client.failovers
        wall = time.monotonic() - t0
        if killer is not None:
            killer.join()
        cpu = {name: (proc_cpu_s(pid) or cpu0[name]) - cpu0[name] for name, pid in pids.items()}
        if not kill:
            cluster.check()
    m = request_metrics(out.results, warmup=cfg.warmup)
    sent = max(1, out.sent)
    total_cpu = sum(cpu.values())
    # The drive's CPU above each replica's idle rate: the work the requests (and the KV events they
    # cause, which every replica ingests) added.
    busy_cpu = sum(max(0.0, cpu[n] - idle_rate[n] * wall) for n in cpu)
    return {"replicas": replicas, "case": "one replica SIGKILLed half-way" if kill else "steady",
            "sent": out.sent, "completed": m["completed"], "errors": m["errors"], "unanswered": out.timed_out,
            "failovers": failovers, "hit_rate": m["hit_rate"], "ttft_p50_ms": m["ttft_p50_ms"],
            "ttft_p99_ms": m["ttft_p99_ms"], "throughput_rps": m["throughput_rps"], "load_cv": m["load_cv"],
            "router_cpu_ms_per_request": total_cpu * 1e3 / sent,
            "router_cpu_above_idle_ms_per_request": busy_cpu * 1e3 / sent,
            "idle_cpu_share_per_replica": sum(idle_rate.values()) / len(idle_rate),
            "busiest_replica_cpu_share": max(cpu.values()) / wall if wall else 0.0,
            "replica_cpu_s": {k: round(v, 3) for k, v in cpu.items()}, "wall_s": wall}


def run(cfg: ReplicasConfig, *, command: str = "kvr bench replicas", progress=None) -> SuiteResult:
    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-replicas-"))
    points = [(n, False) for n in cfg.replicas] + ([(2, True)] if cfg.kill_case else [])
    progress.start(len(points), "starting")
    rows = []
    try:
        for n, kill in points:
            row = _point(cfg, root, n, kill=kill)
            rows.append(row)
            progress.step(f"{n} replica(s){' (kill)' if kill else ''}: hit {row['hit_rate']:.3f}, "
                          f"TTFT p99 {row['ttft_p99_ms']:.0f} ms")
            settle(1.0)
    finally:
        progress.close()
    result = SuiteResult("replicas", command, {**asdict(cfg), "replicas": list(cfg.replicas)})
    result.tables["replicas"] = rows
    base = next((r for r in rows if r["replicas"] == 1 and r["case"] == "steady"), None)
    if base is not None:
        for r in rows:
            r["hit_rate_vs_1"] = r["hit_rate"] - base["hit_rate"]
            r["ttft_p99_vs_1"] = r["ttft_p99_ms"] / base["ttft_p99_ms"] if base["ttft_p99_ms"] else math.nan
            r["cpu_per_request_vs_1"] = (r["router_cpu_ms_per_request"] / base["router_cpu_ms_per_request"]
                                         if base["router_cpu_ms_per_request"] else math.nan)
            r["cpu_above_idle_vs_1"] = (r["router_cpu_above_idle_ms_per_request"]
                                        / base["router_cpu_above_idle_ms_per_request"]
                                        if base["router_cpu_above_idle_ms_per_request"] else math.nan)
    result.notes.append(f"{cfg.workers} workers, gsp ({cfg.system_prompt_len}-token system prompts, "
                        f"{cfg.prompts_per_group} questions each) at {cfg.rate_per_s:g} req/s of workload time for "
                        f"{cfg.duration_s:g} s, speedup {cfg.speedup:g}; same seed for every point; first "
                        f"{cfg.warmup} requests left out; logs in {root}")
    return result
