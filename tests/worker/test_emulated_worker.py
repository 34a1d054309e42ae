"""The emulated worker on the router link: a raw ROUTER on 127.0.0.1 plays the router."""

from __future__ import annotations

import threading
import time

import msgspec
import pytest
import zmq

from bus.schema import (
    REFUSED_DUPLICATE_ID,
    Cancel,
    Completion,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Heartbeat,
    Hello,
    Refused,
    ReplyBatch,
    TokenChunk,
    Welcome,
)
from tests.waiting import eventually
from worker.emulated import EmulatedBackend, EmulatedWorkerConfig
from worker.service import WorkerService


@pytest.fixture
def start_worker(router):
    started = []

    def start(**svc_kw):
        ctx = zmq.Context()
        backend = EmulatedBackend(config=EmulatedWorkerConfig(worker_id="w1", speedup=20.0, seed=3), ctx=ctx)
        svc = WorkerService(backend=backend, router_endpoint=router.endpoint, worker_id="w1", ctx=ctx, **svc_kw)
        th = threading.Thread(target=svc.run, daemon=True)
        th.start()
        started.append((svc, th, ctx))
        return svc

    yield start
    for svc, th, ctx in started:
        svc.stop()
        th.join(timeout=5)
        assert not th.is_alive()
        ctx.term()


def register(router, interval_s: float = 0.2, liveness: int = 5) -> Hello:
    hello = router.recv(Hello)
    router.send(Welcome(router_id="r1", heartbeat_interval_s=interval_s, heartbeat_liveness=liveness))
    return hello


def collect(router, request_id: str) -> tuple[list[int], Completion | ErrorReply]:
    tokens: list[int] = []
    while True:
        msg = router.recv()
        if isinstance(msg, TokenChunk) and msg.request_id == request_id:
            tokens.extend(msg.token_ids)
        elif isinstance(msg, (Completion, ErrorReply)) and msg.request_id == request_id:
            return tokens, msg


def test_registers_runs_requests_and_reports_cached_tokens(router, start_worker) -> None:
    svc = start_worker()
    hello = register(router)
    assert (hello.worker_id, hello.engine, hello.block_size) == ("w1", "emulated", 16)
    prompt = list(range(100))
    router.send(Dispatch(request_id="a", token_ids=prompt, max_tokens=5))
    tokens, done = collect(router, "a")
    assert isinstance(done, Completion) and len(tokens) == 5 == done.output_tokens
    assert (done.prompt_tokens, done.cached_tokens) == (100, 0)
    router.send(Dispatch(request_id="b", token_ids=prompt, max_tokens=2))
    _, again = collect(router, "b")
    assert again.cached_tokens == 96
    assert svc.registered and svc.counters.dispatches == 2


def test_heartbeats_carry_the_engine_load(router, start_worker) -> None:
    start_worker()
    register(router, interval_s=0.05, liveness=100)  # this router never beats: a long timeout
    router.send(Dispatch(request_id="long", token_ids=list(range(50)), max_tokens=10_000))
    for _ in range(50):
        beat = router.recv(Heartbeat)
        if beat.load.running == 1:
            break
    assert beat.sender_id == "w1" and beat.load.num_gpu_blocks == 924 and beat.load.kv_usage > 0
    router.send(Cancel(request_id="long"))
    _, end = collect(router, "long")
    assert isinstance(end, ErrorReply) and end.code == ErrorCode.CANCELLED


def test_a_silent_router_makes_the_worker_reconnect_with_the_same_epoch(router, start_worker) -> None:
    svc = start_worker(backoff_min_s=0.05)
    first = register(router, interval_s=0.05, liveness=2)
    # Say nothing more: after 0.1 s of silence the worker drops the link and says Hello again.
    second = router.recv(Hello, timeout_s=5)
    assert second.epoch == first.epoch and svc.counters.connects >= 2


def test_a_stalled_worker_loop_reads_the_waiting_beats_before_calling_the_router_silent(router, start_worker) -> None:
    """CPU starvation or a long piece of work on the loop: the router's beats wait unread in the
    socket meanwhile; that is not a silent router, and the worker must not drop the link."""
    svc = start_worker()
    # Silent for 0.5 s = dead: above a 300 ms stall of this test thread (the router's beats come
    # from it), far below the 1.5 s the worker's loop is stuck.
    register(router, interval_s=0.1, liveness=5)
    svc.call(lambda: time.sleep(1.5))  # the loop is stuck (an HTTP-side call, here) for 1.5 s
    end = time.monotonic() + 2.0
    while time.monotonic() < end:  # the router beats on all along
        router.send(Heartbeat(sender_id="r1"))
        time.sleep(0.02)
    assert svc.registered and svc.counters.connects == 1  # the link never dropped: the beats were there


def test_a_replaced_link_resends_every_kept_stream_from_its_start_after_the_welcome(router, start_worker) -> None:
    """A stalled router: the worker drops the link mid-stream (what its DEALER still queued is
    gone), says Hello on a new one listing the request and its link token, holds every reply
    until the Welcome, then sends the whole stream again, numbered: nothing is missing."""
    svc = start_worker(backoff_min_s=0.3)
    first = register(router, interval_s=0.05, liveness=2)
    router.send(Dispatch(request_id="r", token_ids=list(range(40)), max_tokens=400))
    eventually(lambda: svc.counters.replies_held > 0, what="replies held while the link is down")
    before: list[TokenChunk] = []
    while not isinstance(msg := router.recv(), Hello):  # what got out before the link dropped
        if isinstance(msg, TokenChunk):
            before.append(msg)
    assert msg.in_flight == ["r"] and msg.link_token == first.link_token != "" and msg.epoch == first.epoch
    assert [c.seq for c in before] == list(range(len(before)))
    router.send(Welcome(router_id="r1", heartbeat_interval_s=0.05, heartbeat_liveness=50))
    chunks: list[TokenChunk] = []
    while not isinstance(msg := router.recv(), (Completion, ErrorReply)):
        if isinstance(msg, TokenChunk):
            chunks.append(msg)
    assert [c.seq for c in chunks] == list(range(len(chunks)))  # again from chunk 0, none skipped
    assert isinstance(msg, Completion) and msg.output_tokens == 400 and msg.chunks == len(chunks)
    assert sum(len(c.token_ids) for c in chunks) == 400
    assert chunks[: len(before)] == before and svc.counters.replies_resent >= len(before)


def test_refused_stops_the_worker(router) -> None:
    ctx = zmq.Context()
    backend = EmulatedBackend(config=EmulatedWorkerConfig(worker_id="w1"), ctx=ctx)
    svc = WorkerService(backend=backend, router_endpoint=router.endpoint, worker_id="w1", ctx=ctx)
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    router.recv(Hello)
    router.send(Refused(reason="block size 16 != 32"))
    th.join(timeout=5)
    assert not th.is_alive() and svc.refused == "block size 16 != 32"
    ctx.term()


def test_stop_answers_in_flight_requests_then_says_goodbye(router, start_worker) -> None:
    svc = start_worker()
    register(router)
    router.send(Dispatch(request_id="slow", token_ids=list(range(30)), max_tokens=100_000))
    router.recv(TokenChunk)
    svc.stop()
    _, end = collect(router, "slow")
    assert isinstance(end, ErrorReply) and end.code == ErrorCode.WORKER_ERROR
    assert isinstance(router.recv(Goodbye), Goodbye)


def test_local_requests_go_to_their_sink_not_the_router(router, start_worker) -> None:
    svc = start_worker()
    register(router)
    got: list = []
    done = threading.Event()

    def sink(msg) -> None:
        got.append(msg)
        if isinstance(msg, (Completion, ErrorReply)):
            done.set()

    svc.submit_local(Dispatch(request_id="local-1", token_ids=list(range(20)), max_tokens=3), sink)
    assert done.wait(5)
    assert [type(m).__name__ for m in got] == ["TokenChunk"] * 3 + ["Completion"]
    assert svc.call(lambda: svc.backend.engine.counters.finished).result(timeout=5) == 1


def test_a_failing_backend_answers_with_an_internal_error_and_keeps_serving(router, start_worker) -> None:
    svc = start_worker()
    register(router)
    real_submit = svc.backend.submit

    def flaky(d):
        if d.request_id == "boom":
            raise RuntimeError("injected")
        real_submit(d)

    svc.backend.submit = flaky
    router.send(Dispatch(request_id="boom", token_ids=[1, 2, 3], max_tokens=1))
    _, err = collect(router, "boom")
    assert isinstance(err, ErrorReply) and err.code == ErrorCode.INTERNAL
    router.send(Dispatch(request_id="fine", token_ids=[1, 2, 3], max_tokens=1))
    _, ok = collect(router, "fine")
    assert isinstance(ok, Completion) and svc.counters.handler_errors == 1


def test_a_router_that_does_not_know_the_worker_gets_a_hello_at_once_on_the_same_link(router, start_worker) -> None:
    """A restarted router, or one that declared the worker dead while it was stalled, answers its
    beats with "not known": the cue to register again now. Waiting for the liveness timeout would
    never end, since those answers are beats too."""
    svc = start_worker()
    first = router.recv(Hello)
    router.send(Welcome(router_id="r1", heartbeat_interval_s=0.2, heartbeat_liveness=50, router_epoch=5))
    router.send(Heartbeat(sender_id="r1", epoch=5))  # a known worker: nothing to do
    router.send(Heartbeat(sender_id="r1", epoch=9, known=False))
    again = router.recv(Hello, timeout_s=2)
    # Same socket; its requests (none) are the ones of the router incarnation that welcomed it.
    assert again == msgspec.structs.replace(first, router_epoch=5)
    assert svc.counters.rehellos == 1 and svc.counters.connects == 1
    router.send(Heartbeat(sender_id="r1", epoch=9, known=False))  # within 0.5 s of that Hello: no other
    time.sleep(0.2)
    assert svc.counters.rehellos == 1
    router.send(Welcome(router_id="r1", heartbeat_interval_s=0.2, heartbeat_liveness=50, router_epoch=9))
    time.sleep(0.5)
    router.send(Heartbeat(sender_id="r1", epoch=9))
    time.sleep(0.2)
    assert svc.counters.rehellos == 1 and svc.registered


def _silence_warnings(caplog, svc, timeout_s: float = 5.0) -> list[str]:
    return eventually(lambda: [r.getMessage() for r in caplog.records if r.getMessage().startswith("router silent")],
                      timeout_s=timeout_s, what="a 'router silent' warning", interval_s=0.02)


def test_no_router_at_all_is_said_so_not_blamed_on_curve(caplog) -> None:
    """Nothing listens at the router endpoint: the warning says so (it used to suggest CURVE keys)."""
    from bus.sockets import free_tcp_endpoint

    caplog.set_level("WARNING", logger="worker.service")
    ctx = zmq.Context()
    endpoint = free_tcp_endpoint()
    backend = EmulatedBackend(config=EmulatedWorkerConfig(worker_id="w1", speedup=20.0, seed=3), ctx=ctx)
    svc = WorkerService(backend=backend, router_endpoint=endpoint, worker_id="w1", ctx=ctx, heartbeat_interval_s=0.05,
                        liveness=2, backoff_min_s=0.05)
    th = threading.Thread(target=svc.run, daemon=True)
    th.start()
    try:
        message = _silence_warnings(caplog, svc)[0]
    finally:
        svc.stop()
        th.join(5)
        ctx.term()
    assert message.endswith(f"(nothing accepts connections at {endpoint}: is the router running there? "
                            "--router none runs without one)")
    assert "curve" not in message.lower() and "key" not in message


def test_a_router_that_accepts_but_never_welcomes_is_not_blamed_on_curve(router, start_worker, caplog) -> None:
    caplog.set_level("WARNING", logger="worker.service")
    svc = start_worker(heartbeat_interval_s=0.05, liveness=2, backoff_min_s=0.05)
    router.recv(Hello)  # read, never answered
    assert _silence_warnings(caplog, svc)[0].endswith("(connected, never welcomed)")


def test_a_duplicate_id_refusal_is_tried_once_more_after_the_holders_timeout_then_stops(router, start_worker) -> None:
    """The holder may be this worker's dead predecessor: one more Hello after ``retry_after_s``;
    refused again, the holder is alive, and the worker stops with the reason."""
    svc = start_worker()
    router.recv(Hello)
    refused_at = time.monotonic()
    router.send(Refused(reason="worker id 'w1' is in use", code=REFUSED_DUPLICATE_ID, retry_after_s=0.3))
    router.recv(Hello, timeout_s=5)
    assert time.monotonic() - refused_at >= 0.3 and svc.refused is None
    router.send(Refused(reason="worker id 'w1' is in use", code=REFUSED_DUPLICATE_ID, retry_after_s=0.3))
    eventually(lambda: svc.refused is not None, what="the second refusal taken")
    assert svc.refused == "worker id 'w1' is in use"


def test_a_restarted_worker_registers_once_its_dead_predecessor_timed_out(router, start_worker) -> None:
    svc = start_worker()
    router.recv(Hello)
    router.send(Refused(reason="in use", code=REFUSED_DUPLICATE_ID, retry_after_s=0.1))
    register(router)  # the second Hello: the predecessor is gone now
    eventually(lambda: svc.registered, what="w1 registered")
    assert svc.refused is None


def test_a_welcome_from_a_restarted_router_cancels_and_forgets_the_old_routers_requests(router, start_worker) -> None:
    svc = start_worker()
    router.recv(Hello)
    router.send(Welcome(router_id="r1", heartbeat_interval_s=0.2, heartbeat_liveness=50, router_epoch=5))
    router.send(Dispatch(request_id="old", token_ids=list(range(30)), max_tokens=100_000))
    router.recv(TokenChunk)
    router.send(Heartbeat(sender_id="r1", epoch=9, known=False))  # a new router incarnation
    again = router.recv(Hello)
    assert again.in_flight == ["old"] and again.router_epoch == 5
    router.send(Welcome(router_id="r1", heartbeat_interval_s=0.2, heartbeat_liveness=50, router_epoch=9))
    # The old request was cancelled and its reply not sent to a router that never asked for it.
    eventually(lambda: svc.counters.orphan_replies_dropped >= 1, what="the old router's reply dropped")
    assert svc.call(lambda: svc.backend.num_in_flight).result(timeout=5) == 0
    router.send(Dispatch(request_id="new", token_ids=list(range(30)), max_tokens=2))
    tokens, done = collect(router, "new")  # nothing of "old" in between
    assert isinstance(done, Completion) and len(tokens) == 2


def test_stream_chunks_are_numbered_and_the_completion_counts_them(router, start_worker) -> None:
    start_worker()
    register(router)
    router.send(Dispatch(request_id="n", token_ids=list(range(30)), max_tokens=5))
    chunks: list[TokenChunk] = []
    while not isinstance(msg := router.recv(), (Completion, ErrorReply)):
        if isinstance(msg, TokenChunk):
            chunks.append(msg)
    assert [c.seq for c in chunks] == [0, 1, 2, 3, 4] and msg.chunks == 5


def test_a_call_its_caller_cancelled_is_skipped_and_the_loop_keeps_serving(router, start_worker) -> None:
    svc = start_worker()
    register(router)
    ran: list[int] = []
    blocker = threading.Event()
    svc.call(blocker.wait)  # holds the loop while the next call is cancelled
    fut = svc.call(lambda: ran.append(1))
    assert fut.cancel()
    blocker.set()
    assert svc.call(lambda: 2).result(timeout=5) == 2 and ran == []


def _stream_of_two(router) -> list:
    """Two requests dispatched together (their decode steps coincide); every message until both end."""
    router.send(Dispatch(request_id="p", token_ids=list(range(40)), max_tokens=12))
    router.send(Dispatch(request_id="q", token_ids=list(range(100, 140)), max_tokens=12))
    got, ended = [], set()
    while ended != {"p", "q"}:
        msg = router.recv()
        got.append(msg)
        for reply in msg.replies if isinstance(msg, ReplyBatch) else [msg]:
            if isinstance(reply, (Completion, ErrorReply)):
                ended.add(reply.request_id)
    return got


def _flat(got: list, rid: str) -> list:
    replies = [r for m in got for r in (m.replies if isinstance(m, ReplyBatch) else [m])]
    return [r for r in replies if isinstance(r, (TokenChunk, Completion)) and r.request_id == rid]


def test_a_router_that_reads_batches_gets_a_steps_replies_in_one_message(router, start_worker) -> None:
    start_worker()
    router.recv(Hello)
    router.send(Welcome(router_id="r1", heartbeat_interval_s=0.2, heartbeat_liveness=5, reply_batches=True))
    got = _stream_of_two(router)
    batches = [m for m in got if isinstance(m, ReplyBatch)]
    assert batches and max(len(b.replies) for b in batches) >= 2  # both requests' tokens of one step
    for rid in ("p", "q"):
        replies = _flat(got, rid)
        assert [c.seq for c in replies[:-1]] == list(range(12)) and isinstance(replies[-1], Completion)
        assert replies[-1].chunks == 12


def test_a_router_that_does_not_read_batches_gets_every_reply_alone(router, start_worker) -> None:
    start_worker()
    register(router)  # its Welcome leaves reply_batches at False, as an older router's does
    got = _stream_of_two(router)
    assert not [m for m in got if isinstance(m, ReplyBatch)]
    for rid in ("p", "q"):
        assert [c.seq for c in _flat(got, rid)[:-1]] == list(range(12))
