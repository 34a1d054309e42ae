"""One logical KV-event stream from one vLLM-compatible publisher (one worker / DP rank).

:class:`EventSubscriber` turns what arrives on a SUB socket (plus replies of vLLM's
replay ROUTER) into an ordered list of stream items (``bus/stream_items.py``), each
reported exactly once: :class:`AppliedBatch` (the next batch, in seq order, no holes),
:class:`StreamReset` (publisher restarted: drop the worker's state, the new stream
starts at 0), :class:`GapLost` (gone for good: resync the worker) and
:class:`BadBatch` (undecodable payload, seq consumed).

How the stream is kept whole:

* **Gap** (a seq beyond the next expected one): live batches are buffered, and a
  replay is requested over a DEALER from the last applied seq (the *anchor*). The
  anchor's bytes must equal what was applied, else the publisher restarted behind
  our back (reset). Live batches that arrive meanwhile are applied in order.
* **Duplicates** (the same seq live and replayed, or a duplicated live message)
  are recognised by seq plus an xxh3 digest of the payload and counted, not applied.
* **Reset**: a live seq below the expected one whose bytes differ from what was
  applied under that seq (or too old to know) means a new publisher instance.
  A reconnection of the SUB (socket monitor) triggers an anchor check too, so a
  restarted publisher is noticed even when its seq has not gone backwards yet
  (batches buffered before it are dropped: the replay brings them back if the
  instance is the same). If that check cannot be made (replay unreachable), the
  stream is treated as reset: forgetting a worker's blocks costs hits, keeping a
  dead instance's would send requests to blocks that are gone.
* **Slow joiner**: on start, when a replay endpoint is known, the stream is
  replayed from 0 (or from ``expected_seq``), so batches sent before the
  subscription reached the publisher are not missed.
* **Rotated-out** replay starts (the first replayed seq is above the requested
  one) are reported as :class:`GapLost`.
* A replay that times out (publisher gone) gets a fresh DEALER and is retried
  ``max_replay_attempts`` times; then the missing range is reported as lost.
* **Tail losses**: a gap shows only when a later batch arrives. Once the stream has been
  quiet for ``quiet_probe_s`` after a batch, it asks the replay socket once for anything
  newer than its anchor (checking the anchor's bytes too): batches lost at the end of a
  burst come back, and a publisher that restarted while idle is noticed. Such a probe is
  not "a replay in flight" (nothing is known missing); unanswered, it is simply dropped.

Malformed messages (wrong frame count, seq not 8 bytes) are counted in
``bad_frames`` and logged; nothing here raises on bad input.

Limit: vLLM has no incarnation id on the wire. A restart is seen from a seq going
back, from a reconnection (then the anchor is checked), or from any later replay
whose anchor bytes differ; a restart that none of these reveals (no reconnect seen,
new seqs continuing exactly at the expected one) would go unnoticed.

Data parallelism: one subscriber per rank; derive each rank's endpoints with
``bus.sockets.offset_endpoint_for_dp_rank`` (and ``connectable`` for ``*`` binds).

The rules live in ``bus/event_stream.py`` (no sockets); this module owns the sockets.

Use: ``poll(timeout_ms)`` for one stream. A router multiplexing many streams
registers each subscriber with its own ``zmq.Poller`` via :meth:`attach` (the
DEALER is replaced after a timeout, and attached pollers follow), then calls
:meth:`handle_readable` for ready sockets and :meth:`check_timeouts` every loop
(``next_deadline_s()`` tells when it matters). Like every zmq user, one thread
owns a subscriber.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.event_stream import EventStream
from bus.security import Curve
from bus.sockets import DEFAULT_HWM, MAX_EVENT_BYTES, SocketSetup, attach, make_dealer, make_socket
from bus.stream_items import AppliedBatch, BadBatch, GapLost, StreamItem, StreamReset, SubscriberCounters
from bus.vllm_codec import VllmEventDecoder

__all__ = ["AppliedBatch", "BadBatch", "EventSubscriber", "GapLost", "StreamItem", "StreamReset",
           "SubscriberCounters"]

logger = logging.getLogger(__name__)

#: Quiet spell after a batch before the stream asks its replay socket once for anything newer.
DEFAULT_QUIET_PROBE_S = 1.0

_END_SEQ = b"\xff" * 8
_MONITOR_EVERY = 16
#: A connecting SUB whose connection dropped without a reconnect being scheduled within this
#: long has lost its session for good: libzmq ends a session on a protocol error (a frame over
#: ZMQ_MAXMSGSIZE, a malformed one) instead of reconnecting, so we dial again ourselves.
_REVIVE_AFTER_S = 0.5
_MONITOR_EVENTS = zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED


class EventSubscriber(EventStream):
    """Gap-free, de-duplicated view of one publisher's KV-event stream, over ZMQ."""

    def __init__(
        self,
        *,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str | bytes = b"",
        bind: bool = False,
        ctx: zmq.SyncContext | None = None,
        expected_seq: int | None = None,
        replay_timeout_ms: int = 1000,
        max_replay_attempts: int = 3,
        max_pending: int = 100_000,
        digest_window: int = 4096,
        hwm: int = DEFAULT_HWM,
        decoder: VllmEventDecoder | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
        max_msg_size: int = MAX_EVENT_BYTES,
        curve: Curve | None = None,
        server_key: str | bytes | None = None,
        quiet_probe_s: float | None = DEFAULT_QUIET_PROBE_S,
    ) -> None:
        """``expected_seq`` resumes a stream (e.g. from Redis); ``None`` starts from the beginning.

        A batch (live or replayed) bigger than ``max_msg_size`` cuts the connection (libzmq;
        it reconnects, and the gap is replayed or reported lost). With ``curve`` and the
        publisher's public ``server_key``, the SUB and the replay DEALER are CURVE clients:
        only the holder of that key's secret can feed this stream."""
        super().__init__(name=name or endpoint, has_replay=replay_endpoint is not None, expected_seq=expected_seq,
                         replay_timeout_s=replay_timeout_ms / 1000.0, max_replay_attempts=max_replay_attempts,
                         max_pending=max_pending, digest_window=digest_window, decoder=decoder, clock=clock,
                         quiet_probe_s=quiet_probe_s)
        self._own_ctx = ctx is None
        self._ctx: zmq.SyncContext = ctx if ctx is not None else zmq.Context()
        self._topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self._replay_endpoint = replay_endpoint
        self._pollers: list[zmq.Poller] = []
        self._max_msg_size = max_msg_size
        self._setup: SocketSetup | None = None
        if curve is not None and server_key is not None:
            self._setup = lambda sock: curve.dial(sock, server_key)
        self._sub = make_socket(self._ctx, zmq.SUB, hwm=hwm, max_msg_size=max_msg_size, setup=self._setup)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        # The monitor must exist before the first connection, or its event is lost.
        self._monitor = self._sub.get_monitor_socket(_MONITOR_EVENTS)
        self._bind = bind
        self._revive_at: float | None = None
        try:
            self.endpoint = attach(self._sub, endpoint, bind=bind)
        except zmq.ZMQError:  # e.g. a --bind port in use: leave nothing open behind
            self._sub.disable_monitor()
            self._monitor.close(linger=0)
            self._sub.close(linger=0)
            if self._own_ctx:
                self._ctx.term()
            raise
        self._dealer: zmq.SyncSocket | None = None
        if replay_endpoint is not None:
            self._dealer = self._make_dealer()
        self.start()

    # -- sockets -------------------------------------------------------------------------------

    def _make_dealer(self) -> zmq.SyncSocket:
        assert self._replay_endpoint is not None  # only a stream with a replay endpoint has a DEALER
        return make_dealer(self._ctx, self._replay_endpoint, max_msg_size=self._max_msg_size, setup=self._setup)

    def sockets(self) -> list[zmq.SyncSocket]:
        """Sockets to poll for POLLIN (SUB, its connection monitor, the replay DEALER)."""
        return [s for s in (self._sub, self._monitor, self._dealer) if s is not None]

    def attach(self, poller: zmq.Poller) -> None:
        """Register on ``poller`` and keep it current when the DEALER is replaced."""
        self._pollers.append(poller)
        for sock in self.sockets():
            poller.register(sock, zmq.POLLIN)

    def detach(self, poller: zmq.Poller) -> None:
        self._pollers.remove(poller)
        for sock in self.sockets():
            poller.unregister(sock)

    def handle_readable(self, sock: zmq.SyncSocket) -> list[StreamItem]:
        """Drain one readable socket of this subscriber; returns the items now ready."""
        if sock is self._sub:
            received = 0
            while True:
                # A reconnection should be known before the messages it carries: look at the
                # monitor before the first message and every few messages after (not each one:
                # reading socket options costs as much as handling a batch).
                if received % _MONITOR_EVERY == 0:
                    self._drain_monitor()
                try:
                    frames = self._sub.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                received += 1
                self._on_live_frames(frames)
        elif sock is self._monitor:
            self._drain_monitor()
        elif sock is self._dealer:
            while self._dealer is not None:
                try:
                    frames = self._dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_replay_frames(frames)
        return self.take()

    def check_timeouts(self) -> list[StreamItem]:
        """Retry or give up a replay whose answer is overdue, dial a dead SUB again; returns items now ready."""
        if self._revive_at is not None:
            self._drain_monitor()
            if self._revive_at is not None and self._clock() >= self._revive_at:
                self._revive()
        self.on_timer()
        return self.take()

    def next_deadline_s(self) -> float | None:
        deadline = super().next_deadline_s()
        if self._revive_at is not None:
            deadline = self._revive_at if deadline is None else min(deadline, self._revive_at)
        return deadline

    def _revive(self) -> None:
        self._revive_at = None
        self.counters.bad_frames += 1
        logger.warning("%s: connection dropped for a bad frame (over %d bytes?): dialling again", self.name,
                       self._sub.getsockopt(zmq.MAXMSGSIZE))
        try:
            self._sub.disconnect(self.endpoint)
        except zmq.ZMQError:
            pass  # the session is gone already
        self._sub.connect(self.endpoint)  # the new connection's anchor check finds what was lost

    def poll(self, timeout_ms: int = 0) -> list[StreamItem]:
        """Wait up to ``timeout_ms`` for traffic; returns every item ready (maybe none)."""
        poller = zmq.Poller()
        for sock in self.sockets():
            poller.register(sock, zmq.POLLIN)
        deadline = self.next_deadline_s()
        if deadline is not None:
            timeout_ms = max(0, min(timeout_ms, int((deadline - self._clock()) * 1000) + 1))
        items: list[StreamItem] = []
        for sock, _ in poller.poll(timeout_ms):
            items.extend(self.handle_readable(sock))
        items.extend(self.check_timeouts())
        return items

    def close(self) -> None:
        for poller in list(self._pollers):
            self.detach(poller)
        self._sub.disable_monitor()
        for sock in self.sockets():
            sock.close(linger=0)
        self._dealer = None
        if self._own_ctx:
            self._ctx.term()

    # -- wire ----------------------------------------------------------------------------------

    def _on_live_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._bad_frames(f"live message with {len(frames)} frames" if len(frames) != 3
                             else f"seq frame of {len(frames[1])} bytes")
            return
        topic, seq_frame, payload = frames
        self.on_live(int.from_bytes(seq_frame, "big"), topic, payload)

    def _on_replay_frames(self, frames: list[bytes]) -> None:
        # DEALER view: 0.33 [b"", topic, seq, payload]; legacy [b"", seq, payload].
        if len(frames) not in (3, 4) or frames[0] != b"":
            self._bad_frames(f"replay reply with {len(frames)} frames")
            return
        if len(frames) == 4:
            _, topic, seq_frame, payload = frames
        else:
            (_, seq_frame, payload), topic = frames, self._topic
        if len(seq_frame) != 8:
            self._bad_frames(f"replay seq frame of {len(seq_frame)} bytes")
            return
        if seq_frame == _END_SEQ:
            self.on_replay_end()
        elif topic.startswith(self._topic):
            self.on_replayed(int.from_bytes(seq_frame, "big"), topic, payload)
        else:  # replay ignores SUB filters; keep the stream what the subscription lets through
            logger.debug("%s: ignoring replayed batch of topic %r", self.name, topic)

    def _bad_frames(self, what: str) -> None:
        self.counters.bad_frames += 1
        logger.warning("%s: dropping malformed message: %s", self.name, what)

    def _drain_monitor(self) -> None:
        while True:
            try:
                msg = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError) as exc:  # malformed monitor frames cannot happen; never crash
                logger.debug("%s: monitor: %s", self.name, exc)
                return
            event = msg["event"]
            if event in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                self._revive_at = None
                self.on_connected()
            elif event == zmq.EVENT_CONNECT_RETRIED:
                self._revive_at = None  # libzmq is reconnecting by itself
            elif event == zmq.EVENT_DISCONNECTED and not self._bind:
                # A bound SUB's peers dial again by themselves; a connecting one may not (_revive).
                self._revive_at = self._clock() + _REVIVE_AFTER_S

    # -- hooks of EventStream --------------------------------------------------------------

    def _send_replay_request(self, start: int) -> None:
        assert self._dealer is not None  # EventStream asks for replays only when it has a replay endpoint
        self._dealer.send_multipart([b"", start.to_bytes(8, "big")])

    def _abandon_replay_channel(self) -> None:
        if self._dealer is None:
            return
        for poller in self._pollers:
            poller.unregister(self._dealer)
        self._dealer.close(linger=0)
        self._dealer = self._make_dealer()
        for poller in self._pollers:
            poller.register(self._dealer, zmq.POLLIN)
