"""Drive a simulator workload against a live router (the demo and live benchmarks).

The same :class:`sim.workload.Workload` objects the simulator runs are sent
over a real :class:`bus.client.RouterClient`: roots at their arrival times,
follow-ups (next chat turn, tree children) when their parent finishes, after
their think time. Workload time runs ``speedup`` times faster than wall time,
like the workers' emulated engines, so a live run and a simulated run of the
same workload see the same relative timing.

One thread owns the client (ZMQ sockets are not thread-safe).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from bus.client import RequestResult, RouterClient
from bus.replica_client import ReplicaClient
from bus.schema import GenerateRequest
from sim.workload import SimRequest, Workload

logger = logging.getLogger(__name__)


@dataclass
class DriveResult:
    """What a drive produced: every finished request, and what did not finish."""

    results: list[RequestResult] = field(default_factory=list)
    sent: int = 0
    timed_out: int = 0
    wall_s: float = 0.0

    @property
    def errors(self) -> int:
        return sum(1 for r in self.results if r.error is not None)

    @property
    def completed(self) -> int:
        return sum(1 for r in self.results if r.completion is not None)


def drive_workload(
    client: RouterClient | ReplicaClient,
    workload: Workload,
    arrivals_s: Sequence[float],
    *,
    speedup: float = 1.0,
    max_in_flight: int | None = None,
    timeout_s: float = 300.0,
    id_prefix: str = "",
    progress: Callable[[int, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
) -> DriveResult:
    """Send ``workload`` (root ``i`` at ``arrivals_s[i] / speedup`` s) and wait for every reply.

    ``max_in_flight`` caps concurrency (requests wait their turn, in arrival
    order). ``progress(done, known)`` is called as requests finish; ``known``
    grows as follow-ups appear. Stops early when ``should_stop()`` or after
    ``timeout_s``; unanswered requests are counted in ``timed_out``.
    """
    if speedup <= 0:
        raise ValueError("speedup must be positive")
    if len(arrivals_s) != workload.num_roots():
        raise ValueError(f"{len(arrivals_s)} arrival times for {workload.num_roots()} roots")
    order = itertools.count()
    # (wall time due, tie-break, request)
    due: list[tuple[float, int, SimRequest]] = []
    t0 = clock()
    for i, t in enumerate(arrivals_s):
        for req in workload.root_requests(i):
            heapq.heappush(due, (t0 + t / speedup, next(order), req))
    known = len(due)
    in_flight: dict[str, SimRequest] = {}
    out = DriveResult()
    deadline = t0 + timeout_s
    while due or in_flight:
        now = clock()
        if now > deadline or (should_stop is not None and should_stop()):
            break
        while due and due[0][0] <= now and (max_in_flight is None or len(in_flight) < max_in_flight):
            _, _, req = heapq.heappop(due)
            rid = f"{id_prefix}{req.request_id}"
            client.send(GenerateRequest(request_id=rid, token_ids=list(req.token_ids), max_tokens=req.max_tokens,
                                        lora_name=req.lora_name))
            in_flight[rid] = req
            out.sent += 1
        wait_ms = 50
        if due and (max_in_flight is None or len(in_flight) < max_in_flight):
            wait_ms = max(0, min(wait_ms, int(1000 * (due[0][0] - now))))
        for result in client.poll(wait_ms):
            req = in_flight.pop(result.request_id, None)
            if req is None:
                continue
            out.results.append(result)
            if result.completion is not None:
                for child in workload.follow_ups(req, result.token_ids):
                    heapq.heappush(due, (clock() + child.delay_s / speedup, next(order), child))
                    known += 1
            if progress is not None:
                progress(len(out.results), known)
    out.timed_out = len(in_flight) + len(due)
    for rid in in_flight:
        client.pending.pop(rid, None)
    out.wall_s = clock() - t0
    if out.timed_out:
        logger.warning("%d requests unanswered or unsent when the drive stopped", out.timed_out)
    return out
