"""The virtual clock: time order, FIFO ties, no scheduling into the past."""

from __future__ import annotations

import pytest

from sim.clock import EventQueue


def test_events_come_out_in_time_then_schedule_order():
    q = EventQueue()
    q.schedule(2.0, "b", 1)
    q.schedule(1.0, "a", 2)
    q.schedule(2.0, "c", 3)
    q.schedule(1.0, "d", 4)
    out = []
    while q:
        ev = q.pop()
        out.append((ev.at_s, ev.kind, q.now))
    assert out == [(1.0, "a", 1.0), (1.0, "d", 1.0), (2.0, "b", 2.0), (2.0, "c", 2.0)]
    assert q.peek_time() is None and len(q) == 0


def test_schedule_in_is_relative_and_past_is_rejected():
    q = EventQueue(start_s=5.0)
    q.schedule_in(0.5, "x")
    assert q.peek_time() == 5.5
    q.pop()
    with pytest.raises(ValueError):
        q.schedule(5.0, "late")
