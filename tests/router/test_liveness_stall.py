"""A stalled router loop reads the workers' waiting heartbeats before declaring anyone dead."""

from __future__ import annotations

import zmq

from bus.codec import encode
from bus.schema import Heartbeat, Hello
from core.liveness import HeartbeatConfig
from router.service import RouterConfig, RouterService
from tests.fakes.clock import ManualClock
from tests.waiting import eventually


def test_beats_that_arrived_during_a_stall_keep_the_worker_alive() -> None:
    clock = ManualClock()
    ctx = zmq.Context()
    svc = RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:*", bind_workers="tcp://127.0.0.1:*",
                                     heartbeat=HeartbeatConfig(interval_s=0.5, liveness=3)),
                        ctx=ctx, clock=clock)
    worker = ctx.socket(zmq.DEALER)
    worker.setsockopt(zmq.LINGER, 0)
    worker.connect(svc.workers_endpoint)
    try:
        worker.send(encode(Hello("w1", 1, "m", 16, 100, "tcp://127.0.0.1:1")))
        eventually(lambda: "w1" in svc.workers, what="w1 registered", pump=lambda: svc.run_once(max_wait_ms=20),
                   interval_s=0)
        # The loop stalls for 10 s of its clock; the worker beat meanwhile, and the beat is waiting.
        worker.send(encode(Heartbeat(sender_id="w1", epoch=1)))
        assert svc._workers_sock.poll(2000)
        clock.advance(10.0)
        svc.tick(clock())
        assert "w1" in svc.workers and svc.counters["error_worker_died"] == 0
        # A worker that really is silent still dies.
        clock.advance(10.0)
        svc.tick(clock())
        assert "w1" not in svc.workers
    finally:
        worker.close()
        svc.close()
        ctx.term()
