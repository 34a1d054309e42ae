"""Ingestion and memory parts of ``kvr bench overhead`` (see ``bench/overhead.py``).

* :func:`ingestion`: blocks/s through the router's real ingest path (``EventIngest`` on
  ``AppliedBatch`` items: decode, apply with deltas, the batch's net change, one Redis pipeline
  per batch), without the mirror, with the synchronous mirror, and with the background writer
  ``kvr router`` uses (batches written in rounds; timed until Redis holds them all), arms
  interleaved per repetition;
* :func:`memory`: bytes per indexed (target, block) pair in process (tracemalloc) and in Redis
  (``used_memory`` delta and ``MEMORY USAGE`` of the blocks hashes).
"""

from __future__ import annotations

import gc
import logging
import random
import time
import tracemalloc
from types import SimpleNamespace

from bench.fleet_events import FleetEvents
from bench.progress import NullProgress
from bench.results import spread
from core.prefix_index import PrefixIndex, WorkerKey
from router.background_mirror import BackgroundMirror

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16


def _ingest_payloads(cfg) -> tuple[list[tuple[int, bytes]], int, int]:
    """Encoded batches ``(worker, payload)`` interleaved over workers; stored and removed block counts."""
    from bus.synthetic_events import SyntheticKVEvents
    from bus.vllm_codec import encode_batch
    from core.events import BlockRemoved, BlockStored, KVEventBatch

    per_worker = cfg.ingest_blocks // cfg.ingest_workers
    streams = [SyntheticKVEvents(rng=random.Random(cfg.seed * 1000 + w), block_size=BLOCK_SIZE,
                                 capacity_blocks=max(64, min(4096, per_worker // 4)), clear_prob=0.0)
               for w in range(cfg.ingest_workers)]
    counts = [0] * cfg.ingest_workers
    payloads, stored, removed = [], 0, 0
    w = 0
    while min(counts) < per_worker:
        if counts[w] < per_worker:
            events = []
            for _ in range(cfg.steps_per_batch):
                events += streams[w].next_step()
            for ev in events:
                if isinstance(ev, BlockStored):
                    counts[w] += len(ev.block_hashes)
                    stored += len(ev.block_hashes)
                elif isinstance(ev, BlockRemoved):
                    removed += len(ev.block_hashes)
            payloads.append((w, encode_batch(KVEventBatch(time.time(), events, 0))))
        w = (w + 1) % cfg.ingest_workers
    return payloads, stored, removed


def _ingest_once(payloads, *, n_workers: int, mirror, decode_only: bool = False) -> tuple[float, int]:
    """Seconds to push every payload through the router's ingest path; mirror round trips used."""
    import zmq

    from bus.subscriber import AppliedBatch
    from bus.vllm_codec import VllmEventDecoder
    from router.ingest import EventIngest, TargetStream

    decoder = VllmEventDecoder()
    index = PrefixIndex(block_size=BLOCK_SIZE)
    ctx = zmq.Context()
    ingest = EventIngest(index=index, poller=zmq.Poller(), ctx=ctx, mirror=mirror)
    # The subscriber is the socket side (measured live); the ingest reads only this flag of it.
    idle_subscriber = SimpleNamespace(replay_in_flight=False)
    streams = [TargetStream(WorkerKey(f"worker-{w}", 0), 1, idle_subscriber) for w in range(n_workers)]
    seqs = [0] * n_workers
    rt0 = mirror.round_trips if mirror is not None else 0
    try:
        t0 = time.perf_counter()
        if decode_only:
            for _, payload in payloads:
                decoder.decode(payload)
        else:
            on_item = ingest._on_item  # the exact per-batch path of the service
            for w, payload in payloads:
                on_item(streams[w], AppliedBatch(seqs[w], decoder.decode(payload)))
                seqs[w] += 1
            if isinstance(mirror, BackgroundMirror) and not mirror.flush(timeout_s=120.0):
                raise RuntimeError("the background mirror did not drain within 120 s")
        elapsed = time.perf_counter() - t0
    finally:
        ctx.term()
    if ingest.mirror_failures:
        raise RuntimeError(f"{ingest.mirror_failures} Redis writes failed during the ingestion benchmark")
    return elapsed, (mirror.round_trips - rt0) if mirror is not None else 0


def ingestion(cfg, redis_client, progress=None) -> list[dict]:
    progress = progress or NullProgress()
    payloads, stored, removed = _ingest_payloads(cfg)
    arms = [("decode only", None, True), ("decode + apply (no Redis)", None, False)]
    background = None
    if redis_client is not None:
        from router.mirror import RedisMirror

        arms.append(("decode + apply + Redis mirror", RedisMirror(client=redis_client, namespace="bench"), False))
        # As ``kvr router`` runs it: writes on the writer thread, event batches in rounds; timed until
        # Redis holds every batch (flush).
        background = BackgroundMirror(mirror=RedisMirror(client=redis_client, namespace="bench"))
        arms.append(("decode + apply + Redis mirror, background writer", background, False))
    secs: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    trips: dict[str, int] = {}
    for _ in range(cfg.repeats):  # arms interleave per repetition: load drift hits them alike
        for name, mirror, decode_only in arms:
            if redis_client is not None:
                redis_client.flushdb()
            gc.collect()
            s, trips[name] = _ingest_once(payloads, n_workers=cfg.ingest_workers, mirror=mirror,
                                          decode_only=decode_only)
            secs[name].append(s)
            progress.step(f"ingest: {name}")
    rows = []
    for name, mirror, _ in arms:
        rows.append({"path": name, "mirror": mirror is not None, "batches": len(payloads), "stored_blocks": stored,
                     "removed_blocks": removed,
                     "stored_blocks_per_s": spread(stored / s for s in secs[name]),
                     "all_blocks_per_s": spread((stored + removed) / s for s in secs[name]),
                     "redis_round_trips_per_batch": trips[name] / len(payloads) if mirror is not None else 0.0})
    if redis_client is not None:
        redis_client.flushdb()
    if background is not None:
        background.close()
    return rows


def memory(cfg, redis_client) -> dict:
    """Bytes per indexed block in process (tracemalloc) and in Redis (the mirror's real writes)."""
    from router.ingest import net_change

    n_workers = 8
    targets = [WorkerKey(f"worker-{i}", 0) for i in range(n_workers)]
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(block_size=BLOCK_SIZE)
    fleet = FleetEvents(n_workers=n_workers, block_size=BLOCK_SIZE, seed=cfg.seed, record=False)
    for w, batch in fleet.batches_until(cfg.memory_blocks):
        for event in batch.events:
            index.apply(targets[w], event, now=0.0)
    del fleet, batch, event
    gc.collect()
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    out = {"index_blocks": index.total_blocks(), "unique_blocks": index.num_unique_blocks(),
           "process_bytes_per_block": used / index.total_blocks()}
    del index
    if redis_client is None:
        return out
    from bus import names
    from core.prefix_index import IndexDelta
    from router.mirror import RedisMirror

    redis_client.flushdb()
    mirror = RedisMirror(client=redis_client, namespace="bench")
    before = int(redis_client.info("memory")["used_memory"])
    index = PrefixIndex(block_size=BLOCK_SIZE)
    fleet = FleetEvents(n_workers=n_workers, block_size=BLOCK_SIZE, seed=cfg.seed, record=False)
    seqs = [0] * n_workers
    for w, batch in fleet.batches_until(cfg.memory_blocks):
        delta = IndexDelta()
        for event in batch.events:
            index.apply(targets[w], event, now=0.0, delta=delta)
        stored, removed, cleared = net_change(index, targets[w], delta)
        mirror.write_batch(targets[w].worker_id, 0, seq=seqs[w], epoch=1, stored=stored, removed=removed,
                           cleared=cleared, num_events=len(batch.events))
        seqs[w] += 1
    after = int(redis_client.info("memory")["used_memory"])
    hashes = sum(int(redis_client.memory_usage(k, samples=0) or 0)
                 for k in redis_client.scan_iter(match=names.target_pattern("bench", "blocks"), count=1000))
    redis_client.flushdb()
    out.update({"redis_used_memory_bytes_per_block": (after - before) / index.total_blocks(),
                "redis_blocks_hash_bytes_per_block": hashes / index.total_blocks()})
    return out
