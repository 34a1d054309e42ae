"""What one KV-event stream yields (:class:`~bus.subscriber.EventSubscriber`), and its counters.

Every item is reported exactly once, in stream order:

* :class:`AppliedBatch`: the next batch, seq order, no holes (``replayed`` if it came by replay);
* :class:`StreamReset`: the publisher restarted; forget this worker, the new stream starts at 0;
* :class:`GapLost`: batches ``from_seq..to_seq`` are gone for good; resync this worker;
* :class:`BadBatch`: a batch whose payload does not decode (its seq is consumed).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec

from core.events import KVEventBatch


class AppliedBatch(msgspec.Struct, frozen=True):
    """The next batch of the stream (``topic`` as it came on the wire)."""

    seq: int
    batch: KVEventBatch
    replayed: bool = False
    topic: bytes = b""


class StreamReset(msgspec.Struct, frozen=True):
    """The publisher restarted: drop what this worker reported; seq starts again at 0."""

    old_seq: int  # last seq applied from the old stream (-1: none)
    new_seq: int | None  # first seq seen from the new stream (None: found by replay)


class GapLost(msgspec.Struct, frozen=True):
    """Batches that no replay can bring back: this worker's index needs a resync."""

    from_seq: int
    to_seq: int  # inclusive


class BadBatch(msgspec.Struct, frozen=True):
    """A batch whose payload did not decode (counted, logged; its seq is used up)."""

    seq: int
    reason: str


StreamItem = AppliedBatch | StreamReset | GapLost | BadBatch


@dataclass
class SubscriberCounters:
    """Cumulative counts of one subscriber (``block_events``: hashes stored + removed)."""

    batches: int = 0
    events: int = 0
    block_events: int = 0
    gaps: int = 0
    replays: int = 0
    replayed_batches: int = 0
    replay_timeouts: int = 0
    duplicates: int = 0
    resets: int = 0
    reconnects: int = 0
    decode_errors: int = 0
    bad_frames: int = 0
    unrecoverable_gaps: int = 0
    lost_batches: int = 0
    quiet_probes: int = 0  # replays asked after a quiet spell, for batches lost at the tail
