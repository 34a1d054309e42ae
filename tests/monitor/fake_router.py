"""A scripted router on a real ROUTER socket (loopback), for client-side tests."""

from __future__ import annotations

import threading
import time

import zmq

from bus.codec import client_decoder, encode
from bus.schema import Completion, ErrorCode, ErrorReply, GenerateRequest, Routed, TokenChunk
from tests.conftest import free_port


class ScriptedRouter:
    """Answers every GenerateRequest: routed to w1, cached = tokens seen before (a perfect cache)."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{free_port()}"
        self.sock.bind(self.endpoint)
        self.requests: list[GenerateRequest] = []
        self.received_s: list[float] = []  # monotonic receive time of each request
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        dec = client_decoder()
        prev = ""
        while not self.stop.is_set():
            if not self.sock.poll(50):
                continue
            ident, frame = self.sock.recv_multipart()
            req = dec.decode(frame)
            self.requests.append(req)
            self.received_s.append(time.monotonic())
            prompt = req.prompt or " ".join(map(str, req.token_ids))
            if prompt == "fail":
                self.sock.send_multipart([ident,
                                          encode(ErrorReply(req.request_id, ErrorCode.NO_WORKERS, "no workers alive"))])
                continue
            cached = len(prev) if prompt.startswith(prev) and prev else 0
            prev = prompt
            routed = Routed(req.request_id, "w1", 0, cached // 16, cached, "kvr", "best overlap")
            self.sock.send_multipart([ident, encode(routed)])
            self.sock.send_multipart([ident, encode(TokenChunk(req.request_id, [1, 2], " hi"))])
            self.sock.send_multipart([ident,
                                      encode(Completion(req.request_id, "w1", len(prompt), cached, 2, "length"))])

    def close(self) -> None:
        self.stop.set()
        self.thread.join(timeout=5)
        self.sock.close(linger=0)
        self.ctx.term()
