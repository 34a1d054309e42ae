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
* **Several routers** (replicas sharing a fleet): one link per router endpoint, each with all of
  the above on its own (its DEALER, heartbeats, backoff, Welcome, router incarnation). A request
  belongs to the link that dispatched it: its replies, its resend after a reconnect and its
  cancellation when that router restarts concern that link only. Router request ids carry the
  router id (``{router_id}-{n}``), so replicas must have distinct ``--router-id``s; a Welcome
  from a router id another link already has is logged as an error.
* **Backend.** ``Dispatch`` → ``backend.submit``, ``Cancel`` → ``backend.cancel``;
  whatever the backend produces (``TokenChunk``, ``Completion``, ``ErrorReply``) goes
  to the router, or to a local sink for requests that came in over HTTP. What one drain of the
  backend yields for a router (an engine step's tokens for every running request) goes as one
  ``ReplyBatch`` when that router's ``Welcome`` says it reads them (``reply_batches``).
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
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import msgspec
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.codec import DecodeError, encode, router_decoder
from bus.schema import (
    MAX_REPLY_BATCH,
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
    ReplyBatch,
    TokenChunk,
    Welcome,
)
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES, make_dealer
from core.liveness import DEFAULT_INTERVAL_S, DEFAULT_LIVENESS

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

    link: _Link
    messages: list = field(default_factory=list)
    chunks: int = 0
    finished: bool = False
    sent_s: float | None = None  # when its terminal last went out on a welcomed link


@dataclass
class _Link:
    """One router's link (module docstring): its DEALER and the state of its handshake."""

    endpoint: str
    backoff_s: float
    heartbeat_interval_s: float
    liveness: int
    dealer: zmq.Socket | None = None
    events: zmq.Socket | None = None  # the DEALER's socket monitor (why no Welcome came)
    seen: int = 0  # zmq events seen on the current DEALER (EVENT_CONNECTED, handshake failures)
    last_recv: float = 0.0
    next_heartbeat: float = 0.0
    reconnect_at: float | None = None
    registered: bool = False
    router_id: str = ""
    router_epoch: int = 0  # the incarnation of the router that welcomed us (0: not yet)
    welcomed_epoch: int | None = None  # the router incarnation that dispatched what this link's streams hold
    duplicate_retry_at: float | None = None  # when to say Hello again after REFUSED_DUPLICATE_ID
    duplicate_retried: bool = False
    last_rehello: float = -1e9
    welcomes: int = 0
    backlog: deque[bytes] = field(default_factory=deque)  # encoded replies the full link has not taken yet
    reply_batches: bool = False  # the welcoming router reads ReplyBatch


def router_endpoints(value: str | Sequence[str] | None) -> list[str]:
    """The routers a worker registers with, from ``--router`` values: each may list several,
    comma-separated (router replicas); ``none`` or nothing: no router (HTTP only)."""
    values = [value] if isinstance(value, str) else list(value or [])
    out = [e.strip() for v in values for e in v.split(",") if e.strip()]
    return [] if out in ([], ["none"]) else out


class WorkerService:
    """Runs ``backend`` behind its router links (see the module docstring)."""

    def __init__(
        self,
        *,
        backend: Any,
        router_endpoint: str | Sequence[str] | None,
        worker_id: str,
        epoch: int | None = None,
        profile: str = "",
        heartbeat_interval_s: float = DEFAULT_INTERVAL_S,
        liveness: int = DEFAULT_LIVENESS,
        backoff_min_s: float = 0.25,
        backoff_max_s: float = 8.0,
        max_poll_s: float = 0.02,
        ctx: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        curve: Curve | None = None,
        max_msg_size: int = MAX_REQUEST_BYTES,
    ) -> None:
        """``router_endpoint``: one router, several (replicas: a link to each), or None (no router:
        HTTP only). ``curve``: the router links are CURVE clients of the router's key
        (bus/security.py); a frame from a router bigger than ``max_msg_size`` drops that link (it
        reconnects)."""
        self.backend = backend
        self.curve = curve
        self.max_msg_size = max_msg_size
        endpoints = router_endpoints(router_endpoint)
        if "none" in endpoints:
            raise ValueError("'none' (no router) cannot be combined with router endpoints")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"a router endpoint is given twice: {endpoints}")
        self.router_endpoints = endpoints
        self.worker_id = worker_id
        self.epoch = epoch if epoch is not None else time.time_ns() // 1000
        self.profile = profile
        self.backoff_min_s = backoff_min_s
        self.backoff_max_s = backoff_max_s
        self.max_poll_s = max_poll_s
        self.counters = LinkCounters()
        self.refused: str | None = None
        self._ctx = ctx or zmq.Context.instance()
        self._clock = clock
        self._decoder = router_decoder()
        self._poller = zmq.Poller()
        self.links = [_Link(endpoint=e, backoff_s=backoff_min_s, heartbeat_interval_s=heartbeat_interval_s,
                            liveness=liveness) for e in endpoints]
        self._by_socket: dict[zmq.Socket, _Link] = {}
        self._streams: dict[str, _Stream] = {}  # router request id -> its replies so far (module docstring)
        self._finished: deque[str] = deque()  # ids of finished streams, oldest first (pruning)
        self._orphans: set[str] = set()  # requests of a router incarnation that is gone (cancelled)
        self._link_token = secrets.token_hex(16)  # proves a new link is this incarnation (Hello.link_token)
        self._sinks: dict[str, Sink] = {}
        # While _flush_backend relays the backend's output: id(link) -> (link, its replies, in order).
        self._batching: dict[int, tuple[_Link, list[Any]]] | None = None
        self._inbox: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        set_waker = getattr(backend, "set_waker", None)
        if set_waker is not None:  # a threaded backend (vLLM adapter) wakes the loop when it has messages
            set_waker(self._wake)
        self._poller.register(self._wake_r.fileno(), zmq.POLLIN)
        self._stop = threading.Event()

    # ------------------------------------------------------------------ views

    @property
    def router_endpoint(self) -> str | None:
        """The first router's endpoint (None: no router)."""
        return self.router_endpoints[0] if self.router_endpoints else None

    @property
    def registered(self) -> bool:
        """Welcomed by every router it has a link to (False with none)."""
        return bool(self.links) and all(link.registered for link in self.links)

    @property
    def heartbeat_interval_s(self) -> float:
        return min((link.heartbeat_interval_s for link in self.links), default=DEFAULT_INTERVAL_S)

    @property
    def _dealer(self) -> zmq.Socket | None:
        """The first link's DEALER (tests of a single-router worker)."""
        return self.links[0].dealer if self.links else None

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
            for link in self.links:
                self._connect(link)
            while not self._stop.is_set():
                self.run_once()
        finally:
            self._shutdown()

    def run_once(self) -> None:
        self._run_inbox()
        now = self._clock()
        due = self._advance(now)
        self._flush_backend()
        self._prune_streams()
        deadlines = [now + self.max_poll_s]
        if due is not None:
            deadlines.append(due)
        for link in self.links:
            self._link_timers(link, now)
            self._flush_backlog(link)
            if link.dealer is not None:
                deadlines.append(link.next_heartbeat)
            if link.reconnect_at is not None:
                deadlines.append(link.reconnect_at)
            if link.duplicate_retry_at is not None:
                deadlines.append(link.duplicate_retry_at)
        # zmq polls in whole milliseconds: round up rather than spin through the last one.
        timeout_ms = max(0, math.ceil((min(deadlines) - self._clock()) * 1000.0))
        for sock, _ in self._poller.poll(timeout_ms):
            if sock == self._wake_r.fileno():
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                link = self._by_socket.get(sock)
                if link is not None:
                    self._recv_router(link)
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
        # What the backend has now (an engine step's tokens for every running request) goes to each
        # router as one ReplyBatch where the router reads them (one message per step, not per request).
        self._batching = {}
        try:
            for msg in self.backend.drain():
                sink = self._sinks.get(msg.request_id)
                if sink is not None:
                    if isinstance(msg, _TERMINAL):
                        del self._sinks[msg.request_id]
                    sink(msg)
                else:
                    self._relay(msg)
        finally:
            batching, self._batching = self._batching, None
            for link, replies in batching.values():
                self._send_replies(link, replies)

    # ------------------------------------------------------------------ router links

    def _connect(self, link: _Link | None = None) -> None:
        link = link or self.links[0]
        link.seen = 0

        def setup(sock: zmq.Socket) -> None:
            if self.curve is not None:
                self.curve.dial(sock)
            # Before connect: whether anything ever accepted the connection tells "no router
            # there" from "a router that refused the handshake" (CURVE) when no Welcome comes.
            link.events = sock.get_monitor_socket(zmq.EVENT_CONNECTED | _HANDSHAKE_FAILED)

        link.dealer = make_dealer(self._ctx, link.endpoint, max_msg_size=self.max_msg_size, setup=setup)
        self._by_socket[link.dealer] = link
        self._poller.register(link.dealer, zmq.POLLIN)
        self.counters.connects += 1
        now = self._clock()
        link.last_recv = now
        link.next_heartbeat = now + link.heartbeat_interval_s
        link.reconnect_at = None
        link.registered = False
        link.router_epoch = 0
        if link.duplicate_retry_at is None:  # else the retry timer says it, not before the holder's timeout
            self._send(link, self._hello(link))
        logger.info("worker %s registering with %s (epoch %d)", self.worker_id, link.endpoint, self.epoch)

    def _hello(self, link: _Link) -> Hello:
        return msgspec.structs.replace(self.backend.hello(epoch=self.epoch, profile=self.profile),
                                       link_token=self._link_token,
                                       in_flight=[k for k, st in self._streams.items() if st.link is link],
                                       router_epoch=link.welcomed_epoch or 0)

    # ------------------------------------------------------------------ request streams

    def _relay(self, msg: Any) -> None:
        """A reply to a router request: numbered, kept, and sent if its link is welcomed."""
        key = msg.request_id
        if key in self._orphans:
            if isinstance(msg, _TERMINAL):
                self._orphans.discard(key)
            self.counters.orphan_replies_dropped += 1
            return
        stream = self._streams.get(key)
        if stream is None:  # not dispatched over a link (nothing does that): dropped, counted
            self.counters.orphan_replies_dropped += 1
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
        link = stream.link
        if link.registered and link.dealer is not None:
            if self._batching is not None:  # sent with the rest of the backend's output (_flush_backend)
                self._batching.setdefault(id(link), (link, []))[1].append(msg)
            else:
                self._send_reply(link, msg)
            if terminal:
                stream.sent_s = self._clock()
        else:
            self.counters.replies_held += 1

    def _resend_streams(self, link: _Link) -> None:
        """After a Welcome of the same router: every stream it dispatched again from its start, in order."""
        now = self._clock()
        n = requests = 0
        for stream in self._streams.values():
            if stream.link is not link:
                continue
            requests += 1
            for msg in stream.messages:
                self._send_reply(link, msg)
                n += 1
            if stream.finished:
                stream.sent_s = now
        if n:
            self.counters.replies_resent += n
            logger.info("worker %s: sent %d replies of %d request(s) again from their start", self.worker_id, n,
                        requests)

    def _forget_streams(self, link: _Link, why: str) -> None:
        """The router that dispatched them is gone: stop what runs, drop what is kept."""
        mine = [key for key, s in self._streams.items() if s.link is link]
        running = [key for key in mine if not self._streams[key].finished]
        if running:
            logger.warning("worker %s: cancelling %d request(s): %s", self.worker_id, len(running), why)
        if len(self._orphans) > MAX_FINISHED_STREAMS:
            self._orphans.clear()  # ids whose cancel never answered: forget them
        for key in running:
            self._orphans.add(key)
            self.backend.cancel(key)
        for key in mine:
            del self._streams[key]  # (their ids leave _finished as _prune_streams meets them)

    def _prune_streams(self) -> None:
        """Forget finished streams their router has surely read: it spoke a whole liveness timeout
        after they went out (a heuristic: one it missed after all ends explicitly at the router)."""
        finished = self._finished
        while finished:
            key = finished[0]
            stream = self._streams.get(key)
            if stream is None or not stream.finished:
                finished.popleft()  # forgotten, or dispatched again since (a new stream under the same id)
                continue
            link = stream.link
            if len(finished) > MAX_FINISHED_STREAMS:
                self.counters.streams_forgotten += 1
            elif stream.sent_s is None or stream.sent_s > link.last_recv - link.heartbeat_interval_s * link.liveness:
                return
            finished.popleft()
            del self._streams[key]

    def _disconnect(self, link: _Link) -> None:
        link.backlog.clear()  # kept in _streams: the next Welcome resends them
        if link.dealer is not None:
            self._poller.unregister(link.dealer)
            self._by_socket.pop(link.dealer, None)
            if link.events is not None:
                link.dealer.disable_monitor()
                link.events.close(linger=0)
                link.events = None
            link.dealer.close()
            link.dealer = None
        link.registered = False

    def _silence_hint(self, link: _Link) -> str:
        """Why a router never welcomed this worker, from the DEALER's socket events."""
        while link.events is not None:
            try:
                link.seen |= recv_monitor_message(link.events, zmq.NOBLOCK)["event"]
            except zmq.Again:
                break
        if link.welcomes:
            return ""
        if link.seen & _HANDSHAKE_FAILED:
            # A CURVE refusal looks exactly like silence from the link (the router never sees a
            # refused peer); only the failed handshake shows it.
            return (" (handshake refused: is this worker's public key in the router's workers/ key directory?)"
                    if self.curve is not None else
                    " (handshake refused: a router with --curve-dir admits only workers with an authorised key)")
        if not link.seen & zmq.EVENT_CONNECTED:
            return f" (nothing accepts connections at {link.endpoint}: is the router running there? " \
                   "--router none runs without one)"
        return " (connected, never welcomed)"

    def _link_timers(self, link: _Link, now: float) -> None:
        if not getattr(self.backend, "healthy", True):  # its engine is down (vLLM adapter): leave the router
            if link.dealer is not None:
                logger.warning("worker %s: backend unhealthy, leaving router %s", self.worker_id, link.endpoint)
                self._send(link, Goodbye(worker_id=self.worker_id, epoch=self.epoch))
                link.dealer.setsockopt(zmq.LINGER, 500)
                self._disconnect(link)
            link.reconnect_at = now + link.heartbeat_interval_s  # register again once healthy
            return
        if link.dealer is None:
            if link.reconnect_at is not None and now >= link.reconnect_at:
                self._connect(link)
            return
        if link.duplicate_retry_at is not None and now >= link.duplicate_retry_at:
            link.duplicate_retry_at = None
            self._send(link, self._hello(link))
        timeout_s = link.heartbeat_interval_s * link.liveness
        if now - link.last_recv > timeout_s:
            # Read what is waiting before judging: after a long step or CPU starvation the
            # router's beats sit unread in the socket, and the router was not silent at all.
            self._recv_router(link)
        if link.dealer is not None and now - link.last_recv > timeout_s:
            hint = self._silence_hint(link)
            logger.warning("router silent for %.1f s (%s): reconnecting in %.2f s%s", now - link.last_recv,
                           link.endpoint, link.backoff_s, hint)
            self._disconnect(link)
            link.reconnect_at = now + link.backoff_s
            link.backoff_s = min(link.backoff_s * 2, self.backoff_max_s)
            return
        if now >= link.next_heartbeat:
            for rank, load in self.backend.loads().items():
                self._send(link, Heartbeat(sender_id=self.worker_id, epoch=self.epoch, load=load, dp_rank=rank))
                self.counters.heartbeats_sent += 1
            link.next_heartbeat = now + link.heartbeat_interval_s

    def _send_replies(self, link: _Link, replies: list[Any]) -> None:
        """Replies in order: one ``ReplyBatch`` per ``MAX_REPLY_BATCH`` if the router reads them."""
        if len(replies) == 1 or not link.reply_batches:
            for msg in replies:
                self._send_reply(link, msg)
            return
        for start in range(0, len(replies), MAX_REPLY_BATCH):
            part = replies[start:start + MAX_REPLY_BATCH]
            self._send_reply(link, part[0] if len(part) == 1 else ReplyBatch(part))

    def _send_reply(self, link: _Link, msg: Any) -> None:
        """A request reply on the welcomed link: never dropped for a full queue (a resend after a
        reconnect can be tens of thousands of chunks); it waits in the link's backlog, in order."""
        link.backlog.append(encode(msg))
        self._flush_backlog(link)

    def _flush_backlog(self, link: _Link) -> None:
        backlog = link.backlog
        while backlog and link.dealer is not None:
            try:
                link.dealer.send(backlog[0], zmq.NOBLOCK)
            except zmq.Again:
                return  # the link is full: the loop tries again within max_poll_s
            backlog.popleft()
            self.counters.messages_sent += 1

    def _send(self, link: _Link, msg: Any) -> None:
        if link.dealer is None:
            self.counters.messages_dropped += 1
            return
        if link.backlog:  # behind the replies waiting there (a Goodbye must not overtake a result)
            link.backlog.append(encode(msg))
            return
        try:
            link.dealer.send(encode(msg), zmq.NOBLOCK)
            self.counters.messages_sent += 1
        except zmq.Again:
            self.counters.messages_dropped += 1
            logger.warning("router link %s full: dropped a %s", link.endpoint, type(msg).__name__)

    def _recv_router(self, link: _Link) -> None:
        while link.dealer is not None:
            try:
                frame = link.dealer.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            link.last_recv = self._clock()
            try:
                msg = self._decoder.decode(frame)
            except DecodeError as exc:
                self.counters.bad_messages += 1
                logger.warning("bad message from router %s: %s", link.endpoint, exc)
                continue
            self._handle(link, msg)

    def _handle(self, link: _Link, msg: Any) -> None:
        try:
            self._dispatch_message(link, msg)
        except Exception:  # a bug in a backend must not take the worker down
            self.counters.handler_errors += 1
            logger.exception("handling %s failed", type(msg).__name__)
            if isinstance(msg, Dispatch):
                self._relay(ErrorReply(msg.request_id, ErrorCode.INTERNAL, "worker failed to start the request",
                                       self.worker_id))

    def _dispatch_message(self, link: _Link, msg: Any) -> None:
        if isinstance(msg, Dispatch):
            self.counters.dispatches += 1
            kept = self._streams.get(msg.request_id)
            if kept is None or kept.finished:  # (a running one dispatched again: the backend ignores it)
                self._streams[msg.request_id] = _Stream(link=link)
            self.backend.submit(msg)
        elif isinstance(msg, Cancel):
            self.counters.cancels += 1
            self.backend.cancel(msg.request_id)
        elif isinstance(msg, Welcome):
            self._on_welcome(link, msg)
        elif isinstance(msg, Heartbeat):
            # The router does not know us (it restarted, or declared us dead while we were
            # stalled): register again now rather than after the liveness timeout, which its beats
            # would keep from ever expiring. At most twice a second.
            now = self._clock()
            if not msg.known and link.duplicate_retry_at is None and now - link.last_rehello >= 0.5:
                link.last_rehello = now
                self.counters.rehellos += 1
                link.registered = False
                logger.warning("router %s (epoch %d) does not know this worker (welcomed by epoch %d): "
                               "saying Hello again", msg.sender_id, msg.epoch, link.router_epoch)
                self._send(link, self._hello(link))
        elif isinstance(msg, Refused):
            if msg.code == REFUSED_DUPLICATE_ID and not link.duplicate_retried:
                # The holder may be this worker's predecessor, dead but not yet timed out: once
                # more after its timeout; a second refusal proves it alive.
                link.duplicate_retried = True
                wait_s = msg.retry_after_s + DUPLICATE_RETRY_MARGIN_S
                link.duplicate_retry_at = self._clock() + wait_s
                logger.warning("router refused worker %s: %s; saying Hello once more in %.2f s, in case the holder "
                               "is this worker's dead predecessor", self.worker_id, msg.reason, wait_s)
                return
            self.refused = msg.reason
            logger.error("router %s refused worker %s: %s", link.endpoint, self.worker_id, msg.reason)
            self._stop.set()

    def _on_welcome(self, link: _Link, msg: Welcome) -> None:
        self.counters.welcomes += 1
        link.welcomes += 1
        link.registered = True
        link.heartbeat_interval_s = msg.heartbeat_interval_s
        link.liveness = msg.heartbeat_liveness
        link.backoff_s = self.backoff_min_s
        link.router_epoch = msg.router_epoch
        link.reply_batches = msg.reply_batches
        link.duplicate_retried = False
        link.duplicate_retry_at = None
        twins = [other.endpoint for other in self.links if other is not link and other.router_id == msg.router_id]
        if twins:
            # Request ids are {router_id}-{n}: two routers of one id would hand out the same ids.
            logger.error("routers at %s and %s both call themselves %r: give each replica its own --router-id",
                         link.endpoint, ", ".join(twins), msg.router_id)
        link.router_id = msg.router_id
        logger.info("registered with router %s at %s (heartbeat %.2f s x %d)", msg.router_id, link.endpoint,
                    msg.heartbeat_interval_s, msg.heartbeat_liveness)
        if link.welcomed_epoch is not None and msg.router_epoch != link.welcomed_epoch:
            self._forget_streams(link, f"router {msg.router_id} restarted (epoch {link.welcomed_epoch} -> "
                                       f"{msg.router_epoch}) and does not know them")
        link.welcomed_epoch = msg.router_epoch
        self._resend_streams(link)

    def _shutdown(self) -> None:
        self._run_inbox()
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()
        self._flush_backend()
        for link in self.links:
            if link.dealer is None:
                continue
            self._send(link, Goodbye(worker_id=self.worker_id, epoch=self.epoch))
            deadline = self._clock() + 1.0
            while link.backlog and self._clock() < deadline:
                self._flush_backlog(link)
                if link.backlog:
                    time.sleep(0.005)
            link.dealer.setsockopt(zmq.LINGER, 500)  # let the last replies and the goodbye out
            self._disconnect(link)
        for sink in self._sinks.values():
            sink(None)  # the front end's request will get no more messages
        self._sinks.clear()
        self._poller.unregister(self._wake_r.fileno())
        self._wake_r.close()
        self._wake_w.close()
