"""Worker churn in the simulator: cache resets, restarts and scale-out mid-run.

Three things happen to a live fleet that an index-driven router must follow, and each reaches
the simulated router the way it reaches the live one:

* ``reset``: the engine's prefix cache is cleared with its running requests preempted
  (vLLM's ``/reset_prefix_cache?reset_running_requests=true``, the live worker's
  ``--clear-cache-every``). The engine publishes ``AllBlocksCleared`` and the router's index
  learns it through the event plane, ``event_delay_s`` later. No request is lost: the preempted
  ones recompute on the same engine.
* ``restart``: the worker process restarts with an empty cache (a new engine). The live router
  sees a Hello with a new epoch and treats the old incarnation as dead (``router/service.py``,
  ``_worker_gone``): its targets leave the core and the index, and each of its requests is
  routed again elsewhere if its client saw no token yet and retries are left (``max_retries``,
  the router's default 2), else it fails with ``WORKER_DIED``. The new incarnation registers at
  once (a fast restart: no down time is modelled). Events and step results of the old
  incarnation still on their way are dropped, as the live ingest drops the old stream.
* ``join``: a worker that was not in the fleet registers (scale-out), with an empty cache.

A failed request is an error the client sees: the simulator counts it in ``RunResult.failed``
and the goodput predicate fails a probe that has any (``sim/goodput.py``). Restart churn
therefore fails every probe that loses a request mid-stream; resets never lose one.

Which worker churns is fixed by the plan, not drawn: the k-th churn (k = 0, 1, ...) hits the
``k mod n``-th of the ``n`` workers in the fleet at that moment, in name order, so two policies
see the same churn. Churn recurs every ``every_s`` from ``first_s`` while the run has work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RESET = "reset"
RESTART = "restart"
KINDS = (RESET, RESTART)
#: The live router's default retries of a request whose worker died before its first token.
DEFAULT_MAX_RETRIES = 2


@dataclass(frozen=True, kw_only=True)
class ChurnConfig:
    """When workers churn and how (module docstring). The default is no churn."""

    #: Interval between churn events; 0: none.
    every_s: float = 0.0
    kind: str = RESET
    #: Time of the first churn event (None: ``every_s``).
    first_s: float | None = None
    #: Times at which one more worker joins the fleet, each (scale-out).
    join_at_s: tuple[float, ...] = ()
    #: Retries of a request whose worker restarted before its first token (``restart`` only).
    max_retries: int = DEFAULT_MAX_RETRIES

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown churn kind {self.kind!r} ({', '.join(KINDS)})")
        if not (self.every_s >= 0 and math.isfinite(self.every_s)):
            raise ValueError(f"churn interval {self.every_s} must be a finite number >= 0")
        if self.first_s is not None and not self.first_s >= 0:
            raise ValueError(f"first churn time {self.first_s} must be >= 0")
        if any(not (t >= 0 and math.isfinite(t)) for t in self.join_at_s):
            raise ValueError("join times must be finite and >= 0")
        if self.max_retries < 0:
            raise ValueError("max_retries must be >= 0")

    @property
    def churns(self) -> bool:
        return self.every_s > 0

    @property
    def start_s(self) -> float:
        return self.every_s if self.first_s is None else self.first_s

    @property
    def joins(self) -> int:
        return len(self.join_at_s)


def churn_victim(k: int, live_workers: list[int]) -> int:
    """The worker the ``k``-th churn event hits: round-robin over the fleet as it is then."""
    if not live_workers:
        raise ValueError("no worker to churn")
    return sorted(live_workers)[k % len(live_workers)]
