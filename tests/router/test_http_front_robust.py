"""The router's HTTP front under load and odd clients, against a scripted router (a bare ROUTER
socket that answers what each test says): bursts, framing, idle connections, HTTP/1.0, re-routes
and clients that leave."""

from __future__ import annotations

import asyncio
import http.client
import json
import logging
import socket
import threading

import aiohttp
import pytest
import zmq

from bus.codec import client_decoder, encode
from bus.schema import CancelRequest, Completion, GenerateRequest, Routed, TokenChunk
from bus.sockets import free_tcp_endpoint
from router.http_front import RouterHttpFront
from tests.http_helpers import raw_http
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


class ScriptedRouter:
    """The router's client channel, answered by the test: ``requests`` (GenerateRequest) and
    ``cancels`` (CancelRequest) as they arrive; :meth:`reply` sends to the front."""

    def __init__(self, ctx: zmq.Context) -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = free_tcp_endpoint()
        self.sock.bind(self.endpoint)
        self.decoder = client_decoder()
        self.peer: bytes | None = None
        self.requests: list[GenerateRequest] = []
        self.cancels: list[str] = []

    def pump(self, timeout_s: float = 0.01) -> None:
        while self.sock.poll(int(timeout_s * 1000)):
            self.peer, frame = self.sock.recv_multipart()
            msg = self.decoder.decode(frame)
            (self.cancels.append(msg.request_id) if isinstance(msg, CancelRequest) else self.requests.append(msg))
            timeout_s = 0

    def wait(self, pred, timeout_s: float = 10.0) -> None:
        """Until ``pred()``, reading what the front sends meanwhile."""
        eventually(pred, timeout_s=timeout_s, pump=self.pump, interval_s=0)

    def reply(self, *msgs) -> None:
        for m in msgs:
            self.sock.send_multipart([self.peer, encode(m)])


@pytest.fixture
def scripted():
    ctx = zmq.Context()
    router = ScriptedRouter(ctx)
    fronts: list[RouterHttpFront] = []

    def make(**kw) -> RouterHttpFront:
        front = RouterHttpFront(client_endpoint=router.endpoint, model="m", ctx=ctx, request_timeout_s=10,
                                stats=lambda: {"workers": 1, "models": ["m"]}, **kw)
        front.start()
        fronts.append(front)
        return front

    yield router, make
    for f in fronts:
        f.close()
    router.sock.close(linger=0)
    ctx.term()


def _done(rid: str, worker: str = "w1") -> Completion:
    return Completion(rid, worker, prompt_tokens=3, cached_tokens=0, output_tokens=2)


def _post_stream(front: RouterHttpFront, body: dict, box: dict) -> threading.Thread:
    def run() -> None:
        conn = http.client.HTTPConnection(*front.server.server_address, timeout=10)
        conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}))
        resp = conn.getresponse()
        box["status"], box["body"] = resp.status, resp.read()  # http.client checks the chunked framing
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _events(data: bytes) -> list:
    lines = [line[len(b"data: "):] for line in data.split(b"\n\n") if line.startswith(b"data: ")]
    return [line.decode() if line == b"[DONE]" else json.loads(line) for line in lines]


def test_a_retry_before_any_token_continues_the_one_stream(scripted):
    router, make = scripted
    front = make()
    box: dict = {}
    t = _post_stream(front, {"prompt": [1, 2, 3], "max_tokens": 2}, box)
    router.wait(lambda: router.requests)
    rid = router.requests[0].request_id
    # The first worker died before its first token: the router routes it again.
    router.reply(Routed(rid, "w1", 0, 0, 0, "kvr"), Routed(rid, "w2", 0, 0, 0, "kvr"),
                 TokenChunk(rid, [7, 8], "ab"), _done(rid, "w2"))
    t.join(10)
    assert box["status"] == 200
    events = _events(box["body"])
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["ab", ""]
    assert events[-1] == "[DONE]"
    assert router.cancels == []


def test_a_reroute_after_tokens_ends_the_stream_with_an_error_event_and_cancels(scripted):
    router, make = scripted
    front = make()
    box: dict = {}
    t = _post_stream(front, {"prompt": [1, 2, 3], "max_tokens": 4}, box)
    router.wait(lambda: router.requests)
    rid = router.requests[0].request_id
    router.reply(Routed(rid, "w1", 0, 0, 0, "kvr"), TokenChunk(rid, [7], "a"), Routed(rid, "w2", 0, 0, 0, "kvr"))
    t.join(10)
    events = _events(box["body"])
    assert events[0]["choices"][0]["text"] == "a"
    assert events[1]["error"]["type"] == "worker_died" and events[2] == "[DONE]" and len(events) == 3
    router.wait(lambda: router.cancels == [rid])


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_leaves_cancels_its_request_without_a_traceback(scripted, caplog, stream):
    router, make = scripted
    front = make()
    caplog.set_level(logging.DEBUG)
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 4, "stream": stream}).encode()
    s = socket.create_connection(front.server.server_address, timeout=10)
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
    router.wait(lambda: router.requests)
    rid = router.requests[0].request_id
    if stream:
        router.reply(Routed(rid, "w1", 0, 0, 0, "kvr"), TokenChunk(rid, [7], "a"))
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
    s.close()
    router.wait(lambda: router.cancels == [rid])
    router.reply(TokenChunk(rid, [8], "b"))  # late replies to a request that ended are dropped
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_content_length_with_transfer_encoding_is_refused_and_nothing_is_smuggled(scripted):
    router, make = scripted
    front = make()
    smuggled = b'{"prompt": [1], "max_tokens": 1}'
    reply = raw_http(front.server.server_address, (
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"0\r\n\r\nPOST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%s"
    ) % (len(smuggled) + 5, len(smuggled), smuggled))
    assert reply.split(b" ")[1] == b"400" and reply.count(b"HTTP/1.") == 1  # one answer: the second was not read
    head, _, body = reply.partition(b"\r\n\r\n")
    assert json.loads(body)["error"]["type"] == "bad_request"
    router.pump(0.2)
    assert router.requests == []


def test_an_idle_connection_is_closed_after_the_keepalive_timeout(scripted):
    _, make = scripted
    front = make(keepalive_timeout_s=0.3)
    with socket.create_connection(front.server.server_address, timeout=10) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        first = s.recv(4096)
        assert first.startswith(b"HTTP/1.1 200") and b"1 worker(s)" in first
        s.settimeout(5)
        assert s.recv(4096) == b""  # closed by the server, not by our timeout
    with socket.create_connection(front.server.server_address, timeout=10) as s:  # never sends anything
        s.settimeout(5)
        assert s.recv(4096) == b""


def test_an_http_1_0_client_gets_an_unchunked_stream_ended_by_close(scripted):
    router, make = scripted
    front = make()
    body = json.dumps({"prompt": [1, 2, 3], "max_tokens": 2, "stream": True}).encode()
    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", raw_http(front.server.server_address, (
        b"POST /v1/completions HTTP/1.0\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)))), daemon=True)
    t.start()
    router.wait(lambda: router.requests)
    rid = router.requests[0].request_id
    router.reply(Routed(rid, "w1", 0, 0, 0, "kvr"), TokenChunk(rid, [7, 8], "ab"), _done(rid))
    t.join(10)
    head, _, data = box["r"].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower() and b"content-length" not in head.lower()
    events = _events(data)
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["ab", ""] and events[-1] == "[DONE]"


def test_a_burst_of_1000_connections_gets_answers_or_429s_never_a_reset(scripted):
    """1,000 requests at once over 1,000 connections against 50 slots: the 50 admitted are held by
    the router until the 950 others were refused (429 with Retry-After), then all end in a 200."""
    router, make = scripted
    front = make(max_in_flight=50)
    n = 1000
    body = {"prompt": [1, 2, 3], "max_tokens": 2}

    async def one(session: aiohttp.ClientSession) -> tuple[int, str | None]:
        async with session.post(f"{front.url}/v1/completions", json=body) as resp:
            await resp.read()
            return resp.status, resp.headers.get("Retry-After")

    async def burst() -> list:
        connector = aiohttp.TCPConnector(limit=0, force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            return await asyncio.gather(*(one(session) for _ in range(n)), return_exceptions=True)

    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("r", asyncio.run(burst())), daemon=True)
    t.start()
    router.wait(lambda: len(router.requests) == 50 and front.server.admission.refused == n - 50, timeout_s=30)
    router.reply(*(_done(r.request_id) for r in router.requests))
    t.join(30)
    results = box["r"]
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert sorted(set(results)) == [(200, None), (429, "1")]
    assert results.count((200, None)) == 50 and front.server.admission.in_flight == 0
