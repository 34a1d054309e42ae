"""``kvr bench peer``: kvr against a published router (sglang-router) in front of the same fleet.

Every arm gets a fresh fleet of ``workers`` emulated workers (``kvr worker``, vLLM's HTTP API,
``speedup``; the same seeds, so the same engines) and one router in front of it:

* ``kvr`` (or ``kvr:<policy>``, another of kvr's policies in the same router, e.g. ``kvr:sglang``,
  kvr's own implementation of SGLang's rule on the exact index: it separates the router from the
  policy): ``kvr router`` with its OpenAI HTTP front; the workers on its ZMQ link (their KV
  events feed its index);
* ``sglang:<policy>``: ``python -m sglang_router.launch_router`` (PyPI ``sglang-router``,
  loopback-only flags from ``docs/peer-routers.md``) over the workers' HTTP API (``--router
  none``: no kvr router anywhere). The workers do not advertise a model or tokenizer path, so the
  peer never reaches out to the network;
* ``vllm:<policy>``: ``vllm-router`` (PyPI ``vllm-router``) the same way; its ``cache_aware`` asks
  every worker for the prompt's token ids (``/v1/completions/render``, then ``/tokenize``) per
  request, as it would with stock vLLM, and that cost is part of its TTFT.

The request sequence is a shared-prefix text workload (``groups`` system prompts of
``system_words`` words, ``prompts_per_group`` questions each, shuffled), sent open-loop at
Poisson arrival times (``rate_per_s`` of workload time, ``/ speedup`` on the wall clock) as
streaming ``/v1/completions`` with a **new connection per request** (sglang-router 0.3.2 holds
the first chunk of a keep-alive connection back ~30 ms: ``docs/peer-routers.md`` §4). Text, not
token ids, so sglang's character-based tree sees what it was built for; the workers and kvr
tokenize with the same built-in tokenizer. TTFT = first SSE event; hit rate = the engine's
``usage.prompt_tokens_details.cached_tokens``. The first ``warmup`` requests are discarded;
arms interleave per repetition; the table shows median (min–max) over repetitions.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TypeVar, cast

from bench.live import proc_cpu_s, settle
from bench.progress import NullProgress
from bench.results import Goal, SuiteResult, fmt_spread, percentile, spread, spread_bars
from bench.sse_client import HTTPStreamError, post_sse
from cluster.local import http_ok

logger = logging.getLogger(__name__)
T = TypeVar("T")

TTFT_GOAL_RATIO = 0.7
HIT_GOAL_POINTS = 0.10


@dataclass
class PeerConfig:
    arms: tuple[str, ...] = ("kvr", "sglang:cache_aware", "sglang:round_robin")
    workers: int = 4
    speedup: float = 10.0
    groups: int = 8
    prompts_per_group: int = 16
    system_words: int = 500
    question_words: int = 30
    max_tokens: int = 16
    rate_per_s: float = 8.0
    warmup: int = 16
    repeats: int = 3
    seed: int = 0
    request_timeout_s: float = 60.0
    ready_timeout_s: float = 90.0
    out_dir: str = ""
    busy: bool = False  # a process spinning on one core for the whole run, every arm alike

    @classmethod
    def quick(cls) -> PeerConfig:
        return cls(arms=("kvr", "sglang:cache_aware"), workers=2, speedup=50.0, groups=2, prompts_per_group=4,
                   system_words=120, question_words=10, max_tokens=4, rate_per_s=20.0, warmup=2, repeats=1)


# ---------------------------------------------------------------------------- the workload


def text_workload(cfg: PeerConfig, seed: int) -> list[tuple[float, str]]:
    """``(arrival s of workload time, prompt text)``, the same for every arm of a repetition."""
    rnd = random.Random(seed)
    vocab = ["".join(rnd.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rnd.randint(2, 9))) for _ in range(5000)]
    words = lambda n: " ".join(rnd.choice(vocab) for _ in range(n))  # noqa: E731
    systems = [f"[group {g}] " + words(cfg.system_words) for g in range(cfg.groups)]
    prompts = [f"{systems[g]}\nQuestion {q}: {words(cfg.question_words)}\nAnswer:"
               for g in range(cfg.groups) for q in range(cfg.prompts_per_group)]
    rnd.shuffle(prompts)
    t, out = 0.0, []
    for p in prompts:
        t += rnd.expovariate(cfg.rate_per_s)
        out.append((t, p))
    return out


# ---------------------------------------------------------------------------- the client


async def _one(url: str, prompt: str, max_tokens: int, timeout_s: float) -> dict:
    body = {"model": "kvr-emulated", "prompt": prompt, "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    out = {"sent_s": t0, "ttft_s": None, "e2e_s": None, "prompt_tokens": 0, "cached_tokens": 0, "chunks": 0,
           "error": None}
    try:
        async with asyncio.timeout(timeout_s):
            async for data in post_sse(f"{url}/v1/completions", body):
                if out["ttft_s"] is None:
                    out["ttft_s"] = time.perf_counter() - t0
                if data == b"[DONE]":
                    break
                out["chunks"] += 1
                msg = json.loads(data)
                usage = msg.get("usage")
                if usage:
                    out["prompt_tokens"] = usage.get("prompt_tokens", 0)
                    out["cached_tokens"] = (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0) or 0
                if "error" in msg:
                    out["error"] = str(msg["error"])[:200]
        out["e2e_s"] = time.perf_counter() - t0
    except (HTTPStreamError, OSError, TimeoutError, ValueError) as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:200]
    return out


async def send_at_arrivals(workload: list[tuple[float, str]], speedup: float,
                           send: Callable[[str], Awaitable[T]]) -> list[T]:
    """``send(prompt)`` for each ``(arrival s of workload time, prompt)`` at ``arrival / speedup`` s
    of wall time from now, open loop (each in its own task); their results in workload order."""
    t0 = time.perf_counter()
    tasks = []
    for at, prompt in workload:
        delay = t0 + at / speedup - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.ensure_future(send(prompt)))
    return list(await asyncio.gather(*tasks))


async def _drive(url: str, workload: list[tuple[float, str]], cfg: PeerConfig) -> list[dict]:
    # A new connection per request (see the module docstring): post_sse never reuses one.
    return await send_at_arrivals(workload, cfg.speedup,
                                  lambda prompt: _one(url, prompt, cfg.max_tokens, cfg.request_timeout_s))


@dataclass
class ArmRun:
    """One arm's drive: the client's results, and the CPU its router spent meanwhile."""

    results: list[dict]
    router_cpu_s: float | None  # user + system CPU of the router's processes over the drive (None: unreadable)


def drive_http(url: str, workload: list[tuple[float, str]], cfg: PeerConfig, *, router_pids: list[int]) -> ArmRun:
    """Drive ``workload`` through ``url``; ``router_pids`` are the processes a router arm costs
    (kvr: the router and its Redis; a peer: its one process): their CPU is read around the drive."""
    cpu0 = [proc_cpu_s(pid) for pid in router_pids]
    results = asyncio.run(_drive(url, workload, cfg))
    cpu1 = [proc_cpu_s(pid) for pid in router_pids]
    if any(c is None for c in cpu0 + cpu1):
        return ArmRun(results, None)
    return ArmRun(results, sum(cast(float, b) - cast(float, a) for a, b in zip(cpu0, cpu1, strict=True)))


def http_metrics(results: list[dict], warmup: int, router_cpu_s: float | None = None) -> dict:
    """Metrics of the requests after the warm-up (in send order). ``router_cpu_s`` covers every
    request (warm-up included), so it is divided by all of them, and by all streamed chunks."""
    every_chunk = sum(r.get("chunks", 0) for r in results)
    kept = sorted(results, key=lambda r: r["sent_s"])[warmup:]
    done = [r for r in kept if r["error"] is None and r["ttft_s"] is not None]
    prompt = sum(r["prompt_tokens"] for r in done)
    cached = sum(r["cached_tokens"] for r in done)
    ttft = sorted(r["ttft_s"] * 1e3 for r in done)
    span = max(r["sent_s"] + r["e2e_s"] for r in done) - min(r["sent_s"] for r in done) if done else 0.0
    return {"requests": len(kept), "completed": len(done), "errors": len(kept) - len(done),
            "hit_rate": cached / prompt if prompt else 0.0, "ttft_p50_ms": percentile(ttft, 50),
            "ttft_p99_ms": percentile(ttft, 99), "ttft_mean_ms": sum(ttft) / len(ttft) if ttft else float("nan"),
            "throughput_rps": len(done) / span if span > 0 else 0.0,
            "router_cpu_ms_per_request": (router_cpu_s * 1e3 / len(results)
                                          if router_cpu_s is not None and results else float("nan")),
            "router_cpu_us_per_chunk": (router_cpu_s * 1e6 / every_chunk
                                        if router_cpu_s is not None and every_chunk else float("nan"))}


# ---------------------------------------------------------------------------- the arms


def _sglang_workers_ready(url: str, n: int) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/workers", timeout=1.0) as resp:
            data = json.loads(resp.read())
    except (OSError, ValueError):
        return False
    workers = data.get("workers", data) if isinstance(data, dict) else data
    if not isinstance(workers, list):
        return False
    healthy = [w for w in workers if isinstance(w, dict) and w.get("is_healthy", True)]
    return len(healthy) >= n


def run_kvr_arm(cfg: PeerConfig, workload, run_dir: Path, seed: int, policy: str = "kvr") -> ArmRun:
    from bench.live import cluster_config
    from bus.redis_server import free_loopback_port
    from cluster.local import LocalCluster

    port = free_loopback_port()
    ccfg = cluster_config(workers=cfg.workers, policy=policy, speedup=cfg.speedup, run_dir=run_dir,
                          namespace=run_dir.name, seed=seed,
                          router_args=["--http-port", str(port), "--http-host", "127.0.0.1"])
    url = f"http://127.0.0.1:{port}"
    with LocalCluster(ccfg) as cluster:
        deadline = time.monotonic() + cfg.ready_timeout_s
        while not http_ok(f"{url}/health"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"kvr HTTP front at {url} not ready")
            time.sleep(0.1)
        sup = cluster.supervisor
        # The router's cost includes its Redis (the mirror): a peer keeps its state in its one process.
        pids = [sup.pid(name) for name in ("router", "redis") if name in sup.names]
        return drive_http(url, workload, cfg, router_pids=pids)


def http_fleet(sup, cfg: PeerConfig, seed: int) -> list[str]:
    """Start ``cfg.workers`` emulated workers serving only vLLM's HTTP API (no kvr router); their URLs."""
    from bus.redis_server import free_loopback_port
    from cluster.local import kvr_argv
    from cluster.supervisor import ComponentSpec

    urls = []
    for i in range(cfg.workers):
        port = free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        urls.append(url)
        sup.start(ComponentSpec(f"worker-{i}", "worker", kvr_argv(
            "worker", "--id", f"worker-{i}", "--router", "none", "--http-port", str(port), "--http-host",
            "127.0.0.1", "--speedup", f"{cfg.speedup:g}", "--seed", str(seed), "--replay-endpoint", "none",
            log_level="WARNING"), ready=lambda u=url: http_ok(f"{u}/health")))
    for i in range(cfg.workers):
        sup.wait_ready(f"worker-{i}", timeout_s=cfg.ready_timeout_s)
    return urls


def start_sglang_router(sup, cfg: PeerConfig, policy: str, worker_urls: list[str]) -> str:
    """Start sglang-router (loopback only) over ``worker_urls`` as ``sup``'s ``sglang-router``; its URL
    once it lists every worker healthy."""
    from bus.redis_server import free_loopback_port
    from cluster.supervisor import ComponentSpec

    port, prom = free_loopback_port(), free_loopback_port()
    url = f"http://127.0.0.1:{port}"
    sup.start(ComponentSpec("sglang-router", "router", [
        sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
        "--worker-urls", *worker_urls, "--policy", policy, "--prometheus-host", "127.0.0.1", "--prometheus-port",
        str(prom), "--worker-startup-check-interval", "1", "--log-level", "warn"],
        ready=lambda: _sglang_workers_ready(url, len(worker_urls))))
    sup.wait_ready("sglang-router", timeout_s=cfg.ready_timeout_s)
    return url


def run_sglang_arm(cfg: PeerConfig, policy: str, workload, run_dir: Path, seed: int) -> ArmRun:
    from cluster.supervisor import Supervisor

    sup = Supervisor(log_dir=run_dir / "logs")
    try:
        url = start_sglang_router(sup, cfg, policy, http_fleet(sup, cfg, seed))
        return drive_http(url, workload, cfg, router_pids=[sup.pid("sglang-router")])
    finally:
        sup.stop()


def run_vllm_router_arm(cfg: PeerConfig, policy: str, workload, run_dir: Path, seed: int) -> ArmRun:
    """vllm-router (PyPI ``vllm-router``): its cache_aware fetches token ids from every worker's /tokenize."""
    import shutil

    from bus.redis_server import free_loopback_port
    from cluster.supervisor import ComponentSpec, Supervisor

    binary = shutil.which("vllm-router") or str(Path(sys.executable).with_name("vllm-router"))
    sup = Supervisor(log_dir=run_dir / "logs")
    try:
        urls = http_fleet(sup, cfg, seed)
        port, prom = free_loopback_port(), free_loopback_port()
        url = f"http://127.0.0.1:{port}"
        sup.start(ComponentSpec("vllm-router", "router", [
            binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls, "--policy", policy,
            "--prometheus-host", "127.0.0.1", "--prometheus-port", str(prom), "--log-level", "warning"],
            ready=lambda: http_ok(f"{url}/health") and http_ok(f"{url}/v1/models")))
        sup.wait_ready("vllm-router", timeout_s=cfg.ready_timeout_s)
        return drive_http(url, workload, cfg, router_pids=[sup.pid("vllm-router")])
    finally:
        sup.stop()


def _spin(stop) -> None:
    while not stop.is_set():
        for _ in range(100_000):
            pass


class CoreBurner:
    """One process that keeps a core busy until closed (``--busy``: issue 15 asks how a router's TTFT
    p99 holds when another process burns one of the machine's cores). A context manager."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self._stop = ctx.Event()
        self.process = ctx.Process(target=_spin, args=(self._stop,), daemon=True, name="kvr-core-burner")

    def __enter__(self) -> CoreBurner:
        self.process.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self.process.join(timeout=5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join(timeout=5)


def run(cfg: PeerConfig, *, command: str = "kvr bench peer", progress=None) -> SuiteResult:
    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-peer-"))
    progress.start(len(cfg.arms) * cfg.repeats, "starting")
    per_arm: dict[str, list[dict]] = {a: [] for a in cfg.arms}
    stack = contextlib.ExitStack()
    if cfg.busy:
        stack.enter_context(CoreBurner())
    try:
        for rep in range(cfg.repeats):
            seed = cfg.seed + rep
            workload = text_workload(cfg, seed)
            for arm in cfg.arms:
                run_dir = root / f"{arm.replace(':', '-').replace('_', '-')}-{rep}"
                if arm == "kvr" or arm.startswith("kvr:"):
                    arm_run = run_kvr_arm(cfg, workload, run_dir, seed, arm.partition(":")[2] or "kvr")
                elif arm.startswith("sglang:"):
                    arm_run = run_sglang_arm(cfg, arm.split(":", 1)[1], workload, run_dir, seed)
                elif arm.startswith("vllm:"):
                    arm_run = run_vllm_router_arm(cfg, arm.split(":", 1)[1], workload, run_dir, seed)
                else:
                    raise ValueError(f"unknown arm {arm!r}")
                m = http_metrics(arm_run.results, cfg.warmup, arm_run.router_cpu_s)
                per_arm[arm].append(m)
                progress.step(f"{arm} rep {rep + 1}: hit {m['hit_rate']:.2f}, TTFT p99 {m['ttft_p99_ms']:.0f} ms, "
                              f"router CPU {m['router_cpu_ms_per_request']:.2f} ms/request")
                settle(0.5)
    finally:
        stack.close()
        progress.close()
    result = SuiteResult("peer", command, {**asdict(cfg), "arms": list(cfg.arms)})
    rows = []
    for arm, runs in per_arm.items():
        rows.append({"arm": arm, "runs": len(runs), "requests": runs[0]["requests"] if runs else 0,
                     **{k: spread(r[k] for r in runs) for k in ("hit_rate", "ttft_p50_ms", "ttft_p99_ms",
                                                                "ttft_mean_ms", "throughput_rps", "errors",
                                                                "router_cpu_ms_per_request",
                                                                "router_cpu_us_per_chunk")}})
    result.tables["arms"] = rows
    result.tables["runs"] = [{"arm": a, "rep": i, **r} for a, runs in per_arm.items() for i, r in enumerate(runs)]
    _goals(result, per_arm)
    result.notes.append(f"{cfg.workers} emulated workers at speedup {cfg.speedup:g}, fresh per arm and repetition; "
                        f"{cfg.groups}×{cfg.prompts_per_group} shared-prefix text prompts ({cfg.system_words}-word "
                        f"system prompts), Poisson {cfg.rate_per_s:g} req/s of workload time, first {cfg.warmup} "
                        f"discarded; latencies wall-clock ms; logs in {root}"
                        + ("; another process spun on one core throughout (--busy)" if cfg.busy else ""))
    return result


def _goals(result: SuiteResult, per_arm: dict[str, list[dict]]) -> None:
    kvr, peer = per_arm.get("kvr"), per_arm.get("sglang:cache_aware")
    if not kvr or not peer:
        return
    ratios = [k["ttft_p99_ms"] / p["ttft_p99_ms"] for k, p in zip(kvr, peer, strict=True) if p["ttft_p99_ms"]]
    points = [k["hit_rate"] - p["hit_rate"] for k, p in zip(kvr, peer, strict=True)]
    r, d = spread(ratios), spread(points)
    result.goals.append(Goal("TTFT p99 kvr / sglang-router cache_aware", r["median"], TTFT_GOAL_RATIO, "×", False,
                             f"per repetition, range {r['min']:.2f}–{r['max']:.2f}"))
    result.goals.append(Goal("hit rate kvr − sglang-router cache_aware", d["median"] * 100, HIT_GOAL_POINTS * 100,
                             "points", True, f"per repetition, range {d['min'] * 100:.1f}–{d['max'] * 100:.1f}"))


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    rows = [{"arm": r["arm"], "runs": r["runs"], "requests": r["requests"], "hit rate": fmt_spread(r["hit_rate"], 3),
             "TTFT p50 ms": fmt_spread(r["ttft_p50_ms"]), "TTFT p99 ms": fmt_spread(r["ttft_p99_ms"]),
             "TTFT mean ms": fmt_spread(r["ttft_mean_ms"]), "req/s": fmt_spread(r["throughput_rps"], 2),
             "router CPU ms/request": fmt_spread(r["router_cpu_ms_per_request"], 2),
             "router CPU µs/chunk": fmt_spread(r["router_cpu_us_per_chunk"]),
             "errors": fmt_spread(r["errors"], 0)} for r in result.tables["arms"]]
    return {"arms": rows, "runs": [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()}
                                   for r in result.tables["runs"]]}


def plot(result: SuiteResult, out_dir: Path) -> list[Path]:
    return [spread_bars(result.tables["arms"], name_key="arm",
                        panels=(("hit_rate", "token hit rate"), ("ttft_p50_ms", "TTFT p50 (ms)"),
                                ("ttft_p99_ms", "TTFT p99 (ms)")),
                        title="kvr vs sglang-router, same fleet, same requests", path=out_dir / "peer.png",
                        rotation=20, width_in=13.0)]
