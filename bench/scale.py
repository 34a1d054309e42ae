"""``kvr bench scale``: the fleet grows 1 → 16 workers under a request-rate sweep.

For each fleet size one local cluster (policy ``kvr``) serves a sweep of offered loads, given
per worker (``rates_per_worker`` × workers requests/s of workload time, Poisson, a
shared-prefix workload of ``duration_s`` of workload time). Each load point draws its own
seeded prompts (its own system prompts, so no point inherits another's cache hits). Measured:
throughput, TTFT p50/p99, hit rate, and the router process's CPU time per request and as a
share of one core over the drive (``/proc``). The router is the bottleneck where its CPU share
nears 1.0 (it is single-threaded) while throughput stops following the offered load.

On a 2-core machine the workers themselves compete for the CPU long before the router does:
the ``workers_cpu_share`` column says how busy the machine was, so a flattening curve can be
attributed honestly.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.live import WorkloadSpec, cluster_config, drive_cluster, proc_cpu_s, request_metrics, settle
from bench.progress import NullProgress
from bench.results import SuiteResult

logger = logging.getLogger(__name__)


@dataclass
class ScaleConfig:
    workers: tuple[int, ...] = (1, 2, 4, 8, 16)
    rates_per_worker: tuple[float, ...] = (1.0, 2.0, 4.0)
    duration_s: float = 24.0  # workload time per load point
    speedup: float = 5.0
    prompts_per_group: int = 16
    system_prompt_len: int = 1024
    question_len: int = 128
    output_len: int = 16
    warmup: int = 8
    seed: int = 0
    run_timeout_s: float = 180.0
    out_dir: str = ""

    @classmethod
    def quick(cls) -> ScaleConfig:
        return cls(workers=(1, 2), rates_per_worker=(4.0,), duration_s=2.0, speedup=50.0, prompts_per_group=4,
                   system_prompt_len=128, question_len=16, output_len=4, warmup=1)


def _spec(cfg: ScaleConfig, rate: float) -> WorkloadSpec:
    n = max(cfg.prompts_per_group, round(rate * cfg.duration_s))
    groups = max(1, math.ceil(n / cfg.prompts_per_group))
    return WorkloadSpec("gsp", {"num_groups": groups, "prompts_per_group": cfg.prompts_per_group,
                                "system_prompt_len": cfg.system_prompt_len, "question_len": cfg.question_len,
                                "output_len": cfg.output_len}, rate)


def run(cfg: ScaleConfig, *, command: str = "kvr bench scale", progress=None) -> SuiteResult:
    import time

    from cluster.local import LocalCluster

    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-scale-"))
    progress.start(len(cfg.workers) * len(cfg.rates_per_worker), "starting")
    rows = []
    try:
        for n in cfg.workers:
            ns = f"scale-{n}"
            cluster = LocalCluster(cluster_config(workers=n, policy="kvr", speedup=cfg.speedup,
                                                  run_dir=root / ns, namespace=ns, seed=cfg.seed))
            with cluster:
                worker_pids = [cluster.supervisor.pid(w) for w in cluster.worker_ids]
                for k, per_worker in enumerate(cfg.rates_per_worker):
                    rate = per_worker * n
                    w0 = sum(proc_cpu_s(p) or 0.0 for p in worker_pids)
                    t0 = time.monotonic()
                    out = drive_cluster(cluster, _spec(cfg, rate), cfg.seed + 1000 * n + k, speedup=cfg.speedup,
                                        timeout_s=cfg.run_timeout_s, id_prefix=f"{ns}-{k}-")
                    wall = time.monotonic() - t0
                    w1 = sum(proc_cpu_s(p) or 0.0 for p in worker_pids)
                    m = request_metrics(out.results, warmup=cfg.warmup)
                    cpu = out.router_cpu_s or 0.0
                    rows.append({"workers": n, "offered_rps_workload": rate, "offered_rps_wall": rate * cfg.speedup,
                                 "sent": out.sent, "completed": m["completed"], "errors": m["errors"],
                                 "timed_out": out.timed_out, "throughput_rps": m["throughput_rps"],
                                 "ttft_p50_ms": m["ttft_p50_ms"], "ttft_p99_ms": m["ttft_p99_ms"],
                                 "hit_rate": m["hit_rate"], "load_cv": m["load_cv"],
                                 "router_cpu_ms_per_request": cpu * 1e3 / max(1, out.sent),
                                 "redis_commands_per_request": (out.redis_commands or 0) / max(1, out.sent),
                                 "router_cpu_share": cpu / out.wall_s if out.wall_s else 0.0,
                                 "workers_cpu_share": (w1 - w0) / wall if wall else 0.0, "wall_s": out.wall_s})
                    progress.step(f"{n} workers, {rate:g} req/s: TTFT p99 {m['ttft_p99_ms']:.0f} ms")
            settle(1.0)
    finally:
        progress.close()
    result = SuiteResult("scale", command, {**asdict(cfg), "workers": list(cfg.workers),
                                            "rates_per_worker": list(cfg.rates_per_worker)})
    result.tables["scale"] = rows
    busiest = max(rows, key=lambda r: r["router_cpu_share"], default=None)
    if busiest is not None:
        result.notes.append(
            f"busiest router: {busiest['router_cpu_share']:.2f} of one core at {busiest['workers']} workers, "
            f"{busiest['offered_rps_wall']:.0f} req/s wall ({busiest['router_cpu_ms_per_request']:.2f} ms CPU per "
            f"request); the emulated workers used {busiest['workers_cpu_share']:.2f} cores meanwhile")
    result.notes.append(f"policy kvr, gsp workload ({cfg.system_prompt_len}-token system prompts, "
                        f"{cfg.prompts_per_group} questions each), {cfg.duration_s:g} s of workload time per point at "
                        f"speedup {cfg.speedup:g}; first {cfg.warmup} requests of each point left out; logs in {root}")
    return result


def plot(result: SuiteResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.tables["scale"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    for per in sorted({r["offered_rps_workload"] / r["workers"] for r in rows}):
        pts = sorted((r for r in rows if abs(r["offered_rps_workload"] / r["workers"] - per) < 1e-9),
                     key=lambda r: r["workers"])
        xs = [r["workers"] for r in pts]
        axes[0].plot(xs, [r["throughput_rps"] for r in pts], marker="o", label=f"{per:g} req/s per worker")
        axes[1].plot(xs, [r["ttft_p99_ms"] for r in pts], marker="o", label=f"{per:g} req/s per worker")
        axes[2].plot(xs, [r["router_cpu_ms_per_request"] for r in pts], marker="o", label=f"{per:g} req/s per worker")
    for ax, label in zip(axes, ("throughput (req/s, wall)", "TTFT p99 (ms, wall)", "router CPU per request (ms)"),
                         strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("workers")
        ax.set_title(label)
        ax.legend(fontsize=8)
        ax.grid(True, alpha=0.3)
    fig.suptitle("kvr bench scale")
    fig.tight_layout()
    path = out_dir / "scale.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
