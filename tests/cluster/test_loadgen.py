"""Driving a simulator workload over a real client socket against a scripted router."""

from __future__ import annotations

import random

import pytest
import zmq

from bus.client import RouterClient
from cluster.loadgen import drive_workload
from sim.workloads import make_workload
from tests.monitor.fake_router import ScriptedRouter

pytestmark = pytest.mark.integration


@pytest.fixture
def router():
    r = ScriptedRouter()
    yield r
    r.close()


def test_roots_at_scaled_arrivals_and_follow_ups_after_their_parent(router):
    wl = make_workload("multiturn", random.Random(3), {"num_clients": 3, "num_rounds": 2, "request_length": 32,
                                                       "output_length": 2})
    arrivals = [0.0, 1.0, 2.0]  # workload seconds; speedup 10 → 0, 0.1, 0.2 s of wall time
    ctx = zmq.Context()
    seen = []
    try:
        with RouterClient(endpoint=router.endpoint, ctx=ctx) as client:
            res = drive_workload(client, wl, arrivals, speedup=10.0, id_prefix="t-", timeout_s=20,
                                 progress=lambda done, known: seen.append((done, known)))
    finally:
        ctx.term()
    ids = [r.request_id for r in router.requests]
    assert res.sent == 6 and res.completed == 6 and res.errors == 0 and res.timed_out == 0
    assert sorted(ids) == sorted(f"t-chat-{g}/r{k}" for g in range(3) for k in (1, 2))
    for g in range(3):  # each follow-up carries its parent's prompt + answer as its prefix
        first = router.requests[ids.index(f"t-chat-{g}/r1")]
        second = router.requests[ids.index(f"t-chat-{g}/r2")]
        assert ids.index(f"t-chat-{g}/r1") < ids.index(f"t-chat-{g}/r2")
        assert second.token_ids[: len(first.token_ids) + 2] == first.token_ids + [1, 2]
    roots = [router.received_s[ids.index(f"t-chat-{g}/r1")] for g in range(3)]
    assert roots == sorted(roots)
    assert roots[2] - roots[0] >= 0.19  # 2 workload seconds at speedup 10
    assert seen[-1] == (6, 6) and [d for d, _ in seen] == list(range(1, 7))


def test_max_in_flight_and_timeout_count_what_was_not_answered():
    wl = make_workload("multiturn", random.Random(3), {"num_clients": 4, "num_rounds": 1, "request_length": 16,
                                                       "output_length": 2})
    ctx = zmq.Context()
    try:
        from tests.conftest import free_port

        with RouterClient(endpoint=f"tcp://127.0.0.1:{free_port()}", ctx=ctx) as client:  # nobody answers
            res = drive_workload(client, wl, [0.0] * 4, max_in_flight=2, timeout_s=0.3)
            assert client.pending == {}
    finally:
        ctx.term()
    assert (res.sent, res.completed, res.timed_out) == (2, 0, 4)
    with pytest.raises(ValueError):
        drive_workload(None, wl, [0.0], speedup=1.0)
