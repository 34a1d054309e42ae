"""The embedded default Redis, both kinds, as real child processes on loopback."""

from __future__ import annotations

import shutil

import pytest

from bus.redis_server import EmbeddedRedis, embedded_redis_argv, ping, resolve_kind
from bus.schema import Hello
from router.mirror import RedisMirror, make_redis_client

pytestmark = pytest.mark.integration


def test_kind_resolution_and_argv(monkeypatch):
    assert resolve_kind("fakeredis") == "fakeredis"
    monkeypatch.setattr(shutil, "which", lambda name: None)
    assert resolve_kind("auto") == "fakeredis"
    kind, argv = embedded_redis_argv(7001)
    assert kind == "fakeredis" and argv[1:] == ["-m", "bus.redis_server", "--port", "7001"]
    with pytest.raises(FileNotFoundError):
        embedded_redis_argv(7001, kind="redis-server")
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/redis-server")
    kind, argv = embedded_redis_argv(7002, workdir="/tmp/x")
    assert kind == "redis-server"
    assert argv == ["/usr/bin/redis-server", "--port", "7002", "--bind", "127.0.0.1", "--save", "", "--appendonly",
                    "no", "--dir", "/tmp/x"]
    with pytest.raises(ValueError):
        resolve_kind("memcached")


@pytest.mark.parametrize("kind", ["fakeredis", "redis-server"])
def test_embedded_redis_serves_the_mirror_and_stops(kind):
    if kind == "redis-server" and shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed")
    with EmbeddedRedis(kind=kind) as r:
        assert r.kind == kind
        mirror = RedisMirror(client=make_redis_client(r.url, timeout_s=2.0), namespace="t")
        hello = Hello(worker_id="w1", epoch=3, model="m", block_size=16, num_gpu_blocks=100, events_endpoint="tcp://x:1")
        mirror.register_worker(hello, now_s=1.0, ttl_s=30.0)
        mirror.write_batch("w1", 0, seq=5, epoch=3, stored={11: 22, 33: 44}, num_events=2)
        assert mirror.alive_workers() == {"w1": 3}
        assert mirror.target_block_counts() == {("w1", 0): 2}
        snap = mirror.load_snapshot()[("w1", 0)]
        assert (snap.seq, snap.epoch, snap.blocks) == (5, 3, {11: 22, 33: 44})
        url = r.url
    assert not ping(url, timeout_s=0.2)


def test_fakeredis_server_turns_nagle_off_on_every_connection():
    import socket

    from bus.redis_server import make_fakeredis_server

    server = make_fakeredis_server("127.0.0.1", 0)
    try:
        client = socket.create_connection(server.server_address[:2])
        conn, _ = server.get_request()
        try:
            assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
        finally:
            conn.close()
            client.close()
    finally:
        server.server_close()
