"""KV-event ingestion: one ``EventSubscriber`` per target, applied to the index and the mirror.

For each (worker, dp_rank) named by a worker's ``Hello`` this module owns one subscriber on
the worker's KV-event endpoint (vLLM's DP port offset per rank) and turns its stream items into
index changes:

* ``AppliedBatch``: every event is applied to the prefix index; the batch's *net* change
  (a block stored then removed in the same batch is in neither list) goes to Redis in one
  pipeline together with the batch's seq and the worker's epoch;
* ``StreamReset`` (the publisher restarted): the target is cleared (a restarted engine starts
  with an empty cache) and stays ``fresh``;
* ``GapLost`` (batches gone for good): the target is cleared, so it can never produce a false
  hit, and marked ``resyncing`` for ``resync_s`` while it re-learns;
* ``BadBatch``: counted and logged.

While a replay is in flight the target is ``resyncing``. Redis being away never stops
ingestion: the mirror is marked dirty and rewritten from the index when it answers again.
One thread owns this object (ZMQ sockets are not thread-safe).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from bus.schema import Hello
from bus.security import Curve
from bus.sockets import MAX_EVENT_BYTES, connectable, offset_endpoint_for_dp_rank, vllm_binds
from bus.subscriber import AppliedBatch, BadBatch, EventSubscriber, GapLost, StreamReset
from core.prefix_index import Confidence, IndexDelta, PrefixIndex, WorkerKey
from router.mirror import MirrorUnavailable, RedisMirror, TargetSnapshot

logger = logging.getLogger(__name__)

DEFAULT_RESYNC_S = 10.0
#: After a failed Redis write, dirty targets are not rewritten for this long: against a Redis that
#: hangs (SIGSTOP, partition) each try costs the loop the whole socket timeout.
MIRROR_RETRY_S = 1.0


@dataclass
class TargetStream:
    """Ingestion state and counters of one target (shown by ``WorkerSample``)."""

    target: WorkerKey
    epoch: int
    subscriber: EventSubscriber
    events_applied: int = 0
    batches: int = 0
    last_seq: int = -1
    last_batch_ts: float = 0.0
    event_lag_s: float = 0.0
    gaps: int = 0
    resets: int = 0
    bad_batches: int = 0
    resync_until_s: float = 0.0
    stored_blocks: int = 0
    removed_blocks: int = 0
    mirror_dirty: bool = False


def _clear_target(target: WorkerKey, *, epoch: int) -> Callable[[RedisMirror], None]:
    """The mirror write that empties one target, as ``EventIngest._mirror`` takes it (a closure
    over its own arguments, so one made in a loop does not see the loop's later values)."""
    return lambda m: m.clear_target(target.worker_id, target.dp_rank, epoch=epoch)


def net_change(index: PrefixIndex, target: WorkerKey, delta: IndexDelta) -> tuple[dict[int, int], set[int], bool]:
    """A batch's net change on one target: ``(stored ext → own, removed exts, cleared)``.

    Read off the index *after* the batch, which is what Redis must end up holding: an external
    hash the batch touched is stored if the target maps it now, removed otherwise (a block stored
    then evicted in the same batch is a harmless HDEL of an absent field). With a clear in the
    batch, the mirror deletes the target first and then writes what is present.
    """
    stored: dict[int, int] = {}
    removed: set[int] = set()
    own_of = index.external_map(target).get  # one target lookup per batch, not per block
    for entries in (delta.stored, delta.removed):
        for _, ext, _own in entries:
            if ext in stored or ext in removed:
                continue
            own = own_of(ext)
            if own is None:
                removed.add(ext)
            else:
                stored[ext] = own
    return stored, removed, bool(delta.cleared)


class EventIngest:
    """Subscribers for every registered target, feeding one ``PrefixIndex`` (and Redis)."""

    def __init__(
        self,
        *,
        index: PrefixIndex,
        poller: zmq.Poller,
        ctx: zmq.Context,
        mirror: RedisMirror | None = None,
        resync_s: float = DEFAULT_RESYNC_S,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        replay_timeout_ms: int = 1000,
        curve: Curve | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        on_mirror_failure: Callable[[BaseException], None] | None = None,
    ) -> None:
        """``on_mirror_failure``: told of every failed mirror write (the service's ``MirrorSync``
        degrades the mirror's health by it; the target itself is rewritten here, later)."""
        self.index = index
        self._on_mirror_failure = on_mirror_failure
        self._curve = curve
        self._max_event_bytes = max_event_bytes
        self.mirror = mirror
        self.resync_s = resync_s
        self._poller = poller
        self._ctx = ctx
        self._clock = clock
        self._wall = wall
        self._replay_timeout_ms = replay_timeout_ms
        self.streams: dict[WorkerKey, TargetStream] = {}
        self._by_socket: dict[zmq.Socket, TargetStream] = {}
        # Each stream's next deadline (inf: none), refreshed whenever its subscriber ran: the loop
        # asks for the soonest every turn, and asking every subscriber was O(workers) per turn.
        # Invariant: a subscriber's deadline changes only in handle, tick and add_worker.
        self._due: dict[WorkerKey, float] = {}
        self.mirror_failures = 0
        #: False while another router replica holds the mirror's writer lease (router/mirror_sync.py):
        #: this one then writes no targets' blocks or streams (it would race the writer on the same keys).
        self.mirror_writes = True
        #: While this router holds the writer lease: until when (clock) it is surely still held, as
        #: of the last renewal; past it (a stalled loop: the lease may have gone to another replica)
        #: writes are held back and the targets marked dirty, rewritten once the lease is confirmed.
        #: None: no lease in force (a lone router without one, a benchmark, a test).
        self.mirror_writes_until: float | None = None
        self._mirror_retry_at = 0.0  # no rewrite of dirty targets before this (clock)

    # ------------------------------------------------------------------ warm start

    def warm_start(self) -> dict[WorkerKey, TargetSnapshot]:
        """Load Redis's index mirror into the index (targets ``resyncing`` until their worker says Hello)."""
        if self.mirror is None:
            return {}
        try:
            snaps = self.mirror.load_snapshot()
        except MirrorUnavailable as exc:
            logger.warning("warm start skipped, Redis unavailable: %s", exc)
            return {}
        from core.prefix_index import SnapshotBlocks

        out = {}
        for (wid, rank), snap in snaps.items():
            target = WorkerKey(wid, rank)
            pairs = sorted(snap.blocks.items())
            self.index.apply(target, SnapshotBlocks([e for e, _ in pairs], [o for _, o in pairs]), now=self._clock())
            self.index.set_confidence(target, Confidence.RESYNCING)
            out[target] = snap
        logger.info("warm start: %d targets, %d blocks from Redis", len(out), self.index.total_blocks())
        return out

    # ------------------------------------------------------------------ workers

    def add_worker(self, hello: Hello, *, resume: dict[int, TargetSnapshot] | None = None) -> list[WorkerKey]:
        """Subscribe to every DP rank of a worker. ``resume[rank]`` continues from a stored seq.

        A stored position of another epoch (the worker restarted) is discarded with the index
        entries it described.
        """
        self.remove_worker(hello.worker_id)
        if hello.events_curve_key and self._curve is None:
            logger.warning("worker %s publishes KV events over CURVE but this router has no keys (--curve-dir): "
                           "its events cannot be read", hello.worker_id)
        elif self._curve is not None and not hello.events_curve_key:
            logger.warning("worker %s: plain (unauthenticated) KV-event socket, as real vLLM's: keep it on a "
                           "private network (docs/security.md)", hello.worker_id)
        targets = []
        for rank in range(max(1, hello.dp_size)):
            target = WorkerKey(hello.worker_id, rank)
            snap = (resume or {}).get(rank)
            expected = None
            if snap is not None and snap.epoch == hello.epoch and snap.seq >= 0:
                expected = snap.seq + 1
            else:
                self.index.clear_target(target)
                self._mirror(_clear_target(target, epoch=hello.epoch))
            self.index.set_confidence(target, Confidence.FRESH if expected is None else Confidence.RESYNCING)
            endpoint = offset_endpoint_for_dp_rank(hello.events_endpoint, rank)
            # Hello advertises where *the router* subscribes (worker/vllm/checks.py): a host means
            # the publisher binds there and we connect; a wildcard means the publisher dials us.
            bind = vllm_binds(endpoint)
            replay = hello.replay_endpoint
            if replay is not None:
                replay = connectable(offset_endpoint_for_dp_rank(replay, rank))
            sub = EventSubscriber(
                endpoint=endpoint, replay_endpoint=replay, topic=hello.topic,
                bind=bind, ctx=self._ctx, expected_seq=expected, replay_timeout_ms=self._replay_timeout_ms,
                clock=self._clock, name=str(target), max_msg_size=self._max_event_bytes,
                # CURVE when the worker's event sockets are CURVE servers (bus/security.py)
                curve=self._curve, server_key=hello.events_curve_key or None)
            sub.attach(self._poller)
            stream = TargetStream(target, hello.epoch, sub, last_seq=-1 if expected is None else expected - 1)
            self.streams[target] = stream
            self._note_due(stream)
            targets.append(target)
        self._reindex()
        return targets

    def remove_worker(self, worker_id: str) -> list[WorkerKey]:
        gone = [t for t in self.streams if t.worker_id == worker_id]
        for target in gone:
            stream = self.streams.pop(target)
            self._due.pop(target, None)
            stream.subscriber.close()
        if gone:
            self._reindex()
        return gone

    def _reindex(self) -> None:
        self._by_socket = {s: st for st in self.streams.values() for s in st.subscriber.sockets()}

    # ------------------------------------------------------------------ loop hooks

    def handle(self, sock: zmq.Socket) -> bool:
        """Consume a readable socket if it is one of ours."""
        stream = self._by_socket.get(sock)
        if stream is None:
            self._reindex()  # a replay DEALER may have been replaced
            stream = self._by_socket.get(sock)
            if stream is None:
                return False
        try:
            for item in stream.subscriber.handle_readable(sock):
                self._on_item(stream, item)
        finally:
            self._note_due(stream)
        return True

    def _note_due(self, stream: TargetStream) -> None:
        if self.streams.get(stream.target) is stream:  # not removed meanwhile
            due = stream.subscriber.next_deadline_s()
            self._due[stream.target] = math.inf if due is None else due

    def tick(self) -> None:
        """Replay timeouts, confidence upkeep, and a dirty mirror's resync."""
        now = self._clock()
        replaced = False
        for stream in list(self.streams.values()):
            before = stream.subscriber.sockets()
            for item in stream.subscriber.check_timeouts():
                self._on_item(stream, item)
            replaced |= before != stream.subscriber.sockets()
            self._note_due(stream)
            self._update_confidence(stream, now)
            if stream.mirror_dirty and now >= self._mirror_retry_at:
                self._resync_mirror(stream)
        if replaced:
            self._reindex()

    def mark_mirror_lost(self) -> None:
        """Redis lost what was mirrored (restart, flush): rewrite every target on the next tick."""
        self._mirror_retry_at = 0.0  # Redis answered just now: no reason to wait
        for stream in self.streams.values():
            stream.mirror_dirty = True

    def next_deadline_s(self) -> float | None:
        due = min(self._due.values(), default=math.inf)
        return None if due == math.inf else due

    def close(self) -> None:
        for stream in self.streams.values():
            stream.subscriber.close()
        self.streams.clear()
        self._due.clear()
        self._by_socket.clear()

    # ------------------------------------------------------------------ items

    def _on_item(self, stream: TargetStream, item) -> None:
        target = stream.target
        now = self._clock()
        if isinstance(item, AppliedBatch):
            # The batch's delta and net change are for the mirror only: not recorded without one, or
            # on a replica that does not write it (a tuple per block, and 13 % of the ingest path).
            # The index's counters give the same block counts (each is counted where it is recorded).
            if not stream.mirror_dirty and self.mirror is not None and self.mirror_writes:
                delta: IndexDelta | None = IndexDelta()
            else:
                delta = None
                counters = self.index.counters
                stored0, removed0 = counters["stored_blocks"], counters["removed_blocks"]
            self.index.apply_events(target, item.batch.events, now=now, delta=delta)
            if delta is not None:
                stream.stored_blocks += len(delta.stored)
                stream.removed_blocks += len(delta.removed)
            else:
                stream.stored_blocks += counters["stored_blocks"] - stored0
                stream.removed_blocks += counters["removed_blocks"] - removed0
            stream.batches += 1
            stream.events_applied += len(item.batch.events)
            stream.last_seq = item.seq
            stream.last_batch_ts = item.batch.ts
            stream.event_lag_s = max(0.0, self._wall() - item.batch.ts)
            if delta is not None:
                net_stored, net_removed, cleared = net_change(self.index, target, delta)
                self._mirror(lambda m: m.write_batch(
                    target.worker_id, target.dp_rank, seq=item.seq, epoch=stream.epoch, stored=net_stored,
                    removed=net_removed, cleared=cleared, num_events=len(item.batch.events), now_s=self._wall()),
                    stream)
        elif isinstance(item, StreamReset):
            stream.resets += 1
            stream.last_seq = -1
            logger.warning("%s: event stream restarted (seq %s after %s): index cleared", target, item.new_seq,
                           item.old_seq)
            self.index.clear_target(target)
            self._mirror(lambda m: m.clear_target(target.worker_id, target.dp_rank, epoch=stream.epoch), stream)
        elif isinstance(item, GapLost):
            stream.gaps += 1
            logger.warning("%s: event batches %d..%d lost for good: index cleared, resyncing", target,
                           item.from_seq, item.to_seq)
            self._clear_and_resync(stream, now)
        elif isinstance(item, BadBatch):
            stream.bad_batches += 1
            logger.warning("%s: undecodable event batch seq %d: %s", target, item.seq, item.reason)
        self._update_confidence(stream, now)

    def resync_target(self, target: WorkerKey) -> bool:
        """Entries of ``target`` proven wrong (``core/trust.py``: its reports fall short of them):
        cleared and re-learned as after a lost gap, ``resyncing`` for ``resync_s``. False: not ours."""
        stream = self.streams.get(target)
        if stream is None:
            return False
        now = self._clock()
        self._clear_and_resync(stream, now)
        self._update_confidence(stream, now)
        return True

    def _clear_and_resync(self, stream: TargetStream, now: float) -> None:
        """The index can never produce a false hit from what was cleared; the target re-learns
        from its next events while ``resyncing``."""
        target = stream.target
        self.index.clear_target(target)
        stream.resync_until_s = now + self.resync_s
        self._mirror(lambda m: m.clear_target(target.worker_id, target.dp_rank, epoch=stream.epoch,
                                              seq=stream.last_seq), stream)

    def _update_confidence(self, stream: TargetStream, now: float) -> None:
        resyncing = stream.subscriber.replay_in_flight or now < stream.resync_until_s
        current = self.index.confidence(stream.target)
        if current is Confidence.STALE:
            return  # the service owns staleness (heartbeats); it restores fresh itself
        self.index.set_confidence(stream.target, Confidence.RESYNCING if resyncing else Confidence.FRESH)

    # ------------------------------------------------------------------ mirror

    def _mirror(self, write: Callable[[RedisMirror], None], stream: TargetStream | None = None) -> None:
        """``write`` to the mirror, if there is one; a failure marks ``stream`` dirty (rewritten later)."""
        if self.mirror is None or not self.mirror_writes:
            return
        if self.mirror_writes_until is not None and self._clock() >= self.mirror_writes_until:
            if stream is not None:
                stream.mirror_dirty = True  # owed: rewritten whole once the lease is confirmed
            return
        try:
            write(self.mirror)
        except MirrorUnavailable as exc:
            self.mirror_failures += 1
            self._mirror_retry_at = self._clock() + MIRROR_RETRY_S
            if self._on_mirror_failure is not None:
                self._on_mirror_failure(exc)
            if stream is not None:
                if not stream.mirror_dirty:  # the service logs the degradation once (router/mirror_health.py)
                    logger.debug("%s: Redis write failed (%s); will rewrite the target when it is back",
                                 stream.target, exc)
                stream.mirror_dirty = True

    def _resync_mirror(self, stream: TargetStream) -> None:
        if self.mirror is None or not self.mirror_writes:
            return
        if self.mirror_writes_until is not None and self._clock() >= self.mirror_writes_until:
            return  # stays dirty until the lease is confirmed
        t = stream.target
        snap = TargetSnapshot(t.worker_id, t.dp_rank, stream.last_seq, stream.epoch, dict(self.index.snapshot(t)))
        try:
            self.mirror.replace_target(snap)
        except MirrorUnavailable as exc:
            self._mirror_retry_at = self._clock() + MIRROR_RETRY_S
            if self._on_mirror_failure is not None:
                self._on_mirror_failure(exc)
            return
        stream.mirror_dirty = False
        # Sent, not landed (a background writer may still fail it): the service reads the mirror
        # back and logs success only then.
        logger.debug("%s: Redis mirror rewrite sent (%d blocks)", t, len(snap.blocks))
