"""Virtual time: a clock that only moves when the next event is taken off a heap.

Events at the same time come out in the order they were scheduled (a sequence
number breaks ties), so a simulation is deterministic whatever its payloads are.
"""

from __future__ import annotations

import heapq
import logging
from typing import Any, NamedTuple

logger = logging.getLogger(__name__)


class Event(NamedTuple):
    """One scheduled happening: its time, a kind the caller dispatches on, a payload."""

    at_s: float
    seq: int
    kind: str
    payload: Any


class EventQueue:
    """A heap of :class:`Event` plus the virtual ``now``.

    Invariant: ``now`` never decreases; scheduling in the past is an error
    (it would mean an effect before its cause).
    """

    def __init__(self, *, start_s: float = 0.0) -> None:
        self._heap: list[Event] = []
        self._seq = 0
        self.now = start_s

    def schedule(self, at_s: float, kind: str, payload: Any = None) -> None:
        """Queue an event at absolute virtual time ``at_s`` (>= now)."""
        if at_s < self.now:
            raise ValueError(f"cannot schedule {kind!r} at {at_s} before now={self.now}")
        heapq.heappush(self._heap, Event(at_s, self._seq, kind, payload))
        self._seq += 1

    def schedule_in(self, delay_s: float, kind: str, payload: Any = None) -> None:
        """Queue an event ``delay_s`` (>= 0) after now."""
        self.schedule(self.now + delay_s, kind, payload)

    def pop(self) -> Event:
        """Take the earliest event and advance ``now`` to it."""
        ev = heapq.heappop(self._heap)
        self.now = ev.at_s
        return ev

    def peek_time(self) -> float | None:
        """Time of the earliest event, or None when empty."""
        return self._heap[0].at_s if self._heap else None

    def __len__(self) -> int:
        return len(self._heap)

    def __bool__(self) -> bool:
        return bool(self._heap)
