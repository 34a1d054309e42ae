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
  restarted publisher is noticed even when its seq has not gone backwards yet.
* **Slow joiner**: on start, when a replay endpoint is known, the stream is
  replayed from 0 (or from ``expected_seq``), so batches sent before the
  subscription reached the publisher are not missed.
* **Rotated-out** replay starts (the first replayed seq is above the requested
  one) are reported as :class:`GapLost`.
* A replay that times out (publisher gone) gets a fresh DEALER and is retried
  ``max_replay_attempts`` times; then the missing range is reported as lost.

Malformed messages (wrong frame count, seq not 8 bytes) are counted in
``bad_frames`` and logged; nothing here raises on bad input.

Limit: vLLM has no incarnation id on the wire. A restart is seen from a seq going
back, from a reconnection (then the anchor is checked), or from any later replay
whose anchor bytes differ; a restart that none of these reveals (no reconnect seen,
new seqs continuing exactly at the expected one) would go unnoticed.

Data parallelism: one subscriber per rank; derive each rank's endpoints with
``bus.sockets.offset_endpoint_for_dp_rank`` (and ``connectable`` for ``*`` binds).

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
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import xxhash
import zmq
from zmq.utils.monitor import recv_monitor_message

from bus.sockets import DEFAULT_HWM, attach, make_dealer, make_socket
from bus.stream_items import AppliedBatch, BadBatch, GapLost, StreamItem, StreamReset, SubscriberCounters
from bus.vllm_codec import DecodeError, VllmEventDecoder
from core.events import AllBlocksCleared

__all__ = ["AppliedBatch", "BadBatch", "EventSubscriber", "GapLost", "StreamItem", "StreamReset",
           "SubscriberCounters"]

logger = logging.getLogger(__name__)

_END_SEQ = b"\xff" * 8
_MONITOR_EVERY = 16
_LOST = -1  # digest marker of a seq reported as GapLost: a late copy is stale, not a reset


@dataclass
class _Replay:
    start: int  # first seq requested
    anchor: bool  # start is the last applied seq, whose bytes must match
    deadline_s: float
    attempts: int = 1
    seen_first: bool = False
    progressed: bool = False
    live_after: int = 0  # live batches received since the request: the answer may predate them


class EventSubscriber:
    """Gap-free, de-duplicated view of one publisher's KV-event stream."""

    def __init__(
        self,
        *,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str | bytes = b"",
        bind: bool = False,
        ctx: zmq.Context | None = None,
        expected_seq: int | None = None,
        replay_timeout_ms: int = 1000,
        max_replay_attempts: int = 3,
        max_pending: int = 100_000,
        digest_window: int = 4096,
        hwm: int = DEFAULT_HWM,
        decoder: VllmEventDecoder | None = None,
        clock: Callable[[], float] = time.monotonic,
        name: str = "",
    ) -> None:
        """``expected_seq`` resumes a stream (e.g. from Redis); ``None`` starts from the beginning."""
        self.name = name or endpoint
        self.counters = SubscriberCounters()
        self.decoder = decoder or VllmEventDecoder()
        self._own_ctx = ctx is None
        self._ctx = ctx if ctx is not None else zmq.Context()
        self._topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self._replay_endpoint = replay_endpoint
        self._replay_timeout_s = replay_timeout_ms / 1000.0
        self._max_attempts = max_replay_attempts
        self._max_pending = max_pending
        self._window = digest_window
        self._clock = clock
        self._pollers: list[zmq.Poller] = []
        self._sub = make_socket(self._ctx, zmq.SUB, hwm=hwm)
        self._sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        # The monitor must exist before the first connection, or its event is lost.
        self._monitor = self._sub.get_monitor_socket(zmq.EVENT_CONNECTED | zmq.EVENT_ACCEPTED)
        try:
            self.endpoint = attach(self._sub, endpoint, bind=bind)
        except zmq.ZMQError:  # e.g. a --bind port in use: leave nothing open behind
            self._sub.disable_monitor()
            self._monitor.close(linger=0)
            self._sub.close(linger=0)
            if self._own_ctx:
                self._ctx.term()
            raise
        self._connections = 0
        self._dealer: zmq.Socket | None = None
        self._replay: _Replay | None = None
        self._expected = 0 if expected_seq is None else expected_seq
        self._joined = expected_seq is not None  # know where the stream stands
        self._digests: OrderedDict[int, int] = OrderedDict()
        self._pending: dict[int, tuple[bytes, bytes]] = {}
        self._out: list[StreamItem] = []
        if replay_endpoint is not None:
            self._dealer = make_dealer(self._ctx, replay_endpoint)
            self._joined = True
            self._request_replay(self._expected, anchor=False)  # slow-joiner window

    # -- public API ----------------------------------------------------------------------------

    @property
    def expected_seq(self) -> int:
        """The seq the next applied batch will carry."""
        return self._expected

    @property
    def connections(self) -> int:
        """Connections of the SUB seen so far (the first one included)."""
        return self._connections

    @property
    def replay_in_flight(self) -> bool:
        return self._replay is not None

    def sockets(self) -> list[zmq.Socket]:
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

    def handle_readable(self, sock: zmq.Socket) -> list[StreamItem]:
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
                self._on_live(frames)
        elif sock is self._monitor:
            self._drain_monitor()
        elif sock is self._dealer:
            while self._dealer is not None:
                try:
                    frames = self._dealer.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._on_replay_message(frames)
        return self._take()

    def check_timeouts(self) -> list[StreamItem]:
        """Retry or give up a replay whose answer is overdue; returns items now ready."""
        replay = self._replay
        if replay is not None and self._clock() >= replay.deadline_s:
            self.counters.replay_timeouts += 1
            self._new_dealer()  # a late answer to the old request must not be mistaken for a new one
            if replay.attempts < self._max_attempts:
                logger.warning("%s: replay from %d timed out, retrying", self.name, replay.start)
                # Ask afresh from where the stream stands now (part of the old answer may have come).
                self._request_replay_from_anchor(retry=True)
                self._replay.attempts = replay.attempts + 1
            else:
                logger.warning("%s: replay from %d unanswered after %d attempts", self.name, replay.start,
                               replay.attempts)
                self._replay = None
                self._give_up_gap()
        return self._take()

    def next_deadline_s(self) -> float | None:
        """Clock time at which :meth:`check_timeouts` has work, if any."""
        return None if self._replay is None else self._replay.deadline_s

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

    # -- live stream ---------------------------------------------------------------------------

    def _on_live(self, frames: list[bytes]) -> None:
        if len(frames) != 3 or len(frames[1]) != 8:
            self._bad_frames(f"live message with {len(frames)} frames" if len(frames) != 3
                             else f"seq frame of {len(frames[1])} bytes")
            return
        topic, seq_frame, payload = frames
        if self._replay is not None:
            self._replay.live_after += 1
        self._on_batch(int.from_bytes(seq_frame, "big"), topic, payload, replayed=False)

    def _on_batch(self, seq: int, topic: bytes, payload: bytes, *, replayed: bool) -> None:
        if not self._joined:  # no replay endpoint: the stream starts where we came in
            self._joined = True
            if seq > 0:
                self._lose(0, seq - 1, "joined mid-stream without a replay endpoint")
            self._expected = seq
        if seq < self._expected:
            known = self._digests.get(seq)
            if known is not None and (known == _LOST or known == _digest(payload)):
                self.counters.duplicates += 1
                return
            if replayed:
                if known is None:  # older than what we remember: not ours to judge
                    self.counters.duplicates += 1
                else:  # the publisher now holds other bytes under a seq we applied
                    self._restart_stream(None)
                return
            self._reset(seq)
        if seq in self._pending:
            self.counters.duplicates += 1
            return
        if seq == self._expected and (replayed or not self._awaiting_anchor()):
            if replayed:
                self.counters.replayed_batches += 1
                self._replay.progressed = True
            self._apply(seq, topic, payload, replayed)
            self._drain_pending()
            return
        # seq > expected (or held until the anchor is checked): buffer until its turn.
        self._pending[seq] = (topic, payload)
        if self._replay is None and seq > self._expected:
            self.counters.gaps += 1
            if self._replay_endpoint is None:
                self._give_up_gap()
            else:
                logger.info("%s: gap, expected seq %d got %d: replaying", self.name, self._expected, seq)
                self._request_replay_from_anchor()
        elif len(self._pending) > self._max_pending:
            logger.warning("%s: %d batches buffered behind a replay: giving up on it", self.name, len(self._pending))
            self._replay = None
            self._new_dealer()
            self._give_up_gap()

    def _apply(self, seq: int, topic: bytes, payload: bytes, replayed: bool) -> None:
        self._remember(seq, _digest(payload))
        self._expected = seq + 1
        try:
            batch = self.decoder.decode(payload)
        except DecodeError as exc:
            self.counters.decode_errors += 1
            logger.warning("%s: seq %d does not decode: %s", self.name, seq, exc)
            self._out.append(BadBatch(seq, str(exc)))
            return
        self.counters.batches += 1
        self.counters.events += len(batch.events)
        blocks = 0
        for event in batch.events:
            if event.__class__ is not AllBlocksCleared:
                blocks += len(event.block_hashes)
        self.counters.block_events += blocks
        self._out.append(AppliedBatch(seq, batch, replayed, topic))

    def _awaiting_anchor(self) -> bool:
        """A replay is checking the anchor: live batches wait, they may be a new stream's."""
        return self._replay is not None and self._replay.anchor and not self._replay.seen_first

    def _drain_pending(self) -> None:
        while self._expected in self._pending:
            topic, payload = self._pending.pop(self._expected)
            self._apply(self._expected, topic, payload, False)

    def _give_up_gap(self) -> None:
        """What is buffered cannot be completed by replay: report the holes, apply the rest."""
        self._drain_pending()
        while self._pending:
            self._skip_to(min(self._pending), "not recoverable by replay")

    def _skip_to(self, target: int, why: str) -> None:
        """Advance to ``target``: buffered batches are applied, each missing run is reported lost."""
        while self._expected < target:
            if self._expected in self._pending:
                self._drain_pending()
                continue
            # Seqs come off the wire: a jump can be 2**64 wide, so never walk the hole.
            hole_end = min((s for s in self._pending if s > self._expected), default=target) - 1
            hole_end = min(hole_end, target - 1)
            self._lose(self._expected, hole_end, why)
            self._expected = hole_end + 1
        self._drain_pending()

    def _lose(self, from_seq: int, to_seq: int, why: str) -> None:
        self.counters.unrecoverable_gaps += 1
        self.counters.lost_batches += to_seq - from_seq + 1
        logger.warning("%s: batches %d..%d lost (%s)", self.name, from_seq, to_seq, why)
        for seq in range(max(from_seq, to_seq - self._window + 1), to_seq + 1):
            self._remember(seq, _LOST)
        self._out.append(GapLost(from_seq, to_seq))

    def _reset(self, new_seq: int | None) -> None:
        self.counters.resets += 1
        logger.warning("%s: publisher restarted (expected seq %d, got %s)", self.name, self._expected, new_seq)
        self._out.append(StreamReset(self._expected - 1, new_seq))
        self._expected = 0
        self._digests.clear()
        self._pending.clear()
        if self._replay is not None:
            self._replay = None
            self._new_dealer()

    def _remember(self, seq: int, digest: int) -> None:
        self._digests[seq] = digest
        while len(self._digests) > self._window:
            self._digests.popitem(last=False)

    def _bad_frames(self, what: str) -> None:
        self.counters.bad_frames += 1
        logger.warning("%s: dropping malformed message: %s", self.name, what)

    def _take(self) -> list[StreamItem]:
        out, self._out = self._out, []
        return out

    # -- reconnects ----------------------------------------------------------------------------

    def _drain_monitor(self) -> None:
        while True:
            try:
                msg = recv_monitor_message(self._monitor, zmq.NOBLOCK)
            except zmq.Again:
                return
            except (zmq.ZMQError, ValueError) as exc:  # malformed monitor frames cannot happen; never crash
                logger.debug("%s: monitor: %s", self.name, exc)
                return
            if msg["event"] not in (zmq.EVENT_CONNECTED, zmq.EVENT_ACCEPTED):
                continue
            self._connections += 1
            if self._connections > 1:
                self.counters.reconnects += 1
            # Whoever is on the other end now may be a new publisher instance whose seq has
            # not gone backwards yet (even on a first connection: batches may have been applied
            # from a replay of an instance that is gone): prove continuity against the anchor.
            if self._replay_endpoint is not None and self._expected > 0:
                logger.info("%s: connected: checking the stream against seq %d", self.name, self._expected - 1)
                if self._replay is not None:  # it may be talking to the instance that just went away
                    self._replay = None
                    self._new_dealer()
                self._request_replay_from_anchor()

    # -- replay --------------------------------------------------------------------------------

    def _request_replay_from_anchor(self, *, retry: bool = False) -> None:
        anchor = self._expected - 1
        if anchor >= 0 and anchor in self._digests and self._digests[anchor] != _LOST:
            self._request_replay(anchor, anchor=True, retry=retry)
        else:
            self._request_replay(self._expected, anchor=False, retry=retry)

    def _request_replay(self, start: int, *, anchor: bool, retry: bool = False) -> None:
        if not retry:
            self.counters.replays += 1
        self._replay = _Replay(start, anchor, self._clock() + self._replay_timeout_s)
        self._send_replay_request(start)

    def _send_replay_request(self, start: int) -> None:
        self._dealer.send_multipart([b"", start.to_bytes(8, "big")])

    def _new_dealer(self) -> None:
        if self._dealer is None:
            return
        for poller in self._pollers:
            poller.unregister(self._dealer)
        self._dealer.close(linger=0)
        self._dealer = make_dealer(self._ctx, self._replay_endpoint)
        for poller in self._pollers:
            poller.register(self._dealer, zmq.POLLIN)

    def _on_replay_message(self, frames: list[bytes]) -> None:
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
        replay = self._replay
        if replay is None:  # a stale answer (cannot happen with a fresh DEALER per retry)
            return
        if seq_frame == _END_SEQ:
            self._end_replay(replay)
            return
        if not topic.startswith(self._topic):
            # Replay ignores SUB filters; keep the stream what the subscription lets through.
            logger.debug("%s: ignoring replayed batch of topic %r", self.name, topic)
            return
        seq = int.from_bytes(seq_frame, "big")
        if not replay.seen_first:
            replay.seen_first = True
            if replay.anchor and seq == replay.start:
                if self._digests.get(seq) != _digest(payload):
                    self._restart_stream(None)
                else:  # verified; not progress: a replay of only the anchor must not loop
                    self._drain_pending()  # live batches held for the check
                return  # the anchor itself was applied already
            if seq > replay.start and seq > self._expected:
                self._skip_to(seq, "rotated out of the publisher's replay ring")
                replay.progressed = True
        self._on_batch(seq, topic, payload, replayed=True)

    def _end_replay(self, replay: _Replay) -> None:
        self._replay = None
        if replay.anchor and not replay.seen_first:
            # The publisher no longer has a seq we applied: its history was replaced.
            self._restart_stream(None)
            return
        self._drain_pending()
        if self._pending:
            # Ask again if the answer moved us on or may predate the hole (live batches came
            # in after the request); an answer that could have filled the hole and did not
            # means the publisher does not have it.
            if replay.progressed or replay.live_after:
                self._request_replay_from_anchor()
            else:
                self._give_up_gap()

    def _restart_stream(self, new_seq: int | None) -> None:
        """A reset found by replay: report it, then fetch the new stream from seq 0."""
        self._reset(new_seq)
        self._request_replay(0, anchor=False)


def _digest(payload: bytes) -> int:
    return xxhash.xxh3_64_intdigest(payload)
