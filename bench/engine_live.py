"""Live worker cost (``kvr bench engine --live``): real router and worker processes on loopback.

A closed loop keeps ``concurrency`` requests in flight through ``kvr router`` to ``workers``
emulated workers for ``duration_s`` seconds (prompts: one of 8 shared 1,024-token prefixes
plus 128 fresh tokens, 128 output tokens). Reports requests and output tokens per second
and the CPU each process used (from ``/proc``, so Linux only), plus the workers' own
account of keeping time (their exit log: how late each step was noticed, and resyncs,
each a stall over 50 ms after which the engine fell behind real time).
"""

from __future__ import annotations

import logging
import os
import random
import re
import subprocess
import sys
import time
from typing import Any

from bus.client import RouterClient
from bus.schema import GenerateRequest
from bus.sockets import free_tcp_endpoint
from cluster.processes import stop_process

logger = logging.getLogger(__name__)

_LATE = re.compile(r"lag mean ([0-9.]+) ms max ([0-9.]+) ms, (\d+) resyncs")


def _cpu_s(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _spawn(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _stop(proc: subprocess.Popen) -> str:
    """SIGTERM (a worker prints its timing log on the way out); its stderr."""
    return stop_process(proc).stderr or ""


def bench_live(*, workers: int = 1, concurrency: int = 32, duration_s: float = 10.0, speedup: float = 10.0,
               profile: str = "a100-80gb-8b", stream_interval: int = 1, seed: int = 0) -> dict[str, Any]:
    clients, worker_ep = free_tcp_endpoint(), free_tcp_endpoint()
    router = _spawn(["router", "--bind-clients", clients, "--bind-workers", worker_ep, "--bind-metrics", "",
                     "--no-redis"])
    procs = [_spawn(["worker", "--id", f"live{i}", "--router", worker_ep, "--speedup", str(speedup), "--profile",
                     profile, "--seed", str(seed + i), "--stream-interval", str(stream_interval)])
             for i in range(workers)]
    rng = random.Random(seed)
    prefixes = [[rng.randrange(50_000) for _ in range(1024)] for _ in range(8)]
    done = tokens = errors = sent = 0
    try:
        time.sleep(2.0)  # registration
        cpu0 = {p.pid: _cpu_s(p.pid) for p in [router, *procs]}
        with RouterClient(endpoint=clients) as client:
            in_flight = 0
            start = time.monotonic()
            while time.monotonic() - start < duration_s:
                while in_flight < concurrency:
                    prompt = prefixes[rng.randrange(8)] + [rng.randrange(50_000) for _ in range(128)]
                    client.send(GenerateRequest(request_id=f"b{sent}", token_ids=prompt, max_tokens=128))
                    sent += 1
                    in_flight += 1
                for res in client.poll(20):
                    if res.done:
                        in_flight -= 1
                        if res.completion is not None:
                            done += 1
                            tokens += res.completion.output_tokens
                        else:
                            errors += 1
            elapsed = time.monotonic() - start
        cpu = {pid: _cpu_s(pid) - c for pid, c in cpu0.items()}
    finally:
        logs = [_stop(p) for p in procs]
        _stop(router)
    late = [m.groups() for m in (_LATE.search(log) for log in logs) if m]
    return {
        "suite": "live", "workers": workers, "concurrency": concurrency, "speedup": speedup, "profile": profile,
        "stream_interval": stream_interval, "elapsed_s": elapsed, "requests_per_s": done / elapsed,
        "output_tokens_per_s": tokens / elapsed, "errors": errors,
        "router_cpu_cores": cpu[router.pid] / elapsed,
        "worker_cpu_cores": [cpu[p.pid] / elapsed for p in procs],
        "worker_lag_mean_ms": [float(a) for a, _, _ in late], "worker_lag_max_ms": [float(b) for _, b, _ in late],
        "worker_resyncs": [int(c) for _, _, c in late],
    }
