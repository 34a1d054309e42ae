"""A Redis that hangs (SIGSTOP, partition) must not stall the routing loop once per write.

Each write to such a Redis costs the whole socket timeout, so after one fails the ingest waits
``MIRROR_RETRY_S`` before rewriting dirty targets, and the router skips heartbeat refreshes while
Redis is known down (its periodic check is the one probe).
"""

from __future__ import annotations

import zmq

from core.prefix_index import PrefixIndex, WorkerKey
from router.ingest import MIRROR_RETRY_S, EventIngest, TargetStream
from router.mirror import MirrorUnavailable
from tests.fakes.clock import ManualClock


class HangingMirror:
    """Every call fails (as a timed-out one would), and is counted."""

    def __init__(self) -> None:
        self.calls = 0

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls += 1
            raise MirrorUnavailable(f"{name}: timeout")
        return call


class _Sub:
    replay_in_flight = False

    def sockets(self):
        return []

    def check_timeouts(self):
        return []

    def next_deadline_s(self):
        return None

    def close(self) -> None:
        pass


def test_dirty_targets_are_not_rewritten_on_every_tick_after_a_failure() -> None:
    clock, mirror = ManualClock(100.0), HangingMirror()
    ctx = zmq.Context()
    ingest = EventIngest(index=PrefixIndex(block_size=16), poller=zmq.Poller(), ctx=ctx, mirror=mirror, clock=clock)
    for w in ("a", "b"):
        t = WorkerKey(w, 0)
        ingest.streams[t] = TargetStream(t, 1, _Sub(), mirror_dirty=True)
    ingest.tick()
    assert mirror.calls == 1  # the first rewrite fails: the second target waits too
    for _ in range(10):
        clock.t += MIRROR_RETRY_S / 20
        ingest.tick()
    assert mirror.calls == 1
    clock.t += MIRROR_RETRY_S
    ingest.tick()
    assert mirror.calls == 2  # one try per retry period, not one per tick and target
    # Redis answered the router's check again (empty or back): rewrite at once, every target.
    ingest.mark_mirror_lost()
    ingest.tick()
    assert mirror.calls == 3
    ctx.term()


def test_heartbeat_refreshes_are_skipped_while_redis_is_down() -> None:
    from router.service import RouterConfig, RouterService

    mirror = HangingMirror()
    svc = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:*", bind_workers="tcp://127.0.0.1:*"),
                        mirror=mirror)
    mirror.calls = 0  # the warm start tried once
    try:
        svc.mirror_sync.write(lambda m: m.touch_worker("w"), refresh=True)
        assert mirror.calls == 1 and svc.mirror_sync.down  # Redis up as far as we knew: tried, failed
        svc.mirror_sync.write(lambda m: m.touch_worker("w"), refresh=True)
        assert mirror.calls == 1 and svc.counters["mirror_skipped"] == 1
        svc.mirror_sync.write(lambda m: m.unregister_worker("w"))  # not a refresh: always tried
        assert mirror.calls == 2
    finally:
        svc.close()


class RecordingMirror:
    """Every call succeeds and is recorded by name."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __getattr__(self, name):
        def call(*args, **kwargs):
            self.calls.append(name)
        return call


def test_writes_past_the_writer_lease_are_held_back_and_the_target_rewritten_once_renewed() -> None:
    """A router whose loop stalled past its writer lease may have lost it to another replica: its
    batch writes wait (the target marked dirty) until the lease is confirmed, then the target is
    rewritten whole, so nothing it held back is missing from the mirror."""
    clock, mirror = ManualClock(100.0), RecordingMirror()
    ctx = zmq.Context()
    ingest = EventIngest(index=PrefixIndex(block_size=16), poller=zmq.Poller(), ctx=ctx, mirror=mirror, clock=clock)
    t = WorkerKey("a", 0)
    stream = ingest.streams[t] = TargetStream(t, 1, _Sub())
    ingest.mirror_writes_until = 101.0
    ingest._mirror(lambda m: m.write_batch(), stream)
    assert mirror.calls == ["write_batch"] and not stream.mirror_dirty
    clock.t = 101.5  # past the lease's sure part (a stall)
    ingest._mirror(lambda m: m.write_batch(), stream)
    ingest.tick()
    assert mirror.calls == ["write_batch"] and stream.mirror_dirty  # held back, owed
    ingest.mirror_writes_until = 103.0  # the check renewed the lease
    ingest.tick()
    assert mirror.calls == ["write_batch", "replace_target"] and not stream.mirror_dirty
    ctx.term()
