"""The HTTP front's links to one or several routers' client sockets (router replicas on one fleet).

One DEALER per router endpoint, all on the front's event loop (plain sockets read from the loop's
own epoll, never blocking it). One DEALER connected to every router would round-robin a
``CancelRequest`` to a router that never saw the request, and could not tell whose loss ended
which requests: so each request is on exactly one link, and its cancel goes on that link.

A new request goes to the connected router with the fewest requests pending from this front
(ties rotate, so load spreads evenly and a lost router gets nothing new).

Failover (as ``bus/replica_client.py``): a link whose established session ends (socket monitor:
handshake succeeded, then disconnected) is lost. Its pending requests that have had no token yet
are sent again, once, to another connected router under the same request id (the HTTP client saw
no part of an answer: a ``Routed`` at most, and a second ``Routed`` continues the same response);
the others end with ``ROUTER_RESTARTED``. A router that answers ``ROUTER_RESTARTED`` itself (it is
shutting down) is treated the same way. The old link also gets a ``CancelRequest`` behind the
request, so a copy still queued in its DEALER ends at once if that router comes back.

Invariants: a request is pending on at most one link; every request handed to :meth:`send` gets
exactly one terminal reply through ``deliver`` (the router's, or a local ``ROUTER_RESTARTED``)
unless :meth:`cancel` ends it first; replies from a link the request is no longer on are dropped
(``late_replies``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from bus.codec import DecodeError, encode, reply_decoder
from bus.schema import CancelRequest, Completion, ErrorCode, ErrorReply, ReplyMessage, TokenChunk
from bus.security import Curve
from bus.sockets import MAX_REQUEST_BYTES, make_socket, read_session_events

logger = logging.getLogger(__name__)

#: Re-sends of one request after losing its router before any token (as ReplicaClient's default).
MAX_FAILOVERS = 1


@dataclass(eq=False)
class _Link:
    index: int  # its place in the endpoint list (ties between links rotate over it)
    endpoint: str
    sock: Any  # zmq.Socket, opened on the loop
    monitor: Any
    session_up: bool = False
    losses: int = 0
    pending: set[str] = field(default_factory=set)  # ids of the requests on this link


@dataclass(eq=False)
class _Sent:
    data: bytes  # the encoded GenerateRequest, sent again on a failover
    link: _Link
    failovers: int = 0
    started: bool = False  # a token arrived: another router would repeat it


class RouterLinks:
    """DEALERs to ``endpoints``, used only on the event loop passed to :meth:`open`."""

    def __init__(self, *, endpoints: Sequence[str], ctx: zmq.Context, deliver: Callable[[ReplyMessage], None],
                 curve: Curve | None = None, max_failovers: int = MAX_FAILOVERS) -> None:
        """``deliver``: called on the loop with every reply for a request still on its link (and
        the local ``ROUTER_RESTARTED`` of a request lost with its router)."""
        if not endpoints:
            raise ValueError("no router endpoint given")
        if len(set(endpoints)) != len(endpoints):
            raise ValueError(f"a router endpoint is given twice: {list(endpoints)}")
        self.endpoints = list(endpoints)
        self._ctx, self._curve, self._deliver = ctx, curve, deliver
        self.max_failovers = max_failovers
        self._links: list[_Link] = []
        self._sent: dict[str, _Sent] = {}
        self._rotation = itertools.cycle(range(len(self.endpoints)))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._decoder = reply_decoder()
        self.failovers = 0  # requests sent again to another router
        self.connection_losses = 0  # router sessions that ended
        self.late_replies = 0  # replies for requests no longer on that link (ended, cancelled, moved)

    # ------------------------------------------------------------------ lifecycle (on the loop)

    def open(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for index, endpoint in enumerate(self.endpoints):
            # No send high-water mark: what a DEALER queues is bounded by the front's max_in_flight.
            sock = make_socket(self._ctx, zmq.DEALER, hwm=0, max_msg_size=MAX_REQUEST_BYTES,
                               setup=None if self._curve is None else self._curve.dial)
            # Before connect, so no session goes unseen; a refused CURVE handshake never succeeds
            # and so never counts as a session (it held no request).
            monitor = sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
            link = _Link(index, endpoint, sock, monitor)
            self._links.append(link)
            try:
                sock.connect(endpoint)
            except zmq.ZMQError:
                self.close()
                raise
            loop.add_reader(sock.FD, self._drain, link)
            loop.add_reader(monitor.FD, self._watch, link)
        for link in self._links:  # the FDs are edge-triggered: read what came before add_reader
            self._watch(link)
            self._drain(link)

    def close(self) -> None:
        links, self._links = self._links, []
        self._sent.clear()
        for link in links:
            if self._loop is not None and not link.sock.closed:
                self._loop.remove_reader(link.sock.FD)
                self._loop.remove_reader(link.monitor.FD)
                link.sock.disable_monitor()
            link.monitor.close(linger=0)
            link.sock.close(linger=0)

    # ------------------------------------------------------------------ requests

    def send(self, request_id: str, data: bytes) -> None:
        """Send an encoded ``GenerateRequest`` to the least-loaded connected router."""
        link = self._pick()
        if link is None:  # closed
            return
        self._sent[request_id] = _Sent(data, link)
        link.pending.add(request_id)
        self._write(link, data)

    def cancel(self, request_id: str) -> None:
        """End a request this side (the HTTP exchange ended first): cancel it on its router."""
        sent = self._sent.pop(request_id, None)
        if sent is not None:
            sent.link.pending.discard(request_id)
            self._write(sent.link, encode(CancelRequest(request_id)))

    def connected(self) -> int:
        """Routers with an established session."""
        return sum(link.session_up for link in self._links)

    def snapshot(self) -> dict:
        """Per router endpoint: connected, requests pending; for the front's /health and /metrics."""
        return {link.endpoint: {"connected": link.session_up, "pending": len(link.pending), "losses": link.losses}
                for link in self._links}

    def _pick(self, avoid: _Link | None = None) -> _Link | None:
        """The router a request goes to: connected ones first; none connected yet (at start, or all
        gone): the ones never lost, else any (ZMQ queues it until that router is back). A failover
        (``avoid``) goes only to another connected router."""
        links = [link for link in self._links if link is not avoid]
        pool = [link for link in links if link.session_up]
        if not pool and avoid is None:
            pool = [link for link in links if link.losses == 0] or links
        if not pool:
            return None
        if len(pool) == 1:
            return pool[0]
        start, n = next(self._rotation), len(self.endpoints)
        return min(pool, key=lambda link: (len(link.pending), (link.index - start) % n))

    def _write(self, link: _Link, data: bytes) -> None:
        try:
            link.sock.send(data, zmq.NOBLOCK)
        except zmq.ZMQError as exc:  # no high-water mark: only a closing context gets here
            logger.warning("could not send to the router at %s: %s", link.endpoint, exc)
            return
        # A send can consume the FD's edge for replies that arrived meanwhile: look once more.
        if link.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            assert self._loop is not None
            self._loop.call_soon(self._drain, link)

    # ------------------------------------------------------------------ replies and losses

    def _drain(self, link: _Link, budget: int = 1000) -> None:
        """Hand every waiting reply on. ZMQ's FD is edge-triggered: read until nothing is left (or
        the budget is spent: then again on the next turn of the loop)."""
        sock = link.sock
        if sock.closed:
            return
        decode = self._decoder.decode
        for _ in range(budget):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            except zmq.ZMQError:  # closed under us at shutdown
                return
            try:
                reply = decode(frame)
            except DecodeError as exc:
                logger.warning("undecodable reply from the router at %s: %s", link.endpoint, exc)
                continue
            self._on_reply(link, reply)
        assert self._loop is not None
        self._loop.call_soon(self._drain, link)

    def _on_reply(self, link: _Link, reply: ReplyMessage) -> None:
        rid = reply.request_id
        sent = self._sent.get(rid)
        if sent is None or sent.link is not link:
            self.late_replies += 1
            return
        if isinstance(reply, TokenChunk):
            sent.started = True
        elif isinstance(reply, (Completion, ErrorReply)):
            if (isinstance(reply, ErrorReply) and reply.code is ErrorCode.ROUTER_RESTARTED
                    and self._fail_over(rid, sent)):
                return
            del self._sent[rid]
            link.pending.discard(rid)
        self._deliver(reply)

    def _watch(self, link: _Link) -> None:
        link.session_up, lost = read_session_events(link.monitor, link.session_up)
        if lost:
            self._lost(link)

    def _lost(self, link: _Link) -> None:
        link.losses += 1
        self.connection_losses += 1
        self._drain(link)  # replies that made it before the session ended are real: first
        if link.pending:
            logger.warning("connection to the router at %s lost with %d request(s) pending", link.endpoint,
                           len(link.pending))
        for rid in list(link.pending):
            sent = self._sent[rid]
            if self._fail_over(rid, sent):
                continue
            del self._sent[rid]
            link.pending.discard(rid)
            self._deliver(ErrorReply(rid, ErrorCode.ROUTER_RESTARTED,
                                     f"connection to the router at {link.endpoint} lost (it died, restarted or "
                                     "dropped this front) before the request finished; its outcome is unknown"))

    def _fail_over(self, rid: str, sent: _Sent) -> bool:
        """Send a request lost before any token to another connected router; False: it cannot."""
        if sent.started or sent.failovers >= self.max_failovers:
            return False
        old = sent.link
        other = self._pick(avoid=old)
        if other is None:
            return False
        old.pending.discard(rid)
        # A copy still queued in the old DEALER would reach that router if it comes back: the
        # cancel behind it ends it there (an id it never saw is ignored).
        self._write(old, encode(CancelRequest(rid)))
        sent.link, sent.failovers = other, sent.failovers + 1
        other.pending.add(rid)
        self.failovers += 1
        logger.info("request %s lost with the router at %s before any token: sent again to %s", rid, old.endpoint,
                    other.endpoint)
        self._write(other, sent.data)
        return True
