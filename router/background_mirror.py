"""The Redis mirror's writes on a background thread: the routing loop never waits on Redis.

``RedisMirror`` is synchronous: every event batch costs the routing thread one Redis round
trip. That is ~0.1-2 ms against a healthy Redis, but a slow one (a busy or distant server, the
embedded fakeredis) or a hung one (SIGSTOP, a partition: every call waits out the socket
timeout) stalls routing, heartbeats go unanswered and workers are declared dead. This wrapper
keeps ``RedisMirror``'s interface, so ``EventIngest`` and ``RouterService`` use it unchanged:

* writes (``write_batch``, ``clear_target``, ``replace_target``, the registry) are queued and
  run in submission order on one thread; they return at once;
* a write that fails there is reported to the caller on its *next* write for the same target
  (``MirrorUnavailable``, as a synchronous failure would be): the caller marks the target dirty
  and rewrites it whole. ``replace_target`` and ``clear_target`` write a target's whole state,
  so they supersede an earlier failure instead of reporting it;
* any failure is also reported by ``take_write_failures`` (which the service reads with each
  mirror check), so the service treats Redis as having been away and rewrites the registry and
  every target as soon as a check succeeds — a target that never writes again is repaired too;
* ``router_heartbeat`` answers from the last completed check and queues the next (the first
  call waits for its answer); reads (``load_snapshot``, ``alive_workers`` …) stay synchronous;
* ``request_verification`` reads the mirror back *after* every write queued before it (a queued
  rewrite is not a done one); ``take_verification`` gives its answer once it ran;
* failures keep the exception they came from (``MirrorUnavailable`` from redis-py's), so the
  router can tell their cause (``router/mirror_health.py``);
* event batches are written in rounds: an idle writer looks at its queue every ``PARK_S`` and
  lets batches gather for ``linger_s`` (Redis lags the index by up to ~60 ms; routing never
  reads it); every other write, a flush and a close wake it at once;
* the queue is bounded: when Redis cannot keep up, writes are dropped and counted, and the
  targets they belonged to are rewritten later, exactly as after a failure.

Invariant: a target's writes reach Redis in the order the routing thread made them, and after a
failure the next whole-target write (queued after everything before it) makes Redis exact again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import cast

from router.mirror import BatchWrite, MirrorUnavailable, RedisMirror, TargetSnapshot

logger = logging.getLogger(__name__)

DEFAULT_MAX_QUEUE = 10_000
#: The writer waits this long for event batches to gather (Redis is then at most this much behind
#: the index, on top of the write itself: the mirror serves warm starts and inspection, not routing).
DEFAULT_LINGER_S = 0.01
#: ... or until this many writes are waiting.
LINGER_MAX_WRITES = 256
#: An idle writer looks at its queue this often: an event batch is in Redis at most
#: ``PARK_S + DEFAULT_LINGER_S`` after the routing thread queued it (plus the write).
PARK_S = 0.05
#: The longest an event batch waits in the queue (an idle writer's look, then the linger), with room
#: for the write itself: what a reader of Redis waits to see everything queued before it.
MIRROR_ROUND_S = PARK_S + DEFAULT_LINGER_S + 0.05
_REGISTRY = ("registry",)

#: A mirror check's outcome: the generation token Redis holds, or why there is none.
_CheckResult = tuple[str, None] | tuple[None, MirrorUnavailable]


class BackgroundMirror:
    """``RedisMirror`` with its writes moved to a background thread (see the module docstring)."""

    def __init__(self, *, mirror: RedisMirror, max_queue: int = DEFAULT_MAX_QUEUE,
                 linger_s: float = DEFAULT_LINGER_S) -> None:
        """``linger_s``: how long the writer lets event batches gather before writing them (0: at once)."""
        self._mirror = mirror
        self.linger_s = linger_s
        self._flushing = 0  # callers waiting in flush()
        self._targets_seen: set[tuple] = set()  # keys of event-batch writes: the ones that may linger
        self.namespace = mirror.namespace
        self._max_queue = max_queue
        #: (key, write): a function to call, or an event batch (written in rounds: ``_run``).
        self._queue: deque[tuple[tuple, Callable[[], object] | BatchWrite]] = deque()
        self._cond = threading.Condition()
        self._failed: dict[tuple, MirrorUnavailable] = {}  # target or registry key -> why its last write failed
        self._failed_since_check: MirrorUnavailable | None = None
        self._last_error: MirrorUnavailable | None = None  # of the last write, until one succeeds
        # (generation, None) or (None, error) of the last check
        self._heartbeat: _CheckResult | None = None
        self._verification: str | None = None  # the latest read-back's answer, until taken
        self._verifications_asked = 0
        self._heartbeat_pending = False
        self._busy = False
        self._closed = False
        self.queued = 0
        self.dropped = 0
        self.async_failures = 0
        self._thread = threading.Thread(target=self._run, name="kvr-redis-mirror", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ passthrough

    def __getattr__(self, name: str):
        # Reads and counters (load_snapshot, alive_workers, round_trips …) go to the mirror itself.
        return getattr(self._mirror, name)

    @property
    def failures(self) -> int:
        return self._mirror.failures

    # ------------------------------------------------------------------ writes

    def register_worker(self, hello, **kw) -> None:
        self._submit(_REGISTRY, lambda: self._mirror.register_worker(hello, **kw))

    def touch_worker(self, worker_id: str, **kw) -> None:
        self._submit(_REGISTRY, lambda: self._mirror.touch_worker(worker_id, **kw))

    def unregister_worker(self, worker_id: str, **kw) -> None:
        self._submit(_REGISTRY, lambda: self._mirror.unregister_worker(worker_id, **kw))

    def write_batch(self, worker_id: str, dp_rank: int, **kw) -> None:
        key = (worker_id, dp_rank)
        self._targets_seen.add(key)  # an event batch may linger (see _run)
        self._submit(key, BatchWrite(worker_id, dp_rank, kw))

    def clear_target(self, worker_id: str, dp_rank: int, **kw) -> None:
        self._submit((worker_id, dp_rank), lambda: self._mirror.clear_target(worker_id, dp_rank, **kw), whole=True)

    def replace_target(self, snapshot: TargetSnapshot) -> None:
        key = (snapshot.worker_id, snapshot.dp_rank)
        self._submit(key, lambda: self._mirror.replace_target(snapshot), whole=True)

    @property
    def writer_lease_ms(self) -> int:
        return self._mirror.writer_lease_ms

    @writer_lease_ms.setter
    def writer_lease_ms(self, value: int) -> None:
        self._mirror.writer_lease_ms = value

    @property
    def writer(self) -> str | None:
        """The lease holder as the last completed check read it (the writer thread sets it)."""
        return self._mirror.writer

    def router_heartbeat(self, router_id: str, *, now_s: float, token: str) -> str:
        """The generation seen by the last completed check; queues the next one."""
        with self._cond:
            if not self._heartbeat_pending:
                # A check dropped by a full queue is simply asked again next time.
                self._heartbeat_pending = self._enqueue(("heartbeat",), lambda: self._check(router_id, now_s, token))
            if self._heartbeat is None:  # the very first check: wait for its answer
                deadline = time.monotonic() + 5.0
                while self._heartbeat is None and not self._closed and time.monotonic() < deadline:
                    self._cond.wait(0.05)
            result = self._heartbeat  # the last completed check: one period old at most
        if result is None:
            raise MirrorUnavailable("redis: no answer to the mirror check yet")
        generation, error = result
        if error is not None:
            raise MirrorUnavailable(str(error)) from error.__cause__
        assert generation is not None  # a check answers a generation or fails
        return generation

    def record_health(self, router_id: str, status_json: str) -> None:
        self._submit(("health",), lambda: self._mirror.record_health(router_id, status_json))

    def request_verification(self, *, blocks, workers) -> None:
        """Queue a read-back of the mirror behind every write queued so far (``RedisMirror.verify``)."""
        blocks, workers = dict(blocks), set(workers)

        def verify(asked: int) -> None:
            answer = self._mirror.verify(blocks, workers)
            with self._cond:
                if asked == self._verifications_asked:  # an older read-back answers nothing now
                    self._verification = answer

        with self._cond:
            self._verifications_asked += 1
            self._verification = None
            asked = self._verifications_asked
            if not self._enqueue(("verify",), lambda: verify(asked)):
                self._verification = "the write queue was full"

    def take_verification(self) -> str | None:
        """The verification's answer once it ran (``""``: Redis matched), else None; resets."""
        with self._cond:
            answer, self._verification = self._verification, None
        return answer

    def take_write_failures(self) -> MirrorUnavailable | None:
        """Why a write failed since the last call (None: none did); resets."""
        with self._cond:
            failed, self._failed_since_check = self._failed_since_check, None
        return failed

    # ------------------------------------------------------------------ lifecycle

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued write ran (True) or the timeout passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            self._flushing += 1  # no lingering meanwhile
            self._cond.notify_all()
            try:
                while self._queue or self._busy:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return False
                    self._cond.wait(min(left, 0.05))
            finally:
                self._flushing -= 1
        return True

    def close(self, timeout_s: float = 2.0) -> None:
        """Drain what Redis takes within ``timeout_s``, then stop the thread."""
        if not self.flush(timeout_s):
            logger.warning("Redis mirror: %d writes not flushed at shutdown", len(self._queue))
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout_s)

    # ------------------------------------------------------------------ internals

    def _submit(self, key: tuple, write: Callable[[], object] | BatchWrite, *, whole: bool = False) -> None:
        with self._cond:
            why = self._failed.pop(key, None)
            if why is not None and not whole:
                raise MirrorUnavailable(f"an earlier write failed: {why}") from why.__cause__
            self._enqueue(key, write)

    def _enqueue(self, key: tuple, write: Callable[[], object] | BatchWrite) -> bool:
        """Queue one write (False: the queue was full, the write dropped and recorded as failed)."""
        # Called with the lock held.
        if len(self._queue) >= self._max_queue:
            self.dropped += 1
            full = MirrorUnavailable(f"queue full ({self._max_queue} writes waiting)")
            # Redis not keeping up is usually Redis failing: the last write's error says why.
            full.__cause__ = None if self._last_error is None else self._last_error.__cause__
            self._record_failure(key, full)
            return False
        self._queue.append((key, write))
        self.queued += 1
        # The writer wakes by itself for event batches (see _run), so the routing thread does not
        # pay a thread wake-up per batch; it wakes the writer only for what should not wait, or a
        # queue grown to a round's worth.
        if key not in self._targets_seen or len(self._queue) >= LINGER_MAX_WRITES:
            self._cond.notify_all()
        return True

    def _record_failure(self, key: tuple, why: MirrorUnavailable) -> None:
        # Called with the lock held.
        if key not in (("heartbeat",), ("verify",)):
            self._failed[key] = why
        self._failed_since_check = why

    def _check(self, router_id: str, now_s: float, token: str) -> None:
        result: _CheckResult
        try:
            generation = self._mirror.router_heartbeat(router_id, now_s=now_s, token=token)
        except MirrorUnavailable as exc:
            result = (None, exc)
        else:
            result = (generation, None)
        with self._cond:
            self._heartbeat = result
            self._heartbeat_pending = False
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    # Idle: look again every PARK_S (event batches do not wake the writer).
                    self._cond.wait(PARK_S)
                if not self._queue:
                    return
                if (self.linger_s > 0 and not self._closed and self._flushing == 0
                        and self._queue[-1][0] in self._targets_seen and len(self._queue) < LINGER_MAX_WRITES):
                    # Event batches arrive a few per request: let a round's worth gather. Anything
                    # else queued, a flush, a close or a full round ends the wait (they notify).
                    self._cond.wait(self.linger_s)
                key, write = self._queue.popleft()
                keys = [key]
                if isinstance(write, BatchWrite):
                    # The event batches queued next to it go in the same round trip (in order).
                    batches = [write]
                    queue = self._queue
                    while queue and isinstance(queue[0][1], BatchWrite) and len(batches) < LINGER_MAX_WRITES:
                        next_key, batch = queue.popleft()
                        keys.append(next_key)
                        batches.append(cast(BatchWrite, batch))
                self._busy = True
            try:
                if isinstance(write, BatchWrite):
                    self._mirror.write_batches(batches)
                else:
                    write()
            except MirrorUnavailable as exc:
                with self._cond:
                    self.async_failures += 1
                    self._last_error = exc
                    for failed in keys:
                        self._record_failure(failed, exc)
                logger.debug("background mirror write failed: %s", exc)
            except Exception:  # a bug in one write must not kill the writer
                logger.exception("background mirror write crashed")
                with self._cond:
                    for failed in keys:
                        self._record_failure(failed, MirrorUnavailable("internal error"))
            else:
                if key != ("verify",):
                    self._last_error = None
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
