"""The HTTP front refuses a request bigger than the router's frame limit itself instead of
sending it (413): the router would cut the front's one connection, and with it every HTTP request in
flight on it."""

from __future__ import annotations

import json
import threading

import pytest
import zmq

from bus.sockets import connectable
from router.http_front import RouterHttpFront
from tests.router.test_http_front import _post
from tests.router.test_service import FakeWorker, RunningRouter, _config, wait_for

pytestmark = pytest.mark.timeout(60)
LIMIT = 64 * 1024


def test_an_oversized_http_request_is_refused_and_requests_in_flight_survive() -> None:
    ctx = zmq.Context()
    running = RunningRouter(_config(max_request_bytes=LIMIT))
    svc = running.service
    front = RouterHttpFront(client_endpoint=connectable(svc.clients_endpoint), model="m", stats=lambda: svc.stats,
                            ctx=ctx, request_timeout_s=10, max_request_bytes=LIMIT)
    front.start()
    worker = FakeWorker(ctx, svc.workers_endpoint, "w1", mode="hang")  # holds requests until told
    try:
        worker.hello()
        wait_for(lambda: "w1" in svc.workers, [worker])
        box: dict = {}
        in_flight = threading.Thread(target=lambda: box.setdefault("r", _post(
            front, "/v1/completions", {"prompt": "a request in flight", "max_tokens": 2})), daemon=True)
        in_flight.start()
        wait_for(lambda: worker.dispatches(), [worker])
        status, _, data = _post(front, "/v1/completions", {"prompt": "x" * (2 * LIMIT), "max_tokens": 2})
        assert status == 413, data
        assert "byte limit" in json.loads(data)["error"]["message"]
        # The request in flight still gets its reply over the same connection.
        worker.mode = "complete"
        worker.on_dispatch(worker.dispatches()[0])
        wait_for(lambda: not in_flight.is_alive(), [worker], timeout_s=10)
        assert box["r"][0] == 200, box["r"]
        assert svc.counters["requests"] == 1
    finally:
        front.close()
        running.stop()
        worker.close()
        ctx.term()
