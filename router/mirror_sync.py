"""Keeping Redis's mirror in step with the router's memory, and saying how healthy it is.

Routing never waits on Redis: the index lives in memory and every Redis call here is one that may
fail. What this module guarantees is that a mirror that failed is noticed, rewritten from memory,
read back, and only then called ``ok`` again (``router/mirror_health.py`` holds the state):

* a write that fails (the registry's here, a KV-event batch's in ``EventIngest``, which reports
  it through :meth:`MirrorSync.failed`) degrades the health, logged once per cause;
* a Redis that restarted *between* two writes loses everything silently (redis-py reconnects and
  the next write succeeds into an empty data set): the ``generation`` token the router's heartbeat
  reads catches that;
* on any such transition the registry and every target are rewritten from memory, and the mirror
  read back behind the writes (they may be queued on a background writer) before ``ok``.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Callable, Sequence

from bus.mirror_status import Cause, as_dict, describe
from bus.schema import Hello
from core.prefix_index import PrefixIndex
from router.ingest import EventIngest
from router.mirror import MirrorUnavailable, RedisMirror
from router.mirror_health import MirrorHealth, cause_of

logger = logging.getLogger(__name__)

#: A rewrite's read-back not answered within this is asked again (the writer may have dropped it).
VERIFY_TIMEOUT_S = 10.0


class MirrorSync:
    """One per router; the routing thread owns it (not thread-safe)."""

    def __init__(self, *, mirror: RedisMirror, ingest: EventIngest, index: PrefixIndex, router_id: str,
                 worker_ttl_s: float, counters: Counter[str], clock: Callable[[], float],
                 wall: Callable[[], float]) -> None:
        self.mirror = mirror
        self._ingest, self._index = ingest, index
        self._router_id = router_id
        self._ttl_s = worker_ttl_s  # a registry entry outlives its worker's last heartbeat by this
        self._counters = counters
        self._clock, self._wall = clock, wall
        self.health = MirrorHealth()
        #: A write failed and no check has seen Redis answer since: heartbeat refreshes are skipped.
        self.down = False
        self._generation: str | None = None  # the Redis data set last seen (RedisMirror.router_heartbeat)
        self._failures_seen = 0  # the mirror's failure counters at the last look
        self._verify_asked_s: float | None = None  # clock time a rewrite's read-back was asked; None: none

    def write(self, write: Callable[[RedisMirror], None], *, refresh: bool = False) -> None:
        """A Redis write that must not stop routing. ``refresh`` (a heartbeat's liveness touch) is
        skipped while Redis is known down: against a Redis that hangs rather than refuses, each
        try would stall the loop for the socket timeout, and the resync rewrites it anyway."""
        if refresh and self.down:
            self._counters["mirror_skipped"] += 1
            return
        try:
            write(self.mirror)
        except MirrorUnavailable as exc:
            self._counters["mirror_failures"] += 1
            self.down = True  # the next successful check rewrites what this write missed
            self.failed(exc)
            logger.debug("redis write failed: %s", exc)

    def failed(self, exc: BaseException | None, *, cause: Cause | None = None) -> None:
        """Degraded (or still): logged once per state or cause change, never per failed write."""
        cause = cause or cause_of(exc)
        if self.health.fail(cause, now_s=self._wall(), failed_writes=self._new_failures()):
            logger.warning("Redis mirror degraded: %s (%s); routing goes on from memory, the mirror is "
                           "rewritten once Redis takes writes again", cause.value, exc)
        self._verify_asked_s = None  # a read-back in flight is moot: the next check rewrites again

    def publish_health(self) -> None:
        """The health, in Redis for ``kvr inspect`` (skipped while Redis is known down)."""
        health = json.dumps({**as_dict(self.health.status()), "t_s": self._wall()})
        self.write(lambda m: m.record_health(self._router_id, health), refresh=True)

    def check(self, hellos: Sequence[Hello]) -> None:
        """Notice Redis going away, coming back, or coming back empty; rewrite the mirror then
        (the registry from ``hellos``, every target from the index)."""
        mirror = self.mirror
        try:
            generation = mirror.router_heartbeat(self._router_id, now_s=self._wall(), token=uuid.uuid4().hex)
        except MirrorUnavailable as exc:
            self._counters["mirror_failures"] += 1
            self.down = True
            self.failed(exc)
            return
        lost = self._generation is not None and generation != self._generation
        holder = getattr(mirror, "writer", None)  # None: no lease read (a lone router, or a test double)
        writing = holder is None or holder == self._router_id
        takeover = False
        # Writes are safe for half a lease after this renewal (the answer may be one check old).
        self._ingest.mirror_writes_until = (None if holder is None or not writing
                                            else self._clock() + self._ttl_s * 0.5)
        if writing != self._ingest.mirror_writes:
            self._ingest.mirror_writes = writing
            if writing:
                # The lease was free (or its holder died): what it wrote may be behind this
                # router's index; rewrite everything and read it back, as after a Redis restart.
                self._counters["mirror_writer_takeovers"] += 1
                logger.warning("this router now writes the Redis mirror (it holds the writer lease): rewriting it "
                               "from memory")
                takeover = True
            else:
                logger.info("router replica %s writes the Redis mirror: this one only reads it", holder)
        failed = mirror.take_write_failures()  # writes made off the routing thread that failed
        if failed is not None:
            self.failed(failed)
        elif self.health.cause is not None:  # degraded (a cause is set exactly while it is)
            self.health.fail(self.health.cause, now_s=self._wall(), failed_writes=self._new_failures())
        was_down, self.down = self.down or failed is not None, False
        self._generation = generation
        if not writing:
            # Another replica writes (and verifies) the targets; Redis answering is all this one needs.
            self._verify_asked_s = None
            if failed is None and self.health.recover(now_s=self._wall()):
                logger.info("Redis mirror ok again (another replica writes it)")
            return
        streams = self._ingest.streams
        if lost or takeover or was_down or (self.health.state != "ok" and self._verify_asked_s is None):
            if lost:
                logger.warning("Redis came back empty (restarted or flushed): rewriting the registry and %d "
                               "targets from memory", len(streams))
            else:
                logger.debug("Redis answers: rewriting the registry and %d targets", len(streams))
            self._counters["mirror_resyncs"] += 1
            self._ingest.mark_mirror_lost()
            for hello in hellos:
                self.write(register_write(hello, now_s=self._wall(), ttl_s=self._ttl_s))
            self._ingest.tick()  # the rewrite itself (dirty targets); one that fails stays dirty
            # Queued writes are not landed ones: read the mirror back behind them before saying so.
            mirror.request_verification(
                blocks={(t.worker_id, t.dp_rank): len(self._index.snapshot(t)) for t in streams},
                workers=[h.worker_id for h in hellos])
            self._verify_asked_s = self._clock()
            return
        if self._verify_asked_s is not None:
            self._check_rewrite(asked_s=self._verify_asked_s, workers=len(hellos))

    def _check_rewrite(self, *, asked_s: float, workers: int) -> None:
        """The read-back of a rewrite asked for at ``asked_s``: ok again once it matched; a mismatch is
        logged and rewritten."""
        answer = self.mirror.take_verification()
        if answer is None:
            if self._clock() - asked_s > VERIFY_TIMEOUT_S:  # lost (e.g. dropped from a full queue)
                self._verify_asked_s = None  # the next check rewrites and asks again
            return
        self._verify_asked_s = None
        if answer:
            self._counters["mirror_unverified"] += 1
            if self.health.state == "ok":
                self.failed(None, cause=Cause.OTHER)
            logger.warning("Redis mirror rewrite did not verify (%s): rewriting again", answer)
            return
        streams = self._ingest.streams
        blocks = sum(self._index.num_blocks(t) for t in streams)
        was = describe(self.health.status())
        if self.health.recover(now_s=self._wall()):
            logger.info("Redis mirror ok again (was %s): rewritten and verified, %d targets, %d blocks, %d workers",
                        was, len(streams), blocks, workers)
        else:
            logger.info("Redis mirror rewritten and verified: %d targets, %d blocks, %d workers",
                        len(streams), blocks, workers)

    def _new_failures(self) -> int:
        """Redis calls that failed since the last look (the mirror's counters; a write dropped from a
        full queue counts as one)."""
        total = 0
        for name in ("failures", "dropped"):
            n = getattr(self.mirror, name, 0)
            total += n if isinstance(n, int) else 0
        new, self._failures_seen = max(0, total - self._failures_seen), total
        return new


def register_write(hello: Hello, *, now_s: float, ttl_s: float) -> Callable[[RedisMirror], None]:
    """The registry write for one worker, as :meth:`MirrorSync.write` takes it (a closure over its
    own arguments, so one made in a loop does not see the loop's later values)."""
    return lambda m: m.register_worker(hello, now_s=now_s, ttl_s=ttl_s)
