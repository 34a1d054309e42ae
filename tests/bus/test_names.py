"""bus/names.py's key layout (SCAN patterns match exactly their keys) and bus/redis_url.py's URL forms."""

from __future__ import annotations

import pytest
import redis

from bus import names
from bus.redis_url import LazyRedisCluster, cluster_url, is_cluster, is_cluster_url, make_client, node_url, redact_url


def _every_key(ns: str) -> list[str]:
    return [names.workers_key(ns), names.worker_key(ns, "w1"), names.worker_alive_key(ns, "w1"),
            names.worker_load_key(ns, "w1"), names.routers_key(ns), names.mirror_health_key(ns),
            names.generation_key(ns), names.shard_generation_key(ns, 3),
            names.target_stream_key(ns, "w1", 0), names.target_blocks_key(ns, "w:x", 2),
            names.target_blocks_key(ns, "stream", 1)]


def test_patterns_match_exactly_their_keys(fake_redis) -> None:
    # Given every kind of key of namespace "t", of a namespace "tt" it prefixes, and layout-1 keys
    for key in _every_key("t") + _every_key("tt") + ["kvr:t:workers", "kvr:t:target:w1:0:blocks"]:
        fake_redis.set(key, 1)

    def scan(pattern: str) -> set[str]:
        return {k.decode() for k in fake_redis.scan_iter(match=pattern)}

    assert scan(names.target_pattern("t", "blocks")) == {names.target_blocks_key("t", "w:x", 2),
                                                         names.target_blocks_key("t", "stream", 1)}
    assert scan(names.target_pattern("t", "stream")) == {names.target_stream_key("t", "w1", 0)}
    assert scan(names.namespace_pattern("t")) == set(_every_key("t"))
    assert scan(names.legacy_namespace_pattern("t")) == {"kvr:t:workers", "kvr:t:target:w1:0:blocks"}
    assert names.parse_target_key("t", names.target_blocks_key("t", "w:x", 2)) == ("w:x", 2)
    assert names.legacy_parse_target_key("t", "kvr:t:target:w:x:2:blocks") == ("w:x", 2)


def test_cluster_urls() -> None:
    assert is_cluster_url("redis+cluster://h:7000") and is_cluster_url("REDISS+CLUSTER://h:7000")
    assert not is_cluster_url("redis://h:6379/0") and not is_cluster_url("unix:///tmp/r.sock")
    assert node_url("rediss+cluster://u:pw@h:7000") == "rediss://u:pw@h:7000"
    assert node_url("redis://h:1/2") == "redis://h:1/2"
    assert cluster_url("127.0.0.1", 7000) == "redis+cluster://127.0.0.1:7000"
    assert redact_url("redis+cluster://:s3cret@h:7000") == "redis+cluster://:***@h:7000"


def test_a_cluster_client_is_made_lazily_and_an_unreachable_cluster_is_a_connection_error() -> None:
    from bus.redis_server import free_cluster_node_port

    client = make_client(f"redis+cluster://:pw@127.0.0.1:{free_cluster_node_port()}", timeout_s=0.2)
    assert isinstance(client, LazyRedisCluster) and is_cluster(client)
    for _ in range(2):  # each use tries again
        with pytest.raises(redis.ConnectionError, match=r"\*\*\*") as exc:
            client.ping()
        assert "pw" not in str(exc.value)
    client.close()
    assert not is_cluster(make_client("redis://127.0.0.1:1/0"))


def test_a_cluster_refusing_the_credentials_raises_the_refusal_not_a_plain_connection_error() -> None:
    from redis.exceptions import RedisClusterException

    def refused():
        try:
            raise redis.AuthenticationError("invalid username-password pair")
        except redis.AuthenticationError as exc:
            raise RedisClusterException("Redis Cluster cannot be connected") from exc

    def down():
        raise RedisClusterException("Redis Cluster cannot be connected")

    with pytest.raises(redis.AuthenticationError):
        LazyRedisCluster(refused, url="redis+cluster://:pw@h:7000").ping()
    with pytest.raises(redis.ConnectionError) as exc:
        LazyRedisCluster(down, url="redis+cluster://:pw@h:7000").ping()
    assert type(exc.value) is redis.ConnectionError
