"""Micro-benchmarks of the routing path: ``python -m router.bench [--quick] [--redis-url URL]``.

* routing decision latency (``RouterCore.route`` + ``on_finish``: hashing, overlap, policy,
  accounting) at several fleet sizes and index sizes, p50/p99;
* event ingestion: blocks/s applied to the index alone, and with the Redis mirror (one pipeline
  per event batch, as the router writes);
* bytes per indexed block, in process (tracemalloc) and in Redis (``used_memory`` delta).

Prints one JSON object; everything is seeded. Each timing is given twice: wall clock
(``perf_counter``) and this thread's CPU time (``thread_time``, ``*_cpu``). On a shared, loaded
machine the CPU figure is the cost of the code; the wall figure adds the time other processes held
the core.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
import tracemalloc

from core.events import BlockStored
from core.policies import get_policy
from core.prefix_index import IndexDelta, PrefixIndex, WorkerKey
from core.routing import RouterCore, RoutingInput

BS = 16


def _events(rnd: random.Random, n_blocks: int, blocks_per_event: int, n_prefixes: int) -> list[BlockStored]:
    """Root-chained stores: each event a fresh prompt of ``blocks_per_event`` blocks after a shared prefix."""
    prefixes = [[rnd.randrange(50_000) for _ in range(4 * BS)] for _ in range(n_prefixes)]
    out = []
    ext = 1
    for _ in range(max(1, n_blocks // blocks_per_event)):
        tokens = rnd.choice(prefixes)[: BS * min(4, blocks_per_event)]
        tokens = tokens + [rnd.randrange(50_000) for _ in range(blocks_per_event * BS - len(tokens))]
        out.append(BlockStored(list(range(ext, ext + blocks_per_event)), None, tokens, BS, None, "GPU", None))
        ext += blocks_per_event
    return out


def bench_routing(n_workers: int, n_blocks: int, *, n_requests: int = 2000, prompt_tokens: int = 1024,
                  policy: str = "kvr", seed: int = 0) -> dict:
    rnd = random.Random(seed)
    index = PrefixIndex(block_size=BS)
    core = RouterCore(policy=get_policy(policy, block_size=BS), index=index, block_size=BS, tentative_window_s=0,
                      rng=random.Random(seed))
    targets = [WorkerKey(f"w{i}", 0) for i in range(n_workers)]
    for t in targets:
        core.register(t, capacity_blocks=n_blocks // n_workers + 1)
    events = _events(rnd, n_blocks, prompt_tokens // BS, n_prefixes=64)
    for i, ev in enumerate(events):
        index.apply(targets[i % n_workers], ev, now=0.0)
    # Requests: a stored prompt's first half (a real hit somewhere) plus a fresh tail.
    reqs = []
    for i in range(n_requests):
        ev = events[rnd.randrange(len(events))]
        head = ev.token_ids[: prompt_tokens // 2]
        reqs.append(RoutingInput(f"r{i}", head + [rnd.randrange(50_000) for _ in range(prompt_tokens - len(head))]))
    lat, cpu = [], []
    gc.disable()
    try:
        for i, r in enumerate(reqs):
            c0, t0 = time.thread_time(), time.perf_counter()
            core.route(r, now=float(i))
            core.on_finish(r.request_id)
            lat.append(time.perf_counter() - t0)
            cpu.append(time.thread_time() - c0)
    finally:
        gc.enable()
    return {"workers": n_workers, "indexed_blocks": index.total_blocks(), "prompt_tokens": prompt_tokens,
            "policy": policy, **_pcts("", lat), **_pcts("_cpu", cpu)}


def _pcts(suffix: str, values: list[float]) -> dict:
    values = sorted(values)
    return {f"p50{suffix}_us": round(values[len(values) // 2] * 1e6, 1),
            f"p99{suffix}_us": round(values[int(len(values) * 0.99)] * 1e6, 1)}


def bench_overlap_only(n_workers: int, n_blocks: int, *, prompt_tokens: int = 1024, seed: int = 0) -> dict:
    """The index lookup alone (the request already hashed)."""
    from core.hashing import block_hashes

    rnd = random.Random(seed)
    index = PrefixIndex(block_size=BS)
    targets = [WorkerKey(f"w{i}", 0) for i in range(n_workers)]
    events = _events(rnd, n_blocks, prompt_tokens // BS, n_prefixes=64)
    for i, ev in enumerate(events):
        index.apply(targets[i % n_workers], ev, now=0.0)
    hashes = [block_hashes(events[rnd.randrange(len(events))].token_ids, block_size=BS) for _ in range(500)]
    lat, cpu = [], []
    for h in hashes:
        c0, t0 = time.thread_time(), time.perf_counter()
        index.overlap(h)
        lat.append(time.perf_counter() - t0)
        cpu.append(time.thread_time() - c0)
    c0 = time.thread_time()
    for ev in events[:200]:
        block_hashes(ev.token_ids, block_size=BS)
    hash_us = (time.thread_time() - c0) / min(200, len(events)) * 1e6
    return {"workers": n_workers, "indexed_blocks": index.total_blocks(), **_pcts("", lat), **_pcts("_cpu", cpu),
            "hash_prompt_cpu_us": round(hash_us, 1)}


def bench_ingest(n_blocks: int, *, blocks_per_event: int = 16, events_per_batch: int = 4, mirror=None,
                 seed: int = 0) -> dict:
    """Blocks/s applied to the index (and written to Redis when ``mirror`` is given)."""
    from router.ingest import net_change

    rnd = random.Random(seed)
    events = _events(rnd, n_blocks, blocks_per_event, n_prefixes=256)
    index = PrefixIndex(block_size=BS)
    target = WorkerKey("w0", 0)
    c0, t0 = time.thread_time(), time.perf_counter()
    for start in range(0, len(events), events_per_batch):
        delta = IndexDelta()
        for ev in events[start:start + events_per_batch]:
            index.apply(target, ev, now=0.0, delta=delta)
        stored, removed, cleared = net_change(index, target, delta)
        if mirror is not None:
            mirror.write_batch("w0", 0, seq=start, epoch=1, stored=stored, removed=removed, cleared=cleared,
                               num_events=events_per_batch)
    dt, dc = time.perf_counter() - t0, time.thread_time() - c0
    blocks = index.total_blocks()
    return {"blocks": blocks, "blocks_per_s": round(blocks / dt), "blocks_per_cpu_s": round(blocks / dc),
            "with_redis": mirror is not None,
            "blocks_per_event": blocks_per_event, "events_per_batch": events_per_batch}


def bytes_per_block(n_blocks: int, *, seed: int = 0) -> dict:
    rnd = random.Random(seed)
    events = _events(rnd, n_blocks, 16, n_prefixes=256)
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    index = PrefixIndex(block_size=BS)
    for i, ev in enumerate(events):
        index.apply(WorkerKey(f"w{i % 8}", 0), ev, now=0.0)
    used = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    return {"blocks": index.total_blocks(), "bytes_per_block_in_process": round(used / index.total_blocks(), 1)}


def redis_bytes_per_block(client, mirror, n_blocks: int) -> dict:
    client.flushdb()
    before = int(client.info("memory")["used_memory"])
    res = bench_ingest(n_blocks, mirror=mirror)
    after = int(client.info("memory")["used_memory"])
    return {"blocks": res["blocks"], "bytes_per_block_in_redis": round((after - before) / res["blocks"], 1)}


def _relay(front_ep: str, back_ep: str) -> None:
    """A bare ROUTER↔ROUTER forwarder (the baseline middle); runs until killed."""
    import zmq

    from bus.sockets import make_router

    ctx = zmq.Context()
    front, _ = make_router(ctx, front_ep)
    back, _ = make_router(ctx, back_ep)
    poller = zmq.Poller()
    poller.register(front, zmq.POLLIN)
    poller.register(back, zmq.POLLIN)
    worker_id = None
    while True:
        for sock, _ in poller.poll(1000):
            frames = sock.recv_multipart()
            if sock is back:
                if len(frames) == 2:  # the worker's hello
                    worker_id = frames[0]
                else:  # [worker, client, payload]
                    front.send_multipart([frames[1], frames[2]])
            elif worker_id is not None:
                back.send_multipart([worker_id, frames[0], frames[1]])


def bench_end_to_end(n_requests: int = 2000, prompt_tokens: int = 256) -> dict:
    """Client round trip through the router vs through a bare ROUTER relay on the same topology.

    Both: client DEALER → middle ROUTER → worker DEALER → middle ROUTER → client; the worker
    answers at once with one token chunk and a completion. The middle runs in its own process
    (``kvr router --no-redis``, or ``_relay`` which forwards frames without decoding them); the
    client and the worker are threads of this process. 100 warm-up requests are excluded.
    """
    import subprocess
    import sys
    import threading

    import zmq

    from bus.codec import encode, reply_decoder, router_decoder
    from bus.schema import Completion, Dispatch, GenerateRequest, Heartbeat, Hello, TokenChunk, Welcome
    from bus.sockets import free_tcp_endpoint, make_socket

    prompt = list(range(prompt_tokens))
    ctx = zmq.Context()

    def worker(endpoint: str, kvr: bool, stop: threading.Event, ready: threading.Event) -> None:
        sock = make_socket(ctx, zmq.DEALER)
        sock.connect(endpoint)
        dec = router_decoder()
        next_hello = 0.0
        next_beat = 0.0
        while not stop.is_set():
            now = time.monotonic()
            if not ready.is_set() and now >= next_hello:  # until the middle is up
                sock.send(encode(Hello("w0", 1, "m", BS, 1000, "tcp://127.0.0.1:1")) if kvr else b"hello")
                next_hello = now + 0.2
                if not kvr:
                    ready.set()
            if kvr and now >= next_beat:
                sock.send(encode(Heartbeat("w0", 1)))
                next_beat = now + 0.5
            if not sock.poll(50):
                continue
            frames = sock.recv_multipart()
            if kvr:
                msg = dec.decode(frames[-1])
                if isinstance(msg, Welcome):
                    ready.set()
                elif isinstance(msg, Dispatch):
                    sock.send(encode(TokenChunk(msg.request_id, [1])))
                    sock.send(encode(Completion(msg.request_id, "w0", len(msg.token_ids), 0, 1)))
            else:  # [client identity, payload] -> two answers for that client
                sock.send_multipart([frames[0], b"chunk"])
                sock.send_multipart([frames[0], b"done"])
        sock.close(linger=0)

    def client(endpoint: str, kvr: bool) -> list[float]:
        sock = make_socket(ctx, zmq.DEALER)
        sock.connect(endpoint)
        dec = reply_decoder()
        rtts = []
        for i in range(n_requests + 100):
            t0 = time.perf_counter()
            if kvr:
                sock.send(encode(GenerateRequest(f"r{i}", token_ids=prompt, max_tokens=1)))
                while not isinstance(dec.decode(sock.recv()), Completion):
                    pass
            else:
                sock.send(b"request")
                while sock.recv() != b"done":
                    pass
            if i >= 100:
                rtts.append(time.perf_counter() - t0)
        sock.close(linger=0)
        return rtts

    out: dict = {"prompt_tokens": prompt_tokens}
    for name, kvr in (("relay", False), ("router", True)):
        f_ep, b_ep = free_tcp_endpoint(), free_tcp_endpoint()
        if kvr:
            argv = [sys.executable, "-m", "cli.main", "--log-level", "WARNING", "router", "--no-redis",
                    "--bind-clients", f_ep, "--bind-workers", b_ep, "--bind-metrics", "", "--block-size", str(BS)]
        else:
            argv = [sys.executable, "-c", f"from router.bench import _relay; _relay({f_ep!r}, {b_ep!r})"]
        proc = subprocess.Popen(argv)
        stop, ready = threading.Event(), threading.Event()
        wt = threading.Thread(target=worker, args=(b_ep, kvr, stop, ready), daemon=True)
        wt.start()
        try:
            if not ready.wait(20):
                raise RuntimeError(f"{name} did not come up")
            time.sleep(0.3)
            out[name] = _pcts("", client(f_ep, kvr))
        finally:
            stop.set()
            wt.join(3)
            proc.terminate()
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
    ctx.term()
    out["ratio_p50"] = round(out["router"]["p50_us"] / out["relay"]["p50_us"], 2)
    out["ratio_p99"] = round(out["router"]["p99_us"] / out["relay"]["p99_us"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes (seconds)")
    ap.add_argument("--redis-url", default="", help="also measure with the Redis mirror (a scratch database!)")
    args = ap.parse_args(argv)
    sizes = [(8, 10_000), (64, 100_000)] if args.quick else [(8, 100_000), (64, 1_000_000), (512, 1_000_000)]
    out: dict = {"routing": [], "overlap": [], "ingest": []}
    out["end_to_end"] = bench_end_to_end(300 if args.quick else 2000)
    for workers, blocks in sizes:
        out["routing"].append(bench_routing(workers, blocks, n_requests=500 if args.quick else 2000))
        out["overlap"].append(bench_overlap_only(workers, blocks))
    n_ingest = 50_000 if args.quick else 400_000
    out["ingest"].append(bench_ingest(n_ingest))
    out["memory"] = bytes_per_block(20_000 if args.quick else 200_000)
    if args.redis_url:
        from router.mirror import RedisMirror, make_redis_client

        client = make_redis_client(args.redis_url, timeout_s=5.0)
        mirror = RedisMirror(client=client, namespace="bench")
        client.flushdb()
        out["ingest"].append(bench_ingest(n_ingest // 4, mirror=mirror))
        out["memory"].update(redis_bytes_per_block(client, mirror, n_ingest // 4))
        client.flushdb()
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
