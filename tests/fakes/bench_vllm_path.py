"""What kvr adds in front of a vLLM server, measured against the fake vLLM on loopback.

    /work/venv/bin/python -m tests.fakes.bench_vllm_path [--requests 300] [--max-tokens 16]

Three paths to the same fake server, same requests (sequential, 300-token prompts from 10
shared prefixes so about half the prompt is a prefix hit):

* ``direct``: ``OpenAIClient.stream_completion`` (the baseline: HTTP + SSE + the fake engine);
* ``adapter``: ``VllmBackend.submit`` → ``TokenChunk``\\ s → ``Completion`` (adds the adapter's
  thread hand-off and message building);
* ``router``: ``RouterClient`` → router → worker service → adapter → fake (adds two ZMQ hops
  each way, routing, the worker link). The router also ingests the fake's KV events.

``direct`` runs first and last (both runs pooled) so drift on a shared machine shows in its
spread; the first tenth of every run is warm-up and not counted. Prints p50/p99 end-to-end
latency per path and the ratio to ``direct``. Not a test: nothing here is asserted.
"""

from __future__ import annotations

import argparse
import random
import threading
import time

from bus.client import RouterClient
from bus.schema import Completion, Dispatch, GenerateRequest
from core.liveness import HeartbeatConfig
from core.quantiles import percentile
from router.service import RouterConfig, RouterService
from tests.fakes.fake_vllm import FakeVllm, KvEventsConfig
from tests.waiting import eventually
from worker.vllm.backend import VllmBackend, VllmBackendConfig
from worker.vllm.openai_client import CompletionRequest, OpenAIClient
from worker.vllm.runner import VllmWorkerOptions, VllmWorkerRunner


def _pct(values: list[float], q: float) -> float:
    return percentile(sorted(values), q)


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prefixes = [[rng.randrange(2, 50_000) for _ in range(150)] for _ in range(10)]
    return [rng.choice(prefixes) + [rng.randrange(2, 50_000) for _ in range(150)] for _ in range(n)]


def bench_direct(fake: FakeVllm, prompts, max_tokens: int) -> list[float]:
    client = OpenAIClient(base_url=fake.url)
    out = []
    for p in prompts:
        t0 = time.perf_counter()
        stream = client.stream_completion(CompletionRequest(model=fake.model, prompt_token_ids=p,
                                                            max_tokens=max_tokens))
        for _ in stream:
            pass
        out.append(time.perf_counter() - t0)
    return out


def bench_adapter(fake: FakeVllm, prompts, max_tokens: int) -> list[float]:
    done = threading.Event()
    backend = VllmBackend(config=VllmBackendConfig(worker_id="b", vllm_url=fake.url, kv_events_endpoint="tcp://*:1",
                                                   watch_block_size=False),
                          emit=lambda m: done.set() if isinstance(m, Completion) else None)
    backend.start(probe=False)
    out = []
    try:
        for i, p in enumerate(prompts):
            done.clear()
            t0 = time.perf_counter()
            backend.submit(Dispatch(f"a{i}", p, max_tokens))
            if not done.wait(30):
                raise TimeoutError("no completion")
            out.append(time.perf_counter() - t0)
    finally:
        backend.close()
    return out


def bench_router(fake: FakeVllm, prompts, max_tokens: int, events: tuple[str, str]) -> list[float]:
    router = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:0", bind_workers="tcp://127.0.0.1:0",
                                        heartbeat=HeartbeatConfig(interval_s=0.5, liveness=20)))
    rt = threading.Thread(target=router.run, daemon=True)
    rt.start()
    runner = VllmWorkerRunner(VllmWorkerOptions(worker_id="w", vllm_url=fake.url, kv_events_endpoint=events[0],
                                                replay_endpoint=events[1], router_endpoint=router.workers_endpoint))
    wt = threading.Thread(target=runner.run, daemon=True)
    wt.start()
    out = []
    try:
        eventually(lambda: "w" in router.workers, timeout_s=10, what="the worker registered")
        with RouterClient(endpoint=router.clients_endpoint) as client:
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                result = client.generate(GenerateRequest(f"r{i}", token_ids=p, max_tokens=max_tokens), timeout_s=30)
                if result.completion is None:
                    raise RuntimeError(f"request failed: {result.error}")
                out.append(time.perf_counter() - t0)
    finally:
        runner.stop()
        wt.join(10)
        router.stop()
        rt.join(10)
    return out


def waker_ab(rounds: int, requests: int, max_tokens: int, free_port_pair) -> None:
    """Router path p50/p90/p99 with ``VllmBackend.set_waker`` on and off (off: the loop polls every 5 ms)."""
    real = VllmBackend.set_waker
    results: dict[str, list[float]] = {"waker": [], "poll": []}
    try:
        for rnd in range(rounds):
            for mode in results:
                VllmBackend.set_waker = real if mode == "waker" else (lambda self, wake: None)
                p, r = free_port_pair(), free_port_pair()
                kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", bind=True)
                with FakeVllm(kv_events=kv, num_gpu_blocks=4096) as fake:
                    run = bench_router(fake, _prompts(requests, seed=rnd), max_tokens, (f"tcp://*:{p}", f"tcp://*:{r}"))
                results[mode].extend(run[requests // 10:])
    finally:
        VllmBackend.set_waker = real
    for mode, values in results.items():
        print(f"{mode:<6} n={len(values)} p50 {_pct(values, 50) * 1e3:.2f} ms  p90 {_pct(values, 90) * 1e3:.2f} ms  "
              f"p99 {_pct(values, 99) * 1e3:.2f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--waker-ab", type=int, default=0, metavar="ROUNDS",
                        help="Instead: the router path with and without the backend waking the worker loop, "
                             "alternating for ROUNDS rounds.")
    args = parser.parse_args()
    from tests.worker.test_vllm_events import free_port_pair

    if args.waker_ab:
        return waker_ab(args.waker_ab, args.requests, args.max_tokens, free_port_pair)

    p, r = free_port_pair(), free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", bind=True)
    results = {}
    for name in ("direct", "adapter", "router", "direct"):
        # A fresh server per path: each path starts from an empty prefix cache.
        with FakeVllm(kv_events=kv if name == "router" else None, num_gpu_blocks=4096) as fake:
            prompts = _prompts(args.requests)
            if name == "direct":
                run = bench_direct(fake, prompts, args.max_tokens)
            elif name == "adapter":
                run = bench_adapter(fake, prompts, args.max_tokens)
            else:
                run = bench_router(fake, prompts, args.max_tokens, (f"tcp://*:{p}", f"tcp://*:{r}"))
            results.setdefault(name, []).extend(run[args.requests // 10:])  # the first tenth warms up
    base50, base99 = _pct(results["direct"], 50), _pct(results["direct"], 99)
    print(f"{args.requests} sequential requests, 300-token prompts, {args.max_tokens} output tokens, "
          "fake vLLM on loopback")
    print(f"{'path':<8} {'p50 ms':>8} {'p99 ms':>8} {'p50 x direct':>13} {'p99 x direct':>13}")
    for name, values in results.items():
        p50, p99 = _pct(values, 50), _pct(values, 99)
        print(f"{name:<8} {p50 * 1e3:8.2f} {p99 * 1e3:8.2f} {p50 / base50:13.2f} {p99 / base99:13.2f}")


if __name__ == "__main__":
    main()
