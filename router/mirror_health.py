"""The Redis mirror's health: ``ok``, or ``degraded`` with a cause, since when, and how many writes failed.

Routing never depends on Redis (the index lives in the router's memory), so a failing mirror is
not a routing outage; but what Redis holds is what ``kvr inspect``, a warm start and other routers
see, and an operator must be able to tell *why* it is missing. This module is the one definition
of that state; the router (``RouterService``) feeds it and every view renders it with
:func:`describe`:

* the router's stats (``/health``, ``/metrics``) and its ``WorkerSample`` (monitor, ``kvr dash``);
* the ``mirror-health`` hash in Redis (``bus/names.py``), read by ``kvr inspect``.

Causes are told apart by exception class, that is by Redis's protocol error codes (``OOM``,
``NOAUTH``/``WRONGPASS``, ``NOPERM``), never by a library's message text:

* ``unreachable``: no connection, or no answer within the socket timeout; on a Redis Cluster
  also ``CLUSTERDOWN``/``MASTERDOWN`` and a slot no master serves (a master is down or restarting);
* ``out_of_memory``: Redis refused a write at its ``maxmemory`` (policy ``noeviction``);
* ``auth``: Redis refused the credentials or the ACL user lacks a permission;
* ``other``: anything else (a full write queue, a rewrite that did not verify, ...).

Invariants: the state is ``degraded`` from the first failure seen until a rewrite of the whole
mirror was *verified* (``recover``); each transition (and a change of cause) is reported once by
the return value of ``fail``/``recover``, so the router logs it once, not per failed write.
"""

from __future__ import annotations

import redis

from bus.mirror_status import DEGRADED, OK, Cause
from bus.schema import MirrorStatus

#: Redis's protocol error code for a write refused at maxmemory (the reply's first word).
_OOM_CODE = "OOM"


def cause_of(exc: BaseException | None) -> Cause:
    """The cause of one failure: ``exc`` or, first, what it was raised from (``MirrorUnavailable``
    wraps redis-py's exception)."""
    chain: list[BaseException] = []
    while exc is not None and exc not in chain and len(chain) < 8:
        chain.append(exc)
        exc = exc.__cause__
    for e in reversed(chain):  # the innermost error says most
        # Before ConnectionError: redis-py's AuthenticationError and AuthorizationError are ConnectionErrors.
        if isinstance(e, (redis.AuthenticationError, redis.exceptions.AuthorizationError,
                          redis.exceptions.NoPermissionError, redis.exceptions.AuthenticationWrongNumberOfArgsError)):
            return Cause.AUTH
        if isinstance(e, redis.exceptions.OutOfMemoryError):
            return Cause.OUT_OF_MEMORY
        if isinstance(e, redis.ResponseError) and str(e).split(" ", 1)[0] == _OOM_CODE:
            return Cause.OUT_OF_MEMORY  # a redis-py that does not map the code to its own class
        if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError, redis.exceptions.ClusterDownError,
                          redis.exceptions.MasterDownError, redis.exceptions.SlotNotCoveredError)):
            return Cause.UNREACHABLE
    return Cause.OTHER


class MirrorHealth:
    """The state machine (one per router; not thread-safe: the routing thread owns it)."""

    def __init__(self) -> None:
        self.state = OK
        self.cause: Cause | None = None
        self.since_s: float | None = None  # wall time the current state began (None: ok from the start)
        self.failed_writes = 0  # since the degradation began (0 while ok)

    def fail(self, cause: Cause, *, now_s: float, failed_writes: int = 1) -> bool:
        """Record failures; True when this changed the state or its cause (the caller logs once)."""
        self.failed_writes += failed_writes
        if self.state == DEGRADED and cause == self.cause:
            return False
        if self.state == OK:
            self.since_s = now_s
        self.state, self.cause = DEGRADED, cause
        return True

    def recover(self, *, now_s: float) -> bool:
        """The mirror was rewritten and verified; True when it was degraded (the caller logs once)."""
        if self.state == OK:
            return False
        self.state, self.cause, self.since_s, self.failed_writes = OK, None, now_s, 0
        return True

    def status(self) -> MirrorStatus:
        return MirrorStatus(state=self.state, cause=None if self.cause is None else self.cause.value,
                            since_s=self.since_s, failed_writes=self.failed_writes)
