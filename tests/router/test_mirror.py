"""RedisMirror: unit tests on fakeredis, and the same contract on a real redis-server."""

from __future__ import annotations

import pytest

from bus import names
from bus.schema import Hello, WorkerLoad
from router.mirror import MirrorUnavailable, RedisMirror, TargetSnapshot

HELLO = Hello(
    worker_id="w1", epoch=7, model="m", block_size=16, num_gpu_blocks=924,
    events_endpoint="tcp://127.0.0.1:5557", replay_endpoint="tcp://127.0.0.1:5558",
)


def _exercise(client) -> None:
    mirror = RedisMirror(client=client, namespace="t1")
    mirror.register_worker(HELLO, now_s=100.0, ttl_s=3.0)
    assert mirror.alive_workers() == {"w1": 7}
    assert mirror.worker_info("w1")["num_gpu_blocks"] == "924"

    # Given two batches with stores, a removal and a clear
    mirror.write_batch("w1", 0, seq=0, epoch=7, stored={2**64 - 1: 11, 5: 12}, num_events=1)
    mirror.write_batch("w1", 0, seq=1, epoch=7, stored=[(6, 13)], removed=[5], num_events=2)
    mirror.write_batch("w1", 1, seq=0, epoch=7, stored={9: 14})
    # Then the snapshot is exactly the net effect, keyed by target
    snap = mirror.load_snapshot()
    assert snap[("w1", 0)] == TargetSnapshot("w1", 0, seq=1, epoch=7, blocks={2**64 - 1: 11, 6: 13})
    assert snap[("w1", 1)].blocks == {9: 14}
    assert client.hget(names.target_stream_key("t1", "w1", 0), "events") == b"3"
    # redis-cli readable: decimal fields and values
    assert client.hget(names.target_blocks_key("t1", "w1", 0), str(2**64 - 1)) == b"11"
    assert mirror.target_block_counts() == {("w1", 0): 2, ("w1", 1): 1}

    mirror.write_batch("w1", 0, seq=2, epoch=7, cleared=True, stored={8: 15})
    assert mirror.load_snapshot()[("w1", 0)].blocks == {8: 15}

    mirror.replace_target(TargetSnapshot("w1", 0, seq=40, epoch=8, blocks={1: 2, 3: 4}))
    assert mirror.load_snapshot()[("w1", 0)] == TargetSnapshot("w1", 0, 40, 8, {1: 2, 3: 4})

    mirror.touch_worker("w1", epoch=7, load=WorkerLoad(running=3), now_s=101.0, ttl_s=3.0)
    assert client.hget(names.worker_load_key("t1", "w1"), "running") == b"3"

    mirror.unregister_worker("w1", dp_ranks=[0, 1])
    assert mirror.alive_workers() == {}
    assert mirror.load_snapshot() == {}


def test_mirror_contract_on_fakeredis(fake_redis) -> None:
    _exercise(fake_redis)


@pytest.mark.integration
def test_mirror_contract_on_real_redis(redis_client) -> None:
    _exercise(redis_client)


@pytest.mark.integration
def test_liveness_key_expires(redis_client) -> None:
    mirror = RedisMirror(client=redis_client, namespace="t2")
    mirror.register_worker(HELLO, now_s=0.0, ttl_s=0.05)
    assert redis_client.pttl(names.worker_alive_key("t2", "w1")) <= 50
    import time

    time.sleep(0.15)
    assert mirror.alive_workers() == {}


def test_unreachable_redis_raises_one_exception_type() -> None:
    from router.mirror import make_redis_client

    client = make_redis_client("redis://127.0.0.1:1/0", timeout_s=0.2)
    mirror = RedisMirror(client=client, namespace="t3")
    with pytest.raises(MirrorUnavailable):
        mirror.write_batch("w", 0, seq=0, epoch=1, stored={1: 2})
    assert mirror.failures == 1


def test_namespace_is_validated() -> None:
    with pytest.raises(ValueError):
        names.workers_key("a:b")
    assert names.parse_target_key("ns", "kvr:ns:target:w:x:3:blocks") == ("w:x", 3)


def test_generation_is_shared_by_routers_and_changes_when_the_data_set_is_lost(fake_redis) -> None:
    a = RedisMirror(client=fake_redis, namespace="g")
    b = RedisMirror(client=fake_redis, namespace="g")
    first = a.router_heartbeat("r-a", now_s=10.0, token="tok-1")
    assert first == "tok-1"
    # Another router (or a later check) offers another token: the stored one wins.
    assert b.router_heartbeat("r-b", now_s=11.0, token="tok-2") == "tok-1"
    assert a.router_heartbeat("r-a", now_s=12.0, token="tok-3") == "tok-1"
    assert {k.decode(): float(v) for k, v in fake_redis.hgetall(names.routers_key("g")).items()} == {
        "r-a": 12.0, "r-b": 11.0}
    fake_redis.flushall()  # what a restart without persistence looks like to a client
    assert b.router_heartbeat("r-b", now_s=13.0, token="tok-4") == "tok-4"
    assert a.router_heartbeat("r-a", now_s=14.0, token="tok-5") == "tok-4"


@pytest.mark.integration
def test_an_error_reply_inside_a_batch_is_one_exception_and_the_connection_stays_usable(redis_client) -> None:
    mirror = RedisMirror(client=redis_client, namespace="t3")
    # A blocks key of the wrong type makes HSET fail with WRONGTYPE inside the packed batch.
    redis_client.set(names.target_blocks_key("t3", "w1", 0), "not a hash")
    with pytest.raises(MirrorUnavailable, match="WRONGTYPE"):
        mirror.write_batch("w1", 0, seq=0, epoch=1, stored={1: 2})
    # The commands around the failing one ran (Redis executes a pipeline's commands one by one).
    assert redis_client.hget(names.target_stream_key("t3", "w1", 0), "seq") == b"0"
    redis_client.delete(names.target_blocks_key("t3", "w1", 0))
    mirror.write_batch("w1", 0, seq=1, epoch=1, stored={2**63: 2**64 - 1}, removed=[5])
    assert mirror.load_snapshot()[("w1", 0)] == TargetSnapshot("w1", 0, 1, 1, {2**63: 2**64 - 1})


def test_blocks_of_another_hash_scheme_are_deleted_not_loaded(fake_redis) -> None:
    from core.own_block_hash import HASH_SCHEME

    mirror = RedisMirror(client=fake_redis, namespace="hs")
    # Given a mirror written before schemes were recorded (scheme 1): blocks and a stream, no scheme key
    fake_redis.hset(names.target_blocks_key("hs", "w1", 0), mapping={5: 11})
    fake_redis.hset(names.target_stream_key("hs", "w1", 0), mapping={"seq": 4, "epoch": 7})
    # Then a warm start loads nothing, deletes both, and records this router's scheme
    assert mirror.load_snapshot() == {}
    assert not fake_redis.exists(names.target_blocks_key("hs", "w1", 0), names.target_stream_key("hs", "w1", 0))
    assert fake_redis.get(names.hash_scheme_key("hs")) == HASH_SCHEME.encode()
    # Given blocks written by this router (every write stamps the scheme), they load
    fake_redis.delete(names.hash_scheme_key("hs"))
    mirror.write_batch("w1", 0, seq=5, epoch=7, stored={6: 12})
    assert fake_redis.get(names.hash_scheme_key("hs")) == HASH_SCHEME.encode()
    assert mirror.load_snapshot() == {("w1", 0): TargetSnapshot("w1", 0, 5, 7, {6: 12})}
    # Given another scheme recorded, the blocks go again
    fake_redis.set(names.hash_scheme_key("hs"), "some-other-scheme")
    assert mirror.load_snapshot() == {}
    mirror.replace_target(TargetSnapshot("w1", 0, seq=9, epoch=7, blocks={1: 2}))
    assert fake_redis.get(names.hash_scheme_key("hs")) == HASH_SCHEME.encode()
