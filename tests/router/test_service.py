"""The router service over real ZMQ sockets on loopback, with scripted workers.

Each fake worker is a DEALER speaking the worker channel plus a vLLM-compatible publisher
(``bus.publisher``) for its KV events; the router runs in its own thread (it owns its sockets).
"""

from __future__ import annotations

import dataclasses
import threading
import time

import pytest
import zmq

from bus.client import RouterClient
from bus.codec import encode, router_decoder
from bus.publisher_thread import PublisherThread
from bus.schema import (
    NO_CAP,
    REFUSED_DUPLICATE_ID,
    REFUSED_KEY_MISMATCH,
    Cancel,
    Completion,
    Dispatch,
    ErrorCode,
    GenerateRequest,
    Goodbye,
    Heartbeat,
    Hello,
    Refused,
    ReplyBatch,
    TokenChunk,
    Welcome,
    WorkerLoad,
)
from bus.sockets import ANY_LOOPBACK_PORT
from core.events import BlockStored
from core.liveness import HeartbeatConfig
from core.prefix_index import WorkerKey
from router.service import RouterConfig, RouterService
from tests.fakes.clock import ManualClock
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)
BS = 16
#: How often a FakeWorker beats (each pump, at most this often).
BEAT_S = 0.1
#: The router's heartbeat settings: it calls a worker stale after 1.5 intervals and dead after
#: LIVENESS of them. Both stay well above a 300 ms stall of the test thread (a busy 2-core
#: machine) plus a beat interval, so a stall is never read as a death; tests about deaths wait
#: TIMEOUT_S, or drive the router with a ManualClock.
ROUTER_BEAT_S = 0.4
LIVENESS = 3
TIMEOUT_S = ROUTER_BEAT_S * LIVENESS


class FakeWorker:
    """A worker link and an event publisher; ``mode`` scripts what it does with a Dispatch."""

    def __init__(self, ctx: zmq.Context, router_ep: str, wid: str, *, epoch: int = 1, block_size: int = BS,
                 mode: str = "complete", link_token: str = "", setup=None) -> None:
        self.wid, self.epoch, self.block_size, self.mode = wid, epoch, block_size, mode
        self.link_token, self.ctx, self.router_ep, self.setup = link_token, ctx, router_ep, setup
        self.pub = PublisherThread(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True,
                                   topic=f"kv@{wid}@m")
        self.sock = self._dealer()
        self.decoder = router_decoder()
        self.received: list = []
        self.alive = True
        self.next_beat = 0.0

    def _dealer(self) -> zmq.Socket:
        sock = self.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        if self.setup is not None:
            self.setup(sock)
        sock.connect(self.router_ep)
        return sock

    def reconnect(self) -> None:
        """A new connection (what a worker does when it timed the router out); the old one is gone."""
        self.sock.close(linger=0)
        self.sock = self._dealer()

    def hello(self, *, in_flight: tuple[str, ...] = (), router_epoch: int = 0) -> None:
        # The publisher binds: advertise its address, the router connects to it.
        self.sock.send(encode(Hello(self.wid, self.epoch, "m", self.block_size, 1000, self.pub.endpoint,
                                    self.pub.replay_endpoint, topic=f"kv@{self.wid}@m", link_token=self.link_token,
                                    in_flight=list(in_flight), router_epoch=router_epoch)))

    def send(self, msg) -> None:
        self.sock.send(encode(msg))

    def refusals(self) -> list[Refused]:
        return [m for m in self.received if isinstance(m, Refused)]

    def store(self, tokens: list[int]) -> None:
        n = len(tokens) // BS
        ext = [hash((self.wid, tuple(tokens[: (i + 1) * BS]))) & 0xFFFFFFFFFFFFFFFF for i in range(n)]
        self.pub.publish([BlockStored(ext, None, tokens[: n * BS], BS, None, "GPU", None)], time.time())

    def pump(self) -> None:
        if not self.alive:
            return
        now = time.monotonic()
        if now >= self.next_beat:
            self.sock.send(encode(Heartbeat(self.wid, self.epoch, WorkerLoad(running=1))))
            self.next_beat = now + BEAT_S
        while self.sock.poll(0):
            msg = self.decoder.decode(self.sock.recv())
            self.received.append(msg)
            if isinstance(msg, Dispatch):
                self.on_dispatch(msg)

    def on_dispatch(self, d: Dispatch) -> None:
        if self.mode in ("complete", "token_then_hang"):
            self.sock.send(encode(TokenChunk(d.request_id, [7, 8])))
        if self.mode == "complete":
            self.sock.send(encode(Completion(d.request_id, self.wid, len(d.token_ids), 32, 2)))

    def dispatches(self) -> list[Dispatch]:
        return [m for m in self.received if isinstance(m, Dispatch)]

    def close(self) -> None:
        self.sock.close(linger=0)
        self.pub.close()


def _config(**kw) -> RouterConfig:
    return RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT, block_size=BS,
                        heartbeat=HeartbeatConfig(interval_s=ROUTER_BEAT_S, liveness=LIVENESS), router_id="r1",
                        request_timeout_s=5.0, max_pending=8, **kw)


class RunningRouter:
    """A RouterService constructed and run by its own thread (it owns the sockets)."""

    def __init__(self, config: RouterConfig, **kw) -> None:
        box: dict = {}
        ready = threading.Event()

        def run() -> None:
            try:
                box["svc"] = RouterService(config, **kw)
            except BaseException as exc:  # e.g. a bind that failed: the test says why, not "timed out"
                box["error"] = exc
                raise
            finally:
                ready.set()
            box["svc"].run()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(5), "the router did not start within 5 s"
        if "error" in box:
            raise box["error"]
        self.service: RouterService = box["svc"]

    def stop(self) -> None:
        self.service.stop()
        self.thread.join(5)
        assert not self.thread.is_alive()


@pytest.fixture
def router(ctx):
    running = RunningRouter(_config())
    yield running.service
    running.stop()


def wait_for(pred, workers, client=None, timeout_s: float = 5.0) -> None:
    """:func:`eventually`, pumping the fake workers (they have no thread) and the client each try."""

    def pump() -> None:
        for w in workers:
            w.pump()
        if client is not None:
            client.poll(5)

    eventually(pred, timeout_s=timeout_s, pump=pump, interval_s=0 if client is not None else 0.005)


def test_registers_ingests_events_and_routes_to_the_cached_worker(ctx, router):
    w1 = FakeWorker(ctx, router.workers_endpoint, "w1")
    w2 = FakeWorker(ctx, router.workers_endpoint, "w2")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        for w in (w1, w2):
            w.hello()
        wait_for(lambda: all(any(isinstance(m, Welcome) for m in w.received) for w in (w1, w2)), [w1, w2])
        prompt = list(range(1000, 1000 + 8 * BS + 5))
        w2.store(prompt)
        wait_for(lambda: router.index.num_blocks(WorkerKey("w2", 0)) == 8, [w1, w2])
        res = client.send(GenerateRequest("req-1", token_ids=prompt, max_tokens=2))
        wait_for(lambda: res.done, [w1, w2], client)
        assert res.routed.worker_id == "w2" and res.routed.overlap_blocks == 8
        assert res.routed.predicted_cached_tokens == 128 and res.routed.policy == "kvr"
        assert res.token_ids == [7, 8]
        c = res.completion
        assert (c.request_id, c.worker_id, c.cached_tokens, c.predicted_cached_tokens, c.retries) == (
            "req-1", "w2", 32, 128, 0)
        [d] = w2.dispatches()
        assert d.token_ids == prompt and d.request_id != "req-1"  # workers see router-unique ids
        assert w1.dispatches() == [] and router.counters["completed"] == 1
    finally:
        client.close()
        w1.close()
        w2.close()


def test_an_uncapped_request_is_dispatched_no_cap(ctx, router):
    """max_tokens None (a chat without max_tokens through the HTTP front) crosses to the worker as
    NO_CAP: the engine decides where the output ends, as vLLM's chat endpoint does."""
    w = FakeWorker(ctx, router.workers_endpoint, "w1")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        w.hello()
        wait_for(lambda: any(isinstance(m, Welcome) for m in w.received), [w])
        res = client.send(GenerateRequest("req-nocap", token_ids=list(range(40)), max_tokens=None))
        wait_for(lambda: res.done, [w], client)
        [d] = w.dispatches()
        assert d.max_tokens == NO_CAP and res.completion is not None
    finally:
        client.close()
        w.close()


def test_refuses_a_block_size_mismatch(ctx, router):
    w = FakeWorker(ctx, router.workers_endpoint, "w9", block_size=32)
    try:
        w.hello()
        wait_for(lambda: any(isinstance(m, Refused) for m in w.received), [w])
        [refused] = [m for m in w.received if isinstance(m, Refused)]
        assert "block_size 32" in refused.reason and "w9" not in router.workers
    finally:
        w.close()


def test_no_workers_bad_frames_and_overload_each_get_one_clear_reply(ctx, router):
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(router.clients_endpoint)
    try:
        raw.send(b"\xc1garbage")
        res = client.send(GenerateRequest("a", token_ids=[1, 2, 3]))
        wait_for(lambda: res.done, [], client)
        assert res.error.code is ErrorCode.NO_WORKERS
        wait_for(lambda: router.counters["bad_messages"] == 1, [])  # another connection: no order with ours
        bad = client.send(GenerateRequest("b", max_tokens=2))  # neither prompt nor token_ids
        wait_for(lambda: bad.done, [], client)
        assert bad.error.code is ErrorCode.BAD_REQUEST
    finally:
        raw.close(linger=0)
        client.close()


def test_worker_death_before_first_token_retries_elsewhere(ctx, router):
    dead = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang")
    good = FakeWorker(ctx, router.workers_endpoint, "b")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        for w in (dead, good):
            w.hello()
        wait_for(lambda: len(router.workers) == 2, [dead, good])
        prompt = list(range(3 * BS))
        dead.store(prompt)  # the index pulls the request to the worker that will die
        wait_for(lambda: router.index.num_blocks(WorkerKey("a", 0)) == 3, [dead, good])
        res = client.send(GenerateRequest("x", token_ids=prompt))
        wait_for(lambda: len(dead.dispatches()) == 1, [dead, good], client)
        dead.alive = False  # stops heartbeating and answering
        wait_for(lambda: res.done, [dead, good], client)
        assert res.completion is not None and res.completion.worker_id == "b" and res.completion.retries == 1
        assert "a" not in router.workers and router.index.num_blocks(WorkerKey("a", 0)) == 0
        assert router.counters["retries"] == 1
    finally:
        client.close()
        dead.close()
        good.close()


def test_worker_death_after_tokens_ends_with_worker_died(ctx, router):
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="token_then_hang")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        w.hello()
        wait_for(lambda: len(router.workers) == 1, [w])
        res = client.send(GenerateRequest("x", token_ids=list(range(40))))
        wait_for(lambda: res.token_ids == [7, 8], [w], client)
        w.sock.send(encode(Goodbye("a", 1)))
        wait_for(lambda: res.done, [w], client)
        assert res.error.code is ErrorCode.WORKER_DIED and "after tokens were streamed" in res.error.message
        assert res.completion is None
    finally:
        client.close()
        w.close()


def test_restarted_router_warm_starts_from_redis_and_resumes_the_stream(ctx, redis_server, redis_client):
    from bus import names
    from router.mirror import RedisMirror, make_redis_client

    def mirror() -> RedisMirror:
        return RedisMirror(client=make_redis_client(redis_server), namespace="t")

    first = RunningRouter(_config(), mirror=mirror())
    w = FakeWorker(ctx, first.service.workers_endpoint, "w1", epoch=42)
    target = WorkerKey("w1", 0)
    a, b = list(range(5000, 5000 + 6 * BS)), list(range(9000, 9000 + 3 * BS))
    try:
        w.hello()
        w.store(a)
        wait_for(lambda: first.service.index.num_blocks(target) == 6, [w])
        wait_for(lambda: redis_client.hlen(names.target_blocks_key("t", "w1", 0)) == 6, [w])
        before = first.service.index.snapshot(target)
        assert redis_client.hget(names.target_stream_key("t", "w1", 0), "seq") == b"0"
        first.stop()

        second = RunningRouter(_config(), mirror=mirror())
        svc = second.service
        try:
            assert svc.index.snapshot(target) == before  # from Redis, before the worker is back
            w.sock.close(linger=0)
            w.sock = ctx.socket(zmq.DEALER)
            w.sock.setsockopt(zmq.LINGER, 0)
            w.sock.connect(svc.workers_endpoint)
            w.hello()  # same epoch: the stored seq still holds, the stream resumes after it
            wait_for(lambda: "w1" in svc.workers, [w])
            assert svc.ingest.streams[target].subscriber.expected_seq == 1
            w.store(b)
            wait_for(lambda: svc.index.num_blocks(target) == 9, [w])
            assert redis_client.hget(names.target_stream_key("t", "w1", 0), "seq") == b"1"
            assert redis_client.hlen(names.target_blocks_key("t", "w1", 0)) == 9
            assert dict(svc.index.snapshot(target)) == {
                int(k): int(v) for k, v in redis_client.hgetall(names.target_blocks_key("t", "w1", 0)).items()}
        finally:
            second.stop()
    finally:
        w.close()


def test_a_worker_restart_with_a_new_epoch_discards_its_stored_index(ctx, redis_server, redis_client):
    from bus import names
    from router.mirror import RedisMirror, make_redis_client

    clock = ManualClock()  # the predecessor's timeout passes when the test says, not with the load
    running = RunningRouter(_config(), mirror=RedisMirror(client=make_redis_client(redis_server), namespace="t"),
                            clock=clock)
    svc = running.service
    w = FakeWorker(ctx, svc.workers_endpoint, "w1", epoch=1)
    w2 = None
    try:
        w.hello()
        w.store(list(range(4 * BS)))
        wait_for(lambda: svc.index.num_blocks(WorkerKey("w1", 0)) == 4, [w])
        w.close()
        w2 = FakeWorker(ctx, svc.workers_endpoint, "w1", epoch=2)  # a new incarnation, new publisher
        w2.hello()
        # Its predecessor died a moment ago, silently: not proven gone yet, so the id stays its own.
        wait_for(lambda: any(isinstance(m, Refused) for m in w2.received), [w2])
        [refused] = [m for m in w2.received if isinstance(m, Refused)]
        assert refused.code == REFUSED_DUPLICATE_ID and 0 < refused.retry_after_s <= TIMEOUT_S
        clock.advance(refused.retry_after_s)
        w2.hello()  # once more after the holder's timeout: it takes over
        wait_for(lambda: "w1" in svc.workers and svc.workers["w1"].hello.epoch == 2, [w2])
        assert svc.index.num_blocks(WorkerKey("w1", 0)) == 0
        wait_for(lambda: redis_client.hlen(names.target_blocks_key("t", "w1", 0)) == 0, [w2])
    finally:
        running.stop()
        if w2 is not None:
            w2.close()


def test_an_unknown_peer_is_asked_to_say_hello_and_welcome_carries_the_router_epoch(ctx, router):
    w = FakeWorker(ctx, router.workers_endpoint, "w1")  # beats without a Hello: a restarted router's view
    try:
        wait_for(lambda: any(isinstance(m, Heartbeat) for m in w.received), [w])
        nudges = [m for m in w.received if isinstance(m, Heartbeat)]
        assert nudges[0].epoch == router.epoch > 0 and not nudges[0].known and "w1" not in router.workers
        time.sleep(0.5)
        wait_for(lambda: True, [w])  # more beats within the second: no more nudges
        assert len([m for m in w.received if isinstance(m, Heartbeat)]) == 1
        assert router.counters["unknown_peers_nudged"] == 1
        w.hello()
        wait_for(lambda: any(isinstance(m, Welcome) for m in w.received), [w])
        [welcome] = [m for m in w.received if isinstance(m, Welcome)]
        assert welcome.router_epoch == router.epoch
    finally:
        w.close()


# ----------------------------------------------------------------------------- stream integrity


def _one_request(ctx, router, w: FakeWorker, client: RouterClient, rid: str = "x"):
    """Register ``w``, send one request to it; returns (result, the router's key)."""
    w.hello()
    wait_for(lambda: w.wid in router.workers, [w])
    res = client.send(GenerateRequest(rid, token_ids=list(range(40)), max_tokens=4))
    wait_for(lambda: len(w.dispatches()) == 1, [w], client)
    return res, w.dispatches()[0].request_id


def test_a_completion_whose_chunk_count_disagrees_with_the_chunks_relayed_is_an_error(ctx, router):
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        res, key = _one_request(ctx, router, w, client)
        w.send(TokenChunk(key, [7, 8], seq=0))
        w.send(Completion(key, "a", 40, 0, 4, chunks=2))  # says 2 chunks (4 tokens): one never arrived
        wait_for(lambda: res.done, [w], client)
        assert res.completion is None and res.token_ids == [7, 8]
        assert res.error.code is ErrorCode.WORKER_DIED and "1 of its 2 chunks were lost" in res.error.message
        assert router.counters["incomplete_completions"] == 1
    finally:
        client.close()
        w.close()


def test_a_reply_batch_is_relayed_as_its_replies_in_order(ctx, router):
    """One message with an engine step's replies for two requests (and a bad one between): each
    request gets its own tokens in order and its completion; the bad reply is counted, not fatal."""
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        first, k1 = _one_request(ctx, router, w, client, rid="x")
        assert [m.reply_batches for m in w.received if isinstance(m, Welcome)] == [True]
        second = client.send(GenerateRequest("y", token_ids=list(range(40)), max_tokens=4))
        wait_for(lambda: len(w.dispatches()) == 2, [w], client)
        k2 = w.dispatches()[1].request_id
        w.send(ReplyBatch([TokenChunk(k1, [7], seq=0), TokenChunk(k2, [8], seq=0), TokenChunk(k1, [9], seq=1),
                           TokenChunk("nobody", [1], seq=0), Completion(k1, "a", 40, 0, 2, chunks=2)]))
        wait_for(lambda: first.done, [w], client)
        assert first.token_ids == [7, 9] and first.completion is not None and not second.done
        w.send(ReplyBatch([TokenChunk(k2, [6], seq=1), Completion(k2, "a", 40, 0, 2, chunks=2)]))
        wait_for(lambda: second.done, [w], client)
        assert second.token_ids == [8, 6] and second.completion is not None
        assert router.counters["reply_batches"] == 2 and router.counters["batched_replies"] == 7
    finally:
        client.close()
        w.close()


def test_a_gap_in_the_chunks_ends_the_request_and_cancels_it_on_the_worker(ctx, router):
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        res, key = _one_request(ctx, router, w, client)
        w.send(TokenChunk(key, [7], seq=0))
        w.send(TokenChunk(key, [9], seq=2))  # chunk 1 lost
        wait_for(lambda: res.done, [w], client)
        assert res.token_ids == [7] and res.error.code is ErrorCode.WORKER_DIED
        wait_for(lambda: any(isinstance(m, Cancel) and m.request_id == key for m in w.received), [w])
        assert router.counters["reply_stream_gaps"] == 1
    finally:
        client.close()
        w.close()


def test_a_gap_before_any_chunk_reached_the_client_routes_the_request_again(ctx, router):
    a = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang")
    b = FakeWorker(ctx, router.workers_endpoint, "b")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        res, key = _one_request(ctx, router, a, client)
        b.hello()
        wait_for(lambda: "b" in router.workers, [a, b])
        a.send(TokenChunk(key, [5], seq=1))  # chunk 0 lost: the client has seen nothing yet
        wait_for(lambda: res.done, [a, b], client)
        assert res.completion is not None and res.completion.worker_id == "b" and res.completion.retries == 1
        assert res.token_ids == [7, 8]  # b's stream only
    finally:
        client.close()
        a.close()
        b.close()


# ----------------------------------------------------------------------------- a replaced worker link


def test_a_replaced_link_hands_its_requests_over_and_the_resent_stream_is_relayed_once(ctx, router):
    """A router stall: the worker reconnects with its link token and lists its request; chunks it
    resends from the start are dropped up to what was relayed, the rest relayed, nothing missing."""
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang", link_token="secret-a")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        res, key = _one_request(ctx, router, w, client)
        w.send(TokenChunk(key, [7], seq=0))
        wait_for(lambda: res.token_ids == [7], [w], client)
        first_identity = router.workers["a"].identity
        w.reconnect()  # chunk 1 went down with the old connection
        w.hello(in_flight=(key,), router_epoch=router.epoch)
        wait_for(lambda: sum(isinstance(m, Welcome) for m in w.received) == 2, [w], client)
        assert router.workers["a"].identity != first_identity
        for i, tok in enumerate([7, 8, 9]):  # the whole stream again, from its start
            w.send(TokenChunk(key, [tok], seq=i))
        w.send(Completion(key, "a", 40, 0, 3, chunks=3))
        wait_for(lambda: res.done, [w], client)
        assert res.completion is not None and res.token_ids == [7, 8, 9]
        assert router.counters["repeated_chunks_dropped"] == 1 and router.counters["worker_links_replaced"] == 1
        assert router.counters["rejected_hello_duplicate_id"] == 0
    finally:
        client.close()
        w.close()


def test_requests_a_reconnecting_worker_does_not_hold_are_routed_again_or_failed(ctx, router):
    """Their Dispatch (or result) died with the old connection: routed again (the same worker may
    take it, on its new link) if the client saw nothing, else WORKER_DIED; one the worker holds but
    the router no longer waits for is cancelled."""
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang", link_token="secret-a")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        w.hello()
        wait_for(lambda: "a" in router.workers, [w])
        streamed = client.send(GenerateRequest("s", token_ids=list(range(40))))
        silent = client.send(GenerateRequest("q", token_ids=list(range(40))))
        wait_for(lambda: len(w.dispatches()) == 2, [w], client)
        key_s, key_q = (d.request_id for d in w.dispatches())
        w.send(TokenChunk(key_s, [7], seq=0))
        wait_for(lambda: streamed.token_ids == [7], [w], client)
        w.reconnect()
        w.hello(in_flight=("gone-already",), router_epoch=router.epoch)  # holds neither of them
        # The Cancel follows the re-dispatch as a separate message: wait for both, not the first.
        cancelled = lambda: any(isinstance(m, Cancel) and m.request_id == "gone-already" for m in w.received)  # noqa: E731
        wait_for(lambda: streamed.done and len(w.dispatches()) == 3 and cancelled(), [w], client)
        assert streamed.error.code is ErrorCode.WORKER_DIED and "link was replaced" in streamed.error.message
        assert w.dispatches()[2].request_id == key_q  # dispatched again, on the new link
        w.send(TokenChunk(key_q, [9], seq=0))
        w.send(Completion(key_q, "a", 40, 0, 1, chunks=1))
        wait_for(lambda: silent.done, [w], client)
        assert silent.completion is not None and silent.completion.retries == 1 and silent.token_ids == [9]
        assert router.counters["requests_lost_with_link"] == 2
    finally:
        client.close()
        w.close()


# ----------------------------------------------------------------------------- one connection per worker id


def test_a_hello_copying_a_live_workers_id_and_epoch_is_refused(ctx, router):
    """An impostor with the id, epoch and endpoints from the registry, but not the link token."""
    w = FakeWorker(ctx, router.workers_endpoint, "a", epoch=7, link_token="secret-a")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    impostor = FakeWorker(ctx, router.workers_endpoint, "a", epoch=7, link_token="guess")
    try:
        w.hello()
        wait_for(lambda: "a" in router.workers, [w])
        identity = router.workers["a"].identity
        impostor.pub.close()
        impostor.pub = w.pub  # the same advertised endpoints
        impostor.hello()
        wait_for(lambda: impostor.refusals(), [w, impostor])
        [refused] = impostor.refusals()
        assert refused.code == REFUSED_DUPLICATE_ID and 0 < refused.retry_after_s <= TIMEOUT_S
        assert router.counters["rejected_hello_duplicate_id"] == 1 and router.workers["a"].identity == identity
        res = client.send(GenerateRequest("x", token_ids=list(range(40))))
        wait_for(lambda: res.done, [w, impostor], client)
        assert res.completion is not None and not impostor.dispatches()
    finally:
        client.close()
        impostor.sock.close(linger=0)
        w.close()


def test_a_claimant_takes_an_id_over_once_its_holder_missed_the_heartbeat_timeout(ctx):
    clock = ManualClock()  # the holder's silence is the clock's step, whatever the machine's load
    running = RunningRouter(_config(), clock=clock)
    router = running.service
    w = FakeWorker(ctx, router.workers_endpoint, "a", epoch=7, link_token="secret-a")
    other = FakeWorker(ctx, router.workers_endpoint, "a", epoch=8, link_token="secret-b")
    try:
        w.hello()
        wait_for(lambda: "a" in router.workers, [w])
        other.hello()
        wait_for(lambda: other.refusals(), [w, other])
        w.alive = False  # the holder goes silent
        clock.advance(TIMEOUT_S + ROUTER_BEAT_S)
        other.hello()
        wait_for(lambda: "a" in router.workers and router.workers["a"].hello.epoch == 8, [other])
        assert len(other.refusals()) == 1 and router.counters["rejected_hello_duplicate_id"] == 1
    finally:
        running.stop()
        w.close()
        other.close()


def test_with_curve_a_worker_id_is_bound_to_the_key_that_first_registered_it(ctx, tmp_path):
    from bus.security import generate_keys, load_curve, load_key_pair, make_client

    generate_keys(tmp_path, ("router", "worker", "worker-b", "client"))
    curve = load_curve(tmp_path, name="router")
    clock = ManualClock()
    running = RunningRouter(_config(), curve=curve, clock=clock)
    svc = running.service

    def as_key(name: str):
        pair = load_key_pair(tmp_path, name)
        return lambda sock: make_client(sock, pair, curve.keys.public)

    a = FakeWorker(ctx, svc.workers_endpoint, "a", link_token="t", setup=as_key("worker"))
    thief = FakeWorker(ctx, svc.workers_endpoint, "a", link_token="t", setup=as_key("worker-b"))
    b = FakeWorker(ctx, svc.workers_endpoint, "b", setup=as_key("worker-b"))
    try:
        a.hello()
        wait_for(lambda: "a" in svc.workers, [a])
        a.alive = False
        a.sock.close(linger=0)  # gone for good: the id is free, but not for another key
        clock.advance(TIMEOUT_S + ROUTER_BEAT_S)
        thief.pub.close()
        thief.pub = a.pub
        thief.hello()  # even with the link token: the key decides
        wait_for(lambda: thief.refusals(), [thief])
        assert thief.refusals()[0].code == REFUSED_KEY_MISMATCH
        assert svc.counters["rejected_hello_key_mismatch"] == 1
        b.hello()  # the same key may register an id of its own
        wait_for(lambda: "b" in svc.workers, [b])
    finally:
        running.stop()
        thief.sock.close(linger=0)
        a.pub.close()
        b.close()


def test_a_client_that_reads_slower_than_a_burst_still_gets_every_chunk(ctx, router):
    """Its queue fills (high-water marks): the router keeps the rest, in order, rather than drop it."""
    w = FakeWorker(ctx, router.workers_endpoint, "a", mode="hang")
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        res, key = _one_request(ctx, router, w, client)
        n = 5000  # beyond the router's send and the client's receive high-water marks (1000 each)
        for i in range(n):
            w.send(TokenChunk(key, [i], seq=i))
        w.send(Completion(key, "a", 40, 0, n, chunks=n))
        wait_for(lambda: router.counters["completed"] == 1, [w])  # all relayed while the client did not read
        wait_for(lambda: res.done, [w], client)
        assert res.completion is not None and res.token_ids == list(range(n))
        assert router.counters["reply_drops"] == 0
    finally:
        client.close()
        w.close()


def test_requests_to_a_restarted_router_wait_for_its_workers_to_come_back(ctx, redis_server):
    """A router that warm-started from Redis expects its workers back within a heartbeat timeout:
    a request arriving before any is back waits (parked) and is routed once one says Hello; with
    none back by the end of the grace period it fails NO_WORKERS, explicitly."""
    from router.mirror import RedisMirror, make_redis_client

    def mirror() -> RedisMirror:
        return RedisMirror(client=make_redis_client(redis_server), namespace="t-grace")

    slow_beats = dataclasses.replace(_config(), heartbeat=HeartbeatConfig(interval_s=0.5, liveness=3))
    first = RunningRouter(_config(), mirror=mirror())
    w = FakeWorker(ctx, first.service.workers_endpoint, "w1", epoch=7)
    try:
        w.hello()
        w.store(list(range(3 * BS)))
        wait_for(lambda: first.service.index.num_blocks(WorkerKey("w1", 0)) == 3, [w])
        first.stop()
        # A grace period (the heartbeat timeout) long enough for a busy machine's reconnect.
        second = RunningRouter(slow_beats, mirror=mirror())
        svc = second.service
        client = RouterClient(endpoint=svc.clients_endpoint, ctx=ctx)
        try:
            waiting = client.send(GenerateRequest("early", token_ids=list(range(3 * BS + 5)), max_tokens=2))
            wait_for(lambda: svc.counters["requests_parked"] == 1, [], client)
            assert not waiting.done
            w.router_ep = svc.workers_endpoint  # the worker finds the new router (same epoch, same blocks)
            w.reconnect()
            w.hello()
            wait_for(lambda: waiting.done, [w], client)
            assert waiting.completion is not None and waiting.completion.worker_id == "w1"
            assert svc.counters["error_no_workers"] == 0
        finally:
            client.close()
            second.stop()
        # No worker comes back: the parked request ends NO_WORKERS after the grace period.
        third = RunningRouter(_config(), mirror=mirror())
        client = RouterClient(endpoint=third.service.clients_endpoint, ctx=ctx)
        try:
            started = time.monotonic()
            lonely = client.send(GenerateRequest("lonely", token_ids=list(range(20)), max_tokens=2))
            wait_for(lambda: lonely.done, [], client, timeout_s=5.0)
            assert lonely.error is not None and lonely.error.code is ErrorCode.NO_WORKERS
            assert time.monotonic() - started >= 0.9 * BEAT_S * 3  # the heartbeat timeout, not at once
            assert third.service.counters["requests_parked"] == 1
        finally:
            client.close()
            third.stop()
    finally:
        w.close()


def test_a_stall_of_the_routers_own_loop_is_not_the_workers_silence(ctx):
    """A router stopped (SIGSTOP, starvation) for longer than the heartbeat timeout used to declare
    every worker dead on its first turn back, before their new connections' Hellos were through.
    The loop's turns are timed on their own clock: a gap longer than a heartbeat interval gives
    every worker that time back; a worker silent while the loop turns still dies on time."""
    clock, turns = ManualClock(), ManualClock()
    svc = RouterService(_config(), clock=clock, turn_clock=turns)
    w = FakeWorker(ctx, svc.workers_endpoint, "a")
    try:
        w.hello()
        for _ in range(500):
            w.pump()
            svc.run_once(10)
            if "a" in svc.workers:
                break
        assert "a" in svc.workers
        w.alive = False
        clock.advance(10.0)  # the router did not turn for 10 s: both clocks moved, no turn between
        turns.advance(10.0)
        svc.run_once(0)
        assert "a" in svc.workers and svc.counters["loop_stalls"] == 1
        # Stopped in the middle of a turn (after it started, before its upkeep judged anyone):
        clock.advance(10.0)
        turns.advance(10.0)
        svc.tick(clock())
        assert "a" in svc.workers and svc.counters["loop_stalls"] == 2
        clock.advance(TIMEOUT_S + ROUTER_BEAT_S)  # now the loop turns (no turn gap): a's own silence
        svc.run_once(0)
        assert "a" not in svc.workers and svc.counters["loop_stalls"] == 2
    finally:
        svc.close()
        w.close()
