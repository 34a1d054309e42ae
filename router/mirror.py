"""Redis mirror of the router's prefix index and worker registry.

The schema is documented once, in ``bus/names.py``. This class only writes and
reads it. One event batch = one pipeline (one round trip). Redis being away
must never stop routing: every method raises :class:`MirrorUnavailable` (a
single exception type) and the router keeps its in-memory index, marks the
mirror dirty and calls :meth:`RedisMirror.resync` when Redis is back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import redis
from redis.typing import EncodableT, FieldT

from bus import names
from bus.schema import Hello, WorkerLoad
from core.own_block_hash import HASH_SCHEME

logger = logging.getLogger(__name__)


def make_redis_client(url: str, *, timeout_s: float = 0.5) -> redis.Redis:
    """A client that fails fast: the router must never stall on Redis.

    redis-py retries with backoff by default, which would hold the routing loop
    for seconds while Redis restarts; the mirror instead reports the failure and
    resynchronises later.
    """
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return redis.Redis.from_url(
        url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s, retry=Retry(NoBackoff(), 0)
    )


def _text(value: bytes | str) -> str:
    """A reply as text (the client does not decode responses; redis-py types them either way)."""
    return value.decode() if isinstance(value, bytes) else value


def _bulk(value: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(value), value)


def _int_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, bytes]:
    """RESP bulk strings of decimal ``field value`` pairs, and how many arguments they are."""
    out = []
    for field_, value in pairs:
        f, v = b"%d" % field_, b"%d" % value
        out.append(b"$%d\r\n%s\r\n$%d\r\n%s\r\n" % (len(f), f, len(v), v))
    return 2 * len(out), b"".join(out)


class _PackedPipeline:
    """Commands packed straight into RESP and sent in one write, replies read in order.

    redis-py's pipeline encodes every argument through several Python calls; on the ingest path
    (thousands of ``field value`` pairs per second of decimal uint64 hashes) that packing cost
    more than applying the batch to the index. This packs the integer pairs with one ``%``
    format each. Same connection pool, same timeouts; a connection that fails is dropped.
    """

    def __init__(self, client: redis.Redis) -> None:
        self._client = client
        self._parts: list[bytes] = []
        self._count = 0

    def command(self, name: bytes, *args: bytes, pairs: tuple[int, bytes] | None = None) -> None:
        n_pairs, packed_pairs = pairs if pairs is not None else (0, b"")
        self._parts.append(b"*%d\r\n" % (1 + len(args) + n_pairs) + _bulk(name)
                           + b"".join(_bulk(a) for a in args) + packed_pairs)
        self._count += 1

    def execute(self) -> list:
        pool = self._client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(self._parts)])
            replies = [conn.read_response() for _ in range(self._count)]
        except BaseException:
            conn.disconnect()  # replies may be half read: never reuse this connection
            raise
        finally:
            pool.release(conn)
        for reply in replies:
            if isinstance(reply, redis.ResponseError):
                raise reply
        return replies


class MirrorUnavailable(RuntimeError):
    """Redis could not be reached or answered with an error."""


@dataclass
class TargetSnapshot:
    """What Redis knows of one (worker, dp_rank) target."""

    worker_id: str
    dp_rank: int
    seq: int = -1
    epoch: int = 0
    blocks: dict[int, int] = field(default_factory=dict)  # external block hash → kvr block hash


def _wrap(func):
    def inner(self, *args, **kwargs):
        try:
            return func(self, *args, **kwargs)
        except (redis.RedisError, OSError) as exc:
            self.failures += 1
            raise MirrorUnavailable(f"redis: {exc}") from exc

    inner.__name__ = func.__name__
    inner.__doc__ = func.__doc__
    return inner


class RedisMirror:
    """Writes index deltas and the worker registry under ``kvr:{namespace}:``."""

    def __init__(self, *, client: redis.Redis, namespace: str = "default") -> None:
        self._r = client
        self.namespace = namespace
        self.failures = 0
        self.round_trips = 0
        self._verification: str | None = None  # request_verification's answer until taken
        # Every write of own hashes also stamps their scheme (bus/names.py): a constant command.
        self._scheme_key = names.hash_scheme_key(namespace).encode()

    # ------------------------------------------------------------------ registry

    @_wrap
    def register_worker(self, hello: Hello, *, now_s: float, ttl_s: float) -> None:
        ns, wid = self.namespace, hello.worker_id
        fields: dict[FieldT, EncodableT] = {
            "model": hello.model,
            "block_size": hello.block_size,
            "num_gpu_blocks": hello.num_gpu_blocks,
            "events_endpoint": hello.events_endpoint,
            "replay_endpoint": hello.replay_endpoint or "",
            "topic": hello.topic,
            "dp_size": hello.dp_size,
            "http_url": hello.http_url or "",
            "profile": hello.profile,
            "engine": hello.engine,
            "epoch": hello.epoch,
            "registered_s": now_s,
        }
        pipe = self._r.pipeline(transaction=False)
        pipe.sadd(names.workers_key(ns), wid)
        pipe.delete(names.worker_key(ns, wid))
        pipe.hset(names.worker_key(ns, wid), mapping=fields)
        pipe.set(names.worker_alive_key(ns, wid), hello.epoch, px=max(1, int(ttl_s * 1000)))
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def touch_worker(self, worker_id: str, *, epoch: int, load: WorkerLoad | None, now_s: float, ttl_s: float) -> None:
        """A heartbeat: refresh the liveness key's expiry and store the load."""
        ns = self.namespace
        pipe = self._r.pipeline(transaction=False)
        pipe.set(names.worker_alive_key(ns, worker_id), epoch, px=max(1, int(ttl_s * 1000)))
        if load is not None:
            pipe.hset(
                names.worker_load_key(ns, worker_id),
                mapping={
                    "running": load.running,
                    "waiting": load.waiting,
                    "queued_prefill_tokens": load.queued_prefill_tokens,
                    "kv_usage": load.kv_usage,
                    "num_free_blocks": load.num_free_blocks,
                    "t_s": now_s,
                },
            )
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def unregister_worker(self, worker_id: str, *, dp_ranks: Iterable[int] = (0,)) -> None:
        """A dead or departed worker: registry entry and its index mirror go."""
        ns = self.namespace
        pipe = self._r.pipeline(transaction=False)
        pipe.srem(names.workers_key(ns), worker_id)
        pipe.delete(names.worker_key(ns, worker_id), names.worker_alive_key(ns, worker_id),
                    names.worker_load_key(ns, worker_id))
        for rank in dp_ranks:
            pipe.delete(names.target_blocks_key(ns, worker_id, rank), names.target_stream_key(ns, worker_id, rank))
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def alive_workers(self) -> dict[str, int]:
        """Registered workers whose liveness key has not expired → epoch."""
        ns = self.namespace
        ids = sorted(_text(w) for w in self._r.smembers(names.workers_key(ns)))
        if not ids:
            return {}
        epochs = self._r.mget([names.worker_alive_key(ns, w) for w in ids])
        self.round_trips += 2
        return {w: int(e) for w, e in zip(ids, epochs, strict=True) if e is not None}  # MGET: one per key

    @_wrap
    def worker_info(self, worker_id: str) -> dict[str, str]:
        raw = self._r.hgetall(names.worker_key(self.namespace, worker_id))
        self.round_trips += 1
        return {_text(k): _text(v) for k, v in raw.items()}

    # ------------------------------------------------------------------ index

    @_wrap
    def write_batch(
        self,
        worker_id: str,
        dp_rank: int,
        *,
        seq: int,
        epoch: int,
        stored: Mapping[int, int] | Iterable[tuple[int, int]] = (),
        removed: Iterable[int] = (),
        cleared: bool = False,
        num_events: int = 0,
        now_s: float = 0.0,
    ) -> None:
        """Mirror one applied event batch in one round trip.

        Order inside the batch is preserved by applying ``cleared`` first, then
        removals, then stores: callers pass the *net* delta of the batch (a
        block stored then removed in the same batch appears in neither list).
        """
        ns = self.namespace
        blocks_key = names.target_blocks_key(ns, worker_id, dp_rank).encode()
        stream_key = names.target_stream_key(ns, worker_id, dp_rank).encode()
        pipe = _PackedPipeline(self._r)
        if cleared:
            pipe.command(b"DEL", blocks_key)
        removed_fields = [b"%d" % ext for ext in removed]
        if removed_fields:
            pipe.command(b"HDEL", blocks_key, *removed_fields)
        pairs = list(stored.items() if isinstance(stored, Mapping) else stored)
        if pairs:
            pipe.command(b"HSET", blocks_key, pairs=_int_pairs(pairs))
            pipe.command(b"SET", self._scheme_key, HASH_SCHEME.encode())
        pipe.command(b"HSET", stream_key, b"seq", b"%d" % seq, b"epoch", b"%d" % epoch,
                     b"updated_s", repr(now_s).encode())
        pipe.command(b"HINCRBY", stream_key, b"batches", b"1")
        if num_events:
            pipe.command(b"HINCRBY", stream_key, b"events", b"%d" % num_events)
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def clear_target(self, worker_id: str, dp_rank: int, *, epoch: int, seq: int = -1) -> None:
        """The target's cache is gone (reset, restart, unrecoverable gap)."""
        ns = self.namespace
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(names.target_blocks_key(ns, worker_id, dp_rank))
        pipe.hset(names.target_stream_key(ns, worker_id, dp_rank), mapping={"seq": seq, "epoch": epoch})
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def replace_target(self, snapshot: TargetSnapshot) -> None:
        """Overwrite a target's mirror with the router's exact view (resync after Redis was away)."""
        ns = self.namespace
        blocks_key = names.target_blocks_key(ns, snapshot.worker_id, snapshot.dp_rank)
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(blocks_key)
        items = list(snapshot.blocks.items())
        for start in range(0, len(items), 10_000):
            pipe.hset(blocks_key, mapping=dict(items[start : start + 10_000]))
        pipe.hset(
            names.target_stream_key(ns, snapshot.worker_id, snapshot.dp_rank),
            mapping={"seq": snapshot.seq, "epoch": snapshot.epoch},
        )
        pipe.set(self._scheme_key, HASH_SCHEME)
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def load_snapshot(self) -> dict[tuple[str, int], TargetSnapshot]:
        """Every target's mirrored blocks and stream position (for a warm start).

        Blocks hashed under another scheme than this router's (``core.own_block_hash.HASH_SCHEME``; none
        recorded means the first scheme) are never loaded: their own hashes would never equal
        a request's, and later events would chain from them. Every target's blocks and stream
        position are deleted instead (nothing is resumed: the stored positions described those
        blocks), and this router's scheme is recorded.
        """
        ns = self.namespace
        block_keys = list(self._r.scan_iter(match=names.target_pattern(ns, "blocks"), count=1000))
        scheme = self._r.get(self._scheme_key)
        scheme = scheme.decode() if isinstance(scheme, bytes) else scheme
        if block_keys and scheme != HASH_SCHEME:
            stream_keys = list(self._r.scan_iter(match=names.target_pattern(ns, "stream"), count=1000))
            self._r.delete(*block_keys, *stream_keys)
            logger.warning("Redis mirror holds block hashes of scheme %s, this router uses %s: %d targets' "
                           "mirrors deleted, not loaded", scheme or "1 (unrecorded)", HASH_SCHEME, len(block_keys))
            block_keys = []
        self._r.set(self._scheme_key, HASH_SCHEME)
        out: dict[tuple[str, int], TargetSnapshot] = {}
        for key in self._r.scan_iter(match=names.target_pattern(ns, "stream"), count=1000):
            wid, rank = names.parse_target_key(ns, key)
            raw = self._r.hgetall(key)
            out[(wid, rank)] = TargetSnapshot(wid, rank, int(raw.get(b"seq", -1)), int(raw.get(b"epoch", 0)))
        for key in block_keys:
            wid, rank = names.parse_target_key(ns, key)
            snap = out.setdefault((wid, rank), TargetSnapshot(wid, rank))
            for ext, own in self._r.hscan_iter(key, count=10_000):
                snap.blocks[int(ext)] = int(own)
        self.round_trips += 1
        return out

    @_wrap
    def target_block_counts(self) -> dict[tuple[str, int], int]:
        ns = self.namespace
        keys = list(self._r.scan_iter(match=names.target_pattern(ns, "blocks"), count=1000))
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            pipe.hlen(key)
        counts = pipe.execute()
        # One HLEN reply per key.
        return {names.parse_target_key(ns, k): n for k, n in zip(keys, counts, strict=True)}

    @_wrap
    def router_heartbeat(self, router_id: str, *, now_s: float, token: str) -> str:
        """Record this router as alive and return the generation of the Redis data set.

        ``token`` must be new on every call (a router re-setting its own old token after a
        restart would miss the change). The generation is a token stored once per data set
        (``SET NX``): the first router to write it wins and every router reads the same value
        back. It disappears when Redis restarts without persistence or is flushed, so a router
        seeing a *different* value than last time knows everything it mirrored is gone and must
        be rewritten, even though no write ever failed (redis-py reconnects silently).
        """
        ns = self.namespace
        key = names.generation_key(ns)
        pipe = self._r.pipeline(transaction=False)
        pipe.set(key, token, nx=True)
        pipe.get(key)
        pipe.hset(names.routers_key(ns), router_id, now_s)
        _, generation, _ = pipe.execute()
        self.round_trips += 1
        return generation.decode() if isinstance(generation, bytes) else str(generation)

    def take_write_failures(self) -> MirrorUnavailable | None:
        """Writes that failed without their caller hearing of it: never here (every method raises).

        ``BackgroundMirror`` overrides it; the service asks both kinds with each mirror check.
        """
        return None

    @_wrap
    def record_health(self, router_id: str, status_json: str) -> None:
        """Store this router's mirror health for ``kvr inspect`` (``names.mirror_health_key``)."""
        self._r.hset(names.mirror_health_key(self.namespace), router_id, status_json)
        self.round_trips += 1

    def request_verification(self, *, blocks: Mapping[tuple[str, int], int], workers: Iterable[str]) -> None:
        """Compare what Redis holds with ``blocks`` (per target) and ``workers`` (alive); the answer
        is kept for :meth:`take_verification`. Synchronous here; ``BackgroundMirror`` queues it
        after every write made before it."""
        self._verification = self.verify(blocks, set(workers))

    def take_verification(self) -> str | None:
        """The last verification's answer, once: ``""`` Redis matched, else what did not;
        ``None``: no answer yet."""
        result, self._verification = self._verification, None
        return result

    def verify(self, blocks: Mapping[tuple[str, int], int], workers: set[str]) -> str:
        """What Redis holds that differs from the router's view (``""``: nothing): a rewrite is
        only known to have landed once read back (a queued write may still fail)."""
        try:
            counts = self.target_block_counts()
            alive = self.alive_workers()
        except MirrorUnavailable as exc:
            return f"could not read it back: {exc}"
        wrong = sorted(f"{names.target_name(*t)} holds {counts.get(t, 0)} blocks, not {n}"
                       for t, n in blocks.items() if counts.get(t, 0) != n)
        wrong += [f"worker {w} not registered alive" for w in sorted(workers - set(alive))]
        return "; ".join(wrong[:3]) + (f" (+{len(wrong) - 3} more)" if len(wrong) > 3 else "")

    @_wrap
    def ping(self) -> bool:
        return bool(self._r.ping())
