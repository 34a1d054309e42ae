"""``kvr bench overhead``: what the router itself costs.

* **decision latency**: ``RouterCore.route`` (request hashing, index overlap, candidate states,
  policy, in-flight accounting, predict-on-route) per request, p50/p99, against fleet size and
  index size. The index is filled through ``PrefixIndex.apply`` with realistic ``BlockStored``
  streams (``bench/fleet_events.py``), incrementally: each worker count fills once and is
  measured at every index size on the way. Requests are follow-ups of recorded conversations or
  new ones on a system prompt. Requests stay in flight (a FIFO of ``in_flight_per_worker`` × W)
  and ``now`` advances at ``request_rate`` so load and tentative entries look like a busy router.
  Garbage collection stays on, as in the service. Hashing and overlap are also timed alone on the
  same requests, so the rest (candidates + policy + accounting) is known by difference.
* **ingestion**: blocks/s through the router's real ingest path (``router.ingest.EventIngest``
  handling ``AppliedBatch`` items: decode, apply with deltas, fold the batch's net change, one
  Redis pipeline per batch) with and without the mirror on a real ``redis-server``; the event
  streams come from ``bus.synthetic_events`` (an LRU pool per worker: stores and evictions).
* **memory**: bytes per indexed (target, block) pair in process (tracemalloc) and in Redis
  (``used_memory`` delta and ``MEMORY USAGE`` of the blocks hashes).
* **Redis round trips**: per event batch on the ingest path, and per request on the routing path
  (``RouterCore`` has no Redis handle: counted as the mirror's round trips during routing).

Ingestion and memory are measured in ``bench/ingestion.py``; the live part (router-added latency
against a raw ZMQ echo) in ``bench/echo.py``.
"""

from __future__ import annotations

import gc
import logging
import random
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.fleet_events import FleetEvents
from bench.ingestion import ingestion, memory
from bench.progress import NullProgress
from bench.results import Goal, SuiteResult, fmt_spread, percentile, spread
from core.prefix_index import PrefixIndex, WorkerKey
from core.routing import RouterCore, RoutingInput

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16
DECISION_GOAL_US = 100.0
INGEST_GOAL_BLOCKS_S = 200_000.0


@dataclass
class OverheadConfig:
    workers: tuple[int, ...] = (8, 64, 512)
    index_blocks: tuple[int, ...] = (10_000, 100_000, 1_000_000)
    requests: int = 2000
    repeats: int = 3
    policy: str = "kvr"
    compare_policies: bool = True
    in_flight_per_worker: int = 2
    request_rate: float = 200.0  # requests/s of virtual time (tentative entries live 5 s)
    ingest_workers: int = 8
    ingest_blocks: int = 200_000
    steps_per_batch: int = 4
    memory_blocks: int = 200_000
    redis: bool = True
    redis_kind: str = "redis-server"
    echo: bool = False  # the live part: router-added latency vs raw ZMQ echo (bench/echo.py)
    echo_requests: int = 2000
    seed: int = 0

    @classmethod
    def quick(cls) -> OverheadConfig:
        """Tiny parameters (the smoke test and ``--quick``)."""
        return cls(workers=(4, 16), index_blocks=(2_000, 6_000), requests=200, repeats=2, compare_policies=True,
                   ingest_workers=2, ingest_blocks=4_000, memory_blocks=3_000, echo_requests=200)


# ---------------------------------------------------------------------------- decision latency


def _time_routes(core: RouterCore, prompts: list[list[int]], *, tag: str, now: float, rate: float,
                 max_in_flight: int, ttft_s: float = 0.05) -> tuple[list[float], list[float], float]:
    """Route every prompt once: sorted wall and thread-CPU latencies (s), and the virtual time reached.

    The router sees a steady state: the last ``ttft_s × rate`` requests still prefilling (their
    tokens count as queued prefill on their worker), ``max_in_flight`` in flight in all.
    Wall time includes being descheduled on a shared machine; the thread's CPU time does not
    (but still includes garbage collection, which is real work of the router).
    """
    fifo: deque[str] = deque()
    lat, cpu = [], []
    perf = time.perf_counter
    thread_time = time.thread_time
    dt = 1.0 / rate
    prefill_depth = max(1, min(max_in_flight, round(ttft_s * rate)))  # requests still before their first token
    for i, tokens in enumerate(prompts):
        req = RoutingInput(f"{tag}-{i}", tokens)
        c0 = thread_time()
        t0 = perf()
        core.route(req, now=now)
        t1 = perf()
        cpu.append(thread_time() - c0)
        lat.append(t1 - t0)
        fifo.append(req.request_id)
        if len(fifo) > prefill_depth:
            core.on_first_token(fifo[-prefill_depth - 1], now=now)
        if len(fifo) > max_in_flight:
            core.on_finish(fifo.popleft())
        now += dt
    for rid in fifo:
        core.on_finish(rid)
    lat.sort()
    cpu.sort()
    return lat, cpu, now


def _percentiles(lat: list[float], cpu: list[float]) -> tuple[float, float, float, float]:
    """Wall p50, wall p99, CPU p50, CPU p99 in µs."""
    return (percentile(lat, 50) * 1e6, percentile(lat, 99) * 1e6, percentile(cpu, 50) * 1e6,
            percentile(cpu, 99) * 1e6)


def _time_parts(core: RouterCore, prompts: list[list[int]]) -> tuple[float, float, float, float]:
    """µs of request hashing and of the index overlap alone, on the same prompts: p50, p50, p99, p99.

    (The p99s are the longest prompts', which make the decision's p99: its per-block part.)"""
    perf = time.perf_counter
    h_lat, o_lat = [], []
    for tokens in prompts:
        req = RoutingInput("parts", tokens)
        t0 = perf()
        hashes = core.request_hashes(req)
        t1 = perf()
        core.index.overlap(hashes)
        t2 = perf()
        h_lat.append(t1 - t0)
        o_lat.append(t2 - t1)
    h_lat.sort()
    o_lat.sort()
    return (percentile(h_lat, 50) * 1e6, percentile(o_lat, 50) * 1e6, percentile(h_lat, 99) * 1e6,
            percentile(o_lat, 99) * 1e6)


def _new_core(index: PrefixIndex, targets: list[WorkerKey], policy: str, seed: int) -> RouterCore:
    from core.policies import get_policy

    core = RouterCore(policy=get_policy(policy, block_size=BLOCK_SIZE), index=index, block_size=BLOCK_SIZE,
                      rng=random.Random(seed))
    for t in targets:
        core.register(t, capacity_blocks=0)
    return core


def decision_latency(cfg: OverheadConfig, progress=None) -> tuple[list[dict], list[dict]]:
    """Rows per (workers, index size) for ``cfg.policy``; and every policy at the largest point of 64 workers."""
    progress = progress or NullProgress()
    rows, policy_rows = [], []
    sizes = sorted(cfg.index_blocks)
    for n_workers in cfg.workers:
        fleet = FleetEvents(n_workers=n_workers, block_size=BLOCK_SIZE, seed=cfg.seed)
        index = PrefixIndex(block_size=BLOCK_SIZE)
        targets = [WorkerKey(f"worker-{i}", 0) for i in range(n_workers)]
        fill_s = 0.0
        now = 0.0
        for size in sizes:
            t0 = time.perf_counter()
            for w, batch in fleet.batches_until(size):
                target = targets[w]
                for event in batch.events:
                    index.apply(target, event, now=0.0)
            fill_s += time.perf_counter() - t0
            prompts = fleet.requests(cfg.requests, seed=cfg.seed + size)
            reps = []
            for rep in range(cfg.repeats):
                core = _new_core(index, targets, cfg.policy, cfg.seed + rep)
                lat, cpu, now = _time_routes(core, prompts, tag=f"{n_workers}-{size}-{rep}", now=now,
                                             rate=cfg.request_rate, max_in_flight=cfg.in_flight_per_worker * n_workers)
                reps.append(_percentiles(lat, cpu))
                now += 10.0  # let this repetition's tentative entries expire
            hash_us, overlap_us, hash_p99_us, overlap_p99_us = _time_parts(
                _new_core(index, targets, cfg.policy, cfg.seed), prompts)
            p50 = spread(r[0] for r in reps)
            p99 = spread(r[1] for r in reps)
            cpu_p50 = spread(r[2] for r in reps)
            cpu_p99 = spread(r[3] for r in reps)
            rows.append({
                "workers": n_workers, "index_blocks": index.total_blocks(), "unique_blocks": index.num_unique_blocks(),
                "policy": cfg.policy, "prompt_tokens_mean": round(sum(map(len, prompts)) / len(prompts)),
                "p50_us": p50, "p99_us": p99, "cpu_p50_us": cpu_p50, "cpu_p99_us": cpu_p99,
                "hash_p50_us": hash_us, "overlap_p50_us": overlap_us,
                "rest_p50_us": max(0.0, p50["median"] - hash_us - overlap_us),
                "hash_p99_us": hash_p99_us, "overlap_p99_us": overlap_p99_us,
                "fill_blocks_per_s": index.total_blocks() / fill_s if fill_s else 0.0,
            })
            progress.step(f"decision {n_workers} workers, {index.total_blocks():,} blocks")
            if cfg.compare_policies and size == sizes[-1] and n_workers == _policy_point(cfg.workers):
                policy_rows = _policies(cfg, index, targets, prompts, now)
        del index, fleet
        gc.collect()
    return rows, policy_rows


def _policy_point(workers: tuple[int, ...]) -> int:
    return 64 if 64 in workers else sorted(workers)[len(workers) // 2]


def _policies(cfg: OverheadConfig, index: PrefixIndex, targets, prompts, now: float) -> list[dict]:
    from core.policies import POLICY_NAMES

    out = []
    for name in POLICY_NAMES:
        reps = []
        for rep in range(cfg.repeats):
            core = _new_core(index, targets, name, cfg.seed + rep)
            lat, cpu, now = _time_routes(core, prompts, tag=f"p-{name}-{rep}", now=now, rate=cfg.request_rate,
                                         max_in_flight=cfg.in_flight_per_worker * len(targets))
            reps.append(_percentiles(lat, cpu))
            now += 10.0
        out.append({"policy": name, "workers": len(targets), "index_blocks": index.total_blocks(),
                    "p50_us": spread(r[0] for r in reps), "p99_us": spread(r[1] for r in reps),
                    "cpu_p50_us": spread(r[2] for r in reps), "cpu_p99_us": spread(r[3] for r in reps)})
    return out


# ---------------------------------------------------------------------------- the suite


def run(cfg: OverheadConfig, *, command: str = "kvr bench overhead", progress=None) -> SuiteResult:
    from bus.redis_server import EmbeddedRedis

    progress = progress or NullProgress()
    n_steps = (len(cfg.workers) * len(cfg.index_blocks) + cfg.repeats * (3 if cfg.redis else 2) + 1
               + (2 if cfg.echo else 0))
    progress.start(n_steps, "starting")
    result = SuiteResult("overhead", command, _config_dict(cfg))
    decision_rows, policy_rows = decision_latency(cfg, progress)
    result.tables["decision latency"] = decision_rows
    if policy_rows:
        result.tables["decision latency by policy"] = policy_rows
    redis_proc = EmbeddedRedis(kind=cfg.redis_kind).start() if cfg.redis else None
    client = None
    try:
        if redis_proc is not None:
            import redis

            client = redis.Redis.from_url(redis_proc.url, socket_timeout=10)
            result.notes.append(f"Redis: {redis_proc.kind} {client.info('server')['redis_version']} on loopback")
        result.tables["ingestion"] = ingestion(cfg, client, progress)
        mem = memory(cfg, client)
        result.tables["memory"] = [mem]
        progress.step("memory")
        routing_trips = {"path": "routing a request (RouterCore.route)", "round_trips": 0.0, "per": "request",
                         "why": "RouterCore holds no Redis handle; the service writes Redis only per event "
                                "batch and on worker hello/heartbeat/goodbye"}
        result.tables["redis round trips"] = [routing_trips] + [
            {"path": f"ingesting an event batch ({r['path']})", "round_trips": r["redis_round_trips_per_batch"],
             "per": "event batch",
             "why": "the batches queued together share a pipeline (router/background_mirror.py)"
             if "background" in r["path"] else "one pipeline per batch (router/ingest.py)"}
            for r in result.tables["ingestion"] if r["mirror"]]
        if cfg.echo:
            from bench.echo import EchoConfig, router_vs_echo, router_vs_http_relay

            echo_cfg = EchoConfig(requests=cfg.echo_requests, repeats=cfg.repeats, seed=cfg.seed)
            result.tables["router-added latency"] = router_vs_echo(echo_cfg)
            progress.step("router vs raw echo")
            result.tables["router-added latency, HTTP"] = router_vs_http_relay(echo_cfg)
            progress.step("router vs raw HTTP relay")
    finally:
        if client is not None:
            client.close()
        if redis_proc is not None:
            redis_proc.stop()
        progress.close()
    _goals(cfg, result)
    return result


def _config_dict(cfg: OverheadConfig) -> dict:
    d = asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _goals(cfg: OverheadConfig, result: SuiteResult) -> None:
    rows = result.tables["decision latency"]
    point = [r for r in rows if r["workers"] == _policy_point(cfg.workers)]
    if point:
        r = max(point, key=lambda r: r["index_blocks"])
        result.goals.append(Goal(f"decision p99 (thread CPU) at {r['workers']} workers, {r['index_blocks']:,} blocks",
                                 r["cpu_p99_us"]["median"], DECISION_GOAL_US, "µs", False,
                                 f"wall p99 {r['p99_us']['median']:.0f} µs on the shared machine; p50 "
                                 f"{r['p50_us']['median']:.0f} µs = hashing {r['hash_p50_us']:.0f} + overlap "
                                 f"{r['overlap_p50_us']:.0f} + rest {r['rest_p50_us']:.0f}; hashing p99 "
                                 f"{r['hash_p99_us']:.0f}, overlap p99 {r['overlap_p99_us']:.0f} (the longest "
                                 f"prompts)"))
    mirrored = [r for r in result.tables.get("ingestion", []) if r["mirror"]]
    if mirrored:
        r = mirrored[-1]  # the background writer, as kvr router runs the mirror
        result.goals.append(Goal(f"ingestion with the Redis mirror ({r['path']})", r["stored_blocks_per_s"]["median"],
                                 INGEST_GOAL_BLOCKS_S, "stored blocks/s", True,
                                 f"{r['all_blocks_per_s']['median']:,.0f} blocks/s counting evictions"))
    echo = result.tables.get("router-added latency")
    if echo:
        r = echo[-1]
        result.goals.append(Goal("router round trip / raw ZMQ echo", r["ratio_p50"]["median"], 2.0, "×", False,
                                 "p50 ratio, same sockets, same run"))
        result.goals.append(Goal("router round trip / raw ZMQ relay, p99", r["ratio_p99"]["median"], 3.0, "×", False,
                                 "p99 ratio, same sockets, same run"))
    http = result.tables.get("router-added latency, HTTP")
    if http:
        r = http[-1]
        for q, target in (("p50", 2.0), ("p99", 3.0)):
            result.goals.append(Goal(f"router round trip / raw HTTP relay, {q}", r[f"ratio_{q}"]["median"], target,
                                     "×", False, f"{q} ratio; aiohttp and one ZMQ hop in both, same run"))


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    """Tables with spreads as ``median (min–max)`` text, for the markdown report."""
    out = {}
    for name, rows in result.tables.items():
        out[name] = [{k: (fmt_spread(v, 1 if not k.endswith("per_s") else 0) if isinstance(v, dict) and "median" in v
                          else v) for k, v in row.items()} for row in rows]
    return out


def plot(result: SuiteResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.tables["decision latency"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    # p99 in thread CPU time: wall-clock p99 on a shared 2-core machine measures the scheduler.
    for ax, key, label in zip(axes, ("p50_us", "cpu_p99_us"),
                              ("decision p50, wall (µs)", "decision p99, thread CPU (µs)"), strict=True):
        for w in sorted({r["workers"] for r in rows}):
            pts = sorted((r["index_blocks"], r[key]) for r in rows if r["workers"] == w)
            xs = [p[0] for p in pts]
            ax.errorbar(xs, [p[1]["median"] for p in pts],
                        yerr=[[p[1]["median"] - p[1]["min"] for p in pts], [p[1]["max"] - p[1]["median"] for p in pts]],
                        marker="o", capsize=3, label=f"{w} workers")
        ax.axhline(DECISION_GOAL_US, color="grey", linestyle="--", linewidth=1, label="goal 100 µs")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("indexed blocks (target, block)")
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle("kvr routing decision latency (RouterCore.route)")
    fig.tight_layout()
    path = out_dir / "overhead_decision.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    paths = [path]
    ing = result.tables.get("ingestion")
    if ing:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        names_ = [r["path"] for r in ing]
        med = [r["stored_blocks_per_s"]["median"] / 1e3 for r in ing]
        err = [[(r["stored_blocks_per_s"]["median"] - r["stored_blocks_per_s"]["min"]) / 1e3 for r in ing],
               [(r["stored_blocks_per_s"]["max"] - r["stored_blocks_per_s"]["median"]) / 1e3 for r in ing]]
        ax.barh(names_, med, xerr=err, capsize=3)
        ax.axvline(INGEST_GOAL_BLOCKS_S / 1e3, color="grey", linestyle="--", label="goal 200k")
        ax.set_xlabel("stored blocks/s (thousands)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "overhead_ingestion.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
