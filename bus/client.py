"""A client of the router's client channel (DEALER → router ROUTER).

Used by ``kvr send``, the demo and the benchmarks. One DEALER carries many
concurrent requests; replies are matched by ``request_id``. The client measures
its own wall-clock TTFT and end-to-end latency, which include the router.

Not thread-safe: one thread owns a client (ZMQ sockets are not thread-safe).

**Nothing hangs on a lost router.** A router that dies (SIGKILL, crash) takes the replies of
every request it held with it, and a DEALER would wait for them forever. The client watches its
connection (socket monitor): when an established session to the router ends, every request still
pending ends at once with a local ``ErrorReply(ROUTER_RESTARTED)``. Requests sent afterwards are
queued by ZMQ and reach the router once it is back. A request sent in the few milliseconds
between the disconnect and the client noticing it may still reach the new router: its reply then
arrives after its local error and is counted in ``late_replies``, never delivered twice.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import zmq

from bus.codec import DecodeError, encode, reply_decoder
from bus.schema import (
    CancelRequest,
    Completion,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    ReplyMessage,
    Routed,
    TokenChunk,
)
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES, make_socket, read_session_events

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
    def answered(self) -> bool:
        """The router said something about it (Routed, a token, the end): it is listening."""
        return self.routed is not None or self.first_token_s is not None or self.done

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.sent_s

    @property
    def e2e_s(self) -> float | None:
        return None if self.finished_s is None else self.finished_s - self.sent_s


class NoRouterReply(TimeoutError):
    """Not a word from the router within the first-reply timeout: nothing listens at the endpoint,
    the router refused this client (CURVE), or it is wedged. ``connected``: a session was up."""

    def __init__(self, message: str, *, connected: bool) -> None:
        super().__init__(message)
        self.connected = connected


class RouterClient:
    """Send requests to a kvr router and collect their replies."""

    def __init__(self, *, endpoint: str, ctx: zmq.SyncContext | None = None, identity: bytes | None = None,
                 curve: Curve | None = None, max_msg_size: int = MAX_REQUEST_BYTES) -> None:
        """``curve``: dial the router as a CURVE client (bus/security.py); without an authorised
        key the router never sees a request and the client gets no reply."""
        self._ctx: zmq.SyncContext = ctx or zmq.Context.instance()
        self._sock = make_socket(self._ctx, zmq.DEALER, max_msg_size=max_msg_size,
                                 setup=None if curve is None else curve.dial)
        if identity:
            self._sock.setsockopt(zmq.IDENTITY, identity)
        # Before connect, so no session goes unseen. Only a session that completed its handshake
        # counts: a refused CURVE handshake never reached the router and loses nothing.
        self._monitor = self._sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._session_up = False
        self.endpoint = endpoint
        self._sock.connect(endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._monitor, zmq.POLLIN)
        self._decoder = reply_decoder()
        self.pending: dict[str, RequestResult] = {}
        self.bad_replies = 0
        self.unmatched_replies = 0
        self.connection_losses = 0  # router sessions that ended (router died or cut the connection)
        self.late_replies = 0  # replies for requests already ended locally by a connection loss
        self._abandoned: OrderedDict[str, None] = OrderedDict()  # those requests' ids (bounded)
        self._ended: list[RequestResult] = []  # ended by a loss noticed in send(), for the next poll

    @property
    def session_up(self) -> bool:
        """A router session completed its handshake and has not been lost since (as last read)."""
        self._read_monitor(self._ended)
        return self._session_up

    def send(self, request: GenerateRequest) -> RequestResult:
        # A session lost before this send must not take this request down with it: the
        # requests it did hold are ended now (returned by the next poll), this one goes out after.
        self._read_monitor(self._ended)
        result = RequestResult(request.request_id, time.monotonic())
        self.pending[request.request_id] = result
        self._sock.send(encode(request))
        return result

    def cancel(self, request_id: str) -> None:
        self._sock.send(encode(CancelRequest(request_id)))

    def register(self, poller: zmq.Poller) -> None:
        """Add this client's sockets to ``poller`` (POLLIN): a caller holding several clients waits on
        all of them at once, then calls :meth:`poll` with 0 on each."""
        poller.register(self._sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)

    def poll(self, timeout_ms: int = 100) -> list[RequestResult]:
        """Read every reply available within ``timeout_ms``; return requests that finished."""
        finished, self._ended = self._ended, []
        ready = dict(self._poller.poll(0 if finished else timeout_ms))
        if self._sock in ready:
            self._read_replies(finished)
        if self._monitor in ready:
            self._read_monitor(finished)
        return finished

    def _read_monitor(self, finished: list[RequestResult]) -> None:
        self._session_up, lost = read_session_events(self._monitor, self._session_up)
        if not lost:
            return
        self.connection_losses += 1
        # Replies that made it before the session ended are real: take them first.
        self._read_replies(finished)
        if self.pending:
            logger.warning("connection to the router lost: ending %d pending requests with an error",
                           len(self.pending))
        now = time.monotonic()
        for rid, result in list(self.pending.items()):
            result.error = ErrorReply(rid, ErrorCode.ROUTER_RESTARTED,
                                      "connection to the router lost (router died, restarted or dropped this client) "
                                      "before the request finished; its outcome is unknown")
            result.finished_s = now
            finished.append(self.pending.pop(rid))
            self._abandoned[rid] = None
        while len(self._abandoned) > 100_000:
            self._abandoned.popitem(last=False)

    def _read_replies(self, finished: list[RequestResult]) -> None:
        while True:
            try:
                frame = self._sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
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
            if reply.request_id in self._abandoned:
                self.late_replies += 1
            else:
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

    def generate(self, request: GenerateRequest, *, timeout_s: float = 60.0,
                 first_reply_timeout_s: float | None = None) -> RequestResult:
        """Send one request and wait for its terminal reply (or raise TimeoutError).

        ``first_reply_timeout_s``: give up early, with :class:`NoRouterReply`, when the router has
        not answered at all by then. A router answers every request at once (``Routed`` or an
        error), so this fails fast on a missing router while ``timeout_s`` bounds long generations.
        """
        result = self.send(request)
        now = time.monotonic()
        deadline = now + timeout_s
        first_deadline = None if first_reply_timeout_s is None else now + first_reply_timeout_s
        while time.monotonic() < deadline:
            for done in self.poll(50):
                if done.request_id == request.request_id:
                    return done
            if first_deadline is not None and not result.answered and time.monotonic() > first_deadline:
                self.pending.pop(request.request_id, None)
                if self._session_up:
                    why = "it accepted the connection but has not answered"
                else:
                    why = ("nothing accepted the connection (no router listening there, "
                           "or it refused this client's CURVE key)")
                raise NoRouterReply(
                    f"no reply from a router at {self.endpoint} within {first_reply_timeout_s:g} s: {why}",
                    connected=self._session_up)
        self.pending.pop(request.request_id, None)
        raise TimeoutError(f"no terminal reply for {request.request_id} within {timeout_s} s")

    def close(self) -> None:
        if not self._sock.closed:
            self._sock.disable_monitor()
        self._monitor.close(linger=0)
        self._sock.close(linger=0)

    def __enter__(self) -> RouterClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
