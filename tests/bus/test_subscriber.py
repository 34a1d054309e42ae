"""EventSubscriber over real ZMQ on loopback: gaps, replay, duplicates, resets, garbage."""

from __future__ import annotations

import random
import time
from collections.abc import Callable

import pytest
import zmq

from bus.publisher import EventPublisher, FaultPlan, seq_bytes
from bus.sockets import connectable, make_socket
from bus.subscriber import AppliedBatch, BadBatch, EventSubscriber, GapLost, StreamItem, StreamReset
from bus.vllm_codec import encode_batch
from core.events import BlockRemoved, BlockStored, KVEventBatch
from tests.waiting import eventually


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _events(tag: int) -> list:
    """A distinct, realistic batch per tag (hashes above 2**63 included)."""
    return [
        BlockStored(block_hashes=[2**63 + tag, 2**64 - 1 - tag], parent_block_hash=None, token_ids=list(range(32)),
                    block_size=16, lora_id=None, medium="GPU", lora_name=None, extra_keys=[None, None], group_idx=0,
                    kv_cache_spec_kind="full_attention"),
        BlockRemoved(block_hashes=[tag], medium="GPU", group_idx=0),
    ]


def _pump(sub: EventSubscriber, pubs: list[EventPublisher], until: Callable[[list[StreamItem]], bool],
          items: list[StreamItem], timeout_s: float = 10.0) -> list[StreamItem]:
    """Serve replays and poll the subscriber until ``until(items)`` or fail after ``timeout_s``."""

    def pump() -> None:
        for pub in pubs:
            pub.poll_replay(0)
        items.extend(sub.poll(5))

    eventually(lambda: until(items), timeout_s=timeout_s, pump=pump, interval_s=0,
               what=lambda: (f"stream complete: {_summary(items)}; connections={sub.connections} "
                             f"replay_in_flight={sub.replay_in_flight} {sub.counters}"))
    return items


def _summary(items: list[StreamItem]) -> list:
    return [(type(i).__name__, getattr(i, "seq", None) if isinstance(i, (AppliedBatch, BadBatch)) else i)
            for i in items][-30:]


def _applied(items: list[StreamItem]) -> list[int]:
    return [i.seq for i in items if isinstance(i, AppliedBatch)]


def _n_applied(n: int) -> Callable[[list[StreamItem]], bool]:
    return lambda items: len(_applied(items)) >= n


def test_slow_joiner_gets_everything_since_the_publisher_started(ctx) -> None:
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    sub = None
    try:
        for i in range(10):
            pub.publish(_events(i), float(i))
        sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx)
        items = _pump(sub, [pub], _n_applied(10), [])
        assert items == [AppliedBatch(i, KVEventBatch(float(i), _events(i), 0), True, b"") for i in range(10)]
        assert (sub.counters.batches, sub.counters.events, sub.counters.block_events) == (10, 20, 30)
        assert sub.counters.replays == 1 and sub.counters.replayed_batches == 10
    finally:
        if sub is not None:
            sub.close()
        pub.close()


def _publish_phase(pub: EventPublisher, sub: EventSubscriber, items: list, n: int, tag0: int,
                   sent: dict[int, int]) -> None:
    """Publish n batches with faults on; the last one fault-free, so the tail's gaps get noticed."""
    faults = pub.faults
    for i in range(n):
        if i == n - 1:
            pub.flush_held()
            pub.faults = None
        sent[pub.publish(_events(tag0 + i), float(tag0 + i))] = tag0 + i
        pub.poll_replay(0)
        items.extend(sub.poll(0))
    pub.faults = faults


def test_drops_duplicates_reorders_and_a_restart_apply_the_published_stream_exactly_once(ctx) -> None:
    plan = FaultPlan(drop_rate=0.15, duplicate_rate=0.1, reorder_rate=0.1, delay_rate=0.05, delay_ms=20)
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx,
                         faults=plan, rng=random.Random(42))
    sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx)
    try:
        items: list[StreamItem] = []
        first, second = {}, {}
        _publish_phase(pub, sub, items, 200, 0, first)
        _pump(sub, [pub], _n_applied(200), items)
        pub.restart()
        _publish_phase(pub, sub, items, 100, 1000, second)
        _pump(sub, [pub], _n_applied(300), items)

        resets = [i for i, item in enumerate(items) if isinstance(item, StreamReset)]
        assert resets == [200], _summary(items)
        assert items[200].old_seq == 199
        assert not [i for i in items if isinstance(i, (GapLost, BadBatch))]
        assert _applied(items) == list(range(200)) + list(range(100))
        for item in items[:200]:
            assert item.batch.events == _events(first[item.seq])
        for item in items[201:]:
            assert item.batch.events == _events(second[item.seq])
        c = sub.counters
        assert c.batches == 300 and c.resets == 1 and c.lost_batches == 0
        # Dropped batches come back only by replay. (How many gaps and duplicates the subscriber
        # sees depends on when its SUB connected: on a loaded machine all of phase 1 may be replayed.)
        assert c.replayed_batches >= pub.counters.dropped > 0
        assert pub.counters.dropped > 0 and pub.counters.duplicated > 0 and pub.counters.reordered > 0
    finally:
        sub.close()
        pub.close()


def test_restart_noticed_even_when_the_new_stream_has_no_lower_seq_yet(ctx) -> None:
    """A new publisher instance whose first batches were lost: the anchor check finds it."""
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx)
    try:
        items: list[StreamItem] = []
        for i in range(3):
            pub.publish(_events(i), float(i))
        # Connected, and the connection seen: a restart from here on is a *re*connection.
        _pump(sub, [pub], lambda it: len(_applied(it)) == 3 and sub.connections == 1 and not sub.replay_in_flight,
              items)
        pub.restart()
        for i in range(8):  # published before the SUB reconnects: lost live, kept in the new ring
            pub.publish(_events(100 + i), 100.0 + i)
        _pump(sub, [pub], _n_applied(11), items)
        assert _applied(items) == [0, 1, 2] + list(range(8))
        assert [type(i) for i in items[3:4]] == [StreamReset] and items[3].old_seq == 2
        assert [i.batch.events for i in items[4:]] == [_events(100 + i) for i in range(8)]
        assert sub.counters.resets == 1
    finally:
        sub.close()
        pub.close()


def test_resume_from_an_expected_seq_replays_only_what_is_newer(ctx) -> None:
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    sub = None
    try:
        for i in range(6):
            pub.publish(_events(i), float(i))
        sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx, expected_seq=4)
        items = _pump(sub, [pub], _n_applied(2), [])
        assert _applied(items) == [4, 5] and len(items) == 2
    finally:
        if sub is not None:
            sub.close()
        pub.close()


def test_rotated_out_history_is_reported_lost_then_the_rest_applied(ctx) -> None:
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx,
                         buffer_steps=5)
    sub = None
    try:
        for i in range(20):
            pub.publish(_events(i), float(i))
        sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx)
        items = _pump(sub, [pub], _n_applied(5), [])
        assert items[0] == GapLost(0, 14)
        assert _applied(items) == [15, 16, 17, 18, 19] and len(items) == 6
        assert sub.counters.unrecoverable_gaps == 1 and sub.counters.lost_batches == 15
    finally:
        if sub is not None:
            sub.close()
        pub.close()


def _raw_pub(ctx) -> tuple[zmq.Socket, str]:
    sock = make_socket(ctx, zmq.PUB)
    sock.bind("tcp://127.0.0.1:0")
    return sock, sock.getsockopt(zmq.LAST_ENDPOINT).decode()


def _until_first_applied(raw: zmq.Socket, sub: EventSubscriber, payload: bytes) -> list[StreamItem]:
    """Resend seq 0 until the subscription is up (copies after the first count as duplicates)."""
    items: list[StreamItem] = []

    def resend() -> None:
        raw.send_multipart([b"", seq_bytes(0), payload])
        items.extend(sub.poll(20))

    eventually(lambda: items, what="the subscriber joined", pump=resend, interval_s=0)
    time.sleep(0.05)
    items.extend(sub.poll(20))
    return items


def test_without_replay_a_gap_is_reported_lost(ctx) -> None:
    raw, endpoint = _raw_pub(ctx)
    sub = EventSubscriber(endpoint=endpoint, ctx=ctx)
    try:
        payloads = [encode_batch(KVEventBatch(float(i), _events(i), 0)) for i in range(6)]
        items = _until_first_applied(raw, sub, payloads[0])
        for seq in (1, 2, 5):
            raw.send_multipart([b"", seq_bytes(seq), payloads[seq]])
        items = _pump(sub, [], _n_applied(4), items)
        assert [i if isinstance(i, GapLost) else i.seq for i in items] == [0, 1, 2, GapLost(3, 4), 5]
    finally:
        sub.close()


def test_garbage_never_crashes_the_subscriber_and_is_counted(ctx) -> None:
    rng = random.Random(99)
    raw, endpoint = _raw_pub(ctx)
    sub = EventSubscriber(endpoint=endpoint, ctx=ctx)
    try:
        good = encode_batch(KVEventBatch(1.0, _events(1), 0))
        items = _until_first_applied(raw, sub, good)
        before = sub.counters.duplicates
        bad_frames = decode_errors = 0
        seq = 1
        for _ in range(300):
            kind = rng.randrange(4)
            if kind == 0:  # wrong frame count
                raw.send_multipart([b""] + [rng.randbytes(rng.randrange(12)) for _ in range(rng.choice([0, 1, 3, 5]))])
                bad_frames += 1
            elif kind == 1:  # a seq that is not 8 bytes
                raw.send_multipart([b"", rng.randbytes(rng.choice([0, 1, 7, 9, 16])), good])
                bad_frames += 1
            else:  # a well-framed batch whose payload is garbage
                junk = rng.randbytes(rng.randrange(1, 64)) if kind == 2 else good[: rng.randrange(1, len(good))]
                raw.send_multipart([b"", seq_bytes(seq), junk])
                seq += 1
                decode_errors += 1
        raw.send_multipart([b"", seq_bytes(seq), good])
        items = _pump(sub, [], lambda it: len(_applied(it)) >= 2, items)
        assert sub.counters.bad_frames == bad_frames
        assert sub.counters.decode_errors == decode_errors
        assert [i.seq for i in items if isinstance(i, BadBatch)] == list(range(1, seq))
        assert _applied(items) == [0, seq]
        assert sub.counters.duplicates == before
    finally:
        sub.close()


def test_garbage_replay_answers_are_counted_and_a_silent_publisher_times_out(ctx) -> None:
    raw, endpoint = _raw_pub(ctx)
    router = make_socket(ctx, zmq.ROUTER)
    router.bind("tcp://127.0.0.1:0")
    replay_endpoint = router.getsockopt(zmq.LAST_ENDPOINT).decode()
    sub = EventSubscriber(endpoint=endpoint, replay_endpoint=replay_endpoint, ctx=ctx, replay_timeout_ms=150,
                          max_replay_attempts=2)
    try:
        identity, empty, start = router.recv_multipart() if router.poll(2000) else pytest.fail("no replay request")
        assert (empty, start) == (b"", bytes(8))
        for frames in ([b"x"], [b"", b"t", b"short", b"p"], [b"", b"a", b"b", b"c", b"d"]):
            router.send_multipart([identity] + frames)
        # The router never answers properly.
        eventually(lambda: sub.counters.replay_timeouts >= 2, what="two replay timeouts", pump=lambda: sub.poll(20),
                   interval_s=0)
        assert sub.counters.bad_frames == 3
        assert not sub.replay_in_flight and sub.counters.replays == 1
        payload = encode_batch(KVEventBatch(0.0, _events(0), 0))
        items = _until_first_applied(raw, sub, payload)
        assert _applied(items) == [0]
    finally:
        sub.close()
        router.close()


def test_many_streams_share_one_poller(ctx) -> None:
    pubs = [EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx,
                           dp_rank=r) for r in range(3)]
    subs = [EventSubscriber(endpoint=connectable(p.endpoint), replay_endpoint=p.replay_endpoint, ctx=ctx)
            for p in pubs]
    poller = zmq.Poller()
    try:
        for sub in subs:
            sub.attach(poller)
        for i in range(4):
            for pub in pubs:
                pub.publish(_events(i), float(i))
        got: dict[int, list[int]] = {0: [], 1: [], 2: []}

        def pump() -> None:
            for pub in pubs:
                pub.poll_replay(0)
            ready = dict(poller.poll(10))
            for r, sub in enumerate(subs):
                for sock in sub.sockets():
                    if sock in ready:
                        got[r] += [i.seq for i in sub.handle_readable(sock) if isinstance(i, AppliedBatch)]
                got[r] += [i.seq for i in sub.check_timeouts() if isinstance(i, AppliedBatch)]

        eventually(lambda: all(len(v) >= 4 for v in got.values()), timeout_s=10, what=lambda: f"4 batches each: {got}",
                   pump=pump, interval_s=0)
        assert got == {0: [0, 1, 2, 3], 1: [0, 1, 2, 3], 2: [0, 1, 2, 3]}
    finally:
        for sub in subs:
            sub.close()
        for pub in pubs:
            pub.close()


def test_a_seq_jump_to_near_2_64_is_reported_lost_without_walking_it(ctx) -> None:
    raw, endpoint = _raw_pub(ctx)
    sub = EventSubscriber(endpoint=endpoint, ctx=ctx)
    try:
        payload = encode_batch(KVEventBatch(0.0, _events(0), 0))
        items = _until_first_applied(raw, sub, payload)
        raw.send_multipart([b"", seq_bytes(2**64 - 2), payload])
        raw.send_multipart([b"", seq_bytes(1), encode_batch(KVEventBatch(1.0, _events(1), 0))])
        items = _pump(sub, [], _n_applied(3), items)
        assert [i if not isinstance(i, AppliedBatch) else i.seq for i in items] == [
            0, GapLost(1, 2**64 - 3), 2**64 - 2, StreamReset(2**64 - 2, 1), GapLost(0, 0), 1]
    finally:
        sub.close()


def _until_live(pub: EventPublisher, sub: EventSubscriber, items: list) -> None:
    """Publish until a batch arrives live: the subscription has reached the publisher."""

    def publish() -> None:  # one batch, then 50 ms serving replays and reading
        pub.publish(_events(pub.next_seq), float(pub.next_seq))
        until = time.monotonic() + 0.05
        while time.monotonic() < until:
            pub.poll_replay(0)
            items.extend(sub.poll(5))

    eventually(lambda: any(isinstance(i, AppliedBatch) and not i.replayed for i in items),
               what="a batch arrived live", pump=publish, interval_s=0)
    _pump(sub, [pub], _n_applied(pub.next_seq), items)  # whatever the slow joiner missed, replayed


def test_a_seq_the_publisher_never_sent_ends_as_lost_after_replay_cannot_fill_it(ctx) -> None:
    """A live frame claiming a far-future seq: replay fills what exists, then the rest is lost."""
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx)
    try:
        items: list[StreamItem] = []
        _until_live(pub, sub, items)
        k = pub.next_seq
        assert _applied(items) == list(range(k))
        forged = encode_batch(KVEventBatch(9.0, _events(9), 0))
        pub.publish_frames([b"", seq_bytes(1000), forged])
        pub.publish(_events(k), float(k))  # seq k is real: replay can bring it if its live copy is late
        _pump(sub, [pub], lambda it: 1000 in _applied(it), items)
        tail = [i if not isinstance(i, AppliedBatch) else i.seq for i in items[k:]]
        assert tail == [k, GapLost(k + 1, 999), 1000]
        assert sub.counters.unrecoverable_gaps == 1
    finally:
        sub.close()
        pub.close()


def test_a_vllm_0_22_publisher_legacy_replay_layout_and_array_events(ctx) -> None:
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx,
                         reply_format="legacy", topic="kv@old@m")
    sub = None
    try:
        for i in range(4):
            pub.publish_raw(encode_batch(KVEventBatch(float(i), _events(i), 0), legacy=True))
        sub = EventSubscriber(endpoint=pub.endpoint, replay_endpoint=pub.replay_endpoint, ctx=ctx)
        items = _pump(sub, [pub], _n_applied(4), [])
        # The legacy layout has no topic frame: the subscriber's own (empty) prefix stands in.
        assert items == [AppliedBatch(i, KVEventBatch(float(i), _events(i), 0), True, b"") for i in range(4)]
        assert sub.decoder.legacy_batches == 4
    finally:
        if sub is not None:
            sub.close()
        pub.close()
