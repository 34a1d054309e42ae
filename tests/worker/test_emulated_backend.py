"""The emulated backend: engine steps on a scaled clock, messages, vLLM event batches, faults."""

from __future__ import annotations

import pytest
import zmq

from bus.publisher import FaultPlan
from bus.schema import Completion, Dispatch, ErrorCode, ErrorReply, TokenChunk
from bus.vllm_codec import decode_batch
from core.events import AllBlocksCleared, BlockStored
from core.profiles import get_profile
from tests.fakes.clock import ManualClock
from worker.emulated import EmulatedBackend, EmulatedWorkerConfig


@pytest.fixture
def ctx():
    c = zmq.Context()
    yield c
    c.term()


def backend(ctx, clock, **kw) -> EmulatedBackend:
    cfg = dict(worker_id="w1", speedup=2.0, seed=7)
    cfg.update(kw)
    return EmulatedBackend(config=EmulatedWorkerConfig(**cfg), ctx=ctx, clock=clock, wall_clock=lambda: 1234.5)


def replay_all(b: EmulatedBackend, ctx, start: int = 0) -> list[tuple[int, bytes]]:
    """Ask the backend's replay socket for every batch from ``start`` (bounded waits)."""
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(b.replay_endpoint)
    try:
        dealer.send_multipart([b"", start.to_bytes(8, "big")])
        out = []
        for _ in range(200):
            b.poll_sockets()
            if dealer.poll(10, zmq.POLLIN):
                _, _topic, seq, payload = dealer.recv_multipart()
                if seq == b"\xff" * 8:
                    return out
                out.append((int.from_bytes(seq, "big"), payload))
        raise AssertionError("no end of replay")
    finally:
        dealer.close()


def test_hello_advertises_loopback_endpoints_and_the_profile(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    try:
        h = b.hello(epoch=5)
        assert (h.worker_id, h.epoch, h.model, h.engine, h.profile, h.dp_size) == (
            "w1", 5, "kvr-emulated", "emulated", "simple", 1)
        assert (h.block_size, h.num_gpu_blocks) == (16, 924)
        assert h.events_endpoint.startswith("tcp://127.0.0.1:") and not h.events_endpoint.endswith(":0")
        assert h.replay_endpoint.startswith("tcp://127.0.0.1:") and h.topic == ""  # vLLM's default topic
    finally:
        b.close()


def test_steps_take_their_duration_divided_by_speedup_and_emit_at_their_end(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    lat = get_profile("simple").latency
    prefill = lat.prefill_s(new_tokens=40)  # 15 ms + 3 blocks x 2 ms
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(40)), max_tokens=2))
        due = b.advance(clock.t)
        assert due == pytest.approx(clock.t + prefill / 2)
        clock.t = due - 1e-6
        assert b.advance(clock.t) == due and b.drain() == []
        clock.t = due
        second = b.advance(clock.t)
        (chunk,) = b.drain()
        assert isinstance(chunk, TokenChunk) and chunk.request_id == "q" and len(chunk.token_ids) == 1
        assert chunk.text == b.tokenizer.decode(chunk.token_ids)
        assert second == pytest.approx(due + lat.decode_token_s(batch_size=1, kv_tokens=40) / 2)
        clock.t = second
        assert b.advance(clock.t) is None
        tok, done = b.drain()
        assert isinstance(tok, TokenChunk) and isinstance(done, Completion)
        assert (done.prompt_tokens, done.cached_tokens, done.output_tokens, done.worker_id) == (40, 0, 2, "w1")
        # Stats are engine time: the prefill took its full modelled duration.
        assert done.stats.ttft_s == pytest.approx(prefill) and done.stats.queue_s == pytest.approx(0.0)
        assert b.overrun_s == 0.0
    finally:
        b.close()


def test_each_step_publishes_one_vllm_batch_that_replay_returns(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(40)), max_tokens=1))
        clock.t = b.advance(clock.t)
        b.advance(clock.t)
        (batch,) = replay_all(b, ctx)
        seq, payload = batch
        decoded = decode_batch(payload)
        assert seq == 0 and decoded.ts == 1234.5 and decoded.data_parallel_rank == 0
        (ev,) = decoded.events
        assert isinstance(ev, BlockStored) and ev.token_ids == list(range(32)) and len(ev.block_hashes) == 2
        assert ev.medium == "GPU" and ev.group_idx == 0 and ev.kv_cache_spec_kind == "full_attention"
    finally:
        b.close()


def test_cancel_ends_a_request_with_one_cancelled_error_and_drops_its_pending_tokens(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(40)), max_tokens=100))
        b.advance(clock.t)  # its prefill step is in flight
        assert b.cancel("q") is True
        assert b.cancel("q") is False
        clock.t += 10
        b.advance(clock.t)
        (msg,) = b.drain()
        assert isinstance(msg, ErrorReply) and msg.code == ErrorCode.CANCELLED and msg.request_id == "q"
        assert b.load().kv_usage == 0.0
    finally:
        b.close()


def test_rejected_requests_get_a_clear_error(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    try:
        b.submit(Dispatch(request_id="long", token_ids=[1] * 5000, max_tokens=1))
        b.submit(Dispatch(request_id="rank", token_ids=[1, 2], max_tokens=1, dp_rank=1))
        b.submit(Dispatch(request_id="empty", token_ids=[], max_tokens=1))
        codes = [(m.request_id, m.code) for m in b.drain()]
        assert codes == [("long", ErrorCode.PROMPT_TOO_LONG), ("rank", ErrorCode.BAD_REQUEST),
                         ("empty", ErrorCode.BAD_REQUEST)]
        assert b.advance(clock.t) is None
    finally:
        b.close()


def test_dropped_batches_stay_replayable_and_a_publisher_restart_resets_seq(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock, faults=FaultPlan(drop_rate=1.0))
    try:
        for i in range(2):
            b.submit(Dispatch(request_id=f"q{i}", token_ids=[i] * 40, max_tokens=1))
            clock.t = b.advance(clock.t)
            b.advance(clock.t)
        assert b.publisher.counters.dropped == 2 and b.publisher.counters.sent == 0
        assert [seq for seq, _ in replay_all(b, ctx)] == [0, 1]
        b.restart_publisher()
        assert b.publisher.next_seq == 0
        assert b.reset_prefix_cache() is True
        (batch,) = replay_all(b, ctx)
        assert batch[0] == 0 and decode_batch(batch[1]).events == [AllBlocksCleared()]
    finally:
        b.close()


def test_close_answers_everything_in_flight(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    b.submit(Dispatch(request_id="a", token_ids=list(range(20)), max_tokens=50))
    b.submit(Dispatch(request_id="b", token_ids=list(range(20)), max_tokens=50))
    b.advance(clock.t)
    b.close()
    terminal = [m for m in b.drain() if isinstance(m, (Completion, ErrorReply))]
    assert sorted((m.request_id, m.code) for m in terminal) == [("a", ErrorCode.WORKER_ERROR),
                                                                ("b", ErrorCode.WORKER_ERROR)]


def test_stream_interval_sends_the_first_token_alone_then_batches(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock, stream_interval=3)
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(10)), max_tokens=8))
        chunks = []
        while (due := b.advance(clock.t)) is not None:
            clock.t = due
            chunks += b.drain()
        chunks += b.drain()
        sizes = [len(m.token_ids) for m in chunks if isinstance(m, TokenChunk)]
        assert sizes == [1, 3, 3, 1] and isinstance(chunks[-1], Completion)
        assert "".join(m.text for m in chunks if isinstance(m, TokenChunk)) == b.tokenizer.decode(
            [t for m in chunks if isinstance(m, TokenChunk) for t in m.token_ids])
    finally:
        b.close()


def test_small_lateness_does_not_accumulate_but_a_large_lag_resyncs(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock, speedup=10.0)
    lat = get_profile("simple").latency
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(40)), max_tokens=4))
        first_due = b.advance(clock.t)
        clock.t = first_due + 0.001  # woken 1 ms late (timer granularity)
        second_due = b.advance(clock.t)
        # The next step starts where the last one ended in engine time, not 1 ms later.
        assert second_due == pytest.approx(first_due + lat.decode_token_s(batch_size=1) / 10)
        clock.t = second_due + 1.0  # a long stall: the engine resyncs to the wall clock
        third_due = b.advance(clock.t)
        assert third_due == pytest.approx(clock.t + lat.decode_token_s(batch_size=1) / 10)
        assert b.resyncs == 1 and b.overrun_s == pytest.approx(1.001)
    finally:
        b.close()


def test_a_duplicate_dispatch_is_ignored_not_answered(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(10)), max_tokens=2))
        b.submit(Dispatch(request_id="q", token_ids=list(range(10)), max_tokens=2))
        assert b.drain() == [] and b.num_in_flight == 1
    finally:
        b.close()


def test_a_reset_during_a_step_is_published_after_that_steps_events(ctx) -> None:
    clock = ManualClock(100.0)
    b = backend(ctx, clock)
    try:
        b.submit(Dispatch(request_id="q", token_ids=list(range(40)), max_tokens=3))
        due = b.advance(clock.t)  # the prefill step (it stores 2 blocks) is in flight
        assert b.reset_prefix_cache() is False
        assert b.reset_prefix_cache(True) is True
        clock.t = due
        b.advance(clock.t)
        (batch,) = replay_all(b, ctx)
        assert [type(e).__name__ for e in decode_batch(batch[1]).events] == ["BlockStored", "AllBlocksCleared"]
    finally:
        b.close()
