"""Bad input against a live router, an emulated worker and the HTTP front, over loopback sockets.

Every bad request gets one explicit error with a stable code and message, on the ZMQ client
channel and over HTTP (OpenAI-style error JSON, status per code); malformed frames on either
ROUTER socket and malformed HTTP are counted and the router keeps serving.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import zmq
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.client import RouterClient
from bus.codec import encode
from bus.schema import ErrorCode, GenerateRequest, Heartbeat
from bus.sockets import ANY_LOOPBACK_PORT, connectable
from core.liveness import HeartbeatConfig
from router.config import RouterConfig
from router.http_front import RouterHttpFront
from tests.http_helpers import raw_http
from tests.router.test_service import RunningRouter
from tests.waiting import eventually
from worker.runner import WorkerOptions, WorkerRunner

pytestmark = pytest.mark.timeout(120)
BLOCKS = 64  # the emulated worker's KV cache: 64 × 16 = 1024 tokens; its max_model_len (Hello) is below that


class Stack:
    """Router (own thread), one emulated worker (own thread), HTTP front, a ZMQ client."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        cfg = RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT, block_size=16,
                           heartbeat=HeartbeatConfig(interval_s=0.2, liveness=5), router_id="r1",
                           request_timeout_s=10.0)
        self.running = RunningRouter(cfg)
        self.router = self.running.service
        self.worker = WorkerRunner(WorkerOptions(worker_id="w1",
                                                 router_endpoint=connectable(self.router.workers_endpoint),
                                                 model="m", speedup=50.0, seed=1, num_gpu_blocks=BLOCKS,
                                                 heartbeat_interval=0.2))
        self.worker_thread = threading.Thread(target=self.worker.run, daemon=True)
        self.worker_thread.start()
        self.front = RouterHttpFront(client_endpoint=connectable(self.router.clients_endpoint), model="kvr",
                                     stats=lambda: self.router.stats, ctx=self.ctx, request_timeout_s=10)
        self.front.start()
        self.client = RouterClient(endpoint=connectable(self.router.clients_endpoint), ctx=self.ctx)
        eventually(lambda: self.router.workers, timeout_s=10, what="the emulated worker registered")

    def ask(self, req: GenerateRequest):
        res = self.client.send(req)
        eventually(lambda: res.done, timeout_s=10, what=f"a terminal reply to {req.request_id}",
                   pump=lambda: self.client.poll(20), interval_s=0)
        return res

    def post(self, path: str, raw: bytes, headers: dict | None = None) -> tuple[int, dict]:
        host, port = self.front.server.server_address[:2]
        conn = http.client.HTTPConnection(host, port, timeout=15)
        try:
            conn.request("POST", path, body=raw, headers={"Content-Type": "application/json", **(headers or {})})
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, json.loads(data) if data else {}
        finally:
            conn.close()

    def close(self) -> None:
        self.client.close()
        self.front.close()
        self.worker.stop()
        self.worker_thread.join(5)
        self.running.stop()
        self.ctx.term()


@pytest.fixture(scope="module")
def stack():
    s = Stack()
    yield s
    s.close()


def _max_model_len(stack: Stack) -> int:
    """What the worker said in its Hello: the engine's own limit."""
    mml = stack.router.workers["w1"].hello.max_model_len
    assert mml == stack.worker.backend.engine.max_model_len and 0 < mml <= BLOCKS * 16
    return mml


def _serving(stack: Stack, rid: str) -> None:
    """The router still routes and completes a good request (ZMQ and HTTP)."""
    res = stack.ask(GenerateRequest(rid, token_ids=list(range(1, 40)), max_tokens=2))
    assert res.error is None and res.completion.output_tokens == 2
    status, body = stack.post("/v1/completions", json.dumps({"prompt": "still there?", "max_tokens": 2}).encode())
    assert status == 200 and body["usage"]["completion_tokens"] == 2


# ---------------------------------------------------------------------------- bad requests, ZMQ

TOO_LONG = list(range(2000))
ZMQ_CASES = [
    # (request fields, code, message fragment)
    ({"token_ids": TOO_LONG}, ErrorCode.PROMPT_TOO_LONG,
     "the prompt (2000 tokens) leaves no room for output under max_model_len {mml} (the longest of the workers)"),
    ({"token_ids": [1, -1, 2]}, ErrorCode.BAD_REQUEST, "token id -1 is outside [0, 4294967296)"),
    ({"token_ids": [1, 2**32]}, ErrorCode.BAD_REQUEST, "token id 4294967296 is outside [0, 4294967296)"),
    ({"token_ids": [1, 2**64 - 1]}, ErrorCode.BAD_REQUEST, f"token id {2**64 - 1} is outside"),
    ({"token_ids": []}, ErrorCode.BAD_REQUEST, "token_ids is empty"),
    ({"prompt": ""}, ErrorCode.BAD_REQUEST, "prompt is empty"),
    ({}, ErrorCode.BAD_REQUEST, "give exactly one of prompt or token_ids"),
    ({"prompt": "a", "token_ids": [1]}, ErrorCode.BAD_REQUEST, "give exactly one of prompt or token_ids"),
    ({"token_ids": [1, 2], "model": "nope"}, ErrorCode.UNKNOWN_MODEL, "model 'nope' is not served here (served: m)"),
    ({"token_ids": [1, 2], "max_tokens": 0}, ErrorCode.BAD_REQUEST, "max_tokens must be >= 1, got 0"),
    ({"token_ids": [1, 2], "max_tokens": -5}, ErrorCode.BAD_REQUEST, "max_tokens must be >= 1, got -5"),
    ({"token_ids": [1, 2], "max_tokens": 2**63 - 1}, ErrorCode.BAD_REQUEST,
     f"max_tokens {2**63 - 1} exceeds the limit of 32768"),
]


@pytest.mark.parametrize("fields,code,message", ZMQ_CASES, ids=[f"{c[1].value}-{i}" for i, c in enumerate(ZMQ_CASES)])
def test_each_bad_request_gets_its_error_code_over_zmq(stack, fields, code, message):
    before = stack.router.counters[f"rejected_{code.value}"]
    res = stack.ask(GenerateRequest(f"bad-{time.monotonic_ns()}", **fields))
    assert res.routed is None and res.completion is None  # refused by the router, never dispatched
    assert res.error.code is code and message.format(mml=_max_model_len(stack)) in res.error.message
    assert stack.router.counters[f"rejected_{code.value}"] == before + 1


def test_wrong_types_on_the_client_channel_are_dropped_and_counted(stack, caplog):
    """A frame that is not a GenerateRequest has no request id the router could trust: counted, logged, dropped."""
    with _raw_dealer(stack, stack.router.clients_endpoint) as raw:
        before = stack.router.counters["bad_messages"]
        frames = [
            b"",  # empty
            b"\xc1",  # never used in msgpack
            b'\x82\xa4type\xa8generate\xaarequest_id\x05',  # request_id an int
            b'\x83\xa4type\xa8generate\xaarequest_id\xa1x\xa9token_ids\x91\xa1a',  # a token id a string
            b'\x83\xa4type\xa8generate\xaarequest_id\xa1x\xaamax_tokens\xcb?\xf8\x00\x00\x00\x00\x00\x00',  # 1.5
            b'\x82\xa4type\xa8generate\xaarequest_id\xa3\xc3\x28x',  # not UTF-8 (crashed the loop before)
            b"\x81\xa1a" * 100_000 + b"\xc0",  # an unknown field nested past the recursion limit (crashed the loop)
            b'\x81\xa4type\xa4nope',  # unknown tag
        ]
        for f in frames:
            raw.send(f)
        raw.send_multipart([b"two", b"frames"])  # a second frame: not our framing
        eventually(lambda: stack.router.counters["bad_messages"] >= before + len(frames), what="every frame counted")
        assert stack.router.counters["bad_messages"] == before + len(frames)
        assert stack.running.thread.is_alive()
        logged = [r.getMessage() for r in caplog.records if r.name == "router.service"]
        undecodable = [m for m in logged if m.startswith("undecodable message from ")]
        assert len(undecodable) == len(frames)
        # Each log line names its cause after the peer id; the cause's wording is msgspec's and
        # changes between releases, so only its presence is pinned.
        assert all(m.split(": ", 1)[1].strip() for m in undecodable)
        _serving(stack, "after-bad-client-frames")


def _generate_frame(**fields) -> bytes:
    """A client-channel frame as a peer could build it, types unchecked."""
    import msgspec

    return msgspec.msgpack.encode({"type": "generate", **fields})


@pytest.mark.parametrize("fields,path", [
    ({"request_id": "t1", "token_ids": [1, "2"]}, "$.token_ids[1]"),
    ({"request_id": "t2", "token_ids": [1, 2.5]}, "$.token_ids[1]"),
    ({"request_id": "t3", "token_ids": 7}, "$.token_ids"),
    ({"request_id": "t4", "prompt": "hi", "max_tokens": "8"}, "$.max_tokens"),
    ({"request_id": "t5", "prompt": "hi", "model": 3}, "$.model"),
])
def test_wrong_field_types_get_a_bad_request_reply_naming_the_field(stack, fields, path):
    """The typed decoder refuses the frame; the router still finds its id and answers it. The reply
    is ours ("malformed request: ") and names the field; the words between are msgspec's, which
    change between releases, so they are not pinned."""
    from bus.codec import reply_decoder

    with _raw_dealer(stack, stack.router.clients_endpoint) as raw:
        raw.send(_generate_frame(**fields))
        assert raw.poll(5000), "no reply"
        reply = reply_decoder().decode(raw.recv())
        assert (reply.request_id, reply.code) == (fields["request_id"], ErrorCode.BAD_REQUEST)
        assert reply.message.startswith("malformed request: ") and path in reply.message


def test_frames_without_a_usable_id_get_no_reply(stack):
    """No id (or not a string, or not a generate): nobody to answer; counted, and the socket stays quiet."""
    with _raw_dealer(stack, stack.router.clients_endpoint) as raw:
        before = stack.router.counters["bad_messages"]
        for frame in (_generate_frame(request_id=5, token_ids=[1]), _generate_frame(token_ids=["x"]),
                      _generate_frame(request_id="", token_ids=["x"]), b"\x82\xa4type\xa6cancel\xaarequest_id\x01"):
            raw.send(frame)
        assert not raw.poll(300)
        assert stack.router.counters["bad_messages"] == before + 4


def test_malformed_worker_messages_and_unknown_peers_keep_the_router_serving(stack):
    with _raw_dealer(stack, stack.router.workers_endpoint) as raw:
        bad_before = stack.router.counters["bad_messages"]
        unknown_before = stack.router.counters["unknown_peer_messages"]
        frames = [b"\xc1", b'\x81\xa4type\xa5hello',
                  b'\x83\xa4type\xa9heartbeat\xa9sender_id\xa3\xff\xfe\xfd\xa5epoch\x01',
                  b"\xdd\xff\xff\xff\xff", b"\x81\xa1a" * 100_000 + b"\xc0"]
        for f in frames:
            raw.send(f)
        raw.send(encode(Heartbeat("w1", 1)))  # valid, but from a peer that never said Hello: not w1's beat
        eventually(lambda: (stack.router.counters["bad_messages"] >= bad_before + len(frames)
                            and stack.router.counters["unknown_peer_messages"] >= unknown_before + 1),
                   what="every frame counted")
        assert stack.router.counters["bad_messages"] == bad_before + len(frames)
        assert stack.router.counters["unknown_peer_messages"] == unknown_before + 1
        assert list(stack.router.workers) == ["w1"]
        _serving(stack, "after-bad-worker-frames")


# ---------------------------------------------------------------------------- bad requests, HTTP

HTTP_CASES = [
    # (body, status, type, message fragment)
    ({"prompt": TOO_LONG, "max_tokens": 2}, 413, "prompt_too_long", "(2000 tokens) leaves no room for output under "
                                                                     "max_model_len {mml}"),
    ({"prompt": "word " * 2000, "max_tokens": 2}, 413, "prompt_too_long", "leaves no room for output under "
                                                                          "max_model_len {mml}"),
    ({"prompt": [1, -1], "max_tokens": 2}, 400, "bad_request", "token id -1 is outside [0, 4294967296)"),
    ({"prompt": [2**32], "max_tokens": 2}, 400, "bad_request", "token id 4294967296 is outside [0, 4294967296)"),
    ({"prompt": [2**70], "max_tokens": 2}, 400, "bad_request", f"token id {2**70} is outside [0, 4294967296)"),
    ({"prompt": [1, "2"], "max_tokens": 2}, 400, "bad_request", "'prompt' must be a string or a list of token ids"),
    ({"prompt": [1, 2.5], "max_tokens": 2}, 400, "bad_request", "'prompt' must be a string or a list of token ids"),
    ({"prompt": [], "max_tokens": 2}, 400, "bad_request", "token_ids is empty"),
    ({"prompt": "", "max_tokens": 2}, 400, "bad_request", "prompt is empty"),
    ({"prompt": 5}, 400, "bad_request", "'prompt' must be a string or a list of token ids"),
    ({"prompt": "hi", "model": "nope"}, 404, "unknown_model", "model 'nope' is not served here (served: m)"),
    ({"prompt": "hi", "model": 7}, 400, "bad_request", "'model' must be a string"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "bad_request", "'max_tokens' must be a positive integer"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "bad_request", "'max_tokens' must be a positive integer"),
    ({"prompt": "hi", "max_tokens": "8"}, 400, "bad_request", "'max_tokens' must be a positive integer"),
    ({"prompt": "hi", "max_tokens": 10**6}, 400, "bad_request", "max_tokens 1000000 exceeds the limit of 32768"),
    ({"prompt": "hi", "max_tokens": 10**30}, 400, "bad_request", f"'max_tokens' {10**30} is too large"),
    ({"prompt": "hi", "cache_salt": 1}, 400, "bad_request", "'cache_salt' must be a string"),
    ({"prompt": "hi", "stream": True, "stream_options": 1}, 400, "bad_request", "'stream_options' must be an object"),
    ({"prompt": "\ud800"}, 400, "bad_request", "the request does not encode"),
]


@pytest.mark.parametrize("body,status,kind,message", HTTP_CASES, ids=[f"{c[2]}-{i}" for i, c in enumerate(HTTP_CASES)])
def test_each_bad_request_gets_an_openai_error_over_http(stack, body, status, kind, message):
    got, obj = stack.post("/v1/completions", json.dumps(body).encode())
    assert got == status
    assert obj["error"]["type"] == kind and obj["error"]["code"] == status
    assert message.format(mml=_max_model_len(stack)) in obj["error"]["message"]


def test_the_front_model_alias_and_the_worker_model_are_both_served(stack):
    for model in ("kvr", "m", None):
        body_in = json.dumps({"prompt": "hi", "max_tokens": 1, "model": model}).encode()
        status, body = stack.post("/v1/completions", body_in)
        assert status == 200 and body["usage"]["completion_tokens"] == 1


def test_chat_bodies_with_wrong_types(stack):
    for body, message in (({"messages": []}, "'messages' must be a non-empty list of objects"),
                          ({"messages": "hi"}, "'messages' must be a non-empty list of objects"),
                          ({"messages": [1]}, "'messages' must be a non-empty list of objects")):
        status, obj = stack.post("/v1/chat/completions", json.dumps(body).encode())
        assert (status, obj["error"]["type"], obj["error"]["message"]) == (400, "bad_request", message)


def test_malformed_http_is_answered_and_the_front_keeps_serving(stack):
    status, obj = stack.post("/v1/completions", b"[" * 100_000)  # a RecursionError in json: it dropped the connection
    assert status == 400 and obj["error"]["message"].startswith("invalid JSON: maximum recursion depth")
    status, obj = stack.post("/v1/completions", b"\xff\xfe\x00garbage")
    assert status == 400 and obj["error"]["message"].startswith("invalid JSON")
    status, obj = stack.post("/v1/completions", b"[1, 2]")
    assert (status, obj["error"]["message"]) == (400, "the request body must be a JSON object")
    # The bridge thread used to die on an unencodable request (max_tokens > 2**64): everything after timed out.
    status, _ = stack.post("/v1/completions", b'{"prompt": [1], "max_tokens": 100000000000000000000000}')
    assert status == 400
    _serving(stack, "after-bad-http")


@contextmanager
def _raw_dealer(stack: Stack, endpoint: str) -> Iterator[zmq.Socket]:
    """A bare DEALER on one of the router's sockets, for frames no well-behaved peer sends."""
    raw = stack.ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(connectable(endpoint))
    try:
        yield raw
    finally:
        raw.close(linger=0)


def _raw_http(stack: Stack, data: bytes) -> bytes:
    return raw_http(stack.front.server.server_address, data)


@pytest.mark.parametrize("length,status,message", [
    ("-5", 400, "malformed HTTP request: "),  # rfile.read(-5) raised; -1 would have read to EOF
    ("abc", 400, "malformed HTTP request: "),  # int() raised: the connection closed without an answer
    (str(65 * 1024 * 1024), 413, "is over the 67108864-byte limit"),
])
def test_bad_content_length_headers(stack, length, status, message):
    head_in = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"
    reply = _raw_http(stack, (head_in + "{}").encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == str(status).encode()
    assert message in json.loads(body)["error"]["message"]


@settings(max_examples=40)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8),
       st.sampled_from(["prompt", "max_tokens", "model", "messages", "cache_salt", "n", "stream_options"]))
def test_fuzzed_http_fields_get_an_answer_never_a_dropped_connection(stack, value, key):
    """Any field of any type: a JSON answer with 200 or a 4xx error (a 5xx would be a crash)."""
    body = {"prompt": "hi", "max_tokens": 1, key: value}
    path = "/v1/chat/completions" if key == "messages" else "/v1/completions"
    status, obj = stack.post(path, json.dumps(body).encode())
    assert status == 200 or (400 <= status < 500 and obj["error"]["code"] == status), (status, obj)
