"""Router replicas sharing one fleet: a worker registers with every router it is given, each
router subscribes to its KV events and keeps its own exact index, and either serves requests."""

from __future__ import annotations

import threading
import time

import pytest
import zmq

from bus.client import RouterClient
from bus.replica_client import ReplicaClient
from bus.schema import GenerateRequest
from bus.sockets import ANY_LOOPBACK_PORT, free_tcp_endpoint
from core.liveness import HeartbeatConfig
from core.prefix_index import WorkerKey
from router.config import RouterConfig
from tests.router.test_service import RunningRouter
from tests.waiting import eventually
from worker.emulated import EmulatedBackend, EmulatedWorkerConfig
from worker.service import WorkerService, router_endpoints

pytestmark = pytest.mark.timeout(60)
BS = 16


def _router(router_id: str, *, metrics: str | None = None, peers: tuple[str, ...] = ()) -> RunningRouter:
    return RunningRouter(RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT,
                                      bind_metrics=metrics, peers=peers, block_size=BS, router_id=router_id,
                                      request_timeout_s=10.0, heartbeat=HeartbeatConfig(interval_s=0.2, liveness=5)))


def _run(client: RouterClient, request: GenerateRequest, timeout_s: float = 10.0):
    result = client.send(request)
    eventually(lambda: result.done, timeout_s=timeout_s, what=f"an answer to {request.request_id}",
               pump=lambda: client.poll(20), interval_s=0)
    return result


@pytest.fixture
def fleet(request):
    """Two router replicas (r1, r2) and two workers registered with both; with ``peers`` (a marker
    parameter) the replicas count each other's requests in flight."""
    ctx = zmq.Context()
    speedup = 0.25 if getattr(request, "param", None) == "slow" else 4.0
    if getattr(request, "param", None) == "peers":
        m1, m2 = free_tcp_endpoint(), free_tcp_endpoint()
        routers = [_router("r1", metrics=m1, peers=(m2,)), _router("r2", metrics=m2, peers=(m1,))]
    else:
        routers = [_router("r1"), _router("r2")]
    endpoints = ",".join(r.service.workers_endpoint for r in routers)
    services, threads = [], []
    for wid in ("w1", "w2"):
        backend = EmulatedBackend(config=EmulatedWorkerConfig(worker_id=wid, speedup=speedup, seed=1), ctx=ctx)
        svc = WorkerService(backend=backend, router_endpoint=endpoints, worker_id=wid, ctx=ctx,
                            heartbeat_interval_s=0.2, liveness=5)
        th = threading.Thread(target=svc.run, daemon=True)
        th.start()
        services.append(svc)
        threads.append(th)
    try:
        eventually(lambda: all(s.registered for s in services) and all(len(r.service.workers) == 2 for r in routers),
                   timeout_s=10, what="both workers registered with both replicas")
        # Replicas hear each other once their SUBs connected (the first one dialled a port not bound yet).
        eventually(lambda: all(r.service.peers is None or r.service.peers.heard for r in routers), timeout_s=10)
        yield ctx, routers, services
    finally:
        for svc in services:
            svc.stop()
        for th in threads:
            th.join(5)
        for r in routers:
            if r.thread.is_alive():
                r.stop()
        ctx.term()


def test_router_endpoints_parse_lists_and_none() -> None:
    assert router_endpoints("tcp://a:1, tcp://b:2") == ["tcp://a:1", "tcp://b:2"]
    assert router_endpoints(["tcp://a:1", "tcp://b:2,tcp://c:3"]) == ["tcp://a:1", "tcp://b:2", "tcp://c:3"]
    assert router_endpoints("none") == [] and router_endpoints(None) == [] and router_endpoints("") == []
    with pytest.raises(ValueError):
        WorkerService(backend=None, router_endpoint="tcp://a:1,tcp://a:1", worker_id="w")


def test_each_replica_indexes_every_workers_blocks_and_serves_requests(fleet) -> None:
    ctx, routers, services = fleet
    clients = [RouterClient(endpoint=r.service.clients_endpoint, ctx=ctx) for r in routers]
    try:
        prompt = list(range(1000, 1000 + 8 * BS))
        first = _run(clients[0], GenerateRequest("a", token_ids=prompt, max_tokens=2))
        assert first.completion is not None, first.error
        holder = first.completion.worker_id
        # Both replicas hear the holder's BlockStored events (PUB fans out): exact indexes on each.
        target = WorkerKey(holder, 0)
        eventually(lambda: all(r.service.index.num_blocks(target) >= 8 for r in routers), timeout_s=10)
        # The other replica routes the same prefix to the same worker, and it hits.
        second = _run(clients[1], GenerateRequest("b", token_ids=prompt + [7] * BS, max_tokens=2))
        assert second.completion is not None, second.error
        assert second.routed.worker_id == holder and second.routed.overlap_blocks == 8
        assert second.completion.cached_tokens == 8 * BS
        # Each request went to its own router's link on the worker and came back on it.
        assert sum(s.counters.dispatches for s in services) == 2
    finally:
        for c in clients:
            c.close()


def test_a_replica_dying_leaves_the_others_serving(fleet) -> None:
    ctx, routers, services = fleet
    routers[0].stop()  # its sockets close: the workers' links to it go silent
    client = RouterClient(endpoint=routers[1].service.clients_endpoint, ctx=ctx)
    try:
        for i in range(4):
            result = _run(client, GenerateRequest(f"after-{i}", token_ids=list(range(i * 100, i * 100 + 3 * BS)),
                                                  max_tokens=3))
            assert result.completion is not None and len(result.token_ids) == 3, result.error
        # The survivor still holds both workers; each worker's link to it stays welcomed.
        assert len(routers[1].service.workers) == 2
        assert all(s.links[1].registered for s in services)
    finally:
        client.close()


@pytest.mark.parametrize("fleet", ["peers"], indirect=True)
def test_replicas_count_each_others_requests_in_flight(fleet) -> None:
    """r1's long request shows in r2's load of that worker (within the sync), and stops counting
    when it ends; r2 then routes its own request elsewhere rather than onto the loaded worker."""
    ctx, routers, services = fleet
    r1, r2 = routers[0].service, routers[1].service
    clients = [RouterClient(endpoint=r.service.clients_endpoint, ctx=ctx) for r in routers]
    try:
        long = clients[0].send(GenerateRequest("long", token_ids=list(range(40 * BS)), max_tokens=2000))
        eventually(lambda: long.routed is not None or bool(clients[0].poll(10)), timeout_s=10)
        target = WorkerKey(long.routed.worker_id, 0)
        eventually(lambda: r2.core.load(target).in_flight == 1, timeout_s=10)
        assert r1.core.load(target).in_flight == 1  # its own, counted once (a replica never applies itself)
        other = _run(clients[1], GenerateRequest("short", token_ids=list(range(5000, 5000 + 2 * BS)), max_tokens=1))
        assert other.routed.worker_id != target.worker_id
        clients[0].cancel("long")
        eventually(lambda: long.done or bool(clients[0].poll(10)), timeout_s=10)
        eventually(lambda: r2.core.load(target).in_flight == 0, timeout_s=10)
        assert r2.counters["peer_loads_applied"] >= 1 and r1.counters["peer_loads_applied"] >= 1
        assert r2.peers is not None and set(r2.peers.heard) == {"r1"}
    finally:
        for c in clients:
            c.close()


@pytest.mark.parametrize("fleet", ["peers"], indirect=True)
def test_a_new_prefix_routed_by_one_replica_is_predicted_by_the_other(fleet) -> None:
    """r1 routes a prompt nobody holds; r2 hears which blocks r1 predicted where, and predicts them
    on the same worker (tentatively, before or alongside the worker's own BlockStored)."""
    ctx, routers, _ = fleet
    r1, r2 = routers[0].service, routers[1].service
    client = RouterClient(endpoint=r1.clients_endpoint, ctx=ctx)
    try:
        prompt = list(range(7000, 7000 + 6 * BS))
        result = _run(client, GenerateRequest("new-prefix", token_ids=prompt, max_tokens=1))
        eventually(lambda: r2.counters["peer_routes_predicted"] >= 1, timeout_s=10,
                   what="r2 predicting r1's route")
        from core.routing import RoutingInput

        hashes = r2.core.request_hashes(RoutingInput("probe", prompt))
        held = r2.index.overlap(hashes)
        assert held.get(WorkerKey(result.routed.worker_id, 0)) == len(hashes)
    finally:
        client.close()


@pytest.mark.parametrize("fleet", ["peers"], indirect=True)
def test_a_silent_replica_is_forgotten_after_the_heartbeat_timeout(fleet) -> None:
    ctx, routers, _ = fleet
    r2 = routers[1].service
    eventually(lambda: r2.peers is not None and "r1" in r2.peers.heard, timeout_s=10)
    routers[0].stop()
    eventually(lambda: r2.counters["peers_forgotten"] == 1, timeout_s=5.0)  # heartbeat timeout: 0.2 s x 5
    assert r2.peers is not None and r2.peers.heard == {}


def _drain(client: ReplicaClient, n: int, timeout_s: float = 20.0) -> list:
    done: list = []
    deadline = time.monotonic() + timeout_s
    while len(done) < n and time.monotonic() < deadline:
        done += client.poll(50)
    return done


def test_a_replica_client_spreads_requests_over_the_replicas(fleet) -> None:
    ctx, routers, _ = fleet
    with ReplicaClient(endpoints=[r.service.clients_endpoint for r in routers], ctx=ctx) as client:
        for i in range(6):
            client.send(GenerateRequest(f"s{i}", token_ids=list(range(i * 64, i * 64 + 2 * BS)), max_tokens=2))
        done = _drain(client, 6)
    assert sorted(r.request_id for r in done) == [f"s{i}" for i in range(6)]
    assert all(r.completion is not None for r in done)
    assert [r.service.counters["requests"] for r in routers] == [3, 3]


@pytest.mark.parametrize("fleet", ["slow"], indirect=True)
def test_requests_lost_with_a_replica_before_any_token_fail_over_to_another(fleet) -> None:
    """Replica r1 stops while its requests are still in prefill: each is sent again to r2 under the
    same id and completes; every request ends exactly once, none with an error."""
    ctx, routers, _ = fleet
    with ReplicaClient(endpoints=[r.service.clients_endpoint for r in routers], ctx=ctx) as client:
        for i in range(4):
            client.send(GenerateRequest(f"f{i}", token_ids=list(range(i * 1000, i * 1000 + 40 * BS)), max_tokens=2))
        eventually(lambda: routers[0].service.counters["requests"] == 2, timeout_s=10)
        routers[0].stop()  # answers its pending requests ROUTER_RESTARTED, none had a token yet
        done = _drain(client, 4)
        assert client.failovers == 2 and client.pending == {}
    assert sorted(r.request_id for r in done) == [f"f{i}" for i in range(4)]
    assert all(r.completion is not None for r in done), [r.error for r in done]
    assert routers[1].service.counters["requests"] == 4


def test_one_replica_writes_the_mirror_and_another_takes_over_when_it_dies(redis_server, redis_client) -> None:
    """Replicas would race on the same mirror keys: one holds the writer lease (names.mirror_writer_key)
    and writes; the other only reads. When the writer stops renewing it, the lease expires (the
    heartbeat timeout) and the other takes it over and rewrites the mirror from its own index."""
    from bus import names
    from router.mirror import RedisMirror, make_redis_client

    def replica(router_id: str) -> RunningRouter:
        config = RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT, block_size=BS,
                              router_id=router_id, heartbeat=HeartbeatConfig(interval_s=0.2, liveness=3))
        return RunningRouter(config, mirror=RedisMirror(client=make_redis_client(redis_server), namespace="lease"))

    first = replica("r1")
    eventually(lambda: redis_client.get(names.mirror_writer_key("lease")) == b"r1", what="r1 holds the lease")
    second = replica("r2")
    try:
        eventually(lambda: not second.service.ingest.mirror_writes, what="r2 reads only")
        assert first.service.ingest.mirror_writes
        first.stop()  # stops renewing: the lease (0.6 s) expires
        eventually(lambda: second.service.counters["mirror_writer_takeovers"] == 1, timeout_s=5.0,
                   what="r2 takes the lease over")
        assert second.service.ingest.mirror_writes
        assert redis_client.get(names.mirror_writer_key("lease")) == b"r2"
        assert 0 < redis_client.pttl(names.mirror_writer_key("lease")) <= 600
    finally:
        second.stop()
