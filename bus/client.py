"""A client of the router's client channel (DEALER → router ROUTER).

Used by ``kvr send``, the demo and the benchmarks. One DEALER carries many
concurrent requests; replies are matched by ``request_id``. The client measures
its own wall-clock TTFT and end-to-end latency, which include the router.

Not thread-safe: one thread owns a client (ZMQ sockets are not thread-safe).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import zmq

from bus.codec import DecodeError, encode, reply_decoder
from bus.schema import CancelRequest, Completion, ErrorReply, GenerateRequest, ReplyMessage, Routed, TokenChunk
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES, make_socket

logger = logging.getLogger(__name__)


@dataclass
class RequestResult:
    """Everything the client saw of one request."""

    request_id: str
    sent_s: float
    routed: Routed | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    first_token_s: float | None = None
    completion: Completion | None = None
    error: ErrorReply | None = None
    finished_s: float | None = None

    @property
    def done(self) -> bool:
        return self.completion is not None or self.error is not None

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.sent_s


class RouterClient:
    """Send requests to a kvr router and collect their replies."""

    def __init__(self, *, endpoint: str, ctx: zmq.Context | None = None, identity: bytes | None = None,
                 curve: Curve | None = None, max_msg_size: int = MAX_REQUEST_BYTES) -> None:
        """``curve``: dial the router as a CURVE client (bus/security.py); without an authorised
        key the router never sees a request and the client gets no reply."""
        self._ctx = ctx or zmq.Context.instance()
        self._sock = make_socket(self._ctx, zmq.DEALER, max_msg_size=max_msg_size,
                                 setup=None if curve is None else curve.dial)
        if identity:
            self._sock.setsockopt(zmq.IDENTITY, identity)
        self._sock.connect(endpoint)
        self._decoder = reply_decoder()
        self.pending: dict[str, RequestResult] = {}
        self.bad_replies = 0
        self.unmatched_replies = 0

    def send(self, request: GenerateRequest) -> RequestResult:
        result = RequestResult(request.request_id, time.monotonic())
        self.pending[request.request_id] = result
        self._sock.send(encode(request))
        return result

    def cancel(self, request_id: str) -> None:
        self._sock.send(encode(CancelRequest(request_id)))

    def poll(self, timeout_ms: int = 100) -> list[RequestResult]:
        """Read every reply available within ``timeout_ms``; return requests that finished."""
        finished: list[RequestResult] = []
        if not self._sock.poll(timeout_ms):
            return finished
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return finished
            try:
                reply = self._decoder.decode(frame)
            except DecodeError as exc:
                self.bad_replies += 1
                logger.warning("undecodable reply from router: %s", exc)
                continue
            result = self._apply(reply)
            if result is not None and result.done:
                finished.append(self.pending.pop(result.request_id))

    def _apply(self, reply: ReplyMessage) -> RequestResult | None:
        result = self.pending.get(reply.request_id)
        if result is None:
            self.unmatched_replies += 1
            return None
        now = time.monotonic()
        if isinstance(reply, Routed):
            result.routed = reply
        elif isinstance(reply, TokenChunk):
            if result.first_token_s is None:
                result.first_token_s = now
            result.token_ids.extend(reply.token_ids)
            result.text += reply.text
        elif isinstance(reply, Completion):
            result.completion = reply
            result.finished_s = now
            if result.first_token_s is None:  # non-streaming: the first token arrives with the end
                result.first_token_s = now
        elif isinstance(reply, ErrorReply):
            result.error = reply
            result.finished_s = now
        return result

    def generate(self, request: GenerateRequest, *, timeout_s: float = 60.0) -> RequestResult:
        """Send one request and wait for its terminal reply (or raise TimeoutError)."""
        self.send(request)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for result in self.poll(50):
                if result.request_id == request.request_id:
                    return result
        self.pending.pop(request.request_id, None)
        raise TimeoutError(f"no terminal reply for {request.request_id} within {timeout_s} s")

    def close(self) -> None:
        self._sock.close(linger=0)

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
