"""ZMQ_MAXMSGSIZE: every socket that reads from another process has a frame limit; an oversized
frame costs its sender the connection, never the receiver its life, and traffic goes on."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from bus.client import RouterClient
from bus.codec import encode
from bus.publisher import EventPublisher
from bus.schema import ErrorCode, GenerateRequest, Hello
from bus.sockets import ANY_LOOPBACK_PORT, MAX_CONTROL_BYTES, MAX_EVENT_BYTES, MAX_REQUEST_BYTES
from bus.subscriber import AppliedBatch, EventSubscriber, GapLost
from core.admission import AdmissionLimits
from core.events import BlockStored
from router.service import RouterConfig, RouterService
from tests.waiting import eventually
from worker.service import WorkerService

pytestmark = pytest.mark.timeout(60)
BS = 16


def _limit(sock: zmq.Socket) -> int:
    return sock.getsockopt(zmq.MAXMSGSIZE)


def test_the_largest_legitimate_request_fits_the_default_limit() -> None:
    """Requests at the admission limits must reach validation (a clear error), not be cut off."""
    limits = AdmissionLimits()
    by_tokens = GenerateRequest(request_id="x" * limits.max_id_chars, token_ids=[2**32 - 1] * limits.max_prompt_tokens,
                                max_tokens=limits.max_output_tokens)
    by_text = GenerateRequest(request_id="x" * limits.max_id_chars, prompt="\U0001F600" * limits.max_prompt_chars,
                              max_tokens=limits.max_output_tokens)
    assert len(encode(by_tokens)) < MAX_REQUEST_BYTES
    assert len(encode(by_text)) < MAX_REQUEST_BYTES
    assert MAX_REQUEST_BYTES <= MAX_EVENT_BYTES


class _StubBackend:
    """Just enough of a backend for the worker link to say Hello and shut down."""

    def hello(self, *, epoch: int, profile: str = "") -> Hello:
        return Hello("w2", epoch, "m", BS, 100, "tcp://127.0.0.1:1")

    def drain(self) -> list:
        return []


def test_every_receiving_socket_has_a_frame_limit() -> None:
    ctx = zmq.Context()
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    router = RouterService(RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT,
                                        bind_metrics=ANY_LOOPBACK_PORT, block_size=BS), ctx=ctx)
    router._on_hello(b"w", Hello("w1", 1, "m", BS, 100, pub.endpoint, pub.replay_endpoint), time.monotonic())
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    worker = WorkerService(backend=_StubBackend(), router_endpoint=router.workers_endpoint, worker_id="w2", ctx=ctx)
    worker._connect()
    try:
        (stream,) = router.ingest.streams.values()
        sub = stream.subscriber
        assert _limit(router._clients) == _limit(router._workers_sock) == MAX_REQUEST_BYTES
        assert router._metrics is not None and _limit(router._metrics.sock) == MAX_CONTROL_BYTES
        assert _limit(sub._sub) == _limit(sub._dealer) == MAX_EVENT_BYTES
        assert _limit(pub._pub) == _limit(pub._router) == MAX_CONTROL_BYTES
        assert _limit(client._sock) == MAX_REQUEST_BYTES
        assert _limit(worker._dealer) == MAX_REQUEST_BYTES
    finally:
        worker._shutdown()
        client.close()
        router.close()
        pub.close()
        ctx.term()


def test_an_oversized_request_costs_the_sender_its_connection_not_the_router() -> None:
    config = RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT, block_size=BS,
                          max_request_bytes=64 * 1024)
    box: dict = {}
    ready = threading.Event()

    def run() -> None:
        box["svc"] = RouterService(config)
        ready.set()
        box["svc"].run()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(5)
    router: RouterService = box["svc"]
    ctx = zmq.Context()
    try:
        with RouterClient(endpoint=router.clients_endpoint, ctx=ctx) as client:
            big = client.send(GenerateRequest(request_id="big", token_ids=[1] * 100_000, max_tokens=1))
            time.sleep(0.3)  # the router cuts the connection; the DEALER dials again by itself
            # Later traffic on the same client flows (no worker: an explicit NO_WORKERS error).
            def reply():
                try:
                    return client.generate(GenerateRequest(request_id=f"small-{time.monotonic()}", prompt="hi",
                                                           max_tokens=1), timeout_s=1.0)
                except TimeoutError:
                    return None

            res = eventually(reply, timeout_s=10, what="a reply on the same client", interval_s=0)
            assert res.error is not None and res.error.code is ErrorCode.NO_WORKERS
            # The oversized request never reached the router; the client ends it explicitly when
            # the router drops the connection (bus/client.py), it does not wait forever.
            assert big.error is not None and big.error.code is ErrorCode.ROUTER_RESTARTED
        assert thread.is_alive()
        assert router.counters["requests"] >= 1 and router.counters["bad_messages"] == 0
    finally:
        router.stop()
        thread.join(10)
        ctx.term()


def test_an_oversized_event_batch_is_dropped_and_the_stream_goes_on() -> None:
    ctx = zmq.Context()
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx, replay_timeout_ms=200,
                          max_replay_attempts=2, max_msg_size=64 * 1024)
    tokens = list(range(BS))
    items: list = []
    try:

        def publish(block: int) -> None:
            pub.publish([BlockStored([block], None, tokens, BS, None, "GPU", None)], time.time())
            pub.poll_replay(0)
            items.extend(sub.poll(50))

        eventually(lambda: any(isinstance(i, AppliedBatch) for i in items), timeout_s=2,
                   what="the subscriber joined (a first batch applied)", pump=lambda: publish(1), interval_s=0)
        oversized = pub.publish_raw(b"\x00" * (256 * 1024))
        eventually(lambda: any(isinstance(i, AppliedBatch) and i.seq > oversized for i in items), timeout_s=15,
                   what=lambda: f"a batch after the oversized one: {items[-5:]}", pump=lambda: publish(2),
                   interval_s=0)
        # The oversized batch itself is reported lost (its replay is cut off too), never applied.
        assert not any(isinstance(i, AppliedBatch) and i.seq == oversized for i in items)
        assert any(isinstance(i, GapLost) and i.from_seq <= oversized <= i.to_seq for i in items)
    finally:
        sub.close()
        pub.close()
        ctx.term()
