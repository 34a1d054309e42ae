"""RouterClient ends pending requests explicitly when its router session ends (router died)."""

from __future__ import annotations

import socket
import time

import zmq

from bus.client import RouterClient
from bus.codec import encode
from bus.schema import Completion, ErrorCode, GenerateRequest


def _poll_until(client: RouterClient, n: int, timeout_s: float = 5.0) -> list:
    out: list = []
    deadline = time.monotonic() + timeout_s
    while len(out) < n and time.monotonic() < deadline:
        out.extend(client.poll(50))
    return out


def _recv_request(router: zmq.Socket) -> tuple[bytes, bytes]:
    assert router.poll(5000)
    ident, payload = router.recv_multipart()
    return ident, payload


def test_pending_requests_end_with_an_error_when_the_router_dies_and_later_ones_reach_the_new_one() -> None:
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.setsockopt(zmq.LINGER, 0)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    client = RouterClient(endpoint=f"tcp://127.0.0.1:{port}", ctx=ctx)
    try:
        client.send(GenerateRequest(request_id="a", token_ids=[1, 2], max_tokens=1))
        client.send(GenerateRequest(request_id="b", token_ids=[1, 2], max_tokens=1))
        ident, _ = _recv_request(router)
        _recv_request(router)
        # "a" is answered before the router dies: that reply is real and wins.
        router.send_multipart([ident, encode(Completion("a", "w", 2, 0, 1))])
        time.sleep(0.2)
        router.close(linger=0)  # the router dies holding "b"
        done = {r.request_id: r for r in _poll_until(client, 2)}
        assert set(done) == {"a", "b"}
        assert done["a"].completion is not None and done["a"].error is None
        assert done["b"].error is not None and done["b"].error.code is ErrorCode.ROUTER_RESTARTED
        assert client.pending == {} and client.connection_losses == 1
        # A new router on the same port gets the requests sent from now on, and answers them.
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(f"tcp://127.0.0.1:{port}")
        client.send(GenerateRequest(request_id="c", token_ids=[1, 2], max_tokens=1))
        ident, _ = _recv_request(router)
        router.send_multipart([ident, encode(Completion("c", "w", 2, 0, 1))])
        (c,) = _poll_until(client, 1)
        assert c.request_id == "c" and c.completion is not None
        # A late answer for "b" (it was ended locally) is counted, never delivered a second time.
        router.send_multipart([ident, encode(Completion("b", "w", 2, 0, 1))])
        assert _poll_until(client, 1, timeout_s=0.5) == []
        assert client.late_replies == 1 and client.unmatched_replies == 0
    finally:
        client.close()
        router.close(linger=0)
        ctx.term()


def test_no_router_yet_is_not_a_connection_loss() -> None:
    """Nothing listening: the request waits (ZMQ queues it), it is not failed."""
    ctx = zmq.Context()
    # A port held by a socket that never listens: connections are refused, and no other test's
    # socket can take the port meanwhile.
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    port = holder.getsockname()[1]
    client = RouterClient(endpoint=f"tcp://127.0.0.1:{port}", ctx=ctx)
    try:
        client.send(GenerateRequest(request_id="a", token_ids=[1, 2], max_tokens=1))
        assert _poll_until(client, 1, timeout_s=0.5) == []
        assert "a" in client.pending and client.connection_losses == 0
    finally:
        client.close()
        holder.close()
        ctx.term()
