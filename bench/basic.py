"""``kvr bench basic``: every routing policy in turn on a live cluster, the same request sequence.

For each repetition (seed ``seed + rep``) and each policy: a fresh local cluster (Redis,
router with that policy, N emulated workers at ``speedup``), the same seeded shared-prefix
workload and Poisson arrivals driven through the router, client-side metrics
(``bench/live.py``): token hit rate (engine truth), TTFT p50/p99 and for hits vs misses,
throughput. The first ``warmup`` requests of a run are left out of the metrics (cold caches
are the same for everyone; what matters is the steady state). Policies run interleaved per
repetition, so machine noise spreads over all of them; the table shows median (min–max).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.live import WorkloadSpec, cluster_config, drive_cluster, request_metrics, settle
from bench.progress import NullProgress
from bench.results import SuiteResult, fmt_spread, spread, spread_bars

logger = logging.getLogger(__name__)

DEFAULT_PARAMS = {"num_groups": 8, "prompts_per_group": 16, "system_prompt_len": 1024, "question_len": 128,
                  "output_len": 16}
METRICS = ("hit_rate", "predicted_hit_rate", "ttft_p50_ms", "ttft_p99_ms", "ttft_hit_mean_ms", "ttft_miss_mean_ms",
           "e2e_p50_ms", "throughput_rps", "load_cv", "errors")


@dataclass
class BasicConfig:
    policies: tuple[str, ...] = ()  # empty: every policy
    workers: int = 4
    speedup: float = 10.0
    workload: str = "gsp"
    params: dict = field(default_factory=lambda: dict(DEFAULT_PARAMS))
    rate_per_s: float = 8.0
    repeats: int = 2
    warmup: int = 16
    seed: int = 0
    run_timeout_s: float = 180.0
    out_dir: str = ""

    @classmethod
    def quick(cls) -> BasicConfig:
        return cls(policies=("round_robin", "kvr"), workers=2, speedup=50.0,
                   params={"num_groups": 2, "prompts_per_group": 4, "system_prompt_len": 256, "question_len": 32,
                           "output_len": 4}, rate_per_s=20.0, repeats=1, warmup=2)


def run(cfg: BasicConfig, *, command: str = "kvr bench basic", progress=None) -> SuiteResult:
    from cluster.local import LocalCluster
    from core.policies import POLICY_NAMES

    progress = progress or NullProgress()
    policies = list(cfg.policies or POLICY_NAMES)
    spec = WorkloadSpec(cfg.workload, cfg.params, cfg.rate_per_s)
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-basic-"))
    progress.start(len(policies) * cfg.repeats, "starting")
    per_policy: dict[str, list[dict]] = {p: [] for p in policies}
    try:
        for rep in range(cfg.repeats):
            for policy in policies:
                ns = f"basic-{policy.replace('_', '-')}-{rep}"
                cluster = LocalCluster(cluster_config(workers=cfg.workers, policy=policy, speedup=cfg.speedup,
                                                      run_dir=root / "runs" / ns, namespace=ns, seed=cfg.seed + rep))
                with cluster:
                    out = drive_cluster(cluster, spec, cfg.seed + rep, speedup=cfg.speedup,
                                        timeout_s=cfg.run_timeout_s, id_prefix=f"{ns}-")
                m = request_metrics(out.results, warmup=cfg.warmup)
                m.update(timed_out=out.timed_out, wall_s=out.wall_s,
                         router_cpu_ms_per_request=(out.router_cpu_s or 0.0) * 1e3 / max(1, out.sent),
                         redis_commands_per_request=(out.redis_commands or 0) / max(1, out.sent))
                per_policy[policy].append(m)
                progress.step(f"{policy} rep {rep + 1}: hit {m['hit_rate']:.2f}, TTFT p99 {m['ttft_p99_ms']:.0f} ms")
                settle(0.5)
    finally:
        progress.close()
    result = SuiteResult("basic", command, _config_dict(cfg))
    rows = []
    for policy, runs in per_policy.items():
        row = {"policy": policy, "runs": len(runs), "requests": runs[0]["requests"] if runs else 0}
        for k in (*METRICS, "router_cpu_ms_per_request", "redis_commands_per_request", "timed_out"):
            row[k] = spread(r[k] for r in runs)
        rows.append(row)
    result.tables["policies"] = rows
    result.tables["runs"] = [{"policy": p, "rep": i, **{k: v for k, v in r.items()}}
                             for p, runs in per_policy.items() for i, r in enumerate(runs)]
    base = next((r for r in rows if r["policy"] == "round_robin"), rows[0] if rows else None)
    if base is not None:
        for r in rows:
            r["ttft_p99_vs_round_robin"] = (r["ttft_p99_ms"]["median"] / base["ttft_p99_ms"]["median"]
                                            if base["ttft_p99_ms"]["median"] else float("nan"))
    result.notes.append(f"workload {cfg.workload} {cfg.params}, Poisson {cfg.rate_per_s:g} req/s of workload time, "
                        f"{cfg.workers} emulated workers at speedup {cfg.speedup:g}; latencies are wall-clock ms at "
                        f"that speedup (×{cfg.speedup:g} for engine time); first {cfg.warmup} requests of each run "
                        f"left out; a fresh cluster (cold caches, fresh Redis) per run; logs in {root}")
    return result


def _config_dict(cfg: BasicConfig) -> dict:
    d = asdict(cfg)
    d["policies"] = list(cfg.policies)
    return d


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    rows = []
    for r in result.tables["policies"]:
        rows.append({"policy": r["policy"], "runs": r["runs"], "hit rate": fmt_spread(r["hit_rate"], 3),
                     "predicted hit": fmt_spread(r["predicted_hit_rate"], 3),
                     "TTFT p50 ms": fmt_spread(r["ttft_p50_ms"]), "TTFT p99 ms": fmt_spread(r["ttft_p99_ms"]),
                     "TTFT hit ms": fmt_spread(r["ttft_hit_mean_ms"]),
                     "TTFT miss ms": fmt_spread(r["ttft_miss_mean_ms"]),
                     "req/s": fmt_spread(r["throughput_rps"], 2),
                     "p99 vs RR": f"{r.get('ttft_p99_vs_round_robin', 0):.2f}",
                     "router CPU ms/req": fmt_spread(r["router_cpu_ms_per_request"], 2),
                     "Redis cmds/req": fmt_spread(r["redis_commands_per_request"], 1),
                     "errors": fmt_spread(r["errors"], 0)})
    return {"policies": rows, "runs": [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()}
                                       for r in result.tables["runs"]]}


def plot(result: SuiteResult, out_dir: Path) -> list[Path]:
    return [spread_bars(result.tables["policies"], name_key="policy",
                        panels=(("hit_rate", "token hit rate"), ("ttft_p99_ms", "TTFT p99 (ms, wall)"),
                                ("throughput_rps", "throughput (req/s)")),
                        title="kvr bench basic: every policy, same request sequence", path=out_dir / "basic.png")]
