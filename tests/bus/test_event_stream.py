"""EventStream, the subscriber's rules without sockets, against a simulated vLLM publisher.

Hypothesis drives a publisher (ring of every batch, restarts) and a network that delivers
live batches in order, drops, duplicates or delays them, and answers replay requests
whenever it likes (or lets them time out). Whatever happens, every batch applied is the
publisher's batch under that seq, each at most once, in order per publisher instance; and
after a clean final batch the last instance's whole stream has been applied exactly once.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.event_stream import EventStream
from bus.stream_items import AppliedBatch, BadBatch, GapLost, StreamReset
from bus.vllm_codec import encode_batch
from core.events import BlockRemoved, KVEventBatch


class _Stream(EventStream):
    """Replay requests go to a list; abandoning the channel forgets the outstanding one."""

    def __init__(self, clock, quiet_probe_s: float | None = None) -> None:
        super().__init__(name="sim", has_replay=True, expected_seq=None, replay_timeout_s=1.0,
                         max_replay_attempts=3, max_pending=10_000, digest_window=4096, decoder=None, clock=clock,
                         quiet_probe_s=quiet_probe_s)
        self.requests: list[int] = []
        self.channel = 0  # a new DEALER: the rest of an old answer never arrives

    def _send_replay_request(self, start: int) -> None:
        self.requests = [start]  # one outstanding request at a time

    def _abandon_replay_channel(self) -> None:
        self.requests = []
        self.channel += 1


_op = st.one_of(
    st.tuples(st.just("publish"), st.sampled_from(["live", "live", "live", "drop", "duplicate", "delay"])),
    st.tuples(st.just("release"), st.integers(0, 50)),
    st.tuples(st.just("answer"), st.just(None)),
    st.tuples(st.just("timeout"), st.just(None)),
    st.tuples(st.just("restart"), st.just(None)),
)


@pytest.mark.parametrize("quiet_probe_s", [None, 1.0])
@settings(max_examples=int(__import__('os').environ.get('KVR_STREAM_EXAMPLES', '300')), deadline=None)
@given(st.lists(_op, max_size=80))
def test_any_fault_schedule_applies_each_batch_of_the_last_instance_exactly_once(quiet_probe_s, ops) -> None:
    now = [0.0]
    stream = _Stream(lambda: now[0], quiet_probe_s)
    items: list = []
    instance, ring, delayed = 0, [], []
    identity: dict[float, tuple[int, int]] = {}  # ts -> (instance, seq)

    def publish(fate: str) -> None:
        seq, ts = len(ring), float(len(identity))
        payload = encode_batch(KVEventBatch(ts, [BlockRemoved(block_hashes=[seq], medium="GPU")], 0))
        identity[ts] = (instance, seq)
        ring.append(payload)
        if fate in ("live", "duplicate"):
            stream.on_live(seq, b"", payload)
        if fate == "duplicate":
            stream.on_live(seq, b"", payload)
        if fate == "delay":
            delayed.append((seq, payload))

    def answer() -> None:
        if stream.requests:
            (start,) = stream.requests
            stream.requests = []
            channel = stream.channel
            for seq in range(start, len(ring)):
                if stream.channel != channel:
                    return
                stream.on_replayed(seq, b"", ring[seq])
            if stream.channel == channel:
                stream.on_replay_end()

    stream.start()
    stream.on_connected()  # the SUB's first connection
    for op, arg in ops:
        if op == "publish":
            publish(arg)
        elif op == "release" and delayed:
            seq, payload = delayed.pop(arg % len(delayed))
            stream.on_live(seq, b"", payload)
        elif op == "answer":
            answer()
        elif op == "timeout":
            now[0] += 1.5
            stream.on_timer()
        elif op == "restart":
            instance, ring, delayed = instance + 1, [], []  # in-flight messages die with the connection
            stream.on_connected()
        items += stream.take()
    for seq, payload in delayed:
        stream.on_live(seq, b"", payload)
    publish("live")  # a clean last batch: any hole before it is now visible
    for _ in range(10):
        answer()
    items += stream.take()
    assert not stream.requests and not stream.replay_in_flight

    # Every applied batch is the publisher's batch under that seq; per instance, seqs only grow.
    segments: list[list] = [[]]
    for item in items:
        if isinstance(item, StreamReset):
            segments.append([])
        else:
            assert not isinstance(item, BadBatch)
            segments[-1].append(item)
    last_instance = -1
    for segment in segments:
        seen_seq = -1
        for item in segment:
            first = item.from_seq if isinstance(item, GapLost) else item.seq
            assert first == seen_seq + 1, f"not contiguous: {item} after seq {seen_seq}"
            seen_seq = item.to_seq if isinstance(item, GapLost) else item.seq
            if isinstance(item, AppliedBatch):
                inst, seq = identity[item.batch.ts]
                assert seq == item.seq and inst >= last_instance
                last_instance = inst
    # The last instance's whole stream: applied once each, or reported lost (only after timeouts).
    final = segments[-1]
    applied = [i.seq for i in final if isinstance(i, AppliedBatch) and identity[i.batch.ts][0] == instance]
    lost = {s for i in final if isinstance(i, GapLost) for s in range(i.from_seq, min(i.to_seq, 10**6) + 1)}
    assert len(applied) == len(set(applied)) and not lost & set(applied)
    assert set(range(len(ring))) <= set(applied) | lost
    if not any(op == "timeout" for op, _ in ops):
        assert not lost and applied == list(range(len(ring)))


def _payload(seq: int) -> bytes:
    return encode_batch(KVEventBatch(float(seq), [BlockRemoved(block_hashes=[seq], medium="GPU")], 0))


def test_a_quiet_stream_asks_once_for_batches_lost_at_its_tail() -> None:
    """The last batches of a burst are lost (slow joiner, HWM): no later batch reveals the hole,
    so after a quiet spell the stream probes the replay socket once."""
    now = [0.0]
    stream = _Stream(lambda: now[0], quiet_probe_s=1.0)
    stream.on_connected()
    stream.on_live(0, b"", _payload(0))  # seq 1 and 2 were published too, and never arrived
    assert [i.seq for i in stream.take()] == [0] and stream.next_deadline_s() == 1.0
    now[0] = 0.9
    stream.on_timer()
    assert stream.requests == []
    now[0] = 1.0
    stream.on_timer()
    assert stream.requests == [0]  # from the anchor, whose bytes are checked
    assert not stream.replay_in_flight  # nothing is known missing: the target stays fresh
    assert (stream.counters.quiet_probes, stream.counters.replays) == (1, 0)
    stream.requests = []
    for seq in range(3):
        stream.on_replayed(seq, b"", _payload(seq))
    stream.on_replay_end()
    got = stream.take()
    assert [(i.seq, i.replayed) for i in got] == [(1, True), (2, True)]
    # New batches re-arm the probe; a probe that finds nothing changes nothing.
    now[0] = 2.5
    stream.on_timer()
    assert stream.requests == [2]
    stream.requests = []
    stream.on_replayed(2, b"", _payload(2))
    stream.on_replay_end()
    assert stream.take() == [] and stream.next_deadline_s() is None  # quiet until the next batch
    assert stream.counters.quiet_probes == 2 and stream.counters.gaps == 0


def test_an_unanswered_probe_is_dropped_without_retries_or_losses() -> None:
    now = [0.0]
    stream = _Stream(lambda: now[0], quiet_probe_s=1.0)
    stream.on_connected()
    stream.on_live(0, b"", _payload(0))
    stream.take()
    now[0] = 1.0
    stream.on_timer()
    assert stream.requests == [0]
    now[0] = 2.5  # past the replay timeout: the publisher did not answer
    stream.on_timer()
    assert stream.requests == [] and stream.channel == 1 and not stream.replay_in_flight
    assert (stream.counters.replay_timeouts, stream.counters.unrecoverable_gaps) == (0, 0)
    stream.on_live(1, b"", _payload(1))  # the stream goes on as before
    assert [i.seq for i in stream.take()] == [1]
