"""Router-added latency: a request through ``kvr router`` against raw ZMQ through the same sockets.

Three arms, every process the same kind, measured in the same run, interleaved per repetition:

* **kvr**: client DEALER → ``kvr router`` (a real child process, Redis mirror on a real
  ``redis-server``) → worker DEALER (``WorkerService`` with :class:`InstantBackend`, which answers
  every ``Dispatch`` at once with a one-token ``Completion``) → back through the router.
* **raw relay**: client DEALER → a relay process with the same two bound ROUTERs that forwards
  frames without looking at them → a worker DEALER that answers every frame with the bytes of
  the same ``Completion`` → back. Two hops, like the router, and no logic: the floor of any
  ZMQ router of this shape in Python.
* **raw echo**: client DEALER → a ROUTER that answers at once (one hop).

The client sends the same encoded ``GenerateRequest`` bytes (``prompt_tokens`` token ids) in
every arm, one request at a time, and decodes the terminal reply; round-trip time is measured
from send to the ``Completion``. The router's index is empty here (nothing publishes events):
the cost of a decision against a large index is in the overhead suite's decision table.
"""

from __future__ import annotations

import logging
import multiprocessing
import random
import subprocess
import time
from dataclasses import dataclass

from bench.live import proc_cpu_s
from bench.results import percentile, spread
from cluster.processes import stop_process

logger = logging.getLogger(__name__)


@dataclass
class EchoConfig:
    requests: int = 2000
    repeats: int = 3
    warmup: int = 100
    prompt_tokens: int = 1024
    seed: int = 0
    ready_timeout_s: float = 30.0
    reply_timeout_s: float = 5.0


class InstantBackend:
    """A worker backend that answers every dispatch at once (no engine): isolates the router."""

    def __init__(self, *, worker_id: str, events_endpoint: str, block_size: int = 16, num_gpu_blocks: int = 1000):
        self.worker_id = worker_id
        self.events_endpoint = events_endpoint
        self.block_size = block_size
        self.num_gpu_blocks = num_gpu_blocks
        self.num_in_flight = 0
        self._out: list = []

    def hello(self, *, epoch: int, profile: str = ""):
        from bus.schema import Hello

        return Hello(worker_id=self.worker_id, epoch=epoch, model="echo", block_size=self.block_size,
                     num_gpu_blocks=self.num_gpu_blocks, events_endpoint=self.events_endpoint, profile=profile,
                     engine="echo")

    def loads(self) -> dict:
        from bus.schema import WorkerLoad

        return {0: WorkerLoad(num_gpu_blocks=self.num_gpu_blocks, num_free_blocks=self.num_gpu_blocks)}

    def submit(self, dispatch) -> None:
        self._out.append(completion_for(dispatch.request_id, self.worker_id, len(dispatch.token_ids)))

    def cancel(self, request_id: str) -> None:
        pass

    def drain(self) -> list:
        out, self._out = self._out, []
        return out


def completion_for(request_id: str, worker_id: str, prompt_tokens: int):
    from bus.schema import Completion

    return Completion(request_id=request_id, worker_id=worker_id, prompt_tokens=prompt_tokens, cached_tokens=0,
                      output_tokens=1, finish_reason="length")


# ---------------------------------------------------------------------------- child processes


def _instant_worker_main(router_endpoint: str, events_endpoint: str, stop) -> None:
    import threading

    from worker.service import WorkerService

    service = WorkerService(backend=InstantBackend(worker_id="echo-worker", events_endpoint=events_endpoint),
                            router_endpoint=router_endpoint, worker_id="echo-worker")
    threading.Thread(target=lambda: (stop.wait(), service.stop()), daemon=True).start()
    service.run()


def _relay_main(client_endpoint: str, worker_endpoint: str | None, stop) -> None:
    """Forward frames between a client ROUTER and a worker ROUTER (or echo, without a worker)."""
    import zmq

    from bus.codec import encode
    from bus.sockets import make_router

    ctx = zmq.Context()
    clients, _ = make_router(ctx, client_endpoint)
    poller = zmq.Poller()
    poller.register(clients, zmq.POLLIN)
    workers = worker = None
    if worker_endpoint is not None:
        workers, _ = make_router(ctx, worker_endpoint)
        poller.register(workers, zmq.POLLIN)
    reply = encode(completion_for("r" * 12, "echo-worker", 1024))
    try:
        while not stop.is_set():
            for sock, _ in poller.poll(100):
                frames = sock.recv_multipart()
                if sock is clients:
                    if workers is None:
                        clients.send_multipart([frames[0], reply])
                    elif worker is not None:
                        workers.send_multipart([worker, frames[0], frames[1]])
                elif len(frames) == 2 and frames[1] == b"hello":
                    worker = frames[0]
                else:
                    clients.send_multipart([frames[1], frames[2]])
    finally:
        ctx.destroy(linger=0)


def _raw_worker_main(worker_endpoint: str, stop) -> None:
    import zmq

    from bus.codec import encode
    from bus.sockets import make_dealer

    ctx = zmq.Context()
    sock = make_dealer(ctx, worker_endpoint)
    sock.send(b"hello")
    reply = encode(completion_for("r" * 12, "echo-worker", 1024))
    try:
        while not stop.is_set():
            if sock.poll(100):
                client, _payload = sock.recv_multipart()
                sock.send_multipart([client, reply])
    finally:
        ctx.destroy(linger=0)


# ---------------------------------------------------------------------------- the client


class _Arm:
    def __init__(self, name: str, endpoint: str, ctx) -> None:
        from bus.codec import reply_decoder

        self.name = name
        self.endpoint = endpoint
        self.ctx = ctx
        self.decoder = reply_decoder()
        self.sock = self.poller = None
        self.reset()

    def reset(self) -> None:
        """A fresh DEALER (a late reply to an abandoned request must not be read as the next one's)."""
        import zmq

        from bus.sockets import make_dealer

        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = make_dealer(self.ctx, self.endpoint)
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)

    def round_trip(self, payload: bytes, timeout_s: float) -> float:
        """Seconds from send to the terminal reply (a ``Completion``); raises on error or timeout."""
        from bus.schema import Completion, ErrorReply

        t0 = time.perf_counter()
        self.sock.send(payload)
        deadline = t0 + timeout_s
        while True:
            left_ms = (deadline - time.perf_counter()) * 1000
            if left_ms <= 0 or not self.poller.poll(left_ms):
                raise TimeoutError(f"{self.name}: no reply within {timeout_s} s")
            msg = self.decoder.decode(self.sock.recv())
            if isinstance(msg, Completion):
                return time.perf_counter() - t0
            if isinstance(msg, ErrorReply):
                raise RuntimeError(f"{self.name}: {msg.code} {msg.message}")

    def close(self) -> None:
        self.sock.close(linger=0)


def _payloads(cfg: EchoConfig, tag: str, n: int) -> list[bytes]:
    from bus.codec import encode
    from bus.schema import GenerateRequest

    rnd = random.Random(f"{cfg.seed}-{tag}")
    return [encode(GenerateRequest(request_id=f"{tag}-{i:08d}", token_ids=[rnd.randrange(151_936)
                                                                            for _ in range(cfg.prompt_tokens)],
                                   max_tokens=1)) for i in range(n)]


def router_vs_echo(cfg: EchoConfig | None = None, progress=None) -> list[dict]:
    """Round trips of the three arms; one row per arm plus the kvr/relay ratios."""
    import zmq

    from bus.redis_server import EmbeddedRedis, free_loopback_port
    from bus.sockets import free_tcp_endpoint
    from cluster.local import kvr_argv

    cfg = cfg or EchoConfig()
    mp = multiprocessing.get_context("spawn")
    stop = mp.Event()
    ep = lambda: f"tcp://127.0.0.1:{free_loopback_port()}"  # noqa: E731
    router_clients, router_workers, relay_clients, relay_workers, echo_ep = ep(), ep(), ep(), ep(), ep()
    redis_proc = EmbeddedRedis(kind="redis-server").start()
    router = subprocess.Popen(
        kvr_argv("router", "--bind-clients", router_clients, "--bind-workers", router_workers, "--bind-metrics",
                 ep(), "--http-port", "-1", "--redis-url", redis_proc.url, "--namespace", "echo",
                 log_level="WARNING"),
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children = [mp.Process(target=_instant_worker_main, args=(router_workers, free_tcp_endpoint(), stop), daemon=True),
                mp.Process(target=_relay_main, args=(relay_clients, relay_workers, stop), daemon=True),
                mp.Process(target=_raw_worker_main, args=(relay_workers, stop), daemon=True),
                mp.Process(target=_relay_main, args=(echo_ep, None, stop), daemon=True)]
    for child in children:
        child.start()
    ctx = zmq.Context()
    arms = [_Arm("kvr router", router_clients, ctx), _Arm("raw relay (2 hops)", relay_clients, ctx),
            _Arm("raw echo (1 hop)", echo_ep, ctx)]
    # The process in the middle of each arm: its CPU time per request.
    middle = {"kvr router": router.pid, "raw relay (2 hops)": children[1].pid, "raw echo (1 hop)": children[3].pid}
    try:
        _wait_ready(arms, cfg, router, lambda tag: _payloads(cfg, tag, 1)[0])
        samples, cpu_us = _interleave(arms, middle, lambda tag, n: _payloads(cfg, tag, n), cfg, progress, "echo")
    finally:
        for arm in arms:
            arm.close()
        ctx.destroy(linger=0)
        _stop_all(stop, children, router, redis_proc)
    relay = samples["raw relay (2 hops)"]
    echo = samples["raw echo (1 hop)"]
    rows = [{**_row(cfg, name, reps, relay, cpu_us[name]),
             "ratio_p50_vs_1hop": spread(r[0] / b[0] for r, b in zip(reps, echo, strict=True))}
            for name, reps in samples.items()]
    # The kvr row last: the overhead suite's goal reads it.
    return rows[1:] + rows[:1]


def _row(cfg: EchoConfig, name: str, reps: list[tuple[float, float]], relay: list[tuple[float, float]],
         cpu_us: list[float]) -> dict:
    """An arm's table row: its round trips' spread over the repetitions and their ratio to the relay's."""
    return {"arm": name, "requests": cfg.requests, "prompt_tokens": cfg.prompt_tokens,
            "rtt_p50_us": spread(r[0] for r in reps), "rtt_p99_us": spread(r[1] for r in reps),
            "ratio_p50": spread(r[0] / b[0] for r, b in zip(reps, relay, strict=True)),
            "ratio_p99": spread(r[1] / b[1] for r, b in zip(reps, relay, strict=True)),
            "added_p50_us": spread(r[0] - b[0] for r, b in zip(reps, relay, strict=True)),
            "middle_cpu_us_per_request": spread(cpu_us)}


def _stop_all(stop, children, router: subprocess.Popen, redis_proc) -> None:
    stop.set()
    for child in children:
        child.join(timeout=5)
        if child.is_alive():
            child.kill()
    stop_process(router, group=True)
    redis_proc.stop()


def _interleave(arms, middle: dict[str, int], payloads, cfg: EchoConfig, progress, what: str
                ) -> tuple[dict[str, list[tuple[float, float]]], dict[str, list[float]]]:
    """Per repetition, each arm in turn: ``cfg.warmup`` round trips, then ``cfg.requests`` timed ones
    (``payloads(tag, n)`` makes them). Returns per arm the (p50, p99) µs of each repetition, and the
    CPU µs per request of its process in the middle (``middle``: arm name → pid)."""
    samples: dict[str, list[tuple[float, float]]] = {a.name: [] for a in arms}
    cpu_us: dict[str, list[float]] = {a.name: [] for a in arms}
    for rep in range(cfg.repeats):
        for arm in arms:
            batch = payloads(f"{rep}-{arm.name[:3]}", cfg.warmup + cfg.requests)
            for p in batch[:cfg.warmup]:
                arm.round_trip(p, cfg.reply_timeout_s)
            c0 = proc_cpu_s(middle[arm.name])
            rtts = sorted(arm.round_trip(p, cfg.reply_timeout_s) for p in batch[cfg.warmup:])
            c1 = proc_cpu_s(middle[arm.name])
            if c0 is not None and c1 is not None:
                cpu_us[arm.name].append((c1 - c0) * 1e6 / cfg.requests)
            samples[arm.name].append((percentile(rtts, 50) * 1e6, percentile(rtts, 99) * 1e6))
        if progress is not None:
            progress.step(f"{what} repetition {rep + 1}")
    return samples, cpu_us


def _wait_ready(arms, cfg: EchoConfig, router: subprocess.Popen, payload) -> None:
    """Every arm answers (the instant worker has registered with the router; a relay's worker said
    hello). ``payload(tag)`` makes one request."""
    deadline = time.monotonic() + cfg.ready_timeout_s
    attempt = 0
    for arm in arms:
        while True:
            attempt += 1
            payload_bytes = payload(f"ready{attempt}")
            if router.poll() is not None:
                err = router.stderr.read().decode(errors="replace")[-2000:] if router.stderr else ""
                raise RuntimeError(f"kvr router exited with {router.returncode}: {err}")
            try:
                arm.round_trip(payload_bytes, 0.5)
                break
            except (TimeoutError, RuntimeError) as exc:
                # No worker registered yet (the router refuses, the relay drops): retry on a fresh socket.
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{arm.name} not ready within {cfg.ready_timeout_s} s: {exc}") from None
                arm.reset()
                time.sleep(0.1)


# ---------------------------------------------------------------------------- over HTTP

#: The body the raw HTTP relay answers with: a non-streamed completion of one token, shaped as kvr's.
_RELAY_COMPLETION_BODY = (b'{"id":"cmpl-relay","object":"text_completion","created":0,"model":"echo",'
                          b'"choices":[{"index":0,"text":"x","logprobs":null,"finish_reason":"length"}],'
                          b'"usage":{"prompt_tokens":1024,"completion_tokens":1,"total_tokens":1025,'
                          b'"prompt_tokens_details":{"cached_tokens":0}}}')


def _http_relay_main(port: int, worker_endpoint: str, stop) -> None:
    """The floor of an HTTP router on the same libraries as kvr's front: aiohttp in, one ZMQ hop to a
    worker and back, the worker's socket read from the loop's epoll as kvr's front reads its own.
    It forwards the body without parsing it and answers a fixed completion."""
    import asyncio
    import itertools

    import zmq
    from aiohttp import web

    from bus.sockets import make_router

    async def main() -> None:
        loop = asyncio.get_running_loop()
        ctx = zmq.Context()
        workers, _ = make_router(ctx, worker_endpoint)
        waiting: dict[bytes, asyncio.Future] = {}
        worker: list[bytes] = []
        ids = itertools.count()

        def drain() -> None:
            # ZMQ's FD is edge-triggered: read until EAGAIN on every wake-up and after every send.
            while workers.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                frames = workers.recv_multipart(zmq.NOBLOCK)
                if len(frames) == 2 and frames[1] == b"hello":
                    worker[:] = [frames[0]]
                    continue
                fut = waiting.pop(frames[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(None)

        loop.add_reader(workers.getsockopt(zmq.FD), drain)

        async def complete(request: web.Request) -> web.Response:
            body = await request.read()
            if not worker:
                return web.Response(status=503)
            rid = str(next(ids)).encode()
            fut = waiting[rid] = loop.create_future()
            workers.send_multipart([worker[0], rid, body])
            drain()
            await fut
            return web.Response(body=_RELAY_COMPLETION_BODY, content_type="application/json")

        app = web.Application()
        app.router.add_post("/v1/completions", complete)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            while not stop.is_set():
                await asyncio.sleep(0.1)
        finally:
            loop.remove_reader(workers.getsockopt(zmq.FD))
            await runner.cleanup()
            ctx.destroy(linger=0)

    asyncio.run(main())


class _HttpArm:
    """One keep-alive HTTP/1.1 connection: ``POST /v1/completions``, non-streamed, one output token."""

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.conn = None

    def reset(self) -> None:
        import http.client

        if self.conn is not None:
            self.conn.close()
        self.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5.0)

    def round_trip(self, body: bytes, timeout_s: float) -> float:
        """Seconds from send to the whole response; raises unless it is a 200."""
        if self.conn is None:
            self.reset()
        self.conn.timeout = timeout_s
        t0 = time.perf_counter()
        try:
            self.conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
            response = self.conn.getresponse()
            data = response.read()
        except OSError as exc:
            self.reset()  # a fresh connection for the next try
            raise RuntimeError(f"{self.name}: {exc}") from None
        elapsed = time.perf_counter() - t0
        if response.status != 200:
            raise RuntimeError(f"{self.name}: HTTP {response.status} {data[:200]!r}")
        return elapsed

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()


def _http_bodies(cfg: EchoConfig, tag: str, n: int) -> list[bytes]:
    import json

    rnd = random.Random(f"{cfg.seed}-{tag}")
    return [json.dumps({"prompt": [rnd.randrange(151_936) for _ in range(cfg.prompt_tokens)],
                        "max_tokens": 1, "stream": False}).encode() for _ in range(n)]


def router_vs_http_relay(cfg: EchoConfig | None = None, progress=None) -> list[dict]:
    """Round trips through ``kvr router``'s HTTP front against the raw HTTP relay, arms interleaved per
    repetition; one row per arm with the ratios to the relay (the kvr row last)."""
    from bus.redis_server import EmbeddedRedis, free_loopback_port
    from bus.sockets import free_tcp_endpoint
    from cluster.local import kvr_argv

    cfg = cfg or EchoConfig()
    mp = multiprocessing.get_context("spawn")
    stop = mp.Event()
    ep = lambda: f"tcp://127.0.0.1:{free_loopback_port()}"  # noqa: E731
    router_workers, relay_workers = ep(), ep()
    router_http, relay_http = free_loopback_port(), free_loopback_port()
    redis_proc = EmbeddedRedis(kind="redis-server").start()
    router = subprocess.Popen(
        kvr_argv("router", "--bind-clients", ep(), "--bind-workers", router_workers, "--bind-metrics", ep(),
                 "--http-port", str(router_http), "--http-host", "127.0.0.1", "--redis-url", redis_proc.url,
                 "--namespace", "echo-http", log_level="WARNING"),
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    children = [mp.Process(target=_instant_worker_main, args=(router_workers, free_tcp_endpoint(), stop), daemon=True),
                mp.Process(target=_http_relay_main, args=(relay_http, relay_workers, stop), daemon=True),
                mp.Process(target=_raw_worker_main, args=(relay_workers, stop), daemon=True)]
    for child in children:
        child.start()
    arms = [_HttpArm("kvr router, HTTP", router_http), _HttpArm("raw HTTP relay (2 hops)", relay_http)]
    middle = {"kvr router, HTTP": router.pid, "raw HTTP relay (2 hops)": children[1].pid}
    try:
        _wait_ready(arms, cfg, router, lambda tag: _http_bodies(cfg, tag, 1)[0])
        samples, cpu_us = _interleave(arms, middle, lambda tag, n: _http_bodies(cfg, tag, n), cfg, progress, "HTTP")
    finally:
        for arm in arms:
            arm.close()
        _stop_all(stop, children, router, redis_proc)
    relay = samples["raw HTTP relay (2 hops)"]
    return [_row(cfg, name, samples[name], relay, cpu_us[name])
            for name in ("raw HTTP relay (2 hops)", "kvr router, HTTP")]
