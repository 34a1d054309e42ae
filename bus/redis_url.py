"""Redis URLs: a single server or a Redis Cluster, the one client factory, and redaction for logs.

A URL names a single Redis exactly as redis-py takes it (``redis://``, ``rediss://`` for TLS,
``unix://``). A Redis Cluster is named by the same URL with ``+cluster`` in its scheme:

    redis+cluster://[[user]:[password]@]host:port      any node of the cluster (the others are found)
    rediss+cluster://...                               the same over TLS

The scheme, not a query option, says "cluster" so that it is visible wherever the URL is printed
(redacted) and so that a single-server client never silently talks to one cluster node (it would
answer ``MOVED`` for most keys). A cluster has one database: a path or ``db`` other than 0 is refused.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import urlsplit, urlunsplit

if TYPE_CHECKING:
    import redis

CLUSTER_SCHEMES = {"redis+cluster": "redis", "rediss+cluster": "rediss"}


def redact_url(url: str) -> str:
    """``url`` with its password replaced by ``***`` (unchanged when it has none)."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def is_cluster_url(url: str) -> bool:
    """True when ``url`` names a Redis Cluster (``redis+cluster://``, ``rediss+cluster://``)."""
    return urlsplit(url).scheme.lower() in CLUSTER_SCHEMES


def node_url(url: str) -> str:
    """The plain ``redis://``/``rediss://`` URL of a cluster URL's seed node (other URLs unchanged)."""
    parts = urlsplit(url)
    scheme = CLUSTER_SCHEMES.get(parts.scheme.lower())
    return url if scheme is None else urlunsplit(parts._replace(scheme=scheme))


def cluster_url(host: str, port: int) -> str:
    """The cluster URL of a seed node."""
    return f"redis+cluster://{host}:{port}"


class LazyRedisCluster:
    """A ``redis.cluster.RedisCluster`` made on its first use, then every attribute forwarded to it.

    redis-py's cluster client asks a node for the slot map when it is *made*, so a cluster that
    is down would make ``make_client`` raise; a single-server client connects lazily, and the
    router must start (and route from memory) while Redis is away. Until a node answers, every
    use raises ``redis.ConnectionError`` (and the next use tries again).
    """

    def __init__(self, factory: Callable[[], Any], *, url: str) -> None:
        self._factory = factory
        self._url = url
        self._client: Any = None
        self._lock = threading.Lock()

    def cluster_client(self) -> Any:
        """The ``RedisCluster`` (made now if it was not yet)."""
        if self._client is None:
            from redis.exceptions import RedisClusterException

            with self._lock:
                if self._client is None:
                    try:
                        self._client = self._factory()
                    except RedisClusterException as exc:  # not a RedisError: callers catch those
                        raise _refusal_class(exc)(f"Redis Cluster at {redact_url(self._url)}: {exc}") from exc
        return self._client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.cluster_client(), name)

    def close(self) -> None:
        if self._client is not None:
            self._client.close()


def _refusal_class(exc: BaseException) -> type[Exception]:
    """What a failure to reach a cluster is raised as: the credentials' refusal class it came
    from (a caller refuses to start on those: waiting will not heal them), else ConnectionError."""
    import redis

    auth = (redis.AuthenticationError, redis.exceptions.AuthorizationError, redis.exceptions.NoPermissionError)
    seen: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in seen:
        if isinstance(cause, auth):
            return type(cause)
        seen.append(cause)
        cause = cause.__cause__ or cause.__context__
    return redis.ConnectionError


def is_cluster(client: object) -> bool:
    """True when ``client`` is a Redis Cluster client (``make_client`` of a cluster URL)."""
    from redis.cluster import RedisCluster

    return isinstance(client, (RedisCluster, LazyRedisCluster))


def make_client(url: str, *, timeout_s: float = 0.5, retries: int = 0) -> redis.Redis:
    """A client for ``url`` that fails fast (no retry, no backoff unless ``retries``): a
    ``redis.Redis``, or for a cluster URL a :class:`LazyRedisCluster` (typed as the single-server
    client it behaves as for every command kvr sends; it connects on first use)."""
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    if not is_cluster_url(url):
        return redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                    retry=Retry(NoBackoff(), retries))
    from redis.cluster import RedisCluster

    def factory() -> RedisCluster:
        return RedisCluster.from_url(node_url(url), socket_timeout=timeout_s, socket_connect_timeout=timeout_s,
                                     retry=Retry(NoBackoff(), retries))

    return cast("redis.Redis", LazyRedisCluster(factory, url=url))
