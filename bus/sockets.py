"""ZeroMQ socket helpers: one place for linger, high-water marks and vLLM's endpoint rules.

* Every socket is made with ``linger=0`` so closing never blocks a process exit.
* :func:`vllm_binds` is vLLM's bind-or-connect rule for its PUB socket (0.22..0.33):
  bind iff the endpoint contains ``*`` or ``::`` or starts with ``ipc://`` /
  ``inproc://``; otherwise connect (``tcp://indexer:5557`` makes vLLM dial out).
  vLLM's replay ROUTER always binds.
* :func:`offset_endpoint_for_dp_rank` is vLLM's data-parallel rule: a ``tcp``
  port is offset by the rank (port 0 is left alone), ``inproc://x`` becomes
  ``inproc://x_dp<rank>``; the topic is never changed.
* :func:`connectable` turns a bound wildcard address (``tcp://0.0.0.0:5557``)
  into one a local peer can dial (``tcp://127.0.0.1:5557``).
* Every socket that receives from another process gets ``ZMQ_MAXMSGSIZE``
  (``max_msg_size``): libzmq drops the connection of a peer that sends a bigger
  frame before buffering it, so one bad peer cannot make a process allocate
  without bound. A DEALER or SUB that was cut off reconnects by itself.
* ``setup`` (a callable) runs on a new socket before it binds or connects: where
  CURVE options go (``bus/security.py``).

zmq sockets are not thread-safe: whoever makes a socket here must use it from
one thread only (contexts are thread-safe and may be shared).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import zmq

logger = logging.getLogger(__name__)

#: The socket class a context makes: ``zmq.Socket[bytes]`` for a plain context, the asyncio
#: socket for a ``zmq.asyncio.Context`` (the HTTP front); the helpers hand back that class.
_SocketT = TypeVar("_SocketT", bound=zmq.Socket[Any])
#: ``setup``: options applied to a new socket before it binds or connects (CURVE).
SocketSetup = Callable[[zmq.Socket[Any]], None]

#: vLLM's default PUB high-water mark (``KVEventsConfig.hwm``).
DEFAULT_HWM = 100_000

MiB = 1 << 20
#: Requests, worker messages and replies. The largest legitimate one is a request at the
#: admission limits (core/admission.py): 2 Mi characters of text (up to 4 bytes each in
#: UTF-8) or 128 Ki token ids (up to 5 bytes each in msgpack); 16 MiB leaves room, so such a
#: request gets the router's clear PROMPT_TOO_LONG instead of a dropped connection.
MAX_REQUEST_BYTES = 16 * MiB
#: One KV-event batch, live or replayed: a step that stores 128 Ki tokens' blocks is ~1 MiB
#: (token ids included); vLLM batches every request of a step, so leave a wide margin.
MAX_EVENT_BYTES = 64 * MiB
#: Sockets that only ever receive tiny control frames (subscriptions on a PUB, replay
#: requests on a replay ROUTER).
MAX_CONTROL_BYTES = 64 * 1024
_BIND_RETRY_S = 2.0


class VersionedPoller(zmq.Poller):
    """A ``zmq.Poller`` that counts changes to its set of sockets (``version``), so a caller that
    mirrors the set elsewhere (an asyncio loop watching their FDs) rebuilds it only on a change."""

    def __init__(self) -> None:
        super().__init__()
        self.version = 0

    def register(self, socket: Any, flags: int = zmq.POLLIN | zmq.POLLOUT) -> None:
        super().register(socket, flags)
        self.version += 1

    def unregister(self, socket: Any) -> None:
        super().unregister(socket)
        self.version += 1


def vllm_binds(endpoint: str) -> bool:
    """vLLM's PUB rule: bind iff ``*`` or ``::`` appears, or the transport is ipc/inproc."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))


def offset_endpoint_for_dp_rank(endpoint: str, dp_rank: int) -> str:
    """The endpoint a data-parallel rank uses, as vLLM derives it from the base endpoint."""
    if endpoint.startswith("inproc://"):
        return f"{endpoint}_dp{dp_rank}"
    if endpoint.startswith("tcp://"):
        base, sep, port = endpoint.rpartition(":")
        if not sep or not port.isdigit() or base == "tcp":
            raise ValueError(f"tcp endpoint without a port: {endpoint!r}")
        if int(port) == 0:  # an ephemeral port stays ephemeral for every rank
            return endpoint
        return f"{base}:{int(port) + dp_rank}"
    return endpoint  # ipc:// paths are not offset by vLLM either


def connectable(endpoint: str) -> str:
    """A bound endpoint as a local peer dials it (wildcard hosts become loopback)."""
    for wildcard, loopback in (("tcp://0.0.0.0:", "tcp://127.0.0.1:"), ("tcp://*:", "tcp://127.0.0.1:"),
                               ("tcp://[::]:", "tcp://[::1]:")):
        if endpoint.startswith(wildcard):
            return loopback + endpoint[len(wildcard):]
    return endpoint


def make_socket(ctx: zmq.Context[_SocketT], kind: int, *, hwm: int | None = None, sndhwm: int | None = None,
                rcvhwm: int | None = None, max_msg_size: int | None = None,
                setup: SocketSetup | None = None) -> _SocketT:
    """A socket with linger 0, the given high-water marks (``hwm`` sets both), an inbound frame
    limit and ``setup`` applied (CURVE)."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    if max_msg_size is not None:
        sock.setsockopt(zmq.MAXMSGSIZE, max_msg_size)
    if hwm is not None:
        sock.set_hwm(hwm)
    if sndhwm is not None:
        sock.setsockopt(zmq.SNDHWM, sndhwm)
    if rcvhwm is not None:
        sock.setsockopt(zmq.RCVHWM, rcvhwm)
    if setup is not None:
        try:
            setup(sock)
        except BaseException:
            sock.close(linger=0)
            raise
    return sock


def attach(sock: zmq.Socket[Any], endpoint: str, *, bind: bool) -> str:
    """Bind or connect; returns the resolved endpoint (the real port for ``:0``).

    A bind retries for a short while on EADDRINUSE: a socket closed a moment
    ago (a restarted publisher) may still hold its port in the I/O thread.
    """
    if not bind:
        sock.connect(endpoint)
        return endpoint
    deadline = time.monotonic() + _BIND_RETRY_S
    while True:
        try:
            sock.bind(endpoint)
            break
        except zmq.ZMQError as exc:
            if exc.errno != zmq.EADDRINUSE or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    last = sock.getsockopt(zmq.LAST_ENDPOINT)
    return last.decode() if isinstance(last, bytes) and last else endpoint


def _attached(sock: _SocketT, endpoint: str, *, bind: bool) -> tuple[_SocketT, str]:
    try:
        return sock, attach(sock, endpoint, bind=bind)
    except zmq.ZMQError:
        sock.close(linger=0)
        raise


def make_pub(ctx: zmq.Context[_SocketT], endpoint: str, *, hwm: int = DEFAULT_HWM, bind: bool | None = None,
             max_msg_size: int | None = MAX_CONTROL_BYTES,
             setup: SocketSetup | None = None) -> tuple[_SocketT, str]:
    """A PUB socket; ``bind=None`` applies vLLM's rule. Returns (socket, resolved endpoint).

    A PUB receives only subscriptions, hence the small default inbound limit."""
    sock = make_socket(ctx, zmq.PUB, hwm=hwm, max_msg_size=max_msg_size, setup=setup)
    return _attached(sock, endpoint, bind=vllm_binds(endpoint) if bind is None else bind)


def make_sub(ctx: zmq.Context[_SocketT], endpoint: str, *, topic: bytes = b"", bind: bool = False,
             hwm: int = DEFAULT_HWM, max_msg_size: int | None = MAX_EVENT_BYTES,
             setup: SocketSetup | None = None) -> tuple[_SocketT, str]:
    """A SUB socket subscribed to the byte prefix ``topic``; connects unless ``bind``."""
    sock = make_socket(ctx, zmq.SUB, hwm=hwm, max_msg_size=max_msg_size, setup=setup)
    sock.setsockopt(zmq.SUBSCRIBE, topic)
    return _attached(sock, endpoint, bind=bind)


def make_router(ctx: zmq.Context[_SocketT], endpoint: str, *, sndhwm: int | None = None,
                max_msg_size: int | None = MAX_REQUEST_BYTES,
                setup: SocketSetup | None = None) -> tuple[_SocketT, str]:
    """A bound ROUTER (vLLM's replay socket always binds). Returns (socket, resolved endpoint)."""
    sock = make_socket(ctx, zmq.ROUTER, sndhwm=sndhwm, max_msg_size=max_msg_size, setup=setup)
    return _attached(sock, endpoint, bind=True)


def make_dealer(ctx: zmq.Context[_SocketT], endpoint: str, *, hwm: int | None = None,
                max_msg_size: int | None = MAX_REQUEST_BYTES,
                setup: SocketSetup | None = None) -> _SocketT:
    """A DEALER connected to ``endpoint`` (requests queue until the peer is up)."""
    sock = make_socket(ctx, zmq.DEALER, hwm=hwm, max_msg_size=max_msg_size, setup=setup)
    sock.connect(endpoint)
    return sock


#: Bind to any free loopback port (ZMQ's wildcard) and read the bound endpoint back
#: (``LAST_ENDPOINT``): unlike :func:`free_tcp_endpoint`, no window in which another process can
#: take the port between picking and binding.
ANY_LOOPBACK_PORT = "tcp://127.0.0.1:*"


def free_tcp_endpoint(host: str = "127.0.0.1") -> str:
    """``tcp://host:port`` with a port nothing listens on right now (demos, tests)."""
    import socket

    with socket.socket() as s:
        s.bind((host, 0))
        return f"tcp://{host}:{s.getsockname()[1]}"


def read_session_events(monitor: zmq.Socket[Any], session_up: bool) -> tuple[bool, bool]:
    """Every event waiting on a DEALER's socket monitor, folded: ``(session up now, a session that
    was up was lost)``. A handshake brings the session up; a disconnect of an up session loses it
    (a disconnect before any handshake is a failed dial, not a loss). A closed monitor reads as no
    events (shutdown)."""
    from zmq.utils.monitor import recv_monitor_message

    lost = False
    while True:
        try:
            event = recv_monitor_message(monitor, zmq.NOBLOCK)["event"]
        except zmq.Again:
            break
        except zmq.ZMQError:  # closed at shutdown
            break
        if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
            session_up = True
        elif event == zmq.EVENT_DISCONNECTED and session_up:
            session_up = False
            lost = True
    return session_up, lost
