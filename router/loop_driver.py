"""Turn a ``RouterService``'s loop on an asyncio loop (the HTTP front's) instead of its own thread.

``kvr router`` with its HTTP front used to run two busy Python threads: the service's ZMQ loop
and the front's asyncio loop, talking over a DEALER. Every request and every streamed chunk then
crossed threads: an encode, a send, a wake-up of the other thread, a decode, and the GIL handed
over and back (``strace`` counted ~115 futex calls per request). Here the service's turns run as
callbacks of the front's loop, so the front hands requests to the service and gets replies back
by plain calls (``RouterService.submit_local``, ``attach_local_client``).

How a turn is triggered. The service's ZMQ sockets (its ``Poller``'s: clients, workers, KV-event
subscribers, peers) are watched by the asyncio loop through their ``FD``s; a readable FD, a due
deadline (liveness, replays, upkeep: ``RouterService.next_deadline_s``) or a local submission
schedules one *pump*: ``run_once(0)`` until a turn finds nothing readable (bounded, so HTTP
connections are served in between).

Invariant (ZMQ's FD is edge-triggered: any operation on a socket may consume the signal of a
message that arrived meanwhile): a pump ends only after a turn whose own ``zmq_poll`` found
nothing readable on any socket; a message arriving after that poll signals its FD again, which
wakes the loop. Local submissions (which send on the worker socket) schedule a pump too. A
signalled FD whose socket has no message (``EVENTS``) schedules nothing, unless replies wait for
room on the client socket.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, cast

import zmq

if TYPE_CHECKING:
    from router.service import RouterService

logger = logging.getLogger(__name__)

#: Turns per pump before the loop serves its other callbacks (HTTP) and pumps again.
MAX_TURNS_PER_PUMP = 32


class LoopDriver:
    """Runs ``service``'s turns on ``loop`` (see the module docstring). Use on the loop's thread."""

    def __init__(self, *, service: RouterService, loop: asyncio.AbstractEventLoop) -> None:
        self.service = service
        self.loop = loop
        self._scheduled = False
        self._stopped = False
        self._fds: dict[int, object] = {}  # watched FD -> its socket
        self._sockets_version = -1
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = float("inf")
        self.pumps = 0

    def start(self) -> None:
        self._pump()

    def stop(self) -> None:
        """Watch nothing more (the service is closed by its owner, off the loop)."""
        self._stopped = True
        for fd in self._fds:
            self.loop.remove_reader(fd)
        self._fds.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def kick(self) -> None:
        """Schedule a pump (once, however often called before it runs)."""
        if not self._scheduled and not self._stopped:
            self._scheduled = True
            self.loop.call_soon(self._pump)

    def _pump(self) -> None:
        self._scheduled = False
        if self._stopped:
            return
        self.pumps += 1
        service = self.service
        try:
            for _ in range(MAX_TURNS_PER_PUMP):
                if not service.run_once(0):
                    break
            else:
                self.kick()  # still busy: go on after the loop's other callbacks
        except Exception:  # run_once guards its handlers; this is a bug in the loop itself
            logger.exception("router loop turn failed")
            self.kick()
        self._watch()
        self._arm_timer()

    def _watch(self) -> None:
        """Watch exactly the FDs of the service's current sockets (subscribers come and go)."""
        version = self.service.poll_sockets_version
        if version == self._sockets_version:
            return
        self._sockets_version = version
        sockets = self.service.poll_sockets()
        wanted = {s.FD: s for s in sockets}  # type: ignore[attr-defined]
        for fd in [fd for fd, sock in self._fds.items() if wanted.get(fd) is not sock]:
            self.loop.remove_reader(fd)  # also a closed socket's (asyncio ignores an FD already gone)
            del self._fds[fd]
        for fd, sock in wanted.items():
            if fd not in self._fds:
                self.loop.add_reader(fd, self._on_readable, sock)
                self._fds[fd] = sock

    def _on_readable(self, sock: zmq.Socket) -> None:
        """A socket's FD signalled. ZMQ signals it for any change of the socket's state, and often
        once more for a message a turn has read already (about half the pumps of a streaming run
        found nothing): a turn is scheduled only if the socket has a message, or replies wait for
        room to be sent. Reading ``EVENTS`` is what takes the signal; a later message signals again."""
        try:
            readable = bool(cast(int, sock.getsockopt(zmq.EVENTS)) & zmq.POLLIN)
        except zmq.ZMQError:  # closed meanwhile: let a turn find out
            readable = True
        if readable or self.service.replies.backlogged:
            self.kick()

    def _arm_timer(self) -> None:
        due = self.service.next_deadline_s()
        if self._timer is not None and due >= self._timer_at:
            return  # the timer already set wakes the loop no later than needed
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = due
        delay = max(0.0, due - self.service.now_s())
        self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer, self._timer_at = None, float("inf")
        self.kick()
