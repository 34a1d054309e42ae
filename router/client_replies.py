"""Replies to clients, in order, none dropped for a full queue.

A worker's stream resent after a stall comes in a burst that a client may read slower than it
arrives. The clients' ROUTER socket is ``ROUTER_MANDATORY``, so a full queue raises instead of
dropping silently; what it does not take waits here, per client, and is flushed on every loop
turn. Only a client that is gone (or one that stopped reading past ``MAX_CLIENT_BACKLOG``
replies: bounded memory) loses replies, and each one lost is counted in ``reply_drops``.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable

import zmq

from bus.codec import encode

logger = logging.getLogger(__name__)

#: Replies waiting for one client's full queue; beyond that they are dropped (``reply_drops``).
MAX_CLIENT_BACKLOG = 1_000_000
_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: zmq's enum flags cost an enum operation per send
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)


class ClientReplies:
    def __init__(self, *, sock: zmq.Socket, counters: Counter[str]) -> None:
        self._sock = sock
        self._counters = counters
        self._backlog: dict[bytes, deque[bytes]] = {}
        #: In-process clients (the HTTP front on the router's own loop): identity -> the function
        #: that takes each reply as it is, neither encoded nor queued on a socket.
        self._local: dict[bytes, Callable[[object], None]] = {}

    def add_local(self, identity: bytes, sink: Callable[[object], None]) -> None:
        self._local[identity] = sink

    def remove_local(self, identity: bytes) -> None:
        self._local.pop(identity, None)

    @property
    def backlogged(self) -> bool:
        return bool(self._backlog)

    def send(self, client: bytes, msg) -> None:
        sink = self._local.get(client)
        if sink is not None:
            sink(msg)
            return
        frame = encode(msg)
        waiting = self._backlog.get(client)
        if waiting is not None:
            if len(waiting) >= MAX_CLIENT_BACKLOG:
                self._counters["reply_drops"] += 1  # a client that stopped reading: bounded memory
                return
            waiting.append(frame)
        elif not self._send(client, frame):
            self._backlog[client] = deque([frame])

    def flush(self) -> None:
        for client in list(self._backlog):
            waiting = self._backlog[client]
            while waiting and self._send(client, waiting[0]):
                waiting.popleft()
            if not waiting:
                del self._backlog[client]

    def _send(self, client: bytes, frame: bytes) -> bool:
        """False: the client's queue is full (try again later)."""
        try:
            self._sock.send(client, _SNDMORE_NOBLOCK)
            self._sock.send(frame, _NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # the client is gone: nobody to tell
            self._counters["reply_drops"] += 1
            logger.debug("reply to %s dropped: %s", client.hex(), exc)
        return True
