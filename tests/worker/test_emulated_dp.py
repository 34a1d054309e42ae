"""Data-parallel emulated worker: one engine and one publisher per rank, vLLM's port offsets."""

from __future__ import annotations

import socket

import pytest
import zmq

from bus.schema import Completion, Dispatch, ErrorCode, ErrorReply
from bus.vllm_codec import decode_batch
from worker.emulated import EmulatedWorkerConfig
from worker.emulated_dp import EmulatedDPBackend
from worker.vllm.exporter import render
from worker.vllm.metrics import engine_stats, parse_prometheus_text


def two_free_ports() -> int:
    """A port p with p and p + 1 both free on 127.0.0.1."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            p = a.getsockname()[1]
            try:
                with socket.socket() as b:
                    b.bind(("127.0.0.1", p + 1))
                    return p
            except OSError:
                continue
    raise AssertionError("no two consecutive free ports")


@pytest.fixture
def dp(request):
    ctx = zmq.Context()
    ev, rp = two_free_ports(), two_free_ports()
    clock = [100.0]
    cfg = EmulatedWorkerConfig(worker_id="d", seed=1, events_endpoint=f"tcp://127.0.0.1:{ev}",
                               replay_endpoint=f"tcp://127.0.0.1:{rp}")
    b = EmulatedDPBackend(config=cfg, dp_size=2, ctx=ctx, clock=lambda: clock[0], wall_clock=lambda: 7.0)
    yield b, clock, ctx, ev, rp
    b.close()
    ctx.term()


def run_all(b, clock) -> list:
    out = []
    while (due := b.advance(clock[0])) is not None:
        clock[0] = due
        out += b.drain()
    return out + b.drain()


def test_each_rank_is_its_own_engine_with_offset_ports(dp) -> None:
    b, clock, ctx, ev, rp = dp
    hello = b.hello(epoch=1)
    assert hello.dp_size == 2 and hello.events_endpoint == f"tcp://127.0.0.1:{ev}"
    assert [r.publisher.endpoint for r in b.ranks] == [f"tcp://127.0.0.1:{ev}", f"tcp://127.0.0.1:{ev + 1}"]
    b.submit(Dispatch(request_id="a", token_ids=list(range(40)), max_tokens=2, dp_rank=1))
    done = [m for m in run_all(b, clock) if isinstance(m, Completion)]
    assert [m.request_id for m in done] == ["a"]
    assert b.ranks[0].engine.counters.finished == 0 and b.ranks[1].engine.counters.finished == 1
    assert sorted(b.loads()) == [0, 1]
    # Rank 1's batch carries rank 1 and is replayed from the replay port + 1.
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(f"tcp://127.0.0.1:{rp + 1}")
    dealer.send_multipart([b"", (0).to_bytes(8, "big")])
    for _ in range(100):
        b.poll_sockets()
        if dealer.poll(10):
            break
    _, _topic, seq, payload = dealer.recv_multipart()
    dealer.close()
    assert int.from_bytes(seq, "big") == 0 and decode_batch(payload).data_parallel_rank == 1


def test_any_rank_goes_to_the_least_loaded_and_bad_ranks_are_refused(dp) -> None:
    b, clock, *_ = dp
    b.submit(Dispatch(request_id="x", token_ids=[1] * 20, max_tokens=50, dp_rank=-1))
    b.submit(Dispatch(request_id="y", token_ids=[2] * 20, max_tokens=50, dp_rank=-1))
    assert [r.num_in_flight for r in b.ranks] == [1, 1]
    b.submit(Dispatch(request_id="z", token_ids=[3] * 20, max_tokens=1, dp_rank=5))
    (err,) = b.drain()
    assert isinstance(err, ErrorReply) and err.code == ErrorCode.BAD_REQUEST and err.request_id == "z"
    assert b.cancel("y") and not b.cancel("nope")


def test_metrics_have_one_engine_label_per_rank(dp) -> None:
    b, *_ = dp
    text = render(b.snapshot())
    assert sorted(engine_stats(parse_prometheus_text(text))) == [0, 1]
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1


def test_dp_needs_fixed_ports() -> None:
    with pytest.raises(ValueError, match="fixed events port"):
        EmulatedDPBackend(config=EmulatedWorkerConfig(worker_id="d"), dp_size=2)
