"""vLLM's KV events as the router sees them behind a ``kvr worker --engine vllm`` (127.0.0.1 only).

The fake vLLM publishes exactly as vLLM does (frames, seq, replay ROUTER, DP port offsets);
the consumer here is the router's own machinery (``bus.subscriber.EventSubscriber`` on the
endpoints of the adapter's ``Hello``, ``core.prefix_index.PrefixIndex``). The last test is the
closed loop: the index's predicted cached tokens equal the server-reported ones, exactly.
"""

from __future__ import annotations

import random
import socket

import pytest
import zmq

from bus.publisher import END_SEQ, seq_bytes
from bus.schema import Completion, Dispatch
from bus.subscriber import AppliedBatch, EventSubscriber
from bus.vllm_codec import VllmEventDecoder
from core.prefix_index import PrefixIndex, WorkerKey, request_block_hashes
from tests.conftest import FIXTURES
from tests.fakes.fake_vllm import FakeVllm, KvEventsConfig
from tests.waiting import eventually
from worker.vllm.backend import VllmBackend, VllmBackendConfig
from worker.vllm.checks import BlockSizeWatch

TOPIC = "kv@vllm-pod-0@fake/model-1b"
FIXTURE_NAMES = ["01_stored_one_block", "02_stored_chain_3", "03_stored_multi_block", "05_removed_per_block",
                 "06_all_blocks_cleared", "07_mixed", "09_lora"]


def free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (DP rank 1 uses base + 1)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", port + 1))
                    return port
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def loopback(endpoint: str) -> str:
    """The router binds ``tcp://*:p`` in production; tests bind loopback only."""
    return endpoint.replace("tcp://*:", "tcp://127.0.0.1:")


def collect(sub: EventSubscriber, n: int, timeout_s: float = 5.0) -> list[AppliedBatch]:
    out: list[AppliedBatch] = []
    eventually(lambda: len(out) >= n, timeout_s=timeout_s, what=lambda: f"{n} batches (got {len(out)})",
               pump=lambda: out.extend(item for item in sub.poll(20) if isinstance(item, AppliedBatch)), interval_s=0)
    return out


def backend_config(fake: FakeVllm, events: str, replay: str, **kw) -> VllmBackendConfig:
    return VllmBackendConfig(worker_id="vllm-pod-0", vllm_url=fake.url, kv_events_endpoint=events,
                             replay_endpoint=replay, topic=TOPIC, watch_block_size=False, **kw)


@pytest.fixture
def fixture_payloads() -> list[bytes]:
    return [(FIXTURES / f"{name}.bin").read_bytes() for name in FIXTURE_NAMES]


def test_fixtures_reach_the_router_in_vllm_bind_mode(fixture_payloads):
    p, r = free_port_pair(), free_port_pair()
    # vLLM started with "endpoint":"tcp://*:p" — bound here on loopback only.
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC, bind=True)
    with FakeVllm(kv_events=kv) as fake:
        backend = VllmBackend(config=backend_config(fake, f"tcp://*:{p}", f"tcp://*:{r}"))
        backend.start(probe=False)
        hello = backend.hello(epoch=1)
        backend.close()
        assert (hello.events_endpoint, hello.replay_endpoint) == (f"tcp://127.0.0.1:{p}", f"tcp://127.0.0.1:{r}")
        fake.publish_payloads(fixture_payloads)  # before anyone listens: replay must recover them
        sub = EventSubscriber(endpoint=hello.events_endpoint, replay_endpoint=hello.replay_endpoint,
                              topic=hello.topic, bind=False)
        try:
            got = collect(sub, len(fixture_payloads))
        finally:
            sub.close()
    decoder = VllmEventDecoder()
    assert [b.seq for b in got] == list(range(len(fixture_payloads)))
    assert [b.batch for b in got] == [decoder.decode(p) for p in fixture_payloads]
    assert {b.topic for b in got} == {TOPIC.encode()}


def test_replay_frames_are_vllm_0_33_bytes(fixture_payloads):
    r = free_port_pair()
    kv = KvEventsConfig(endpoint="tcp://127.0.0.1:0", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC, bind=True)
    with FakeVllm(kv_events=kv) as fake:
        fake.publish_payloads(fixture_payloads)
        ctx = zmq.Context()
        dealer = ctx.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        try:
            dealer.connect(f"tcp://127.0.0.1:{r}")
            dealer.send_multipart([b"", seq_bytes(5)])
            frames = []
            for _ in range(3):
                assert dealer.poll(3000), "no replay reply"
                frames.append(dealer.recv_multipart())
        finally:
            dealer.close()
            ctx.term()
    assert frames == [[b"", TOPIC.encode(), seq_bytes(5), fixture_payloads[5]],
                      [b"", TOPIC.encode(), seq_bytes(6), fixture_payloads[6]],
                      [b"", b"", END_SEQ, b""]]


def test_central_mode_vllm_connects_to_the_router(fixture_payloads):
    p, r = free_port_pair(), free_port_pair()
    with FakeVllm() as probe_only:  # only to build the Hello: vLLM dials tcp://<router>:p
        backend = VllmBackend(config=backend_config(probe_only, f"tcp://127.0.0.1:{p}", f"tcp://*:{r}"))
        backend.start(probe=False)
        hello = backend.hello(epoch=1)
        backend.close()
    assert hello.events_endpoint == f"tcp://*:{p}"  # the router binds
    sub = EventSubscriber(endpoint=loopback(hello.events_endpoint), replay_endpoint=loopback(hello.replay_endpoint),
                          topic=hello.topic, bind=True)
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC)
    try:
        with FakeVllm(kv_events=kv) as fake:  # vLLM's rule: a host address means connect
            fake.publish_payloads(fixture_payloads[:3])
            got = collect(sub, 3)
    finally:
        sub.close()
    assert [b.seq for b in got] == [0, 1, 2]


def test_data_parallel_ranks_publish_on_offset_ports(fixture_payloads):
    p, r = free_port_pair(), free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC, bind=True)
    with FakeVllm(kv_events=kv, dp_size=2) as fake:
        fake.publish_payloads(fixture_payloads[:2], dp_rank=0)
        fake.publish_payloads(fixture_payloads[2:3], dp_rank=1)
        subs = [EventSubscriber(endpoint=f"tcp://127.0.0.1:{p + rank}", replay_endpoint=f"tcp://127.0.0.1:{r + rank}",
                                topic=TOPIC) for rank in (0, 1)]
        try:
            rank0, rank1 = collect(subs[0], 2), collect(subs[1], 1)
        finally:
            for sub in subs:
                sub.close()
    assert [b.seq for b in rank0] == [0, 1] and [b.seq for b in rank1] == [0]  # one seq counter per rank


def test_closed_loop_predicted_equals_reported_cached_tokens():
    """Requests through the adapter; events through the router's subscriber and index; exact match."""
    p, r = free_port_pair(), free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC, bind=True)
    rng = random.Random(9)
    bs = 16
    prefixes = [[rng.randrange(2, 50_000) for _ in range(rng.choice([16, 40, 64]))] for _ in range(4)]
    with FakeVllm(kv_events=kv, num_gpu_blocks=24, lora_adapters=("sql-lora",)) as fake:  # small: evictions
        backend = VllmBackend(config=backend_config(fake, f"tcp://*:{p}", f"tcp://*:{r}", block_size=bs))
        backend.start(probe=False)
        hello = backend.hello(epoch=1)
        sub = EventSubscriber(endpoint=hello.events_endpoint, replay_endpoint=hello.replay_endpoint, topic=hello.topic)
        index = PrefixIndex(block_size=bs)
        target = WorkerKey(hello.worker_id, 0)
        results = []
        try:
            for i in range(40):
                tokens = rng.choice(prefixes) + [rng.randrange(2, 50_000) for _ in range(rng.randrange(0, 40))]
                lora = rng.choice([None, None, "sql-lora"])
                salt = rng.choice([None, None, None, "tenant-1"])
                own = request_block_hashes(tokens, block_size=bs, lora_name=lora, cache_salt=salt)
                blocks = index.overlap(own).get(target, 0)
                predicted = min(blocks, (len(tokens) - 1) // bs) * bs  # vLLM always computes the last token
                backend.submit(Dispatch(f"r{i}", tokens, max_tokens=rng.randrange(1, 20), lora_name=lora,
                                        cache_salt=salt))
                done = eventually(lambda: next((m for m in backend.drain() if isinstance(m, Completion)), None),
                                  timeout_s=10, what=f"r{i} completed", interval_s=0.002)
                results.append((predicted, done.cached_tokens))

                def ingest() -> None:
                    for item in sub.poll(20):
                        if isinstance(item, AppliedBatch):
                            index.apply_batch(hello.worker_id, item.batch, now=0.0)

                # The router has caught up.
                eventually(lambda: sub.expected_seq >= fake.publishers[0].next_seq, timeout_s=10,
                           what="the events arrived", pump=ingest, interval_s=0)
        finally:
            sub.close()
            backend.close()
    assert [pred for pred, _ in results] == [actual for _, actual in results]
    assert sum(actual for _, actual in results) > 0, "the workload must produce hits"
    assert fake.engines[0].pool.stats.evicted_blocks > 0, "the workload must evict"


@pytest.mark.parametrize("told, mismatch", [(16, None), (32, (32, 16))])
def test_block_size_watch_checks_the_first_block_stored(fixture_payloads, told, mismatch):
    p = free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", topic=TOPIC, bind=True)
    with FakeVllm(kv_events=kv) as fake:
        watch = BlockSizeWatch(endpoint=f"tcp://127.0.0.1:{p}", topic=TOPIC, block_size=told, timeout_s=10)
        try:
            def publish() -> None:  # PUB/SUB slow joiner: publish until the watch has seen one
                fake.publish_payloads([fixture_payloads[4]])  # 06 AllBlocksCleared: ignored by the watch
                fake.publish_payloads([fixture_payloads[0]])  # 01: one BlockStored of 16 tokens
                watch.checked.wait(0.05)

            eventually(watch.checked.is_set, what="the watch saw a BlockStored", pump=publish, interval_s=0)
        finally:
            watch.close()
    assert watch.mismatch == mismatch


def test_a_legacy_vllm_stream_reaches_the_router():
    """vLLM 0.22 payloads (events as arrays) and <= 0.24 replay replies (no topic frame)."""
    legacy = sorted((FIXTURES / "legacy_v0_22_1").glob("*.bin"))
    payloads = [path.read_bytes() for path in legacy]
    p, r = free_port_pair(), free_port_pair()
    kv = KvEventsConfig(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC,
                        bind=True, reply_format="legacy")
    with FakeVllm(kv_events=kv) as fake:
        fake.publish_payloads(payloads)  # nobody listens yet: only the legacy replay can deliver them
        sub = EventSubscriber(endpoint=f"tcp://127.0.0.1:{p}", replay_endpoint=f"tcp://127.0.0.1:{r}", topic=TOPIC)
        try:
            got = collect(sub, len(payloads))
        finally:
            sub.close()
    assert len(payloads) == 4
    assert [b.seq for b in got] == [0, 1, 2, 3] and all(b.replayed for b in got)
    assert [b.batch for b in got] == [VllmEventDecoder().decode(x) for x in payloads]
