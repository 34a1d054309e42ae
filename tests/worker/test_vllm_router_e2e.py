"""End to end: kvr router + two `kvr worker --engine vllm` adapters + two fake vLLM servers.

Everything is real except the GPU: the router service (its own thread, real sockets), the
adapters on the worker service link, the fake servers' HTTP APIs and their vLLM-compatible
KV-event publishers (bind mode, replay). The closed loop must be exact: for every request the
router's predicted cached tokens (``Routed.predicted_cached_tokens``) equal the cached tokens
the server reported (``Completion.cached_tokens``).
"""

from __future__ import annotations

import random
import threading

import pytest

from bus.client import RouterClient
from bus.schema import GenerateRequest
from core.liveness import HeartbeatConfig
from core.prefix_index import WorkerKey
from router.service import RouterConfig, RouterService
from tests.fakes.fake_vllm import FakeVllm, KvEventsConfig, fake_tokenize
from tests.waiting import eventually
from tests.worker.test_vllm_events import free_port_pair
from worker.vllm.remote_tokenizer import load_router_tokenizer
from worker.vllm.runner import VllmWorkerOptions, VllmWorkerRunner

pytestmark = pytest.mark.timeout(90)
BS = 16
WORKERS = ("vllm-a", "vllm-b")


def _until(predicate, timeout_s: float, what: str, router: RouterService | None = None) -> None:
    """:func:`eventually`, failing at once if ``router`` failed to handle a message meanwhile."""

    def router_healthy() -> None:
        assert router is None or not router.counters["handler_errors"], "the router failed to handle a message"

    eventually(predicate, timeout_s=timeout_s, what=what, pump=router_healthy)


def test_router_predictions_equal_vllm_reported_cached_tokens():
    router = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:0", bind_workers="tcp://127.0.0.1:0",
                                        block_size=BS, heartbeat=HeartbeatConfig(interval_s=0.1, liveness=50)))
    router_thread = threading.Thread(target=router.run, name="router", daemon=True)
    router_thread.start()
    fakes, runners, threads = [], [], []
    try:
        for wid in WORKERS:
            p, r = free_port_pair(), free_port_pair()
            # vLLM: "endpoint":"tcp://*:p", "replay_endpoint":"tcp://*:r" (bound on loopback here).
            kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}",
                                topic=f"kv@{wid}@fake/model-1b", bind=True)
            fake = FakeVllm(kv_events=kv, num_gpu_blocks=40, lora_adapters=("sql-lora",))
            fakes.append(fake)
            runner = VllmWorkerRunner(VllmWorkerOptions(
                worker_id=wid, vllm_url=fake.url, kv_events_endpoint=f"tcp://*:{p}",
                replay_endpoint=f"tcp://*:{r}", topic=kv.topic, router_endpoint=router.workers_endpoint,
                block_size=BS, heartbeat_interval_s=0.1))
            runners.append(runner)
            threads.append(threading.Thread(target=runner.run, name=f"worker-{wid}", daemon=True))
            threads[-1].start()
        _until(lambda: set(router.workers) == set(WORKERS), 5, "both workers to register", router)
        streams = {WorkerKey(w, 0): f for w, f in zip(WORKERS, fakes, strict=True)}
        _until(lambda: all(k in router.ingest.streams for k in streams), 5, "the router to subscribe", router)

        rng = random.Random(5)
        prefixes = [[rng.randrange(2, 50_000) for _ in range(rng.choice([24, 40, 64]))] for _ in range(5)]
        pairs, served = [], []
        with RouterClient(endpoint=router.clients_endpoint) as client:
            for i in range(30):
                tokens = rng.choice(prefixes) + [rng.randrange(2, 50_000) for _ in range(rng.randrange(0, 30))]
                req = GenerateRequest(f"q{i}", token_ids=tokens, max_tokens=rng.randrange(1, 8),
                                      lora_name=rng.choice([None, None, "sql-lora"]),
                                      cache_salt=rng.choice([None, None, None, "t1"]))
                result = client.generate(req, timeout_s=20)
                assert result.completion is not None, result.error
                pairs.append((result.routed.predicted_cached_tokens, result.completion.cached_tokens))
                served.append(result.routed.worker_id)
                # Let the router apply every batch before the next decision (exactness, not speed).
                _until(lambda: all(router.ingest.streams[k].last_seq == f.publishers[0].next_seq - 1
                                   for k, f in streams.items()), 10, "events to be ingested")
    finally:
        for runner in runners:
            runner.stop()
        for t in threads:
            t.join(10)
        router.stop()
        router_thread.join(10)
        for fake in fakes:
            fake.close()
    assert [p for p, _ in pairs] == [a for _, a in pairs]
    assert sum(a for _, a in pairs) > 0, "the workload must produce hits"
    assert sum(f.engines[0].pool.stats.evicted_blocks for f in fakes) > 0, "the workload must evict"
    assert {w for w in served} == set(WORKERS), "both workers must serve"


def test_text_prompts_tokenized_by_the_servers_tokenize():
    """``kvr router --tokenizer <vLLM URL>``: text becomes the server's own token ids."""
    p, r = free_port_pair(), free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic="t", bind=True)
    with FakeVllm(kv_events=kv) as fake:
        router = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:0", bind_workers="tcp://127.0.0.1:0",
                                            block_size=BS, heartbeat=HeartbeatConfig(interval_s=0.1, liveness=50)),
                               tokenizer=load_router_tokenizer(fake.url))
        router_thread = threading.Thread(target=router.run, name="router", daemon=True)
        router_thread.start()
        runner = VllmWorkerRunner(VllmWorkerOptions(
            worker_id="w", vllm_url=fake.url, kv_events_endpoint=f"tcp://*:{p}", replay_endpoint=f"tcp://*:{r}",
            topic="t", router_endpoint=router.workers_endpoint, block_size=BS, heartbeat_interval_s=0.1))
        worker_thread = threading.Thread(target=runner.run, name="worker", daemon=True)
        worker_thread.start()
        text = " ".join(f"word{i}" for i in range(40))  # 41 tokens with the BOS
        try:
            _until(lambda: "w" in router.workers and WorkerKey("w", 0) in router.ingest.streams, 5, "registration")
            with RouterClient(endpoint=router.clients_endpoint) as client:
                first = client.generate(GenerateRequest("a", prompt=text, max_tokens=2), timeout_s=20)
                _until(lambda: router.ingest.streams[WorkerKey("w", 0)].last_seq == fake.publishers[0].next_seq - 1,
                       10, "events to be ingested")
                second = client.generate(GenerateRequest("b", prompt=text, max_tokens=2), timeout_s=20)
        finally:
            runner.stop()
            worker_thread.join(10)
            router.stop()
            router_thread.join(10)
    prompts = [body["prompt"] for body in fake.requests[1:]]  # [0] is the adapter's start-up probe
    assert prompts == [fake_tokenize(text)] * 2
    assert (first.completion.cached_tokens, second.completion.cached_tokens) == (0, 32)
    assert second.routed.predicted_cached_tokens == 32


def test_router_refuses_a_vllm_worker_with_another_block_size():
    """Server and adapter agree on 32, the router was told 16: the worker stops with the router's reason."""
    router = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:0", bind_workers="tcp://127.0.0.1:0",
                                        block_size=BS, heartbeat=HeartbeatConfig(interval_s=0.1, liveness=50)))
    router_thread = threading.Thread(target=router.run, name="router", daemon=True)
    router_thread.start()
    try:
        with FakeVllm(block_size=32) as fake:
            runner = VllmWorkerRunner(VllmWorkerOptions(
                worker_id="w32", vllm_url=fake.url, kv_events_endpoint="tcp://*:5557", block_size=32,
                router_endpoint=router.workers_endpoint, heartbeat_interval_s=0.1))
            worker_thread = threading.Thread(target=runner.run, name="worker", daemon=True)
            worker_thread.start()
            worker_thread.join(10)
            assert not worker_thread.is_alive(), "a refused worker must stop"
    finally:
        router.stop()
        router_thread.join(10)
    assert runner.service.refused == "block_size 32 != the router's 16"
    assert "w32" not in router.workers


def test_a_vllm_server_that_goes_down_leaves_the_router_and_comes_back():
    router = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:0", bind_workers="tcp://127.0.0.1:0",
                                        block_size=BS, heartbeat=HeartbeatConfig(interval_s=0.1, liveness=50)))
    router_thread = threading.Thread(target=router.run, name="router", daemon=True)
    router_thread.start()
    fakes = {wid: FakeVllm() for wid in WORKERS}
    runners, threads = [], []
    try:
        for wid, fake in fakes.items():
            runners.append(VllmWorkerRunner(VllmWorkerOptions(
                worker_id=wid, vllm_url=fake.url, kv_events_endpoint=f"tcp://*:{free_port_pair()}", block_size=BS,
                router_endpoint=router.workers_endpoint, heartbeat_interval_s=0.1, metrics_interval_s=0.05,
                unhealthy_after=2)))
            threads.append(threading.Thread(target=runners[-1].run, daemon=True))
            threads[-1].start()
        _until(lambda: set(router.workers) == set(WORKERS), 5, "both workers to register", router)
        port = int(fakes["vllm-a"].url.rsplit(":", 1)[1])
        fakes["vllm-a"].close()  # vLLM crashed (or restarts and reloads its model)
        _until(lambda: set(router.workers) == {"vllm-b"}, 5, "vllm-a to leave the router")
        with RouterClient(endpoint=router.clients_endpoint) as client:
            results = [client.generate(GenerateRequest(f"d{i}", token_ids=list(range(10 + i, 60 + i)), max_tokens=1),
                                       timeout_s=10) for i in range(6)]
        assert all(r.completion is not None and r.completion.worker_id == "vllm-b" for r in results)
        fakes["vllm-a"] = FakeVllm(port=port)  # back on the same URL
        _until(lambda: set(router.workers) == set(WORKERS), 5, "vllm-a to register again", router)
    finally:
        for runner in runners:
            runner.stop()
        for t in threads:
            t.join(10)
        router.stop()
        router_thread.join(10)
        for fake in fakes.values():
            fake.close()


def test_data_parallel_ranks_are_routed_and_predicted_exactly():
    """One vLLM with --data-parallel-size 2: two targets, events on base and base + 1, exact loop."""
    router = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:0", bind_workers="tcp://127.0.0.1:0",
                                        block_size=BS, heartbeat=HeartbeatConfig(interval_s=0.1, liveness=50)))
    router_thread = threading.Thread(target=router.run, name="router", daemon=True)
    router_thread.start()
    p, r = free_port_pair(), free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic="dp", bind=True)
    fake = FakeVllm(kv_events=kv, dp_size=2, num_gpu_blocks=40)
    runner = VllmWorkerRunner(VllmWorkerOptions(
        worker_id="dp", vllm_url=fake.url, kv_events_endpoint=f"tcp://*:{p}", replay_endpoint=f"tcp://*:{r}",
        topic="dp", dp_size=2, router_endpoint=router.workers_endpoint, block_size=BS, heartbeat_interval_s=0.1))
    worker_thread = threading.Thread(target=runner.run, daemon=True)
    worker_thread.start()
    targets = [WorkerKey("dp", 0), WorkerKey("dp", 1)]
    rng = random.Random(2)
    prefixes = [[rng.randrange(2, 50_000) for _ in range(48)] for _ in range(6)]
    pairs, ranks = [], []
    try:
        _until(lambda: all(t in router.ingest.streams for t in targets), 5, "both ranks subscribed", router)
        with RouterClient(endpoint=router.clients_endpoint) as client:
            for i in range(24):
                tokens = rng.choice(prefixes) + [rng.randrange(2, 50_000) for _ in range(rng.randrange(0, 20))]
                result = client.generate(GenerateRequest(f"p{i}", token_ids=tokens, max_tokens=2), timeout_s=20)
                assert result.completion is not None, result.error
                pairs.append((result.routed.predicted_cached_tokens, result.completion.cached_tokens))
                ranks.append(result.routed.dp_rank)
                _until(lambda: all(router.ingest.streams[t].last_seq == fake.publishers[t.dp_rank].next_seq - 1
                                   for t in targets), 10, "events to be ingested")
    finally:
        runner.stop()
        worker_thread.join(10)
        router.stop()
        router_thread.join(10)
        fake.close()
    assert [a for a, _ in pairs] == [b for _, b in pairs]
    assert set(ranks) == {0, 1} and sum(b for _, b in pairs) > 0
    # Each rank ran what was routed to it (+1 on rank 0: the adapter's start-up probe has no rank header).
    assert [e.pool.stats.requests for e in fake.engines] == [ranks.count(0) + 1, ranks.count(1)]
