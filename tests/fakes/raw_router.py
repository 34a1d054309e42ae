"""A bare router for worker tests: a bound ROUTER socket that decodes what a worker sends.

Tests drive the worker's side of the protocol by hand (read a ``Hello``, answer ``Welcome``,
send a ``Dispatch``...) without a real ``RouterService``. Every receive is bounded, so a worker
that never answers fails the test instead of hanging it.
"""

from __future__ import annotations

import time

import pytest
import zmq

from bus.codec import encode, worker_decoder


class RawRouter:
    """A bound ROUTER that decodes worker messages; ``identity`` is the last sender's."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.decoder = worker_decoder()
        self.identity: bytes | None = None

    def recv(self, kind=None, timeout_s: float = 10.0):
        """The next message of type ``kind`` (any message if None); others are skipped."""
        deadline = time.monotonic() + timeout_s
        what = kind.__name__ if kind else "message"
        while True:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            assert remaining_ms > 0 and self.sock.poll(remaining_ms), f"no {what} within {timeout_s} s"
            self.identity, frame = self.sock.recv_multipart()
            msg = self.decoder.decode(frame)
            if kind is None or isinstance(msg, kind):
                return msg

    def send(self, msg) -> None:
        self.sock.send_multipart([self.identity, encode(msg)])

    def close(self) -> None:
        self.sock.close()
        self.ctx.term()


@pytest.fixture
def router():
    r = RawRouter()
    yield r
    r.close()
