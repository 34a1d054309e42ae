"""``kvr bench goodput``: the highest request rate a live fleet serves within a TTFT p99 SLO, per policy.

The live counterpart of ``kvr sim --goodput`` (``sim/goodput.py``), with the same SLO predicate and
the same search: each probe drives a gsp workload at one Poisson rate through a running local
cluster (one per policy, ``kvr up``'s components as real processes) and measures what the clients
saw; :func:`sim.goodput.find_goodput` brackets and bisects the rate. Each probe draws its own
seeded prompts (its own system prompts), so no probe inherits another's cache hits, and waits for
the fleet to drain before the next one. Rates are requests/s of *workload* time; the workers run
``speedup`` times faster than real time, so wall-clock rates are ``speedup`` times higher.

The live fleet shares this machine's cores with the clients and the router: absolute figures are
the machine's, the ratio between policies measured in the same run is the result.
"""

from __future__ import annotations

import logging
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.live import WorkloadSpec, cluster_config, drive_cluster, settle
from bench.progress import NullProgress
from bench.results import SuiteResult, percentile
from sim.goodput import ProbeStats, Slo, find_goodput

logger = logging.getLogger(__name__)


@dataclass
class GoodputConfig:
    policies: tuple[str, ...] = ("kvr", "round_robin")
    workers: int = 4
    slo_ttft_p99_s: float = 0.5  # wall seconds, as the clients measure it
    slo_tpot_p99_s: float | None = None
    start_rate: float = 4.0  # requests/s of workload time
    tolerance: float = 0.2
    max_doublings: int = 5
    duration_s: float = 40.0  # workload time per probe
    speedup: float = 4.0
    prompts_per_group: int = 8
    system_prompt_len: int = 1024
    question_len: int = 64
    output_len: int = 16
    seed: int = 0
    run_timeout_s: float = 120.0
    out_dir: str = ""

    @classmethod
    def quick(cls) -> GoodputConfig:
        return cls(policies=("kvr", "round_robin"), workers=2, slo_ttft_p99_s=0.5, start_rate=8.0, tolerance=0.5,
                   max_doublings=1, duration_s=4.0, speedup=20.0, prompts_per_group=4, system_prompt_len=128,
                   question_len=16, output_len=4)


def _spec(cfg: GoodputConfig, rate: float) -> WorkloadSpec:
    n = max(cfg.prompts_per_group, round(rate * cfg.duration_s))
    return WorkloadSpec("gsp", {"num_groups": max(1, math.ceil(n / cfg.prompts_per_group)),
                                "prompts_per_group": cfg.prompts_per_group,
                                "system_prompt_len": cfg.system_prompt_len, "question_len": cfg.question_len,
                                "output_len": cfg.output_len}, rate)


def live_probe_stats(results: list, *, sent: int, unanswered: int) -> ProbeStats:
    """What the SLO predicate reads, from the clients' view of one drive (wall seconds).

    ``rejected`` counts requests that ended with an error (an overloaded router says so); the
    arrival span is first to last send, the completion span first send to last finish
    (``sim/goodput.py`` defines the sustained-throughput clause on them)."""
    done = [r for r in results if r.completion is not None]
    ttft = sorted(r.ttft_s for r in done if r.ttft_s is not None)
    tpot = sorted((r.e2e_s - r.ttft_s) / (r.completion.output_tokens - 1) for r in done
                  if r.ttft_s is not None and r.e2e_s is not None and r.completion.output_tokens >= 2)
    prompt = sum(r.completion.prompt_tokens for r in done)
    cached = sum(r.completion.cached_tokens for r in done)
    sends = [r.sent_s for r in results]
    finishes = [r.finished_s for r in done if r.finished_s is not None]
    arrival = max(sends) - min(sends) if sends else 0.0
    completion = max(finishes) - min(sends) if finishes and sends else 0.0
    return ProbeStats(ttft_p99_s=percentile(ttft, 99) if ttft else math.nan,
                      tpot_p99_s=percentile(tpot, 99) if tpot else math.nan,
                      token_hit_rate=cached / prompt if prompt else 0.0,
                      throughput_rps=len(done) / completion if completion > 0 else 0.0,
                      requests=sent, rejected=sum(1 for r in results if r.error is not None), unfinished=unanswered,
                      arrival_span_s=arrival, completion_span_s=completion)


def run(cfg: GoodputConfig, *, command: str = "kvr bench goodput", progress=None) -> SuiteResult:
    from cluster.local import LocalCluster

    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-goodput-"))
    slo = Slo(ttft_p99_s=cfg.slo_ttft_p99_s, tpot_p99_s=cfg.slo_tpot_p99_s)
    # The most probes a search can take: bracketing, the check probe, then bisection.
    budget = 2 + cfg.max_doublings + math.ceil(math.log2(1 / cfg.tolerance) + 1)
    progress.start(len(cfg.policies) * budget, "starting")
    rows, searches = [], {}
    try:
        for policy in cfg.policies:
            ns = f"goodput-{policy}"
            cluster = LocalCluster(cluster_config(workers=cfg.workers, policy=policy, speedup=cfg.speedup,
                                                  run_dir=root / ns, namespace=ns, seed=cfg.seed))
            with cluster:
                counter = iter(range(10_000))

                def probe(rate: float, policy: str = policy, cluster=cluster, counter=counter) -> ProbeStats:
                    k = next(counter)
                    seed = cfg.seed + 1000 * k + 1  # its own prompts: no probe reuses another's cache
                    out = drive_cluster(cluster, _spec(cfg, rate), seed, speedup=cfg.speedup,
                                        timeout_s=cfg.run_timeout_s, id_prefix=f"{policy}-{k}-")
                    stats = live_probe_stats(out.results, sent=out.sent, unanswered=out.timed_out)
                    rows.append({"policy": policy, "rate_workload": rate, "rate_wall": rate * cfg.speedup,
                                 **stats.to_dict()})
                    progress.step(f"{policy} at {rate:g} req/s: TTFT p99 {stats.ttft_p99_s * 1e3:.0f} ms")
                    settle(1.0)  # the fleet drains before the next probe
                    return stats

                searches[policy] = find_goodput(probe, slo=slo, start=cfg.start_rate, tolerance=cfg.tolerance,
                                                max_doublings=cfg.max_doublings)
            settle(1.0)
    finally:
        progress.close()
    result = SuiteResult("goodput", command, {**asdict(cfg), "policies": list(cfg.policies)})
    result.tables["probes"] = rows
    best_peer = max((s.goodput or 0.0 for p, s in searches.items() if p != "kvr"), default=0.0)
    summary = []
    for policy, search in searches.items():
        at = search.at_goodput
        summary.append({"policy": policy, "goodput_rps_workload": search.goodput,
                        "goodput_rps_wall": None if search.goodput is None else search.goodput * cfg.speedup,
                        "bracketed": search.bracketed, "probes": len(search.probes),
                        "ttft_p99_ms_at_goodput": None if at is None else at.stats.ttft_p99_s * 1e3,
                        "hit_rate_at_goodput": None if at is None else at.stats.token_hit_rate,
                        "vs_best_other": (search.goodput / best_peer if search.goodput and best_peer else None)})
    result.tables["goodput"] = summary
    result.notes.append(f"SLO: TTFT p99 <= {cfg.slo_ttft_p99_s * 1e3:g} ms (wall, as the clients saw it)"
                        + (f", TPOT p99 <= {cfg.slo_tpot_p99_s * 1e3:g} ms" if cfg.slo_tpot_p99_s else "")
                        + ", no errors, nothing unanswered, >= 95 % of the offered throughput sustained")
    result.notes.append(f"{cfg.workers} workers at speedup {cfg.speedup:g}; gsp ({cfg.system_prompt_len}-token "
                        f"system prompts, {cfg.prompts_per_group} questions each, {cfg.output_len} output tokens), "
                        f"{cfg.duration_s:g} s of workload time per probe, its own prompts; logs in {root}")
    return result


def plot(result: SuiteResult, out_dir: Path) -> list[Path]:
    """TTFT p99 against offered rate per policy, with the SLO line and each goodput marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.tables["probes"]
    slo_ms = result.config["slo_ttft_p99_s"] * 1e3
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for policy in result.config["policies"]:
        pts = sorted((r for r in rows if r["policy"] == policy), key=lambda r: r["rate_workload"])
        line, = ax.plot([r["rate_workload"] for r in pts], [r["ttft_p99_s"] * 1e3 for r in pts], marker="o",
                        label=policy)
        good = next((s["goodput_rps_workload"] for s in result.tables["goodput"] if s["policy"] == policy), None)
        if good:
            ax.axvline(good, color=line.get_color(), linestyle=":", alpha=0.7)
    ax.axhline(slo_ms, color="red", linestyle="--", label=f"SLO {slo_ms:g} ms")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (requests/s of workload time)")
    ax.set_ylabel("TTFT p99 (ms, wall)")
    ax.set_title("kvr bench goodput: live fleet, dotted = each policy's goodput")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "goodput.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
