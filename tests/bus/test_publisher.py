"""EventPublisher against the frames vLLM 0.33's own publisher put on the wire."""

from __future__ import annotations

import hashlib
import random

import pytest
import zmq

from bus.publisher import END_SEQ, EventPublisher, FaultPlan
from bus.publisher_thread import PublisherThread
from bus.sockets import (
    connectable,
    make_socket,
    offset_endpoint_for_dp_rank,
    vllm_binds,
)
from bus.vllm_codec import decode_batch
from core.events import BlockRemoved, KVEventBatch
from tests.bus.zmq_helpers import PROBE, TOPIC, captured_stream, fixture_bin, nothing_within, recv, wait_subscribed
from tests.conftest import free_port

STREAM = captured_stream()
RANK0 = [m for m in STREAM["meta"]["messages"] if m["publisher_dp_rank"] == 0]


@pytest.fixture
def ctx():
    context = zmq.Context()
    yield context
    context.destroy(linger=0)


def _publisher(ctx, **kwargs) -> EventPublisher:
    kwargs.setdefault("endpoint", "tcp://127.0.0.1:0")
    kwargs.setdefault("bind", True)
    return EventPublisher(ctx=ctx, **kwargs)


def _sub(ctx, pub: EventPublisher, topic: bytes = b"") -> zmq.Socket:
    sub = make_socket(ctx, zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    sub.setsockopt(zmq.SUBSCRIBE, PROBE)
    sub.connect(connectable(pub.endpoint))
    wait_subscribed(lambda: pub.publish_frames([PROBE]), sub)
    return sub


def _dealer(ctx, pub: EventPublisher) -> zmq.Socket:
    dealer = make_socket(ctx, zmq.DEALER)
    dealer.connect(pub.replay_endpoint)
    return dealer


def _replay(pub: EventPublisher, dealer: zmq.Socket, request: list[bytes]) -> list[list[bytes]]:
    """Send a request, serve it, and collect replies up to and including the end marker."""
    dealer.send_multipart(request)
    assert pub.poll_replay(2000) == 1
    replies = []
    while True:
        frames = recv(dealer)
        replies.append(frames)
        if END_SEQ in frames:
            return replies


def _capture_frames(message: list[dict]) -> list[bytes]:
    return [bytes.fromhex(frame["hex"]) for frame in message]


# -- endpoint rules --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("endpoint", "binds"),
    [("tcp://*:5557", True), ("tcp://[::]:5557", True), ("ipc:///tmp/kv", True), ("inproc://kv", True),
     ("tcp://127.0.0.1:5557", False), ("tcp://indexer:5557", False), ("tcp://0.0.0.0:5557", False)],
)
def test_vllm_bind_or_connect_rule(endpoint: str, binds: bool) -> None:
    assert vllm_binds(endpoint) is binds


@pytest.mark.parametrize(
    ("endpoint", "rank", "expected"),
    [("tcp://*:5557", 3, "tcp://*:5560"), ("tcp://*:5558", 0, "tcp://*:5558"), ("tcp://*:0", 2, "tcp://*:0"),
     ("tcp://[::1]:5557", 1, "tcp://[::1]:5558"), ("inproc://events", 0, "inproc://events_dp0"),
     ("inproc://events", 2, "inproc://events_dp2")],
)
def test_dp_rank_offsets_endpoints_like_vllm(endpoint: str, rank: int, expected: str) -> None:
    assert offset_endpoint_for_dp_rank(endpoint, rank) == expected


def test_dp_rank_publisher_binds_offset_ports_and_fills_its_rank(ctx) -> None:
    capture = STREAM["meta"]["replay_captures"]["dp_rank_3"]["req_from_0"][0]
    payload = bytes.fromhex(capture[2]["hex"])
    batch = decode_batch(payload)
    for _ in range(20):  # base ports are free, but base+3 may be taken: try other bases
        port, replay_port = free_port(), free_port()
        if abs(port - replay_port) == 3:
            continue
        try:
            pub = _publisher(ctx, endpoint=f"tcp://127.0.0.1:{port}",
                             replay_endpoint=f"tcp://127.0.0.1:{replay_port}", topic=TOPIC, dp_rank=3)
            break
        except zmq.ZMQError:
            continue
    else:
        pytest.fail("no free port pair at offset 3")
    try:
        assert pub.endpoint == f"tcp://127.0.0.1:{port + 3}"
        assert pub.replay_endpoint == f"tcp://127.0.0.1:{replay_port + 3}"
        sub = _sub(ctx, pub)
        pub.publish(batch.events, batch.ts)  # the rank comes from the publisher, as in vLLM
        assert recv(sub) == [TOPIC.encode(), bytes(8), payload]
    finally:
        pub.close()


# -- live frames -----------------------------------------------------------------------------------


def test_live_frames_are_byte_identical_to_vllms_capture(ctx) -> None:
    """Publish the decoded meaning of all 14 captured batches; frames must equal vLLM's."""
    pub = _publisher(ctx, topic=TOPIC)
    try:
        sub = _sub(ctx, pub)
        for message in RANK0:
            seq = message["frames"][1]["int"]
            pub.publish_batch(decode_batch(STREAM["payloads"][seq]))
            topic, seq_frame, payload = recv(sub)
            assert topic.hex() == message["frames"][0]["hex"]
            assert seq_frame.hex() == message["frames"][1]["hex"]
            assert len(payload) == message["frames"][2]["len"]
            assert hashlib.sha256(payload).hexdigest() == message["frames"][2]["sha256"]
        assert pub.next_seq == len(RANK0)
    finally:
        pub.close()


@pytest.mark.parametrize("name", ["01_stored_one_block", "05_removed_per_block", "06_all_blocks_cleared", "09_lora"])
def test_payload_equals_fixture_bin_and_empty_topic_is_an_empty_frame(ctx, name: str) -> None:
    fixture = fixture_bin(name)
    batch = decode_batch(fixture)
    pub = _publisher(ctx)
    try:
        sub = _sub(ctx, pub)
        assert pub.publish(batch.events, batch.ts) == 0
        assert pub.publish(batch.events, batch.ts) == 1
        assert recv(sub) == [b"", bytes(8), fixture]
        assert recv(sub) == [b"", (1).to_bytes(8, "big"), fixture]
    finally:
        pub.close()


# -- replay protocol -------------------------------------------------------------------------------


def _publish_capture(pub: EventPublisher) -> None:
    for seq in range(len(RANK0)):
        pub.publish_batch(decode_batch(STREAM["payloads"][seq]))


def test_replay_from_1_is_byte_identical_to_vllms_capture(ctx) -> None:
    pub = _publisher(ctx, topic=TOPIC, replay_endpoint="tcp://127.0.0.1:0")
    try:
        _publish_capture(pub)
        replies = _replay(pub, _dealer(ctx, pub), [b"", (1).to_bytes(8, "big")])
        expected = [_capture_frames(m) for m in STREAM["meta"]["replay_captures"]["dp_rank_0"]["dealer_from_1"]]
        assert len(expected) == 14  # 13 batches + end marker
        assert replies == expected
        assert pub.counters.replayed_batches == 13
    finally:
        pub.close()


def test_replay_beyond_the_buffer_gets_only_the_end_marker(ctx) -> None:
    pub = _publisher(ctx, topic=TOPIC, replay_endpoint="tcp://127.0.0.1:0")
    try:
        _publish_capture(pub)
        replies = _replay(pub, _dealer(ctx, pub), [b"", (10**6).to_bytes(8, "big")])
        expected = [_capture_frames(m) for m in STREAM["meta"]["replay_captures"]["dp_rank_0"]["dealer_from_beyond"]]
        assert replies == expected == [[b"", b"", END_SEQ, b""]]
    finally:
        pub.close()


def test_legacy_reply_layout(ctx) -> None:
    pub = _publisher(ctx, topic=TOPIC, replay_endpoint="tcp://127.0.0.1:0", reply_format="legacy")
    try:
        _publish_capture(pub)
        replies = _replay(pub, _dealer(ctx, pub), [b"", (12).to_bytes(8, "big")])
        assert replies == [
            [b"", (12).to_bytes(8, "big"), STREAM["payloads"][12]],
            [b"", (13).to_bytes(8, "big"), STREAM["payloads"][13]],
            [b"", END_SEQ, b""],
        ]
    finally:
        pub.close()


def test_rotated_out_start_replays_from_the_oldest_held_batch(ctx) -> None:
    pub = _publisher(ctx, replay_endpoint="tcp://127.0.0.1:0", buffer_steps=4)
    try:
        for i in range(10):
            pub.publish_raw(b"payload-%d" % i)
        replies = _replay(pub, _dealer(ctx, pub), [b"", (2).to_bytes(8, "big")])
        assert replies == [[b"", b"", i.to_bytes(8, "big"), b"payload-%d" % i] for i in range(6, 10)] + [
            [b"", b"", END_SEQ, b""]]
    finally:
        pub.close()


def test_start_seq_of_any_length_parses_big_endian(ctx) -> None:
    pub = _publisher(ctx, replay_endpoint="tcp://127.0.0.1:0")
    try:
        for i in range(3):
            pub.publish_raw(b"p%d" % i)
        replies = _replay(pub, _dealer(ctx, pub), [b"", b"\x02"])
        assert [r[2] for r in replies] == [(2).to_bytes(8, "big"), END_SEQ]
    finally:
        pub.close()


@pytest.mark.parametrize("request_frames", [[(0).to_bytes(8, "big")], [b"", b"", (0).to_bytes(8, "big")]],
                         ids=["no-delimiter", "extra-frame"])
def test_malformed_replay_request_gets_no_reply(ctx, request_frames: list[bytes]) -> None:
    pub = _publisher(ctx, replay_endpoint="tcp://127.0.0.1:0")
    try:
        pub.publish_raw(b"p0")
        dealer = _dealer(ctx, pub)
        dealer.send_multipart(request_frames)
        assert pub.poll_replay(2000) == 1  # received and ignored
        assert nothing_within(dealer, 200)
        assert pub.counters.bad_replay_requests == 1
        assert pub.counters.replay_requests == 0
        # The socket still serves a well-formed request afterwards.
        assert _replay(pub, dealer, [b"", bytes(8)]) == [[b"", b"", bytes(8), b"p0"], [b"", b"", END_SEQ, b""]]
    finally:
        pub.close()


def test_req_client_sees_only_the_first_reply(ctx) -> None:
    pub = _publisher(ctx, topic=TOPIC, replay_endpoint="tcp://127.0.0.1:0")
    try:
        _publish_capture(pub)
        req = make_socket(ctx, zmq.REQ)
        req.connect(pub.replay_endpoint)
        req.send(bytes(8))
        assert pub.poll_replay(2000) == 1
        expected = [_capture_frames(m) for m in STREAM["meta"]["replay_captures"]["dp_rank_0"]["req_from_0"]]
        assert [recv(req)] == expected
        assert nothing_within(req, 100)
    finally:
        pub.close()


# -- restart and faults ----------------------------------------------------------------------------


def test_restart_resets_seq_and_ring_on_the_same_endpoints(ctx) -> None:
    pub = _publisher(ctx, endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0")
    try:
        for i in range(3):
            pub.publish_raw(b"old-%d" % i)
        endpoint, replay_endpoint = pub.endpoint, pub.replay_endpoint
        pub.restart()
        assert (pub.endpoint, pub.replay_endpoint, pub.next_seq) == (endpoint, replay_endpoint, 0)
        dealer = _dealer(ctx, pub)
        assert _replay(pub, dealer, [b"", bytes(8)]) == [[b"", b"", END_SEQ, b""]]
        sub = _sub(ctx, pub)
        assert pub.publish_raw(b"new-0") == 0
        assert recv(sub) == [b"", bytes(8), b"new-0"]
    finally:
        pub.close()


def test_faults_change_live_sends_only_and_follow_the_injected_rng(ctx) -> None:
    plan = FaultPlan(drop_rate=0.2, duplicate_rate=0.2, reorder_rate=0.1)
    pub = _publisher(ctx, replay_endpoint="tcp://127.0.0.1:0", faults=plan, rng=random.Random(7))
    try:
        sub = _sub(ctx, pub)
        rng = random.Random(7)
        draws = [plan.draw(rng) for _ in range(40)]
        for i in range(40):
            pub.publish_raw(b"%d" % i)
        pub.flush_held()
        received = []
        while not nothing_within(sub, 100):
            received.append(int(sub.recv_multipart()[1].hex(), 16))
        # What the subscriber sees is exactly what the plan drew, batch by batch.
        expected, held = [], []
        for seq, fault in enumerate(draws):
            if fault == "drop":
                continue
            if fault == "reorder":
                held.append(seq)
                continue
            expected += [seq, seq] if fault == "duplicate" else [seq]
            expected += held
            held = []
        expected += held
        assert received == expected
        assert pub.counters.dropped == draws.count("drop") > 0
        assert pub.counters.duplicated == draws.count("duplicate") > 0
        assert pub.counters.reordered == draws.count("reorder") > 0
        # The ring holds the true stream.
        replies = _replay(pub, _dealer(ctx, pub), [b"", bytes(8)])
        assert [int(r[2].hex(), 16) for r in replies[:-1]] == list(range(40))
    finally:
        pub.close()


def test_delayed_batches_are_released_by_poll_once_due(ctx) -> None:
    now = [100.0]
    pub = _publisher(ctx, faults=FaultPlan(delay_rate=1.0, delay_ms=500), rng=random.Random(1),
                     clock=lambda: now[0])
    try:
        sub = _sub(ctx, pub)
        pub.publish_raw(b"late")
        pub.poll_replay(0)
        assert nothing_within(sub, 100) and pub.held == 1
        now[0] += 0.5
        pub.poll_replay(0)
        assert recv(sub) == [b"", bytes(8), b"late"] and pub.held == 0
    finally:
        pub.close()


def test_fault_plan_rejects_rates_above_one() -> None:
    with pytest.raises(ValueError):
        FaultPlan(drop_rate=0.7, duplicate_rate=0.4)


def test_publisher_thread_publishes_in_order_and_serves_replay(ctx) -> None:
    thread = PublisherThread(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True)
    try:
        dealer = make_socket(ctx, zmq.DEALER)
        dealer.connect(thread.replay_endpoint)
        for i in range(5):
            thread.publish([BlockRemoved(block_hashes=[2**64 - 1 - i], medium="GPU")], float(i))
        # Replay is served by the publisher's own thread; it holds all 5 once they are queued through.
        for _ in range(50):
            dealer.send_multipart([b"", bytes(8)])
            replies = [recv(dealer)]
            while replies[-1][2] != END_SEQ:
                replies.append(recv(dealer))
            if len(replies) == 6:
                break
        assert [int(r[2].hex(), 16) for r in replies[:-1]] == [0, 1, 2, 3, 4]
        batches = [decode_batch(r[3]) for r in replies[:-1]]
        assert batches[4] == KVEventBatch(4.0, [BlockRemoved(block_hashes=[2**64 - 5], medium="GPU")], 0)
    finally:
        thread.close()
