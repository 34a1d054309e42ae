"""Paranoid-Pirate liveness and reconnect backoff, on explicit times."""

from __future__ import annotations

import pytest

from core.liveness import Backoff, HeartbeatConfig, LivenessTracker


def test_peer_dies_after_interval_times_liveness_of_silence():
    t = LivenessTracker(HeartbeatConfig(interval_s=0.5, liveness=3))
    t.seen("a", 10.0)
    t.seen("b", 10.4)
    assert t.next_deadline() == 11.5
    assert t.is_alive("a", 11.49) and t.expired(11.49) == []
    assert not t.is_alive("a", 11.5)
    assert t.expired(11.5) == ["a"]
    assert "a" not in t and t.peers() == ["b"]
    t.seen("b", 11.8)  # any message revives the deadline
    assert t.expired(12.5) == [] and t.expired(13.3) == ["b"]
    assert t.next_deadline() is None and not t.is_alive("zzz", 0)


def test_expired_lists_oldest_first():
    t = LivenessTracker(HeartbeatConfig(interval_s=1.0, liveness=2))
    t.seen("late", 5.0)
    t.seen("early", 1.0)
    t.seen("mid", 3.0)
    assert t.expired(10.0) == ["early", "mid", "late"]


def test_heartbeat_send_pacing():
    t = LivenessTracker(HeartbeatConfig(interval_s=1.0, liveness=3))
    assert t.send_due("a", 0.0)
    t.sent("a", 0.0)
    assert not t.send_due("a", 0.99) and t.send_due("a", 1.0)
    t.remove("a")
    assert t.send_due("a", 0.5)


def test_backoff_doubles_to_the_cap_and_resets():
    b = Backoff()
    assert [b.next_delay() for _ in range(8)] == [1, 2, 4, 8, 16, 32, 32, 32]
    b.reset()
    assert b.next_delay() == 1


def test_bad_configs_rejected():
    with pytest.raises(ValueError):
        HeartbeatConfig(interval_s=0)
    with pytest.raises(ValueError):
        HeartbeatConfig(liveness=0)
    with pytest.raises(ValueError):
        Backoff(initial_s=2, max_s=1)
    assert HeartbeatConfig(interval_s=0.25, liveness=4).timeout_s == 1.0


def test_a_stall_of_our_own_gives_every_peer_that_time_back() -> None:
    t = LivenessTracker(HeartbeatConfig(interval_s=1.0, liveness=3))
    t.seen("a", 11.0)
    t.seen("b", 12.5)
    # Our loop stopped from 13 to 20: a was last heard 2 s before it, b 0.5 s before it.
    t.stalled(20.0, 7.0)
    assert (t.last_seen("a"), t.last_seen("b")) == (18.0, 19.5)
    assert t.expired(20.9) == []  # without the stall both would be long dead
    assert t.expired(21.0) == ["a"]  # a's own 2 s of silence before the stall still count
    t.stalled(21.0, 100.0)  # never past now
    assert t.last_seen("b") == 21.0
