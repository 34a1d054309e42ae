"""``kvr worker --events-hwm/--events-sndbuf`` reach the KV-event PUB (the fault suite's slow subscriber)."""

from __future__ import annotations

import zmq

from bus.publisher import EventPublisher
from worker.runner import WorkerOptions


def test_options_reach_the_publisher_socket() -> None:
    cfg = WorkerOptions(worker_id="w", router_endpoint="none", events_hwm=8, events_sndbuf=65_536).backend_config()
    assert (cfg.events_hwm, cfg.events_sndbuf) == (8, 65_536)
    ctx = zmq.Context()
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx, hwm=cfg.events_hwm, sndbuf=cfg.events_sndbuf)
    try:
        assert pub._pub.getsockopt(zmq.SNDHWM) == 8
        assert pub._pub.getsockopt(zmq.SNDBUF) == 65_536
        pub.restart()  # a restarted publisher (seq 0) keeps them
        assert pub._pub.getsockopt(zmq.SNDBUF) == 65_536
    finally:
        pub.close()
        ctx.term()


def test_defaults_leave_the_kernel_buffer_alone() -> None:
    ctx = zmq.Context()
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", bind=True, ctx=ctx)
    try:
        assert pub._pub.getsockopt(zmq.SNDBUF) == -1  # ZMQ's "the OS's"
    finally:
        pub.close()
        ctx.term()
