"""The state machine behind one KV-event stream: seq order, gaps, replay, duplicates, resets.

:class:`EventStream` knows nothing about sockets. Its owner (``bus.subscriber.EventSubscriber``)
feeds it what arrived: :meth:`~EventStream.on_live` for a live batch, :meth:`~EventStream.on_replayed`
and :meth:`~EventStream.on_replay_end` for a replay answer, :meth:`~EventStream.on_connected` when
the SUB (re)connects, :meth:`~EventStream.on_timer` now and then. It answers through two hooks,
:meth:`~EventStream._send_replay_request` and :meth:`~EventStream._abandon_replay_channel` (a
replay's late answers must never be mistaken for the next one's), and through the stream
items that :meth:`~EventStream.take` hands over, each once, in order. The rules are in the
subscriber module's docstring.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import xxhash

from bus.stream_items import AppliedBatch, BadBatch, GapLost, StreamItem, StreamReset, SubscriberCounters
from bus.vllm_codec import DecodeError, VllmEventDecoder
from core.events import AllBlocksCleared

logger = logging.getLogger(__name__)

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
    verify: bool = False  # asked after a (re)connection: is the publisher still the same instance?
    probe: bool = False  # asked after a quiet spell: nothing known missing, so not "in flight" for anyone


class EventStream:
    """Ordered, de-duplicated, gap-repairing view of one publisher's seq-numbered batches."""

    def __init__(
        self,
        *,
        name: str,
        has_replay: bool,
        expected_seq: int | None,
        replay_timeout_s: float,
        max_replay_attempts: int,
        max_pending: int,
        digest_window: int,
        decoder: VllmEventDecoder | None,
        clock: Callable[[], float],
        quiet_probe_s: float | None = None,
    ) -> None:
        self.name = name
        self.counters = SubscriberCounters()
        self.decoder = decoder or VllmEventDecoder()
        self._has_replay = has_replay
        self._replay_timeout_s = replay_timeout_s
        self._max_attempts = max_replay_attempts
        self._max_pending = max_pending
        self._window = digest_window
        self._clock = clock
        # Gaps show when a later batch arrives; batches lost at the *tail* of a burst (the slow
        # joiner's window, an HWM drop) have no later batch to reveal them. So once the stream
        # has been quiet this long after a batch, ask the replay socket once for anything newer.
        self._quiet_probe_s = quiet_probe_s if has_replay else None
        self._probe_due: float | None = None
        self._connections = 0
        self._replay: _Replay | None = None
        self._expected = 0 if expected_seq is None else expected_seq
        # Without replay, a stream of unknown position starts where we come in.
        self._joined = expected_seq is not None or has_replay
        self._digests: OrderedDict[int, int] = OrderedDict()
        self._pending: dict[int, tuple[bytes, bytes]] = {}  # seq -> (topic, payload)
        self._out: list[StreamItem] = []

    # -- hooks for the owner of the sockets ---------------------------------------------------

    def _send_replay_request(self, start: int) -> None:
        raise NotImplementedError

    def _abandon_replay_channel(self) -> None:
        """Drop the replay channel's pending answers (a fresh DEALER)."""

    # -- state ---------------------------------------------------------------------------------

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
        """A replay is repairing the stream (a quiet-spell probe does not count: nothing is known missing)."""
        return self._replay is not None and not self._replay.probe

    def next_deadline_s(self) -> float | None:
        """Clock time at which :meth:`on_timer` has work, if any."""
        return self._probe_due if self._replay is None else self._replay.deadline_s

    # -- inputs --------------------------------------------------------------------------------

    def start(self) -> None:
        """Slow-joiner window: replay from where the stream should start."""
        if self._has_replay:
            self._request_replay(self._expected, anchor=False)

    def on_live(self, seq: int, topic: bytes, payload: bytes) -> None:
        if self._replay is not None:
            self._replay.live_after += 1
        self._on_batch(seq, topic, payload, replayed=False)

    def on_connected(self) -> None:
        self._connections += 1
        if self._connections > 1:
            self.counters.reconnects += 1
        # Whoever is on the other end now may be a new publisher instance whose seq has
        # not gone backwards yet (even on a first connection: batches may have been applied
        # from a replay of an instance that is gone): prove continuity against the anchor.
        # Batches buffered until now may be the old instance's: drop them; if the instance
        # is the same, the replay brings them back.
        if self._has_replay and (self._connections > 1 or self._expected > 0):
            logger.info("%s: connected: checking the stream from seq %d", self.name, max(0, self._expected - 1))
            if self._replay is not None:  # it may be talking to the instance that just went away
                self._replay = None
                self._abandon_replay_channel()
            self._pending.clear()
            replay = self._request_replay_from_anchor()
            replay.verify = replay.anchor

    def on_replayed(self, seq: int, topic: bytes, payload: bytes) -> None:
        replay = self._replay
        if replay is None:  # a stale answer (cannot happen with a fresh channel per request)
            return
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

    def on_replay_end(self) -> None:
        if self._replay is not None:
            self._end_replay(self._replay)

    def on_timer(self) -> None:
        """Retry or give up a replay whose answer is overdue."""
        replay = self._replay
        if replay is None:
            if self._probe_due is not None and self._clock() >= self._probe_due:
                self._probe_due = None
                self.counters.quiet_probes += 1
                self._request_replay_from_anchor(count=False).probe = True
            return
        if self._clock() < replay.deadline_s:
            return
        if replay.probe:  # unanswered probe: nothing was known missing, the next batch will tell
            self._replay = None
            self._abandon_replay_channel()
            return
        self.counters.replay_timeouts += 1
        self._abandon_replay_channel()  # a late answer to the old request must not count for the new one
        if replay.attempts < self._max_attempts:
            logger.warning("%s: replay from %d timed out, retrying", self.name, replay.start)
            # Ask afresh from where the stream stands now (part of the old answer may have come).
            retried = self._request_replay_from_anchor(retry=True)
            retried.attempts = replay.attempts + 1
            retried.verify = replay.verify and retried.anchor
        else:
            logger.warning("%s: replay from %d unanswered after %d attempts", self.name, replay.start,
                           replay.attempts)
            self._replay = None
            if replay.verify:
                # Continuity after a reconnection cannot be proved: assume the worst, a new
                # instance (forgetting a worker's blocks costs hits; keeping a dead one's lies).
                self._reset(None)
            else:
                self._give_up_gap()

    def take(self) -> list[StreamItem]:
        """Items produced since the last call, in order (each is handed over once)."""
        out, self._out = self._out, []
        return out

    # -- the rules ---------------------------------------------------------------------------

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
                # Replayed batches come only through on_replayed, while a replay is open.
                assert self._replay is not None
                self.counters.replayed_batches += 1
                self._replay.progressed = True
            self._apply(seq, topic, payload, replayed)
            self._drain_pending()
            return
        # seq > expected (or held until the anchor is checked): buffer until its turn.
        self._pending[seq] = (topic, payload)
        if self._replay is None and seq > self._expected:
            self.counters.gaps += 1
            if not self._has_replay:
                self._give_up_gap()
            else:
                logger.info("%s: gap, expected seq %d got %d: replaying", self.name, self._expected, seq)
                self._request_replay_from_anchor()
        elif len(self._pending) > self._max_pending:
            logger.warning("%s: %d batches buffered behind a replay: giving up on it", self.name, len(self._pending))
            self._replay = None
            self._abandon_replay_channel()
            self._give_up_gap()

    def _apply(self, seq: int, topic: bytes, payload: bytes, replayed: bool) -> None:
        self._remember(seq, _digest(payload))
        self._expected = seq + 1
        if self._quiet_probe_s is not None:
            self._probe_due = self._clock() + self._quiet_probe_s
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
            if not isinstance(event, AllBlocksCleared):
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
            self._abandon_replay_channel()

    def _remember(self, seq: int, digest: int) -> None:
        self._digests[seq] = digest
        while len(self._digests) > self._window:
            self._digests.popitem(last=False)

    def _request_replay_from_anchor(self, *, retry: bool = False, count: bool = True) -> _Replay:
        anchor = self._expected - 1
        if anchor >= 0 and anchor in self._digests and self._digests[anchor] != _LOST:
            return self._request_replay(anchor, anchor=True, retry=retry, count=count)
        return self._request_replay(self._expected, anchor=False, retry=retry, count=count)

    def _request_replay(self, start: int, *, anchor: bool, retry: bool = False, count: bool = True) -> _Replay:
        """Open a replay (now ``self._replay``) and send its request; returns it."""
        if not retry and count:
            self.counters.replays += 1
        replay = self._replay = _Replay(start, anchor, self._clock() + self._replay_timeout_s)
        self._send_replay_request(start)
        return replay

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
