"""The Redis mirror on a real Redis Cluster: 3 masters on loopback (``redis-server --cluster-enabled
yes`` ×3 + ``redis-cli --cluster create``), no replicas, no persistence.

One event batch is one single-slot pipeline (no CROSSSLOT), a warm start SCANs every master, one
master restarting empty is noticed and the mirror rewritten, and ``kvr router`` / ``kvr inspect``
take a ``redis+cluster://`` URL.
"""

from __future__ import annotations

import json
import random
import shutil
import time

import pytest
import zmq
from click.testing import CliRunner

from bus import names
from bus.client import RouterClient
from bus.redis_server import LocalRedisCluster
from bus.schema import GenerateRequest, Welcome
from cli.main import main
from core.prefix_index import WorkerKey
from router.background_mirror import BackgroundMirror
from router.mirror import RedisMirror, TargetSnapshot, make_redis_client
from tests.conftest import _need_real_service
from tests.router.test_mirror import _exercise
from tests.router.test_service import BS, FakeWorker, RunningRouter, _config, wait_for
from tests.worker.test_worker_cli import http, spawn_ready, stop

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def redis_cluster():
    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _need_real_service("redis-server and redis-cli")
    with LocalRedisCluster(masters=3) as cluster:
        yield cluster


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


@pytest.fixture
def cluster_client(redis_cluster):
    for port in redis_cluster.ports:  # a test that restarted a master waits for it here too
        redis_cluster.wait_ok(port)
    client = make_redis_client(redis_cluster.url, timeout_s=2.0)
    client.flushall()  # every master
    yield client
    client.close()


def _master_of(client, key: str) -> int:
    """The port of the master serving ``key``'s slot."""
    return int(client.get_node_from_key(key).port)


def _keys_per_master(client) -> dict[int, int]:
    return {int(node.port): len(client.keys("*", target_nodes=node)) for node in client.get_primaries()}


def test_the_mirror_contract_holds_on_a_cluster(cluster_client) -> None:
    _exercise(cluster_client)


def test_batches_spread_over_every_master_and_a_warm_start_reads_them_exactly(redis_cluster, cluster_client) -> None:
    rng = random.Random(7)
    mirror = RedisMirror(client=cluster_client, namespace="spread")
    expected: dict[tuple[str, int], TargetSnapshot] = {}
    for i in range(12):
        wid, rank = f"worker-{i}", i % 2
        blocks = {rng.getrandbits(64): rng.getrandbits(64) for _ in range(50)}
        # Each batch is stream + blocks of one target: one single-slot pipeline, never CROSSSLOT.
        mirror.write_batch(wid, rank, seq=0, epoch=3, stored=blocks, num_events=1)
        gone = sorted(blocks)[:5]
        mirror.write_batch(wid, rank, seq=1, epoch=3, removed=gone, num_events=1)
        expected[(wid, rank)] = TargetSnapshot(wid, rank, 1, 3, {k: v for k, v in blocks.items() if k not in gone})
    assert sorted(_keys_per_master(cluster_client)) == sorted(redis_cluster.ports)
    assert all(n > 0 for n in _keys_per_master(cluster_client).values())  # targets on every master

    fresh = RedisMirror(client=make_redis_client(redis_cluster.url), namespace="spread")
    assert fresh.load_snapshot() == expected  # SCAN over every master
    assert fresh.target_block_counts() == {t: len(s.blocks) for t, s in expected.items()}


def test_the_generation_changes_when_one_master_restarts_empty(redis_cluster, cluster_client) -> None:
    mirror = RedisMirror(client=cluster_client, namespace="gen")
    first = mirror.router_heartbeat("r", now_s=1.0, token="tok-1")
    masters = redis_cluster.ports  # `--cluster create` gives the masters slots in the order named
    assert first == ",".join(f"127.0.0.1:{p}=tok-1" for p in masters)  # one token per master
    assert mirror.router_heartbeat("r", now_s=2.0, token="tok-2") == first
    # A master that holds none of the namespace's registry keys restarts: only its token is new.
    registry_master = _master_of(cluster_client, names.routers_key("gen"))
    port = next(p for p in redis_cluster.ports if p != registry_master)
    redis_cluster.kill_master(port)
    redis_cluster.start_master(port)
    deadline = time.monotonic() + 10
    while True:
        try:
            after = mirror.router_heartbeat("r", now_s=3.0, token="tok-3")
            break
        except Exception:  # the client may first see the closed connection
            assert time.monotonic() < deadline
            time.sleep(0.05)
    assert after == ",".join(f"127.0.0.1:{p}={'tok-3' if p == port else 'tok-1'}" for p in masters)
    assert mirror.router_heartbeat("r", now_s=4.0, token="tok-4") == after


def _mirrored(client, wid: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall(names.target_blocks_key("t", wid, 0)).items()}


def _mirror_exact(svc, client, wids: list[str]) -> bool:
    try:
        return all(_mirrored(client, w) == dict(svc.index.snapshot(WorkerKey(w, 0))) for w in wids) and sorted(
            m.decode() for m in client.smembers(names.workers_key("t"))) == sorted(wids)
    except Exception:  # the restarted master may still refuse (CLUSTERDOWN) or the connection be stale
        return False


def test_a_master_restart_is_noticed_and_the_mirror_is_exact_again(ctx, redis_cluster, cluster_client) -> None:
    mirror = BackgroundMirror(mirror=RedisMirror(client=make_redis_client(redis_cluster.url, timeout_s=0.2),
                                                 namespace="t"))
    running = RunningRouter(_config(mirror_check_s=0.1), mirror=mirror)
    svc = running.service
    wids = [f"w{i}" for i in range(6)]
    workers = [FakeWorker(ctx, svc.workers_endpoint, w) for w in wids]
    client = RouterClient(endpoint=svc.clients_endpoint, ctx=ctx)
    try:
        for w in workers:
            w.hello()
        wait_for(lambda: all(any(isinstance(m, Welcome) for m in w.received) for w in workers), workers)
        prompts = {w.wid: list(range(1000 * i, 1000 * i + 4 * BS)) for i, w in enumerate(workers)}
        for w in workers:
            w.store(prompts[w.wid])
        wait_for(lambda: _mirror_exact(svc, cluster_client, wids) and len(_mirrored(cluster_client, "w5")) == 4,
                 workers)
        # Kill the master holding the most targets; it comes back on its port with its slots, empty.
        by_master: dict[int, list[str]] = {}
        for wid in wids:
            by_master.setdefault(_master_of(cluster_client, names.target_blocks_key("t", wid, 0)), []).append(wid)
        port, lost = max(by_master.items(), key=lambda kv: (len(kv[1]), kv[0]))
        redis_cluster.kill_master(port)
        # Routing never waits on Redis: a request is routed by overlap while the master is down.
        res = client.send(GenerateRequest("during", token_ids=prompts[lost[0]] + [1], max_tokens=2))
        wait_for(lambda: res.done, workers, client)
        assert res.routed.worker_id == lost[0]
        redis_cluster.start_master(port, wait_ok=False)
        # It serves its slots again ~2 s later (a restarted master waits before taking writes).
        wait_for(lambda: redis_cluster.cluster_ok(port), workers, timeout_s=10.0)
        assert all(not cluster_client.exists(names.target_blocks_key("t", w, 0)) for w in lost)
        wait_for(lambda: _mirror_exact(svc, cluster_client, wids), workers, timeout_s=10.0)
        assert all(len(_mirrored(cluster_client, w)) == 4 for w in wids)
        assert svc.counters["mirror_resyncs"] >= 1
    finally:
        client.close()
        for w in workers:
            w.close()
        running.stop()
        mirror.close(timeout_s=0.5)


def test_kvr_router_and_kvr_inspect_take_a_cluster_url(tmp_path, redis_cluster, cluster_client) -> None:
    url = redis_cluster.url
    router, ready = spawn_ready("router", "--redis-url", url, "--namespace", "cli", "--bind-clients",
                                "tcp://127.0.0.1:0", "--bind-workers", "tcp://127.0.0.1:0", "--bind-metrics",
                                "tcp://127.0.0.1:0", "--http-port", "0", "--heartbeat-interval", "0.2",
                                ready_file=tmp_path / "router.json")
    worker = None
    try:
        worker, _ = spawn_ready("worker", "--id", "w-a", "--router", ready["endpoints"]["workers"], "--speedup", "50",
                                "--heartbeat-interval", "0.2", ready_file=tmp_path / "w-a.json")
        body = {"model": "kvr-emulated", "prompt": "a shared system prompt that fills a few KV blocks " * 4,
                "max_tokens": 1}
        deadline = time.monotonic() + 20
        while True:  # the worker registers, then its prompt's blocks reach the mirror
            status, _, _ = http("POST", ready["endpoints"]["http"] + "/v1/completions", body)
            state = _inspect_json(url, "cli") if status == 200 else None
            if state and state["targets"] and state["targets"][0]["blocks"] > 0:
                break
            assert time.monotonic() < deadline, state
            time.sleep(0.2)
        assert [(w["worker_id"], w["alive"]) for w in state["workers"]] == [("w-a", True)]
        assert state["targets"][0]["target"] == "w-a:0" and state["mirror"]["state"] == "ok"
        assert state["mirror"]["memory"]["node"] in {f"127.0.0.1:{p}" for p in redis_cluster.ports}
        res = CliRunner().invoke(main, ["inspect", "--redis-url", url, "--namespace", "cli"])
        assert res.exit_code == 0 and "w-a:0" in res.stdout, res.output
    finally:
        code_w = stop(worker)[0] if worker is not None else 0
        code, stderr = stop(router)
    assert code == 0 and code_w == 0
    assert "Traceback" not in stderr and "CROSSSLOT" not in stderr, stderr[-2000:]


def _inspect_json(url: str, namespace: str) -> dict:
    res = CliRunner().invoke(main, ["inspect", "--redis-url", url, "--namespace", namespace, "--json"])
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_kvr_inspect_names_an_unreachable_cluster_without_its_password(redis_cluster) -> None:
    from bus.redis_server import free_cluster_node_port

    res = CliRunner().invoke(main, ["inspect", "--redis-url",
                                    f"redis+cluster://:s3cret@127.0.0.1:{free_cluster_node_port()}"])
    assert res.exit_code == 1
    assert "Redis unreachable" in res.output and "s3cret" not in res.output and "***" in res.output


def _move_slot(redis_cluster, slot: int, source: int, dest: int) -> None:
    """Reshard one slot from the master on port ``source`` to the one on ``dest`` (keys included)."""
    import redis as redis_py

    src, dst = (redis_py.Redis(host="127.0.0.1", port=p) for p in (source, dest))
    try:
        dest_id, source_id = dst.cluster("MYID"), src.cluster("MYID")
        dst.cluster("SETSLOT", slot, "IMPORTING", source_id)
        src.cluster("SETSLOT", slot, "MIGRATING", dest_id)
        while keys := src.cluster("GETKEYSINSLOT", slot, 100):
            src.execute_command("MIGRATE", "127.0.0.1", dest, "", 0, 5000, "KEYS", *keys)
        for client in (dst, src):
            client.cluster("SETSLOT", slot, "NODE", dest_id)
    finally:
        src.close()
        dst.close()


def test_a_resharded_target_fails_one_batch_then_is_written_where_its_slot_went(redis_cluster, cluster_client) -> None:
    from redis.crc import key_slot

    from router.mirror import MirrorUnavailable

    mirror = RedisMirror(client=make_redis_client(redis_cluster.url), namespace="moved")
    mirror.write_batch("w1", 0, seq=0, epoch=1, stored={1: 2})
    key = names.target_blocks_key("moved", "w1", 0)
    source = _master_of(cluster_client, key)
    dest = next(p for p in redis_cluster.ports if p != source)
    _move_slot(redis_cluster, key_slot(key.encode()), source, dest)
    # The mirror's slot map is stale: the batch is refused (MOVED) as one failure, never half applied
    with pytest.raises(MirrorUnavailable):
        mirror.write_batch("w1", 0, seq=1, epoch=1, stored={3: 4})
    # The next batch refreshes the slot map and lands on the new master
    mirror.write_batch("w1", 0, seq=2, epoch=1, stored={5: 6})
    assert mirror.load_snapshot() == {("w1", 0): TargetSnapshot("w1", 0, 2, 1, {1: 2, 5: 6})}
    assert _master_of(make_redis_client(redis_cluster.url), key) == dest


def test_kvr_up_redis_cluster_starts_routes_mirrors_and_stops_everything(tmp_path) -> None:
    import os
    import signal
    import subprocess
    import sys

    if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
        _need_real_service("redis-server and redis-cli")
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--run-dir", str(tmp_path), "--client-port", "0", "--worker-port",
         "0", "--metrics-port", "0", "--no-monitor", "--ready-timeout", "30", "--workers", "2", "--speedup", "50",
         "--redis-cluster", "3", "--namespace", "up"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        lines = [proc.stdout.readline()]  # printed only once the cluster is ready
        assert lines[0].startswith("kvr cluster ready: 2 workers, redis redis+cluster://127.0.0.1:"), \
            proc.stderr.read()
        assert "(redis-cluster of 3 masters)" in lines[0]
        while not lines[-1].startswith("logs:"):
            lines.append(proc.stdout.readline())
        info = json.loads((tmp_path / "cluster.json").read_text())
        assert sorted(info["pids"]) == ["redis-0", "redis-1", "redis-2", "router", "worker-0", "worker-1"]
        port = info["redis_url"].rsplit(":", 1)[1]
        assert f"  redis-cli --cluster call 127.0.0.1:{port} KEYS 'kvr:{{up[}}:~]*'\n" in lines
        with RouterClient(endpoint=info["client_endpoint"]) as client:
            r = client.generate(GenerateRequest("x", prompt="a system prompt of a few KV blocks " * 8, max_tokens=2),
                                timeout_s=10)
        assert r.completion is not None
        # The router mirrors into the cluster: the worker that ran it has its blocks there
        check = make_redis_client(info["redis_url"], timeout_s=2.0)
        deadline = time.monotonic() + 10
        while not check.hlen(names.target_blocks_key("up", r.completion.worker_id, 0)):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert check.smembers(names.workers_key("up")) == {b"worker-0", b"worker-1"}
        check.close()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        for pid in info["pids"].values():
            with pytest.raises(ProcessLookupError):
                os.kill(pid, 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
