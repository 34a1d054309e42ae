"""vLLM KV-event payload codec (pinned to vLLM 0.33.0, reads every earlier form).

Payload = msgpack ``[ts: float64, events: array, data_parallel_rank: int | nil]``.

* vLLM >= 0.24 encodes each event as a map tagged by ``"type"`` (``core.events``
  structs encode to exactly those bytes: the fixtures re-encode byte for byte).
* vLLM <= 0.23 encodes each event as an array with the tag at index 0 and every
  field positional. Releases grew the array from 6 elements (0.9: up to
  ``lora_id``) to 12 (0.22/0.23: up to ``kv_cache_spec_sliding_window``); any
  length in between decodes, missing trailing fields are None.

Whatever goes wrong, :class:`VllmEventDecoder.decode` raises one
:class:`DecodeError`; events of a type this release does not know are skipped
and counted, so a newer vLLM cannot stall the index.
"""

from __future__ import annotations

import logging
from typing import Any

import msgspec

from core.events import (
    EXTERNAL_HASH_MAX_BYTES,
    EXTERNAL_HASH_MIN_BYTES,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    ExternalBlockHash,
    KVEvent,
    KVEventBatch,
)

logger = logging.getLogger(__name__)

#: The vLLM release whose encoding :func:`encode_batch` reproduces byte for byte.
VLLM_VERSION = "0.33.0"
_KNOWN_EVENT_TYPES = ("BlockStored", "BlockRemoved", "AllBlocksCleared")


class DecodeError(ValueError):
    """A frame or payload that is not a valid vLLM KV-event batch."""


# What msgspec raises on bad bytes: DecodeError (ValidationError is one), but UnicodeDecodeError
# for a string that is not UTF-8 and RecursionError for deep nesting (found by kvr bench fuzz).
_MSGSPEC_ERRORS = (msgspec.DecodeError, UnicodeDecodeError, RecursionError)


# Legacy (<= 0.23) positional layout. Everything after block_size was added in
# later releases, hence defaults: a 6-element array from 0.9 decodes as well.
class LegacyBlockStored(msgspec.Struct, tag="BlockStored", array_like=True):
    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: int
    lora_id: int | None = None
    medium: str | None = None
    lora_name: str | None = None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None


class LegacyBlockRemoved(msgspec.Struct, tag="BlockRemoved", array_like=True):
    block_hashes: list[ExternalBlockHash]
    medium: str | None = None
    group_idx: int | None = None


class LegacyAllBlocksCleared(msgspec.Struct, tag="AllBlocksCleared", array_like=True):
    pass


LegacyKVEvent = LegacyBlockStored | LegacyBlockRemoved | LegacyAllBlocksCleared


class LegacyKVEventBatch(msgspec.Struct, array_like=True):
    ts: float
    events: list[LegacyKVEvent]
    data_parallel_rank: int | None = None


_encoder = msgspec.msgpack.Encoder()


def _from_legacy(event: LegacyKVEvent) -> KVEvent:
    if isinstance(event, LegacyBlockStored):
        return BlockStored(**msgspec.structs.asdict(event))
    if isinstance(event, LegacyBlockRemoved):
        return BlockRemoved(**msgspec.structs.asdict(event))
    return AllBlocksCleared()


def _to_legacy(event: KVEvent) -> LegacyKVEvent:
    if isinstance(event, BlockStored):
        fields = msgspec.structs.asdict(event)
        return LegacyBlockStored(**{k: fields[k] for k in LegacyBlockStored.__struct_fields__})
    if isinstance(event, BlockRemoved):
        return LegacyBlockRemoved(event.block_hashes, event.medium, event.group_idx)
    return LegacyAllBlocksCleared()


def _check_hash_bytes(h: bytes) -> None:
    if not EXTERNAL_HASH_MIN_BYTES <= len(h) <= EXTERNAL_HASH_MAX_BYTES:
        raise DecodeError(f"a byte block hash must be {EXTERNAL_HASH_MIN_BYTES}..{EXTERNAL_HASH_MAX_BYTES} "
                          f"bytes, got {len(h)}")


def _check_hashes(event: KVEvent) -> None:
    # The slow paths' check (legacy arrays, raw maps); the map form gets the same bounds from
    # msgspec. Integer hashes need no check: msgpack and msgspec bound them to int64..uint64.
    # Byte hashes are rare, so look for one with a C-level scan before walking the list.
    if type(event) is BlockStored:
        if event.block_size < 0:
            raise DecodeError(f"negative block_size {event.block_size}")
        if type(event.parent_block_hash) is bytes:
            _check_hash_bytes(event.parent_block_hash)
        hashes = event.block_hashes
    elif type(event) is BlockRemoved:
        hashes = event.block_hashes
    else:  # AllBlocksCleared
        return
    if bytes in map(type, hashes):
        for h in hashes:
            if h.__class__ is bytes:
                _check_hash_bytes(h)


class VllmEventDecoder:
    """Decode payloads of any vLLM release; keeps counters of what it saw."""

    def __init__(self) -> None:
        self._map_form = msgspec.msgpack.Decoder(KVEventBatch)
        self._legacy_form = msgspec.msgpack.Decoder(LegacyKVEventBatch)
        self.batches = 0
        self.legacy_batches = 0
        self.unknown_events = 0

    def decode(self, payload: bytes) -> KVEventBatch:
        """Payload bytes → :class:`KVEventBatch` of ``core.events`` structs."""
        if not isinstance(payload, (bytes, bytearray, memoryview)):
            raise DecodeError(f"payload must be bytes, got {type(payload).__name__}")
        try:
            # Fast path: msgspec types every field and checks every range (``core.events``' Meta
            # bounds), so no event is walked in Python after it (that walk was ~4 % of ingestion).
            batch = self._map_form.decode(payload)
        except _MSGSPEC_ERRORS:
            batch = self._decode_slow(payload)  # (re-checks, and says in its own words what is wrong)
        self.batches += 1
        return batch

    def _decode_slow(self, payload: bytes) -> KVEventBatch:
        """Legacy arrays, unknown event types, or a real error with a clear message."""
        try:
            batch = self._legacy_form.decode(payload)
        except _MSGSPEC_ERRORS:
            pass
        else:
            self.legacy_batches += 1
            events = [_from_legacy(e) for e in batch.events]
            for event in events:
                _check_hashes(event)
            return KVEventBatch(batch.ts, events, batch.data_parallel_rank)
        try:
            raw = msgspec.msgpack.decode(payload)
        except (msgspec.DecodeError, ValueError, RecursionError) as exc:
            raise DecodeError(f"payload is not msgpack: {exc}") from None
        if not isinstance(raw, list) or len(raw) not in (2, 3):
            raise DecodeError("payload must be the array [ts, events, data_parallel_rank]")
        ts, events_raw = raw[0], raw[1]
        rank = raw[2] if len(raw) == 3 else None
        if isinstance(ts, bool) or not isinstance(ts, (int, float)):
            raise DecodeError(f"ts must be a number, got {type(ts).__name__}")
        if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int)):
            raise DecodeError(f"data_parallel_rank must be an int or nil, got {type(rank).__name__}")
        if not isinstance(events_raw, list):
            raise DecodeError(f"events must be an array, got {type(events_raw).__name__}")
        kept: list[KVEvent] = []
        for i, raw_event in enumerate(events_raw):
            converted = self._convert_event(i, raw_event)
            if converted is not None:
                _check_hashes(converted)
                kept.append(converted)
        return KVEventBatch(float(ts), kept, rank)

    def _convert_event(self, i: int, raw_event: Any) -> KVEvent | None:
        if isinstance(raw_event, dict):
            tag, legacy = raw_event.get("type"), False
        elif isinstance(raw_event, list) and raw_event:
            tag, legacy = raw_event[0], True
        else:
            raise DecodeError(f"event {i} is neither a tagged map nor a tagged array")
        if tag not in _KNOWN_EVENT_TYPES:
            if isinstance(tag, str):
                self.unknown_events += 1
                logger.debug("skipping event %d of unknown type %r", i, tag)
                return None
            raise DecodeError(f"event {i} has no string type tag")
        try:
            event: KVEvent | LegacyKVEvent = msgspec.convert(raw_event, LegacyKVEvent if legacy else KVEvent)
        except (msgspec.ValidationError, TypeError, ValueError) as exc:
            raise DecodeError(f"event {i} ({tag}): {exc}") from None
        return _from_legacy(event) if isinstance(event, LegacyKVEvent) else event


def encode_batch(batch: KVEventBatch, *, legacy: bool = False) -> bytes:
    """Encode as vLLM 0.33 does (byte for byte), or as <= 0.23 did with ``legacy``."""
    if legacy:
        return _encoder.encode(
            LegacyKVEventBatch(batch.ts, [_to_legacy(e) for e in batch.events], batch.data_parallel_rank)
        )
    return _encoder.encode(batch)


_default_decoder = VllmEventDecoder()


def decode_batch(payload: bytes) -> KVEventBatch:
    """Decode one payload (module-level convenience; counters go to a shared decoder)."""
    return _default_decoder.decode(payload)
