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
    for bad in ("a:b", "a{b", "a}b", "a*", ""):
        with pytest.raises(ValueError):
            names.workers_key(bad)
    assert names.parse_target_key("ns", "kvr:{ns:w:x:3}:blocks") == ("w:x", 3)


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


def test_targets_of_another_hash_scheme_are_deleted_not_loaded(fake_redis) -> None:
    from core.own_block_hash import HASH_SCHEME

    mirror = RedisMirror(client=fake_redis, namespace="hs")
    # Given a target whose stream records no scheme, one of another scheme, and blocks without a stream
    fake_redis.hset(names.target_blocks_key("hs", "w1", 0), mapping={5: 11})
    fake_redis.hset(names.target_stream_key("hs", "w1", 0), mapping={"seq": 4, "epoch": 7})
    fake_redis.hset(names.target_blocks_key("hs", "w2", 0), mapping={6: 12})
    fake_redis.hset(names.target_stream_key("hs", "w2", 0), mapping={"seq": 4, "epoch": 7, "scheme": "other"})
    fake_redis.hset(names.target_blocks_key("hs", "w3", 0), mapping={7: 13})
    # And one written by this router (every write stamps its scheme on the stream)
    mirror.write_batch("w4", 0, seq=5, epoch=7, stored={6: 12})
    assert fake_redis.hget(names.target_stream_key("hs", "w4", 0), "scheme") == HASH_SCHEME.encode()
    # Then a warm start loads only the last and deletes the others' keys
    assert mirror.load_snapshot() == {("w4", 0): TargetSnapshot("w4", 0, 5, 7, {6: 12})}
    assert sorted(fake_redis.keys("kvr:{hs:*")) == sorted(
        k.encode() for k in (names.target_blocks_key("hs", "w4", 0), names.target_stream_key("hs", "w4", 0)))
    # A rewrite and a clear stamp the scheme too
    mirror.replace_target(TargetSnapshot("w1", 0, seq=9, epoch=7, blocks={1: 2}))
    mirror.clear_target("w2", 0, epoch=8)
    assert mirror.load_snapshot() == {("w1", 0): TargetSnapshot("w1", 0, 9, 7, {1: 2}),
                                      ("w2", 0): TargetSnapshot("w2", 0, -1, 8, {}),
                                      ("w4", 0): TargetSnapshot("w4", 0, 5, 7, {6: 12})}


def _write_layout_1(client, ns: str, *, scheme: str | None) -> None:
    """A mirror as a router of key layout 1 left it (no hash tags, one namespace-wide scheme)."""
    client.sadd(f"kvr:{ns}:workers", "w1")
    client.hset(f"kvr:{ns}:worker:w1", mapping={"model": "m"})
    client.set(f"kvr:{ns}:generation", "old")
    client.hset(f"kvr:{ns}:target:w1:0:blocks", mapping={5: 11, 6: 12})
    client.hset(f"kvr:{ns}:target:w1:0:stream", mapping={"seq": 4, "epoch": 7, "batches": 5})
    client.hset(f"kvr:{ns}:target:w:x:1:stream", mapping={"seq": 0, "epoch": 2})  # a worker id with ':'
    if scheme is not None:
        client.set(f"kvr:{ns}:hash-scheme", scheme)


def test_a_layout_1_mirror_of_this_scheme_is_migrated(fake_redis) -> None:
    from core.own_block_hash import HASH_SCHEME

    # Given a layout-1 mirror of this router's scheme, and another namespace's layout-1 keys
    _write_layout_1(fake_redis, "mig", scheme=HASH_SCHEME)
    _write_layout_1(fake_redis, "other", scheme=HASH_SCHEME)
    mirror = RedisMirror(client=fake_redis, namespace="mig")
    # Then a warm start loads its targets, now stored in layout 2, and no layout-1 key of it is left
    expected = {("w1", 0): TargetSnapshot("w1", 0, 4, 7, {5: 11, 6: 12}), ("w:x", 1): TargetSnapshot("w:x", 1, 0, 2)}
    assert mirror.load_snapshot() == expected
    assert fake_redis.keys("kvr:mig:*") == []
    assert fake_redis.hget(names.target_blocks_key("mig", "w1", 0), "6") == b"12"
    assert len(fake_redis.keys("kvr:other:*")) == 7
    # And a second warm start reads the same from layout 2 alone
    assert mirror.load_snapshot() == expected


@pytest.mark.parametrize("scheme", [None, "another-scheme"])
def test_a_layout_1_mirror_of_another_scheme_is_deleted(fake_redis, scheme) -> None:
    _write_layout_1(fake_redis, "mig", scheme=scheme)
    mirror = RedisMirror(client=fake_redis, namespace="mig")
    assert mirror.load_snapshot() == {}
    assert fake_redis.keys("*") == []


def test_one_targets_keys_share_a_slot_and_the_registry_one_slot() -> None:
    from redis.crc import key_slot

    def slot(key: str) -> int:
        return key_slot(key.encode())

    for wid, rank in (("w1", 0), ("w:x", 3), ("w}{", 1)):
        assert slot(names.target_blocks_key("ns", wid, rank)) == slot(names.target_stream_key("ns", wid, rank))
    registry = {slot(k) for k in (names.workers_key("ns"), names.worker_key("ns", "w1"),
                                  names.worker_alive_key("ns", "w2"), names.worker_load_key("ns", "w3"),
                                  names.routers_key("ns"), names.mirror_health_key("ns"), names.generation_key("ns"))}
    assert registry == {slot("{ns}")}
    # Targets spread over slots (a cluster's masters): 64 targets land in more than 32 slots
    assert len({slot(names.target_blocks_key("ns", f"w{i}", 0)) for i in range(64)}) > 32
    # The same worker ids in two namespaces land apart
    assert slot(names.target_blocks_key("a", "w1", 0)) != slot(names.target_blocks_key("b", "w1", 0))
