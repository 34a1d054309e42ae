"""BackgroundMirror: RedisMirror's writes on a thread, failures reported on the next write."""

from __future__ import annotations

import socket
import threading

import pytest

from bus import names
from bus.mirror_status import Cause
from bus.schema import Hello
from router.background_mirror import BackgroundMirror
from router.mirror import MirrorUnavailable, RedisMirror, TargetSnapshot, make_redis_client
from router.mirror_health import cause_of
from tests.waiting import eventually

HELLO = Hello(worker_id="w1", epoch=7, model="m", block_size=16, num_gpu_blocks=924,
              events_endpoint="tcp://127.0.0.1:5557")


@pytest.fixture
def hung_server():
    """A TCP server that accepts connections and never answers (a SIGSTOPped or partitioned Redis)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        srv.settimeout(0.05)
        while not stop.is_set():
            try:
                held.append(srv.accept()[0])
            except OSError:
                continue

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    yield f"redis://127.0.0.1:{srv.getsockname()[1]}/0"
    stop.set()
    t.join(2)
    for c in held:
        c.close()
    srv.close()


def _refused_url() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now: connections are refused
    return f"redis://127.0.0.1:{port}/0"


def test_writes_land_in_order_and_match_the_synchronous_mirror(fake_redis):
    bg = BackgroundMirror(mirror=RedisMirror(client=fake_redis, namespace="bg"))
    try:
        bg.register_worker(HELLO, now_s=1.0, ttl_s=3.0)
        bg.write_batch("w1", 0, seq=0, epoch=7, stored={1: 11, 2: 12})
        bg.write_batch("w1", 0, seq=1, epoch=7, stored={3: 13}, removed=[1])
        bg.write_batch("w1", 0, seq=2, epoch=7, cleared=True, stored={4: 14})
        bg.write_batch("w1", 0, seq=3, epoch=7, stored={5: 15})
        assert bg.flush(5.0)
        assert bg.load_snapshot()[("w1", 0)] == TargetSnapshot("w1", 0, 3, 7, {4: 14, 5: 15})
        assert bg.alive_workers() == {"w1": 7}  # reads pass through, synchronously
        assert bg.router_heartbeat("r", now_s=2.0, token="t1") == "t1"
        assert fake_redis.hget(names.routers_key("bg"), "r") == b"2.0"
        assert (bg.queued, bg.dropped, bg.async_failures) == (6, 0, 0) and bg.take_write_failures() is None
    finally:
        bg.close()


def test_a_failed_write_is_reported_on_the_next_write_of_that_target_and_by_the_check():
    bg = BackgroundMirror(mirror=RedisMirror(client=make_redis_client(_refused_url()), namespace="bg"))
    try:
        with pytest.raises(MirrorUnavailable):
            bg.router_heartbeat("r", now_s=0.0, token="t")  # the first check waits for its answer: refused
        bg.take_write_failures()
        bg.write_batch("w1", 0, seq=0, epoch=1, stored={1: 2})  # returns at once; fails on the thread
        assert bg.flush(5.0) and bg.async_failures == 1
        # The service hears of it with its next mirror check, once.
        failed = bg.take_write_failures()
        assert cause_of(failed) is Cause.UNREACHABLE and bg.take_write_failures() is None
        bg.write_batch("w2", 0, seq=0, epoch=1, stored={1: 2})  # another target: not its failure
        with pytest.raises(MirrorUnavailable, match="an earlier write failed"):
            bg.write_batch("w1", 0, seq=1, epoch=1, stored={3: 4})
        bg.write_batch("w1", 0, seq=2, epoch=1)  # reported once: the caller now owns the resync
        assert bg.flush(5.0)
        # A whole-target write supersedes an earlier failure instead of reporting it.
        bg.replace_target(TargetSnapshot("w1", 0, 2, 1, {1: 2}))
        bg.clear_target("w2", 0, epoch=1)
        with pytest.raises(MirrorUnavailable):
            bg.router_heartbeat("r", now_s=1.0, token="t")
        assert bg.take_write_failures() is not None  # the w2 write, the replace and the clear failed too
    finally:
        bg.close()


def test_a_hung_redis_never_blocks_the_caller_and_the_queue_is_bounded(hung_server):
    bg = BackgroundMirror(mirror=RedisMirror(client=make_redis_client(hung_server, timeout_s=0.5), namespace="bg"),
                          max_queue=3)
    try:
        bg.write_batch("w1", 0, seq=0, epoch=1, stored={0: 0})
        # Taken by the thread, which now waits on the silent server.
        eventually(lambda: bg._busy, what="the mirror thread busy", interval_s=0.005)
        for seq in range(1, 5):  # three wait in the queue, the fourth is dropped
            bg.write_batch("w1", 0, seq=seq, epoch=1, stored={seq: seq})
        assert not bg.flush(0.01)  # the caller came back while the writer is still waiting on Redis
        assert (bg.queued, bg.dropped) == (4, 1)
        with pytest.raises(MirrorUnavailable, match="queue full"):
            bg.write_batch("w1", 0, seq=5, epoch=1)
        # A mirror check that finds the queue full is dropped too, and asked again the next time.
        with bg._cond:
            bg._heartbeat = ("g0", None)  # as if an earlier check had completed
        assert bg.router_heartbeat("r", now_s=1.0, token="t") == "g0"
        assert bg._heartbeat_pending is False and bg.dropped == 2
        assert "queue full" in str(bg.take_write_failures())
    finally:
        bg.close(timeout_s=0.1)


class _RecordingMirror:
    """The RedisMirror surface the writer calls, recording each write's time (no Redis)."""

    namespace = "t"

    def __init__(self) -> None:
        import time

        self._clock = time.monotonic
        self.writes: list[tuple[str, float]] = []
        self.rounds: list[int] = []  # event batches per write_batches call

    def write_batches(self, batches) -> None:
        self.rounds.append(len(batches))
        for b in batches:
            self.writes.append((f"batch {b.worker_id} {b.kw['seq']}", self._clock()))

    def register_worker(self, hello, **kw) -> None:
        self.writes.append((f"register {hello.worker_id}", self._clock()))


def test_event_batches_linger_together_while_other_writes_go_at_once() -> None:
    import time

    rec = _RecordingMirror()
    bg = BackgroundMirror(mirror=rec, linger_s=0.3)  # type: ignore[arg-type]  # the writes it calls
    try:
        t0 = time.monotonic()
        bg.write_batch("w1", 0, seq=1)
        bg.write_batch("w1", 0, seq=2)
        time.sleep(0.1)
        assert rec.writes == []  # both still gathering
        eventually(lambda: len(rec.writes) == 2, timeout_s=2.0)
        assert [w for w, _ in rec.writes] == ["batch w1 1", "batch w1 2"]
        assert all(at - t0 >= 0.25 for _, at in rec.writes)  # written together, after the linger
        assert rec.rounds == [2]  # in one round trip
        # A registry write is not an event batch: it ends the wait at once, taking the batch before it.
        t1 = time.monotonic()
        bg.write_batch("w1", 0, seq=3)
        bg.register_worker(HELLO)
        eventually(lambda: len(rec.writes) == 4, timeout_s=2.0)
        assert [w for w, _ in rec.writes[2:]] == ["batch w1 3", "register w1"]
        assert rec.writes[3][1] - t1 < 0.2
        # flush() does not wait out the linger either.
        bg.write_batch("w1", 0, seq=4)
        t2 = time.monotonic()
        assert bg.flush(timeout_s=2.0) and time.monotonic() - t2 < 0.2
        assert rec.writes[-1][0] == "batch w1 4"
    finally:
        bg.close(timeout_s=1.0)


def test_a_round_of_batches_leaves_redis_as_the_batches_one_by_one(fake_redis) -> None:
    """``write_batches`` packs a round into one pipeline and writes each target's stream hash once
    (last seq/epoch/time, counts added up): Redis must end exactly as after each ``write_batch``."""
    import random

    from router.mirror import BatchWrite

    rng = random.Random(7)
    rounds = []
    for seq in range(40):
        wid = rng.choice(["w1", "w2"])
        stored = {rng.randrange(30): rng.randrange(1 << 60) for _ in range(rng.randrange(4))}
        removed = [rng.randrange(30) for _ in range(rng.randrange(3))]
        rounds.append(BatchWrite(wid, 0, dict(seq=seq, epoch=3, stored=stored, removed=removed,
                                              cleared=rng.random() < 0.1, num_events=rng.randrange(5),
                                              now_s=100.0 + seq)))
    one_by_one = RedisMirror(client=fake_redis, namespace="a")
    for b in rounds:
        one_by_one.write_batch(b.worker_id, b.dp_rank, **b.kw)
    batched = RedisMirror(client=fake_redis, namespace="b")
    batched.write_batches(rounds[:25])
    batched.write_batches(rounds[25:])
    assert batched.round_trips == 2
    for wid in ("w1", "w2"):
        for key in (names.target_blocks_key, names.target_stream_key):
            assert fake_redis.hgetall(key("a", wid, 0)) == fake_redis.hgetall(key("b", wid, 0)), (wid, key)
    assert fake_redis.hget(names.target_stream_key("b", "w1", 0), "batches") is not None
