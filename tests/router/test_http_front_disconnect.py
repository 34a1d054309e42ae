"""A client that leaves a non-streamed request while its tokens stream in: the front cancels it at
the router, every time (issue 13: ``asyncio.wait_for`` on Python 3.11 swallowed the cancellation
when it landed as a chunk arrived, and the request decoded to its end with nobody waiting)."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import zmq

from bus.codec import client_decoder, encode
from bus.schema import CancelRequest, GenerateRequest, Routed, TokenChunk
from router.http_front import RouterHttpFront
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)
CLIENTS, ROUNDS = 8, 6


class StreamingRouter(threading.Thread):
    """A stand-in router on a real ROUTER socket: routes every request and streams chunks to it
    every ~2 ms until it is cancelled; records what the front sent."""

    def __init__(self, ctx: zmq.Context) -> None:
        super().__init__(daemon=True)
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.received: list = []
        self.halt = threading.Event()

    def run(self) -> None:
        decoder = client_decoder()
        live: dict[str, bytes] = {}
        while not self.halt.is_set():
            if self.sock.poll(2):
                ident, data = self.sock.recv_multipart()
                msg = decoder.decode(data)
                self.received.append(msg)
                if isinstance(msg, GenerateRequest):
                    live[msg.request_id] = ident
                    self.sock.send_multipart([ident, encode(Routed(msg.request_id, "w0", 0, 0, 0, "kvr"))])
                else:
                    live.pop(msg.request_id, None)
            for seq, (rid, ident) in enumerate(list(live.items())):
                self.sock.send_multipart([ident, encode(TokenChunk(rid, [5, 6, 7], "a b c", seq=seq))])
        self.sock.close(linger=0)


def _leave_after(port: int, hold_s: float) -> None:
    body = b'{"prompt": [1, 2, 3], "max_tokens": 100000}'
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
        time.sleep(hold_s)
        s.shutdown(socket.SHUT_RDWR)


def test_every_client_that_leaves_mid_stream_is_cancelled_at_the_router() -> None:
    ctx = zmq.Context()
    router = StreamingRouter(ctx)
    router.start()
    front = RouterHttpFront(client_endpoint=f"tcp://127.0.0.1:{router.port}", port=0, ctx=ctx,
                            stats=lambda: {"workers": 1})
    front.start()
    port = int(front.url.rsplit(":", 1)[1])
    try:
        for _ in range(ROUNDS):
            clients = [threading.Thread(target=_leave_after, args=(port, 0.2)) for _ in range(CLIENTS)]
            for c in clients:
                c.start()
            for c in clients:
                c.join()
            eventually(lambda: not front._inboxes, what=lambda: f"every handler ended ({front._inboxes})")

        def received(kind) -> list[str]:
            return [m.request_id for m in list(router.received) if isinstance(m, kind)]

        # The last Cancels may still be on their way to the router's thread on a busy machine.
        eventually(lambda: len(received(CancelRequest)) >= CLIENTS * ROUNDS,
                   what=lambda: f"{CLIENTS * ROUNDS} cancels (got {len(received(CancelRequest))})")
        sent, cancelled = received(GenerateRequest), received(CancelRequest)
        assert len(sent) == CLIENTS * ROUNDS and sorted(cancelled) == sorted(sent)
    finally:
        front.close()
        router.halt.set()
        router.join(timeout=5)
        ctx.term()
