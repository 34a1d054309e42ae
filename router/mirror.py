"""Redis mirror of the router's prefix index and worker registry.

The schema is documented once, in ``bus/names.py``. This class only writes and
reads it. One event batch = one pipeline (one round trip). Redis being away
must never stop routing: every method raises :class:`MirrorUnavailable` (a
single exception type) and the router keeps its in-memory index, marks the
mirror dirty and calls :meth:`RedisMirror.resync` when Redis is back.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis
from redis.crc import key_slot
from redis.exceptions import RedisClusterException, SlotNotCoveredError
from redis.typing import EncodableT, FieldT

from bus import names
from bus.redis_url import LazyRedisCluster, is_cluster, make_client
from bus.schema import Hello, WorkerLoad
from core.own_block_hash import HASH_SCHEME

logger = logging.getLogger(__name__)


def make_redis_client(url: str, *, timeout_s: float = 0.5) -> redis.Redis:
    """A client that fails fast: the router must never stall on Redis. A Redis Cluster URL
    (``redis+cluster://host:port``, ``bus/redis_url.py``) makes a cluster client.

    redis-py retries with backoff by default, which would hold the routing loop
    for seconds while Redis restarts; the mirror instead reports the failure and
    resynchronises later.
    """
    return make_client(url, timeout_s=timeout_s)


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

    On a Redis Cluster ``pool`` is the master serving the slot of every key in the pipeline (one
    target's keys: their hash tag, ``bus/names.py``).
    """

    def __init__(self, pool: redis.ConnectionPool) -> None:
        self._pool = pool
        self._parts: list[bytes] = []
        self._count = 0

    def command(self, name: bytes, *args: bytes, pairs: tuple[int, bytes] | None = None) -> None:
        n_pairs, packed_pairs = pairs if pairs is not None else (0, b"")
        self._parts.append(b"*%d\r\n" % (1 + len(args) + n_pairs) + _bulk(name)
                           + b"".join(_bulk(a) for a in args) + packed_pairs)
        self._count += 1

    def execute(self) -> list:
        pool = self._pool
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


@dataclass(frozen=True)
class BatchWrite:
    """One ``RedisMirror.write_batch`` call's arguments (``kw``: its keyword arguments)."""

    worker_id: str
    dp_rank: int
    kw: dict[str, Any]


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
        except (redis.RedisError, OSError, RedisClusterException) as exc:  # the last is no RedisError
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
        #: The writer lease (``names.mirror_writer_key``): its TTL in ms (0: no lease, a lone router),
        #: and the holder the last ``router_heartbeat`` read ("" none, None: not read yet).
        self.writer_lease_ms = 0
        self.writer: str | None = None
        self._verification: str | None = None  # request_verification's answer until taken
        self._scheme = HASH_SCHEME.encode()  # stamped on every target's stream (bus/names.py)
        self._cluster = is_cluster(client)
        self._slots: dict[bytes, int] = {}  # a key's hash slot never changes: computed once
        self._refresh_slots = False  # a MOVED/ASK reply: refresh the slot map before the next batch

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
        # One key per DEL: a cluster pipeline takes no multi-key DEL (the target's keys are on another slot).
        for key in (names.worker_key(ns, worker_id), names.worker_alive_key(ns, worker_id),
                    names.worker_load_key(ns, worker_id)):
            pipe.delete(key)
        for rank in dp_ranks:
            pipe.delete(names.target_blocks_key(ns, worker_id, rank))
            pipe.delete(names.target_stream_key(ns, worker_id, rank))
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
        batch = BatchWrite(worker_id, dp_rank, dict(seq=seq, epoch=epoch, stored=stored, removed=removed,
                                                    cleared=cleared, num_events=num_events, now_s=now_s))
        self._execute([self._pack_batch(None, batch)])

    @_wrap
    def write_batches(self, batches: Sequence[BatchWrite]) -> None:
        """Several ``write_batch`` calls, in order, in one round trip per Redis (per master of a
        cluster): the background writer's rounds (``router/background_mirror.py``). One failure
        fails them all (each target is then rewritten whole, as after any failed write)."""
        pipes: dict[int, _PackedPipeline] = {}
        # A target's stream hash gets one write per round: its last batch's seq, epoch and time
        # (each overwrites the one before) and the counts added up, after the blocks' commands.
        last: dict[tuple[str, int], tuple[_PackedPipeline, BatchWrite, int, int]] = {}
        for batch in batches:
            pool = self._pool_for(names.target_blocks_key(self.namespace, batch.worker_id,
                                                          batch.dp_rank).encode())
            pipe = pipes[id(pool)] = self._pack_batch(pipes.get(id(pool)), batch, pool, meta=False)
            target = (batch.worker_id, batch.dp_rank)
            _, _, n_batches, n_events = last.get(target, (pipe, batch, 0, 0))
            last[target] = (pipe, batch, n_batches + 1, n_events + batch.kw.get("num_events", 0))
        for pipe, batch, n_batches, n_events in last.values():
            self._pack_meta(pipe, batch, n_batches, n_events)
        self._execute(list(pipes.values()))

    def _pack_batch(self, pipe: _PackedPipeline | None, batch: BatchWrite,
                    pool: redis.ConnectionPool | None = None, *, meta: bool = True) -> _PackedPipeline:
        """``batch``'s commands appended to ``pipe`` (a new one on the batch's Redis if None);
        ``meta``: also its stream hash's (else the caller writes them: ``_pack_meta``)."""
        ns, kw = self.namespace, batch.kw
        blocks_key = names.target_blocks_key(ns, batch.worker_id, batch.dp_rank).encode()
        if pipe is None:
            pipe = _PackedPipeline(pool if pool is not None else self._pool_for(blocks_key))
        if kw.get("cleared"):
            pipe.command(b"DEL", blocks_key)
        removed_fields = [b"%d" % ext for ext in kw.get("removed", ())]
        if removed_fields:
            pipe.command(b"HDEL", blocks_key, *removed_fields)
        stored = kw.get("stored", ())
        pairs = list(stored.items() if isinstance(stored, Mapping) else stored)
        if pairs:
            pipe.command(b"HSET", blocks_key, pairs=_int_pairs(pairs))
        if meta:
            self._pack_meta(pipe, batch, 1, kw.get("num_events", 0))
        return pipe

    def _pack_meta(self, pipe: _PackedPipeline, batch: BatchWrite, n_batches: int, n_events: int) -> None:
        """The stream hash after ``batch``, the last of ``n_batches`` of its target (``n_events`` in all)."""
        kw = batch.kw
        stream_key = names.target_stream_key(self.namespace, batch.worker_id, batch.dp_rank).encode()
        pipe.command(b"HSET", stream_key, b"seq", b"%d" % kw["seq"], b"epoch", b"%d" % kw["epoch"],
                     b"scheme", self._scheme, b"updated_s", repr(kw.get("now_s", 0.0)).encode())
        pipe.command(b"HINCRBY", stream_key, b"batches", b"%d" % n_batches)
        if n_events:
            pipe.command(b"HINCRBY", stream_key, b"events", b"%d" % n_events)

    def _execute(self, pipes: list[_PackedPipeline]) -> None:
        for pipe in pipes:
            try:
                pipe.execute()
            except redis.exceptions.AskError:  # MovedError is one too: the slots were resharded
                self._refresh_slots = True
                raise
            self.round_trips += 1

    def _pool_for(self, slot_key: bytes) -> redis.ConnectionPool:
        """The connection pool of the Redis holding ``slot_key`` (on a cluster, its slot's master)."""
        if not self._cluster:
            return self._r.connection_pool
        lazy: Any = self._r
        cluster = lazy.cluster_client() if isinstance(lazy, LazyRedisCluster) else lazy
        if self._refresh_slots:
            cluster.nodes_manager.initialize()
            self._refresh_slots = False
        slot = self._slots.get(slot_key)
        if slot is None:
            slot = self._slots[slot_key] = key_slot(slot_key)
        nodes = cluster.nodes_manager.slots_cache.get(slot)
        if not nodes:
            raise SlotNotCoveredError(f"slot {slot} is not covered by the cluster")
        node = nodes[0]  # the master
        return (node.redis_connection or cluster.get_redis_connection(node)).connection_pool

    @_wrap
    def clear_target(self, worker_id: str, dp_rank: int, *, epoch: int, seq: int = -1) -> None:
        """The target's cache is gone (reset, restart, unrecoverable gap)."""
        ns = self.namespace
        pipe = self._r.pipeline(transaction=False)
        pipe.delete(names.target_blocks_key(ns, worker_id, dp_rank))
        pipe.hset(names.target_stream_key(ns, worker_id, dp_rank),
                  mapping={"seq": seq, "epoch": epoch, "scheme": self._scheme})
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def replace_target(self, snapshot: TargetSnapshot) -> None:
        """Overwrite a target's mirror with the router's exact view (resync after Redis was away)."""
        self._replace_target(snapshot)

    def _replace_target(self, snapshot: TargetSnapshot) -> None:
        # One MULTI: the target's two keys share a slot (bus/names.py), so a cluster takes it too.
        ns = self.namespace
        blocks_key = names.target_blocks_key(ns, snapshot.worker_id, snapshot.dp_rank)
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(blocks_key)
        items = list(snapshot.blocks.items())
        for start in range(0, len(items), 10_000):
            pipe.hset(blocks_key, mapping=dict(items[start : start + 10_000]))
        pipe.hset(
            names.target_stream_key(ns, snapshot.worker_id, snapshot.dp_rank),
            mapping={"seq": snapshot.seq, "epoch": snapshot.epoch, "scheme": self._scheme},
        )
        pipe.execute()
        self.round_trips += 1

    @_wrap
    def load_snapshot(self) -> dict[tuple[str, int], TargetSnapshot]:
        """Every target's mirrored blocks and stream position (for a warm start).

        SCAN finds the targets (on a Redis Cluster, redis-py scans every master). Blocks hashed
        under another scheme than this router's (``core.own_block_hash.HASH_SCHEME``, recorded in
        each target's stream; none recorded counts as another) are never loaded: their own
        hashes would never equal a request's, and later events would chain from them. Such a
        target's blocks and stream position are deleted instead (the position described those
        blocks). A mirror of key layout 1 is migrated first (``bus/names.py``).
        """
        ns = self.namespace
        self._migrate_layout_1()
        out: dict[tuple[str, int], TargetSnapshot] = {}
        stale: set[tuple[str, int]] = set()
        for key in list(self._r.scan_iter(match=names.target_pattern(ns, "stream"), count=1000)):
            wid, rank = names.parse_target_key(ns, key)
            raw = self._r.hgetall(key)
            if raw.get(b"scheme") != self._scheme:
                stale.add((wid, rank))
                continue
            out[(wid, rank)] = TargetSnapshot(wid, rank, int(raw.get(b"seq", -1)), int(raw.get(b"epoch", 0)))
        for key in list(self._r.scan_iter(match=names.target_pattern(ns, "blocks"), count=1000)):
            wid, rank = names.parse_target_key(ns, key)
            snap = out.get((wid, rank))
            if snap is None:  # no position of this scheme: nothing says what these blocks are
                stale.add((wid, rank))
                continue
            for ext, own in self._r.hscan_iter(key, count=10_000):
                snap.blocks[int(ext)] = int(own)
        if stale:
            keys = [k for t in sorted(stale)
                    for k in (names.target_blocks_key(ns, *t), names.target_stream_key(ns, *t))]
            for start in range(0, len(keys), 1000):
                self._r.delete(*keys[start : start + 1000])  # a cluster client splits it per slot
            logger.warning("Redis mirror holds %d targets of another block-hash scheme than this router's (%s) or "
                           "none: deleted, not loaded", len(stale), HASH_SCHEME)
        self.round_trips += 1
        return out

    def _migrate_layout_1(self) -> None:
        """Rewrite a key-layout-1 mirror of this namespace in layout 2, then delete its keys
        (``bus/names.py``). Targets of another hash scheme are not rewritten."""
        ns = self.namespace
        legacy = list(self._r.scan_iter(match=names.legacy_namespace_pattern(ns), count=1000))
        if not legacy:
            return
        scheme = self._r.get(names.legacy_hash_scheme_key(ns))
        snaps: dict[tuple[str, int], TargetSnapshot] = {}
        if scheme == self._scheme:
            target_prefix = names.legacy_target_prefix(ns)
            for key in legacy:
                text = _text(key)
                if not text.startswith(target_prefix) or not text.endswith((":stream", ":blocks")):
                    continue
                wid, rank = names.legacy_parse_target_key(ns, text)
                snap = snaps.setdefault((wid, rank), TargetSnapshot(wid, rank))
                if text.endswith(":stream"):
                    raw = self._r.hgetall(key)
                    snap.seq, snap.epoch = int(raw.get(b"seq", -1)), int(raw.get(b"epoch", 0))
                else:
                    snap.blocks.update((int(e), int(o)) for e, o in self._r.hscan_iter(key, count=10_000))
            for snap in snaps.values():
                self._replace_target(snap)
        for start in range(0, len(legacy), 1000):
            self._r.delete(*legacy[start : start + 1000])
        logger.warning("Redis mirror of key layout 1 in namespace %s: %d targets rewritten in layout %d, "
                       "%d layout-1 keys deleted%s", ns, len(snaps), names.KEY_LAYOUT, len(legacy),
                       "" if scheme == self._scheme else f" (block-hash scheme {_text(scheme) if scheme else '1'}, "
                       f"not {HASH_SCHEME}: not rewritten)")

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

        On a Redis Cluster one master can restart empty while the others keep their keys, so the
        token is stored once per master (``names.shard_generation_key``) and the generation is
        every master's address and token, in slot order: any master losing its data set changes
        it, and so does a replica taking over a master's slots (a failover may lose the writes
        it had not replicated yet, silently: the router rewrites everything instead).
        """
        ns = self.namespace
        shards = self._shard_generation_keys() if self._cluster else [("", names.generation_key(ns))]
        pipe = self._r.pipeline(transaction=False)
        for _, key in shards:
            pipe.set(key, token, nx=True)
            pipe.get(key)
        pipe.hset(names.routers_key(ns), router_id, now_s)
        lease = names.mirror_writer_key(ns)
        if self.writer_lease_ms:
            pipe.set(lease, router_id, nx=True, px=self.writer_lease_ms)  # taken if free
            pipe.get(lease)
        replies = pipe.execute()
        self.round_trips += 1
        if self.writer_lease_ms:
            holder = replies.pop()
            replies.pop()
            self.writer = _text(holder) if holder is not None else ""
            if self.writer == router_id:  # renew (only the holder does: no other writes the key)
                self._r.pexpire(lease, self.writer_lease_ms)
                self.round_trips += 1
        tokens = [_text(g) if g is not None else "" for g in replies[1:-1:2]]  # each key's GET
        if not self._cluster:
            return tokens[0]
        return ",".join(f"{master}={t}" for (master, _), t in zip(shards, tokens, strict=True))

    def _shard_generation_keys(self) -> list[tuple[str, str]]:
        """``(master, key)``: one generation key per master serving slots, each on that master (by
        the client's slot map), in the order of the masters' first slots."""
        cluster: Any = self._r
        owners = {slot: nodes[0].name for slot, nodes in cluster.nodes_manager.slots_cache.items() if nodes}
        order: dict[str, int] = {}  # master → its first slot
        for slot in sorted(owners):
            order.setdefault(owners[slot], slot)
        keys: dict[str, str] = {}
        n = 0
        while len(keys) < len(order) and n < 100 * 16384:
            key = names.shard_generation_key(self.namespace, n)
            keys.setdefault(owners.get(cluster.keyslot(key), ""), key)
            n += 1
        return [(name, keys[name]) for name in sorted(order, key=order.__getitem__) if name in keys]

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
