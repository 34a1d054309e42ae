"""The worker service: a backend (emulated engine or vLLM adapter) on the router link.

One loop thread owns every socket (zmq sockets are not thread-safe):

* **Router link** (zguide Paranoid Pirate, worker side). A DEALER connects to the
  router and sends ``Hello``; the router answers ``Welcome`` (heartbeat interval and
  liveness, which the worker adopts) or ``Refused`` (the service stops with that
  reason). The worker sends a ``Heartbeat`` carrying each DP rank's load every
  interval; when nothing at all has come from the router for ``interval × liveness``,
  it drops the DEALER and reconnects after an exponential backoff (``backoff_min_s``
  doubling up to ``backoff_max_s``, reset by the next ``Welcome``), re-registering
  with the same epoch. Heartbeats produced while the link is down are dropped.
* **Nothing lost when the link is replaced.** Closing a DEALER throws away whatever it still
  queued (a stalled router read nothing for seconds), so the worker keeps each router request's
  stream: every ``TokenChunk`` numbered (``seq``) and the terminal reply (``Completion.chunks`` =
  the chunks before it), from the ``Dispatch`` until the router has surely read the end (it spoke
  a liveness timeout after the terminal went out; at most ``MAX_FINISHED_STREAMS`` are kept).
  Replies are sent only on a welcomed link; the ``Hello`` on a new link carries the secret
  ``link_token`` of this incarnation and the kept request ids (``in_flight``); after the
  ``Welcome`` of the same router incarnation every kept stream is sent again from its start (the
  router drops chunks it relayed already, by ``seq``, and fails or re-routes the requests this
  worker does not list). A ``Welcome`` of another router incarnation (it restarted and knows none
  of them) cancels and forgets them instead.
* **One live connection per worker id.** A ``Refused`` with ``REFUSED_DUPLICATE_ID`` means
  another live worker holds the id: the worker says Hello once more after ``retry_after_s`` (the
  holder may be its own predecessor, dead but not yet timed out); refused again, it stops
  (``refused`` set, logged as an error; ``kvr worker`` exits non-zero).
* **Backend.** ``Dispatch`` → ``backend.submit``, ``Cancel`` → ``backend.cancel``;
  whatever the backend produces (``TokenChunk``, ``Completion``, ``ErrorReply``) goes
  to the router, or to a local sink for requests that came in over HTTP.
  The emulated backend's ``advance`` tells the loop when its step in flight ends.
* **Other threads** (the HTTP face) never touch the backend: they hand callables to
  :meth:`WorkerService.call` / :meth:`submit_local`, which the loop runs, woken through a
  socket pair.
"""

from __future__ import annotations

import logging
import math
import queue
import secrets
import socket
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.codec import DecodeError, encode, router_decoder
from bus.schema import (
    REFUSED_DUPLICATE_ID,
    Cancel,
    Completion,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Heartbeat,
    Hello,
    Refused,
    TokenChunk,
    Welcome,
)
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES, make_dealer

logger = logging.getLogger(__name__)

Sink = Callable[[Any], None]
_TERMINAL = (Completion, ErrorReply)
#: Finished request streams kept for a resend (beyond that the oldest are forgotten and counted; a
#: router that then misses one fails or re-routes the request explicitly).
MAX_FINISHED_STREAMS = 10_000
#: After a duplicate-id refusal, the second Hello goes this long after the holder's timeout.
DUPLICATE_RETRY_MARGIN_S = 0.1
_HANDSHAKE_FAILED = (zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL
                     | zmq.EVENT_HANDSHAKE_FAILED_AUTH)


@dataclass
class LinkCounters:
    connects: int = 0
    welcomes: int = 0
    heartbeats_sent: int = 0
    messages_sent: int = 0
    messages_dropped: int = 0  # produced while the link was down (heartbeats)
    replies_held: int = 0  # request replies kept unsent while the link was not welcomed, sent after the Welcome
    replies_resent: int = 0  # replies sent again from kept streams after a Welcome
    streams_forgotten: int = 0  # finished streams dropped unconfirmed (MAX_FINISHED_STREAMS)
    orphan_replies_dropped: int = 0  # replies of requests of a router incarnation that is gone
    dispatches: int = 0
    cancels: int = 0
    bad_messages: int = 0
    handler_errors: int = 0
    rehellos: int = 0  # Hellos sent again because a router of another epoch spoke (it restarted)


@dataclass
class _Stream:
    """One router request's replies as sent (numbered), kept for a resend on a new link."""

    messages: list = field(default_factory=list)
    chunks: int = 0
    finished: bool = False
    sent_s: float | None = None  # when its terminal last went out on a welcomed link


class WorkerService:
    """Runs ``backend`` behind the router link (see the module docstring)."""

    def __init__(
        self,
        *,
        backend: Any,
        router_endpoint: str | None,
        worker_id: str,
        epoch: int | None = None,
        profile: str = "",
        heartbeat_interval_s: float = 1.0,
        liveness: int = 3,
        backoff_min_s: float = 0.25,
        backoff_max_s: float = 8.0,
        max_poll_s: float = 0.02,
        ctx: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        curve: Curve | None = None,
        max_msg_size: int = MAX_REQUEST_BYTES,
    ) -> None:
        """``curve``: the router link is a CURVE client of the router's key (bus/security.py);
        a frame from the router bigger than ``max_msg_size`` drops the link (it reconnects)."""
        self.backend = backend
        self.curve = curve
        self.max_msg_size = max_msg_size
        self.router_endpoint = router_endpoint
        self.worker_id = worker_id
        self.epoch = epoch if epoch is not None else time.time_ns() // 1000
        self.profile = profile
        self.heartbeat_interval_s = heartbeat_interval_s
        self.liveness = liveness
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.max_poll_s = max_poll_s
        self.counters = LinkCounters()
        self.refused: str | None = None
        self.registered = False
        self._router_epoch = 0  # the incarnation of the router that welcomed us (0: not yet)
        self._last_rehello = -1e9
        self._ctx = ctx or zmq.Context.instance()
        self._clock = clock
        self._decoder = router_decoder()
        self._dealer: zmq.Socket | None = None
        self._dealer_events: zmq.Socket | None = None  # the DEALER's socket monitor (why no Welcome came)
        self._link_seen = 0  # zmq events seen on the current DEALER (EVENT_CONNECTED, handshake failures)
        self._poller = zmq.Poller()
        self._last_recv = 0.0
        self._next_heartbeat = 0.0
        self._reconnect_at: float | None = None
        self._streams: dict[str, _Stream] = {}  # router request id -> its replies so far (module docstring)
        self._finished: deque[str] = deque()  # ids of finished streams, oldest first (pruning)
        self._backlog: deque[bytes] = deque()  # encoded replies the full link has not taken yet
        self._orphans: set[str] = set()  # requests of a router incarnation that is gone (cancelled)
        self._link_token = secrets.token_hex(16)  # proves a new link is this incarnation (Hello.link_token)
        self._welcomed_epoch: int | None = None  # the router incarnation that dispatched what _streams hold
        self._duplicate_retry_at: float | None = None  # when to say Hello again after REFUSED_DUPLICATE_ID
        self._duplicate_retried = False
        self._backoff_s = backoff_min_s
        self._sinks: dict[str, Sink] = {}
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        set_waker = getattr(backend, "set_waker", None)
        if set_waker is not None:  # a threaded backend (vLLM adapter) wakes the loop when it has messages
            set_waker(self._wake)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ other threads

    def call(self, fn: Callable[[], Any]) -> Future:
        """Run ``fn`` on the loop thread; the future holds its result."""
        fut: Future = Future()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return  # the caller gave up on it (a timed-out HTTP request): nobody wants the result
            try:
                fut.set_result(fn())
            except BaseException as exc:  # handed to the caller
                fut.set_exception(exc)

        self._inbox.put(run)
        self._wake()
        return fut

    def submit_local(self, dispatch: Dispatch, sink: Sink) -> None:
        """A request from this worker's own front end; its messages go to ``sink`` (any thread)."""

        def run() -> None:
            self._sinks[dispatch.request_id] = sink
            self.backend.submit(dispatch)

        self._inbox.put(run)
        self._wake()

    def cancel_local(self, request_id: str) -> None:
        self._inbox.put(lambda: self.backend.cancel(request_id))
        self._wake()

    def stop(self) -> None:
        self._stop.set()
        self._wake()

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"x")
        except (BlockingIOError, OSError):
            pass  # a wake-up is already pending

    # ------------------------------------------------------------------ the loop

    def run(self) -> None:
        """Serve until :meth:`stop` (or a ``Refused``); then answer what is left and say goodbye."""
        try:
            if self.router_endpoint is not None:
                self._connect()
            while not self._stop.is_set():
                self.run_once()
        finally:
            self._shutdown()

    def run_once(self) -> None:
        self._run_inbox()
        now = self._clock()
        due = self._advance(now)
        self._flush_backend()
        if self.router_endpoint is not None:
            self._link_timers(now)
            self._flush_backlog()
        deadlines = [now + self.max_poll_s]
        if due is not None:
            deadlines.append(due)
        if self._dealer is not None:
            deadlines.append(self._next_heartbeat)
        if self._reconnect_at is not None:
            deadlines.append(self._reconnect_at)
        if self._duplicate_retry_at is not None:
            deadlines.append(self._duplicate_retry_at)
        # zmq polls in whole milliseconds: round up rather than spin through the last one.
        timeout_ms = max(0, math.ceil((min(deadlines) - self._clock()) * 1000.0))
        for sock, _ in self._poller.poll(timeout_ms):
            if sock is self._dealer:
                self._recv_router()
            elif sock == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
        poll = getattr(self.backend, "poll_sockets", None)
        if poll is not None:
            poll()

    def _run_inbox(self) -> None:
        while True:
            try:
                fn = self._inbox.get_nowait()
            except queue.Empty:
                return
            fn()

    def _advance(self, now: float) -> float | None:
        advance = getattr(self.backend, "advance", None)
        if advance is not None:
            return advance(now)
        # A threaded backend (vLLM adapter): look at its outbox often while it is busy.
        return now + 0.005 if self.backend.num_in_flight else None

    def _flush_backend(self) -> None:
        for msg in self.backend.drain():
            sink = self._sinks.get(msg.request_id)
            if sink is not None:
                if isinstance(msg, _TERMINAL):
                    del self._sinks[msg.request_id]
                sink(msg)
            else:
                self._relay(msg)

    # ------------------------------------------------------------------ router link

    def _connect(self) -> None:
        self._link_seen = 0

        def setup(sock: zmq.Socket) -> None:
            if self.curve is not None:
                self.curve.dial(sock)
            # Before connect: whether anything ever accepted the connection tells "no router
            # there" from "a router that refused the handshake" (CURVE) when no Welcome comes.
            self._dealer_events = sock.get_monitor_socket(zmq.EVENT_CONNECTED | _HANDSHAKE_FAILED)

        self._dealer = make_dealer(self._ctx, self.router_endpoint, max_msg_size=self.max_msg_size, setup=setup)
        self._poller.register(self._dealer, zmq.POLLIN)
        self.counters.connects += 1
        now = self._clock()
        self._last_recv = now
        self._next_heartbeat = now + self.heartbeat_interval_s
        self._reconnect_at = None
        self.registered = False
        self._router_epoch = 0
        if self._duplicate_retry_at is None:  # else the retry timer says it, not before the holder's timeout
            self._send(self._hello())
        logger.info("worker %s registering with %s (epoch %d)", self.worker_id, self.router_endpoint, self.epoch)

    def _hello(self) -> Hello:
        return msgspec.structs.replace(self.backend.hello(epoch=self.epoch, profile=self.profile),
                                       link_token=self._link_token, in_flight=list(self._streams),
                                       router_epoch=self._welcomed_epoch or 0)

    # ------------------------------------------------------------------ request streams

    def _relay(self, msg: Any) -> None:
        """A reply to a router request: numbered, kept, and sent if the link is welcomed."""
        key = msg.request_id
        if key in self._orphans:
            if isinstance(msg, _TERMINAL):
                self._orphans.discard(key)
            self.counters.orphan_replies_dropped += 1
            return
        stream = self._streams.get(key)
        if stream is None:  # not dispatched over the link (nothing does that): as it is
            self._send(msg)
            return
        if stream.finished:  # a backend answers once; a second terminal would be a bug: do not pass it on
            self.counters.bad_messages += 1
            return
        if isinstance(msg, TokenChunk):
            msg = msgspec.structs.replace(msg, seq=stream.chunks)
            stream.chunks += 1
        elif isinstance(msg, Completion):
            msg = msgspec.structs.replace(msg, chunks=stream.chunks)
        stream.messages.append(msg)
        terminal = isinstance(msg, _TERMINAL)
        if terminal:
            stream.finished = True
            self._finished.append(key)
        if self.registered and self._dealer is not None:
            self._send_reply(msg)
            if terminal:
                stream.sent_s = self._clock()
        else:
            self.counters.replies_held += 1

    def _resend_streams(self) -> None:
        """After a Welcome of the same router: every kept stream again from its start, in order."""
        now = self._clock()
        n = 0
        for stream in self._streams.values():
            for msg in stream.messages:
                self._send_reply(msg)
                n += 1
            if stream.finished:
                stream.sent_s = now
        if n:
            self.counters.replies_resent += n
            logger.info("worker %s: sent %d replies of %d request(s) again from their start", self.worker_id, n,
                        len(self._streams))

    def _forget_streams(self, why: str) -> None:
        """The router that dispatched them is gone: stop what runs, drop what is kept."""
        running = [key for key, s in self._streams.items() if not s.finished]
        if running:
            logger.warning("worker %s: cancelling %d request(s): %s", self.worker_id, len(running), why)
        if len(self._orphans) > MAX_FINISHED_STREAMS:
            self._orphans.clear()  # ids whose cancel never answered: forget them
        for key in running:
            self._orphans.add(key)
            self.backend.cancel(key)
        self._streams.clear()
        self._finished.clear()

    def _prune_streams(self) -> None:
        """Forget finished streams the router has surely read: it spoke a whole liveness timeout
        after they went out (a heuristic: one it missed after all ends explicitly at the router)."""
        cutoff = self._last_recv - self.heartbeat_interval_s * self.liveness
        finished = self._finished
        while finished:
            key = finished[0]
            stream = self._streams.get(key)
            if stream is None or not stream.finished:
                finished.popleft()  # dispatched again since (a new stream under the same id)
                continue
            if len(finished) > MAX_FINISHED_STREAMS:
                self.counters.streams_forgotten += 1
            elif stream.sent_s is None or stream.sent_s > cutoff:
                return
            finished.popleft()
            del self._streams[key]

    def _disconnect(self) -> None:
        self._backlog.clear()  # kept in _streams: the next Welcome resends them
        if self._dealer is not None:
            self._poller.unregister(self._dealer)
            if self._dealer_events is not None:
                self._dealer.disable_monitor()
                self._dealer_events.close(linger=0)
                self._dealer_events = None
            self._dealer.close()
            self._dealer = None
        self.registered = False

    def _silence_hint(self) -> str:
        """Why a router never welcomed this worker, from the DEALER's socket events."""
        while self._dealer_events is not None:
            try:
                self._link_seen |= recv_monitor_message(self._dealer_events, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
        if self.counters.welcomes:
            return ""
        if self._link_seen & _HANDSHAKE_FAILED:
            # A CURVE refusal looks exactly like silence from the link (the router never sees a
            # refused peer); only the failed handshake shows it.
            return (" (handshake refused: is this worker's public key in the router's workers/ key directory?)"
                    if self.curve is not None else
                    " (handshake refused: a router with --curve-dir admits only workers with an authorised key)")
        if not self._link_seen & zmq.EVENT_CONNECTED:
            return f" (nothing accepts connections at {self.router_endpoint}: is the router running there? " \
                   "--router none runs without one)"
        return " (connected, never welcomed)"

    def _link_timers(self, now: float) -> None:
        if not getattr(self.backend, "healthy", True):  # its engine is down (vLLM adapter): leave the router
            if self._dealer is not None:
                logger.warning("worker %s: backend unhealthy, leaving the router", self.worker_id)
                self._send(Goodbye(worker_id=self.worker_id, epoch=self.epoch))
                self._dealer.setsockopt(zmq.LINGER, 500)
                self._disconnect()
            self._reconnect_at = now + self.heartbeat_interval_s  # register again once healthy
            return
        if self._dealer is None:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._connect()
            return
        if self._duplicate_retry_at is not None and now >= self._duplicate_retry_at:
            self._duplicate_retry_at = None
            self._send(self._hello())
        self._prune_streams()
        if now - self._last_recv > self.heartbeat_interval_s * self.liveness:
            # Read what is waiting before judging: after a long step or CPU starvation the
            # router's beats sit unread in the socket, and the router was not silent at all.
            self._recv_router()
        if self._dealer is not None and now - self._last_recv > self.heartbeat_interval_s * self.liveness:
            hint = self._silence_hint()
            logger.warning("router silent for %.1f s: reconnecting in %.2f s%s", now - self._last_recv,
                           self._backoff_s, hint)
            self._disconnect()
            self._reconnect_at = now + self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.backoff_max_s)
            return
        if now >= self._next_heartbeat:
            for rank, load in self.backend.loads().items():
                self._send(Heartbeat(sender_id=self.worker_id, epoch=self.epoch, load=load, dp_rank=rank))
                self.counters.heartbeats_sent += 1
            self._next_heartbeat = now + self.heartbeat_interval_s

    def _send_reply(self, msg: Any) -> None:
        """A request reply on the welcomed link: never dropped for a full queue (a resend after a
        reconnect can be tens of thousands of chunks); it waits in ``_backlog``, in order."""
        self._backlog.append(encode(msg))
        self._flush_backlog()

    def _flush_backlog(self) -> None:
        backlog = self._backlog
        while backlog and self._dealer is not None:
            try:
                self._dealer.send(backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # the link is full: the loop tries again within max_poll_s
            backlog.popleft()
            self.counters.messages_sent += 1

    def _send(self, msg: Any) -> None:
        if self._dealer is None:
            self.counters.messages_dropped += 1
            return
        if self._backlog:  # behind the replies waiting there (a Goodbye must not overtake a result)
            self._backlog.append(encode(msg))
            return
        try:
            self._dealer.send(encode(msg), zmq.NOBLOCK)
            self.counters.messages_sent += 1
        except zmq.Again:
            self.counters.messages_dropped += 1
            logger.warning("router link full: dropped a %s", type(msg).__name__)

    def _recv_router(self) -> None:
        while self._dealer is not None:
            try:
                frame = self._dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._last_recv = self._clock()
            try:
                msg = self._decoder.decode(frame)
            except DecodeError as exc:
                self.counters.bad_messages += 1
                logger.warning("bad message from the router: %s", exc)
                continue
            self._handle(msg)

    def _handle(self, msg: Any) -> None:
        try:
            self._dispatch_message(msg)
        except Exception:  # a bug in a backend must not take the worker down
            self.counters.handler_errors += 1
            logger.exception("handling %s failed", type(msg).__name__)
            if isinstance(msg, Dispatch):
                self._relay(ErrorReply(msg.request_id, ErrorCode.INTERNAL, "worker failed to start the request",
                                       self.worker_id))

    def _dispatch_message(self, msg: Any) -> None:
        if isinstance(msg, Dispatch):
            self.counters.dispatches += 1
            kept = self._streams.get(msg.request_id)
            if kept is None or kept.finished:  # (a running one dispatched again: the backend ignores it)
                self._streams[msg.request_id] = _Stream()
            self.backend.submit(msg)
        elif isinstance(msg, Cancel):
            self.counters.cancels += 1
            self.backend.cancel(msg.request_id)
        elif isinstance(msg, Welcome):
            self.counters.welcomes += 1
            self.registered = True
            self.heartbeat_interval_s = msg.heartbeat_interval_s
            self.liveness = msg.heartbeat_liveness
            self._backoff_s = self.backoff_min_s
            self._router_epoch = msg.router_epoch
            self._duplicate_retried = False
            self._duplicate_retry_at = None
            logger.info("registered with router %s (heartbeat %.2f s x %d)", msg.router_id,
                        msg.heartbeat_interval_s, msg.heartbeat_liveness)
            if self._welcomed_epoch is not None and msg.router_epoch != self._welcomed_epoch:
                self._forget_streams(f"router {msg.router_id} restarted (epoch {self._welcomed_epoch} -> "
                                     f"{msg.router_epoch}) and does not know them")
            self._welcomed_epoch = msg.router_epoch
            self._resend_streams()
        elif isinstance(msg, Heartbeat):
            # The router does not know us (it restarted, or declared us dead while we were
            # stalled): register again now rather than after the liveness timeout, which its beats
            # would keep from ever expiring. At most twice a second.
            now = self._clock()
            if not msg.known and self._duplicate_retry_at is None and now - self._last_rehello >= 0.5:
                self._last_rehello = now
                self.counters.rehellos += 1
                self.registered = False
                logger.warning("router %s (epoch %d) does not know this worker (welcomed by epoch %d): "
                               "saying Hello again", msg.sender_id, msg.epoch, self._router_epoch)
                self._send(self._hello())
        elif isinstance(msg, Refused):
            if msg.code == REFUSED_DUPLICATE_ID and not self._duplicate_retried:
                # The holder may be this worker's predecessor, dead but not yet timed out: once
                # more after its timeout; a second refusal proves it alive.
                self._duplicate_retried = True
                wait_s = msg.retry_after_s + DUPLICATE_RETRY_MARGIN_S
                self._duplicate_retry_at = self._clock() + wait_s
                logger.warning("router refused worker %s: %s; saying Hello once more in %.2f s, in case the holder "
                               "is this worker's dead predecessor", self.worker_id, msg.reason, wait_s)
                return
            self.refused = msg.reason
            logger.error("router refused worker %s: %s", self.worker_id, msg.reason)
            self._stop.set()

    def _shutdown(self) -> None:
        self._run_inbox()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self._flush_backend()
        if self._dealer is not None:
            self._send(Goodbye(worker_id=self.worker_id, epoch=self.epoch))
            deadline = self._clock() + 1.0
            while self._backlog and self._clock() < deadline:
                self._flush_backlog()
                if self._backlog:
                    time.sleep(0.005)
            self._dealer.setsockopt(zmq.LINGER, 500)  # let the last replies and the goodbye out
            self._disconnect()
        for sink in self._sinks.values():
            sink(None)  # the front end's request will get no more messages
        self._sinks.clear()
        self._poller.unregister(self._wake_r.fileno())
        self._wake_r.close()
        self._wake_w.close()
