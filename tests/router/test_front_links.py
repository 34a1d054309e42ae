"""The HTTP front over several routers (``client_endpoints``), against scripted routers: each request
is on one router, its cancel goes there, and a router lost before a request's first token hands
it to another under the same id; one lost after tokens ends the stream with ``router_restarted``."""

from __future__ import annotations

import http.client
import json
import socket
import threading

import pytest
import zmq

from bus.schema import Completion, Routed, TokenChunk
from router.http_front import RouterHttpFront
from tests.prometheus_text import metric_value
from tests.router.test_http_front_robust import ScriptedRouter, _events, _post_stream
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def two():
    """Two scripted routers and a front over both (its own /health: no stats given)."""
    ctx = zmq.Context()
    routers = [ScriptedRouter(ctx), ScriptedRouter(ctx)]
    front = RouterHttpFront(client_endpoints=[r.endpoint for r in routers], model="m", ctx=ctx, request_timeout_s=10)
    front.start()
    eventually(lambda: front.stats()["routers"] and all(r["connected"] for r in front.stats()["routers"].values()),
               what="the front connected to both routers")
    yield front, routers
    front.close()
    for r in routers:
        if not r.sock.closed:
            r.sock.close(linger=0)
    ctx.term()


def _pump_all(routers) -> None:
    for r in routers:
        if not r.sock.closed:
            r.pump(0.002)


def _wait(routers, pred, what: str) -> None:
    eventually(pred, timeout_s=10, pump=lambda: _pump_all(routers), interval_s=0, what=what)


def _health(front: RouterHttpFront) -> tuple[int, str]:
    conn = http.client.HTTPConnection(*front.server.server_address, timeout=10)
    conn.request("GET", "/health")
    resp = conn.getresponse()
    out = resp.status, resp.read().decode()
    conn.close()
    return out


def _done(rid: str, worker: str) -> Completion:
    return Completion(rid, worker, prompt_tokens=3, cached_tokens=0, output_tokens=1)


def test_the_front_needs_distinct_endpoints() -> None:
    with pytest.raises(ValueError):
        RouterHttpFront(client_endpoints=[])
    with pytest.raises(ValueError):
        RouterHttpFront(client_endpoints=["tcp://127.0.0.1:1", "tcp://127.0.0.1:1"])
    with pytest.raises(ValueError):
        RouterHttpFront(client_endpoint="tcp://127.0.0.1:1", client_endpoints=["tcp://127.0.0.1:2"])


def test_requests_alternate_and_each_cancel_reaches_the_router_holding_it(two) -> None:
    front, routers = two
    assert _health(front) == (200, f"2 of 2 router(s) connected\n{routers[0].endpoint}: connected, 0 pending\n"
                                   f"{routers[1].endpoint}: connected, 0 pending\n")
    socks = []
    for _ in range(2):  # two clients that will leave before any answer
        body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2}).encode()
        s = socket.create_connection(front.server.server_address, timeout=10)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        socks.append(s)
    _wait(routers, lambda: all(len(r.requests) == 1 for r in routers), "one request on each router")
    for s in socks:
        s.close()
    _wait(routers, lambda: all(len(r.cancels) == 1 for r in routers), "each router cancelling its own request")
    assert [r.cancels for r in routers] == [[r.requests[0].request_id] for r in routers]


def test_a_router_lost_before_the_first_token_hands_the_request_to_the_other(two) -> None:
    front, routers = two
    box: dict = {}
    t = _post_stream(front, {"prompt": [1, 2, 3], "max_tokens": 1}, box)
    _wait(routers, lambda: any(r.requests for r in routers), "the request at a router")
    first = next(r for r in routers if r.requests)
    other = routers[1 - routers.index(first)]
    rid = first.requests[0].request_id
    first.reply(Routed(rid, "w1", 0, 0, 0, "kvr"))  # routed, no token yet: the stream is open
    first.pump(0.05)
    first.sock.close(linger=0)  # the router dies
    _wait(routers, lambda: other.requests, "the same request at the other router")
    assert [r.request_id for r in other.requests] == [rid] and other.cancels == []
    other.reply(Routed(rid, "w2", 0, 0, 0, "kvr"), TokenChunk(rid, [7], "a"), _done(rid, "w2"))
    t.join(10)
    assert box["status"] == 200
    events = _events(box["body"])
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["a", ""] and events[-1] == "[DONE]"
    assert front.stats()["counters"]["front_failovers"] == 1
    conn = http.client.HTTPConnection(*front.server.server_address, timeout=10)
    conn.request("GET", "/metrics")
    assert metric_value(conn.getresponse().read().decode(), "kvr_router_front_failovers_total") == 1
    conn.close()
    eventually(lambda: _health(front)[0] == 200 and _health(front)[1].startswith("1 of 2 router(s) connected"))


def test_a_router_lost_after_tokens_ends_the_stream_with_router_restarted(two) -> None:
    front, routers = two
    box: dict = {}
    t = _post_stream(front, {"prompt": [1, 2, 3], "max_tokens": 4}, box)
    _wait(routers, lambda: any(r.requests for r in routers), "the request at a router")
    first = next(r for r in routers if r.requests)
    other = routers[1 - routers.index(first)]
    rid = first.requests[0].request_id
    first.reply(Routed(rid, "w1", 0, 0, 0, "kvr"), TokenChunk(rid, [7], "a"))
    eventually(lambda: front.stats()["routers"][first.endpoint]["pending"] == 1)
    first.pump(0.05)
    first.sock.close(linger=0)
    t.join(10)
    assert box["status"] == 200
    events = _events(box["body"])
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["type"] == "router_restarted" and events[2] == "[DONE]" and len(events) == 3
    other.pump(0.1)
    assert other.requests == [] and front.stats()["counters"]["front_failovers"] == 0


def test_with_no_router_connected_health_is_503() -> None:
    ctx = zmq.Context()
    front = RouterHttpFront(client_endpoints=["tcp://127.0.0.1:1"], ctx=ctx)
    front.start()
    try:
        status, text = _health(front)
        assert status == 503 and text.startswith("0 of 1 router(s) connected")
    finally:
        front.close()
        ctx.term()


def test_a_lone_router_lost_ends_its_requests_at_once_not_at_the_timeout(two) -> None:
    """Nowhere to fail over to: the request ends with 503 router_restarted, not a 10 s timeout."""
    front, routers = two
    routers[1].sock.close(linger=0)
    eventually(lambda: front.stats()["routers"][routers[1].endpoint]["connected"] is False)
    box: dict = {}

    def post() -> None:
        conn = http.client.HTTPConnection(*front.server.server_address, timeout=10)
        conn.request("POST", "/v1/completions", body=json.dumps({"prompt": [1], "max_tokens": 1}))
        resp = conn.getresponse()
        box["status"], box["body"] = resp.status, json.loads(resp.read())

    t = threading.Thread(target=post, daemon=True)
    t.start()
    routers[0].wait(lambda: routers[0].requests)
    routers[0].sock.close(linger=0)
    t.join(5)
    assert box["status"] == 503 and box["body"]["error"]["type"] == "router_restarted"
