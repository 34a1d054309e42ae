"""CURVE on the bus: a router with keys lets in only authorised workers, clients and publishers.

Real ZMQ over loopback: the router service in a thread, real emulated workers (``WorkerRunner``)
in threads, raw sockets for the intruders. Every negative case runs beside a positive one in the
same cluster, so "nothing arrived" cannot pass because nothing works at all.
"""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from bus.client import RouterClient
from bus.codec import encode, router_decoder
from bus.publisher import EventPublisher
from bus.schema import GenerateRequest, Heartbeat, Hello, Welcome
from bus.security import WORKERS_DOMAIN, generate_keys, load_curve, make_client
from bus.sockets import ANY_LOOPBACK_PORT, free_tcp_endpoint
from core.events import BlockStored
from core.liveness import HeartbeatConfig
from core.prefix_index import WorkerKey
from router.service import RouterConfig, RouterService
from tests.waiting import eventually
from worker.runner import WorkerOptions, WorkerRunner

pytestmark = pytest.mark.timeout(60)
BS = 16


@pytest.fixture
def keys(tmp_path):
    """The cluster's key directory, plus a stranger's (valid pairs nobody authorised)."""
    folder, stranger = tmp_path / "keys", tmp_path / "stranger"
    generate_keys(folder)
    generate_keys(stranger, ("worker", "client"))
    # The stranger knows the router's public key (it is public): only its own keys are wrong.
    (stranger / "router.key").write_bytes((folder / "router.key").read_bytes())
    return folder, stranger


class Cluster:
    """A CURVE router in its own thread (it owns its sockets) and workers in theirs."""

    def __init__(self, keys_dir) -> None:
        self.keys_dir = keys_dir
        # Stale after 0.6 s, dead after 1.2 s: workers beat every 0.1 s, so a 300 ms stall of a
        # busy machine is neither (these tests are about keys, not liveness).
        self.config = RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT, block_size=BS,
                                   heartbeat=HeartbeatConfig(interval_s=0.4, liveness=3), request_timeout_s=10.0)
        box: dict = {}
        ready = threading.Event()

        def run() -> None:
            box["svc"] = RouterService(self.config, curve=load_curve(keys_dir, name="router"))
            ready.set()
            box["svc"].run()

        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()
        assert ready.wait(5)
        self.router: RouterService = box["svc"]
        self.runners: list[tuple[WorkerRunner, threading.Thread]] = []

    def worker(self, wid: str, curve_dir, **options) -> WorkerRunner:
        runner = WorkerRunner(WorkerOptions(worker_id=wid, router_endpoint=self.router.workers_endpoint,
                                            curve_dir=None if curve_dir is None else str(curve_dir), speedup=100.0,
                                            seed=1, heartbeat_interval=0.1, block_size=BS, **options))
        th = threading.Thread(target=runner.run, daemon=True)
        th.start()
        self.runners.append((runner, th))
        return runner

    def close(self) -> None:
        for runner, th in self.runners:
            runner.stop()
            th.join(10)
        self.router.stop()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def cluster(keys):
    c = Cluster(keys[0])
    yield c
    c.close()


def _request(i: int, prompt: str = "the same long shared prefix " * 8) -> GenerateRequest:
    return GenerateRequest(request_id=f"q{i}", prompt=prompt, max_tokens=4)


@pytest.mark.parametrize("events", ["bound", "dialled"])
def test_authorised_worker_registers_serves_and_indexes_over_curve(cluster, keys, events) -> None:
    """``dialled``: the worker's PUB dials a SUB the router binds (vLLM's central mode); the CURVE
    roles stay the same (PUB server, SUB client) whichever side binds."""
    folder, _ = keys
    extra = {}
    if events == "dialled":
        extra = {"events_dial": True, "events_endpoint": free_tcp_endpoint()}
    runner = cluster.worker("w-good", folder, **extra)
    eventually(lambda: "w-good" in cluster.router.workers, timeout_s=10, what="the authorised worker to register")
    assert cluster.router.workers["w-good"].hello.events_curve_key == load_curve(folder, name="worker").public_z85
    with RouterClient(endpoint=cluster.router.clients_endpoint, ctx=zmq.Context(),
                      curve=load_curve(folder, name="client")) as client:
        first = client.generate(_request(1), timeout_s=10)
        assert first.error is None and first.completion.worker_id == "w-good"
        # The worker's KV events reach the index over its CURVE PUB: the router predicts the hit.
        # (A dialled PUB may connect after the first batch went out; the next batch's gap replays it.)
        target = WorkerKey("w-good", 0)
        # A batch sent before a dialled PUB connected is lost to the SUB, and the same prompt again
        # adds no blocks: only a later batch (a new prompt's) shows the gap, which the router
        # replays or resyncs. So each try sends a new prompt until the first one's blocks are in.
        tries = iter(range(10, 1000))

        def indexed() -> bool:
            if cluster.router.index.num_blocks(target) > 0:
                return True
            assert client.generate(_request(next(tries), prompt=f"fresh words {time.monotonic()} " * 8),
                                   timeout_s=10).error is None
            return False

        eventually(indexed, timeout_s=10, interval_s=0.1, what="blocks indexed from CURVE events")
        second = client.generate(_request(2), timeout_s=10)
        assert second.error is None and second.routed.predicted_cached_tokens > 0
        assert second.completion.cached_tokens > 0
    assert runner.service.registered


def test_workers_without_an_authorised_key_never_register(cluster, keys) -> None:
    folder, stranger = keys
    # A real worker with a valid key pair nobody authorised; one with no keys at all (plain).
    cluster.worker("w-stranger", stranger)
    cluster.worker("w-plain", None)
    # A raw DEALER holding the *client* key: authorised for requests, not for the worker port.
    ctx = zmq.Context()
    intruder = ctx.socket(zmq.DEALER)
    intruder.setsockopt(zmq.LINGER, 0)
    client_curve = load_curve(folder, name="client")
    make_client(intruder, client_curve.keys, client_curve.router_public)
    intruder.connect(cluster.router.workers_endpoint)
    intruder.send(encode(Hello("w-client-key", 1, "m", BS, 100, "tcp://127.0.0.1:1")))
    # The control: an authorised worker registers in the same cluster meanwhile.
    cluster.worker("w-good", folder)
    eventually(lambda: "w-good" in cluster.router.workers, timeout_s=10, what="the authorised worker to register")
    eventually(lambda: cluster.router._zap.denied[WORKERS_DOMAIN] >= 2, timeout_s=10,
               what="refused handshakes to be counted")
    time.sleep(0.5)
    assert set(cluster.router.workers) == {"w-good"}
    # Not even as an unknown peer: the router never read a byte from them.
    assert cluster.router.counters["unknown_peer_messages"] == 0
    assert cluster.router.counters["bad_messages"] == 0
    assert not intruder.poll(200)  # no Welcome, no Refused: nothing at all
    eventually(lambda: cluster.router.stats["counters"].get("auth_denied_workers", 0) >= 2, timeout_s=10,
               what="the stats counter")
    intruder.close()
    ctx.term()


@pytest.mark.parametrize("who", ["no key", "stranger key", "worker key"])
def test_clients_without_an_authorised_key_get_no_service(cluster, keys, who) -> None:
    folder, stranger = keys
    cluster.worker("w-good", folder)
    eventually(lambda: "w-good" in cluster.router.workers, timeout_s=10, what="the authorised worker to register")
    curve = {"no key": None, "stranger key": load_curve(stranger, name="client"),
             "worker key": load_curve(folder, name="worker")}[who]
    ctx = zmq.Context()
    with RouterClient(endpoint=cluster.router.clients_endpoint, ctx=ctx, curve=curve) as client:
        with pytest.raises(TimeoutError):
            client.generate(_request(1), timeout_s=1.0)
    assert cluster.router.counters["requests"] == 0
    # The control: the authorised client is served by the same router.
    with RouterClient(endpoint=cluster.router.clients_endpoint, ctx=ctx,
                      curve=load_curve(folder, name="client")) as client:
        assert client.generate(_request(2), timeout_s=10).error is None
    assert cluster.router.counters["requests"] == 1
    ctx.term()


def test_an_unauthorised_publisher_cannot_inject_blocks(cluster, keys) -> None:
    """The router dials the event endpoint a registered worker names, expecting that worker's key.

    An impostor holding that endpoint (a squatted port) with its own key pair, or with none,
    feeds nothing into the index; the genuine key holder on another endpoint is indexed."""
    folder, stranger = keys
    worker_curve = load_curve(folder, name="worker")
    ctx = zmq.Context()
    impostors = [EventPublisher(endpoint="tcp://127.0.0.1:0", bind=True, topic="", ctx=ctx,
                                curve=load_curve(stranger, name="worker")),
                 EventPublisher(endpoint="tcp://127.0.0.1:0", bind=True, topic="", ctx=ctx)]
    genuine = EventPublisher(endpoint="tcp://127.0.0.1:0", bind=True, topic="", ctx=ctx, curve=worker_curve)
    links = []
    for i, pub in enumerate([*impostors, genuine]):
        # Registered by an authorised worker link, naming the worker's key for its events.
        link = ctx.socket(zmq.DEALER)
        link.setsockopt(zmq.LINGER, 0)
        make_client(link, worker_curve.keys, worker_curve.router_public)
        link.connect(cluster.router.workers_endpoint)
        link.send(encode(Hello(f"w{i}", 1, "m", BS, 100, pub.endpoint, events_curve_key=worker_curve.public_z85)))
        assert link.poll(5000), "no answer to an authorised Hello"
        assert isinstance(router_decoder().decode(link.recv()), Welcome)
        links.append(link)
    tokens = list(range(4 * BS))
    deadline = time.monotonic() + 1.5
    while time.monotonic() < deadline:  # publish for a while: slow joiners and reconnects get their chance
        for i, pub in enumerate([*impostors, genuine]):
            pub.publish([BlockStored([1, 2, 3, 4], None, tokens, BS, None, "GPU", None)], time.time())
            links[i].send(encode(Heartbeat(f"w{i}", 1)))  # stay registered
        time.sleep(0.05)
    eventually(lambda: cluster.router.index.num_blocks(WorkerKey("w2", 0)) == 4, timeout_s=10,
               what="the genuine publisher's blocks")
    assert cluster.router.index.num_blocks(WorkerKey("w0", 0)) == 0
    assert cluster.router.index.num_blocks(WorkerKey("w1", 0)) == 0
    assert cluster.router.ingest.streams[WorkerKey("w0", 0)].events_applied == 0
    assert cluster.router.ingest.streams[WorkerKey("w1", 0)].events_applied == 0
    for sock in links:
        sock.close()
    for pub in [*impostors, genuine]:
        pub.close()
    ctx.term()


def test_the_http_front_dials_its_curve_router_with_the_router_key(cluster, keys) -> None:
    """``kvr router --curve-dir --http-port``: the front is a client of its own router, keyed."""
    import http.client
    import json

    from bus.sockets import connectable
    from router.http_front import RouterHttpFront

    folder, _ = keys
    cluster.worker("w-good", folder)
    eventually(lambda: "w-good" in cluster.router.workers, timeout_s=10, what="the authorised worker to register")
    front = RouterHttpFront(client_endpoint=connectable(cluster.router.clients_endpoint), model="m",
                            stats=lambda: cluster.router.stats, request_timeout_s=10,
                            curve=load_curve(folder, name="router"))
    front.start()
    try:
        host, port = front.server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=10)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": "hello", "max_tokens": 2}),
                     headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        assert body["kvr"]["worker_id"] == "w-good"
        # Refused handshakes show up in Prometheus text too.
        stranger_ctx = zmq.Context()
        stranger = RouterClient(endpoint=cluster.router.clients_endpoint, ctx=stranger_ctx,
                                curve=load_curve(keys[1], name="client"))
        stranger.send(_request(9))
        eventually(lambda: cluster.router.stats["counters"].get("auth_denied_clients", 0) > 0, timeout_s=10,
                   what="a counted refusal")
        conn.request("GET", "/metrics")
        assert "kvr_router_auth_denied_clients_total" in conn.getresponse().read().decode()
        conn.close()
        stranger.close()
        stranger_ctx.term()
    finally:
        front.close()


def test_a_hello_with_a_malformed_events_key_is_refused_not_crashed_on(cluster, keys) -> None:
    from bus.schema import Refused

    folder, _ = keys
    worker_curve = load_curve(folder, name="worker")
    ctx = zmq.Context()
    link = ctx.socket(zmq.DEALER)
    link.setsockopt(zmq.LINGER, 0)
    make_client(link, worker_curve.keys, worker_curve.router_public)
    link.connect(cluster.router.workers_endpoint)
    link.send(encode(Hello("w-bad", 1, "m", BS, 100, "tcp://127.0.0.1:1", events_curve_key="not a key")))
    assert link.poll(5000)
    reply = router_decoder().decode(link.recv())
    assert isinstance(reply, Refused) and "events_curve_key" in reply.reason
    assert "w-bad" not in cluster.router.workers and cluster.router.counters["handler_errors"] == 0
    link.close()
    ctx.term()


def test_a_refused_worker_is_told_to_check_its_key(cluster, keys, caplog) -> None:
    """A CURVE refusal is silence on the link: the worker's warning names the failed handshake
    (and, with keys, the key directory); a worker simply without a router is told otherwise
    (tests/worker/test_emulated_worker.py)."""
    folder, stranger = keys
    caplog.set_level("WARNING", logger="worker.service")
    cluster.worker("w-stranger", stranger)
    cluster.worker("w-plain", None)
    cluster.worker("w-good", folder)
    eventually(lambda: "w-good" in cluster.router.workers, timeout_s=10, what="the authorised worker to register")

    def hints() -> set[str]:
        silent = [r.getMessage() for r in caplog.records if r.getMessage().startswith("router silent")]
        return {m.rpartition(" (")[2] for m in silent}

    eventually(lambda: len(hints()) == 2, timeout_s=10, what="both refused workers to warn")
    assert hints() == {"handshake refused: is this worker's public key in the router's workers/ key directory?)",
                       "handshake refused: a router with --curve-dir admits only workers with an authorised key)"}
