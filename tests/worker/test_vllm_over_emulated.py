"""The vLLM adapter in front of kvr's *emulated* worker's vLLM-compatible HTTP API.

Two independent implementations of one contract: if the adapter's start-up checks, request
relay and load parsing work against both the fake vLLM and the emulated worker's HTTP face
(``worker/http_api.py``), neither can drift from vLLM's shapes unnoticed. The emulated
worker publishes its own vLLM-format KV events; the router-side subscriber and index fed from
the adapter's ``Hello`` must predict exactly the cached tokens the engine reports.
"""

from __future__ import annotations

import random
import threading

import pytest

from bus.schema import Completion, Dispatch
from bus.subscriber import AppliedBatch, EventSubscriber
from core.prefix_index import PrefixIndex, WorkerKey, request_block_hashes
from tests.waiting import eventually
from worker.runner import WorkerOptions, WorkerRunner
from worker.vllm.backend import VllmBackend, VllmBackendConfig

BS = 16


@pytest.fixture
def emulated():
    runner = WorkerRunner(WorkerOptions(worker_id="emu", router_endpoint="none", http_port=0, speedup=1000.0,
                                        num_gpu_blocks=48, seed=3, lora_modules="sql-lora"))
    thread = threading.Thread(target=runner.run, daemon=True)
    thread.start()
    yield runner
    runner.stop()
    thread.join(10)


def test_adapter_over_the_emulated_http_api_closes_the_loop(emulated):
    events_port = emulated.backend.events_endpoint.rsplit(":", 1)[1]
    backend = VllmBackend(config=VllmBackendConfig(
        worker_id="adapter", vllm_url=emulated.http_url, kv_events_endpoint=f"tcp://*:{events_port}",
        replay_endpoint=emulated.backend.replay_endpoint, topic=emulated.backend.topic, block_size=BS,
        startup_timeout_s=5, watch_block_size=False))
    info = backend.start()
    assert (info.model, info.block_size, info.num_gpu_blocks, info.reports_cached_tokens) == (
        "kvr-emulated", BS, 48, True)
    assert info.lora_adapters == ("sql-lora",)
    hello = backend.hello(epoch=1)
    assert hello.events_endpoint == emulated.backend.events_endpoint  # the router dials the engine's PUB
    sub = EventSubscriber(endpoint=hello.events_endpoint, replay_endpoint=hello.replay_endpoint, topic=hello.topic)
    index = PrefixIndex(block_size=BS)
    target = WorkerKey(hello.worker_id, 0)
    rng = random.Random(11)
    prefixes = [[rng.randrange(1000, 30_000) for _ in range(rng.choice([20, 48, 70]))] for _ in range(4)]
    pairs, loras = [], []
    try:
        for i in range(25):
            tokens = rng.choice(prefixes) + [rng.randrange(1000, 30_000) for _ in range(rng.randrange(0, 30))]
            salt = rng.choice([None, None, "s"])
            lora = rng.choice([None, None, "sql-lora"])
            own = request_block_hashes(tokens, block_size=BS, lora_name=lora, cache_salt=salt)
            blocks = index.overlap(own).get(target, 0)
            backend.submit(Dispatch(f"e{i}", tokens, max_tokens=rng.randrange(1, 6), lora_name=lora, cache_salt=salt))
            done = eventually(lambda: next((m for m in backend.drain() if isinstance(m, Completion)), None),
                              timeout_s=10, what=f"e{i} completed", interval_s=0.002)
            pairs.append((min(blocks, (len(tokens) - 1) // BS) * BS, done.cached_tokens))
            loras.append(lora)

            def ingest() -> None:
                for item in sub.poll(10):
                    if isinstance(item, AppliedBatch):
                        index.apply_batch(hello.worker_id, item.batch, now=0.0)

            # Apply everything the engine published so far (its steps before the completion included).
            eventually(lambda: sub.expected_seq >= emulated.backend.publisher.next_seq, timeout_s=10,
                       what="the events arrived", pump=ingest, interval_s=0)
    finally:
        sub.close()
        backend.close()
    assert [p for p, _ in pairs] == [a for _, a in pairs]
    assert sum(a for _, a in pairs) > 0
    by_lora = list(zip(pairs, loras, strict=True))
    assert any(a for (_, a), lora in by_lora if lora) and any(a for (_, a), lora in by_lora if not lora)
