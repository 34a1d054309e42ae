"""``kvr bench light-load``: at light load a router must not pile requests on one worker.

Issue 16's case: in a ``kvr up -n 4`` session, a loop of ``kvr send`` with prompts that share a
short instruction sent almost every request to the one worker that cached it, and those "hits"
were slower than misses, because that worker was busy decoding the previous ones while three
others idled. This suite reproduces it from one process (no per-request process start-up, whose
CPU would swamp the latencies on a small machine): a fresh local cluster per policy (``kvr up``'s
defaults: emulated workers at real time, the ``simple`` profile), and short prompts (a fixed
instruction and a random question) at Poisson rates low enough that the fleet mostly idles.

Per (policy, rate), each rate with its own instruction (so it starts cold): requests per worker,
the largest worker's share, the mean TTFT, and that of hits (any cached prompt token, the engine's
own count) against misses. Goals, per kvr row: hits at
least as fast as misses, and no worker with more than twice its fair share of the requests.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

from bench.progress import NullProgress
from bench.results import Goal, SuiteResult

#: The instruction every prompt starts with (the issue's ``kvr send`` loop shared one like it).
INSTRUCTION = "You are a helpful assistant for the travel desk. Answer briefly and name one place."
#: A worker may take up to this many times its fair share before the run counts as a pile-up.
PILE_UP_SHARE_FACTOR = 2.0


@dataclass
class LightLoadConfig:
    policies: list[str] = field(default_factory=lambda: ["kvr", "round_robin"])
    workers: int = 4
    rates_per_s: list[float] = field(default_factory=lambda: [2.0, 4.0, 8.0])
    requests: int = 80
    max_tokens: int = 16
    seed: int = 0

    @classmethod
    def quick(cls) -> LightLoadConfig:
        return cls(policies=["kvr"], workers=2, rates_per_s=[4.0], requests=12)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def drive(client, *, rate_per_s: float, requests: int, max_tokens: int, rng: random.Random,
          id_prefix: str, desk: int = 0) -> list:
    """Send ``requests`` prompts at Poisson ``rate_per_s`` from this thread; every result, in send order.

    Every prompt starts ``Desk <desk>.``: a drive with a new desk finds no worker holding its
    instruction, so each rate starts cold, as a fresh ``kvr up`` session does."""
    from bus.schema import GenerateRequest

    t0 = time.monotonic()
    next_at, sent = 0.0, 0
    results: dict[str, object] = {}
    order: list[str] = []
    pending: set[str] = set()
    deadline = t0 + requests / rate_per_s + 120.0
    while (sent < requests or pending) and time.monotonic() < deadline:
        if sent < requests and time.monotonic() - t0 >= next_at:
            rid = f"{id_prefix}{sent}"
            question = f"Question {rng.randrange(10**6)}: where should I go in spring?"
            prompt = f"Desk {desk}. {INSTRUCTION} {question}"
            client.send(GenerateRequest(request_id=rid, prompt=prompt, max_tokens=max_tokens))
            order.append(rid)
            pending.add(rid)
            sent += 1
            next_at += rng.expovariate(rate_per_s)
        for r in client.poll(timeout_ms=1):
            if r.done:
                pending.discard(r.request_id)
                results[r.request_id] = r
    return [results[rid] for rid in order if rid in results]


def summarise(results: list, *, workers: int) -> dict:
    """One row's figures from a drive's results."""
    by_worker = Counter(r.routed.worker_id for r in results if r.routed is not None)
    done = [r for r in results if r.completion is not None]
    hits = [r.ttft_s * 1e3 for r in done if r.completion.cached_tokens > 0 and r.ttft_s is not None]
    misses = [r.ttft_s * 1e3 for r in done if r.completion.cached_tokens == 0 and r.ttft_s is not None]
    routed = sum(by_worker.values())
    return {
        "ttft_mean_ms": _mean(hits + misses),
        "requests": len(results),
        "errors": sum(1 for r in results if r.error is not None),
        "per_worker": dict(sorted(by_worker.items())),
        "largest_share": max(by_worker.values()) / routed if routed else float("nan"),
        "fair_share": 1.0 / workers,
        "hits": len(hits),
        "hit_ttft_mean_ms": _mean(hits),
        "misses": len(misses),
        "miss_ttft_mean_ms": _mean(misses),
    }


def run(cfg: LightLoadConfig, *, command: str = "kvr bench light-load", progress=None) -> SuiteResult:
    from bus.client import RouterClient
    from cluster.local import ClusterConfig, LocalCluster

    progress = progress or NullProgress()
    progress.start(len(cfg.policies) * len(cfg.rates_per_s), "light load")
    rows = []
    for policy in cfg.policies:
        with LocalCluster(ClusterConfig(workers=cfg.workers, policy=policy, monitor=False,
                                        label=f"light-{policy}")) as cluster:
            client = RouterClient(endpoint=cluster.client_endpoint)
            try:
                for k, rate in enumerate(cfg.rates_per_s):
                    rng = random.Random(cfg.seed * 1000 + k)  # the same prompts and arrivals per policy
                    results = drive(client, rate_per_s=rate, requests=cfg.requests, max_tokens=cfg.max_tokens,
                                    rng=rng, id_prefix=f"{policy}-{k}-", desk=k)
                    rows.append({"policy": policy, "rate_per_s": rate, **summarise(results, workers=cfg.workers)})
                    progress.step(f"{policy} at {rate:g}/s")
            finally:
                client.close()
    progress.close()
    goals = []
    for row in rows:
        if row["policy"] != "kvr":
            continue
        if row["hits"] and row["misses"]:
            goals.append(Goal(f"hit TTFT / miss TTFT at {row['rate_per_s']:g}/s",
                              row["hit_ttft_mean_ms"] / row["miss_ttft_mean_ms"], 1.0, "×", False))
        goals.append(Goal(f"largest worker share / fair share at {row['rate_per_s']:g}/s",
                          row["largest_share"] / row["fair_share"], PILE_UP_SHARE_FACTOR, "×", False))
    return SuiteResult("light-load", command, asdict(cfg), tables={"light load": rows}, goals=goals)


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    """The table as a person reads it: requests per worker in one column, ms with one decimal."""
    rows = []
    for r in result.tables["light load"]:
        rows.append({"policy": r["policy"], "rate/s": r["rate_per_s"],
                     "per worker": " ".join(str(n) for n in r["per_worker"].values()),
                     "largest share": f"{r['largest_share']:.0%}", "TTFT ms": f"{r['ttft_mean_ms']:.1f}",
                     "hits": r["hits"], "hit TTFT ms": f"{r['hit_ttft_mean_ms']:.1f}",
                     "misses": r["misses"], "miss TTFT ms": f"{r['miss_ttft_mean_ms']:.1f}", "errors": r["errors"]})
    return {"light load": rows}
