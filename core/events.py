"""KV-cache events, shaped exactly like vLLM 0.33's ``kv_events`` structs.

These structs are both the engine's outbox type and the wire type: encoding a
``KVEventBatch`` with ``msgspec.msgpack.Encoder()`` gives vLLM's bytes (tagged
maps, ``"type"`` first, fields in vLLM's declaration order, fields that have a
default left off while they equal it). ``bus/vllm_codec.py`` decodes these and
the legacy array form.

Hashes are *external* block hashes: whatever the engine uses (a uint64, often
>= 2**63, or 32 raw bytes). The router keys its index by its own block hash
(``core/own_block_hash.py``) and keeps the external one only to apply removals.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec

#: Lengths a byte block hash may have (vLLM's digests are 32 bytes; 8..64 leaves room for others).
EXTERNAL_HASH_MIN_BYTES = 8
EXTERNAL_HASH_MAX_BYTES = 64

# An engine's block id on the wire: uint64 (default) or a digest. The bounds are checked by msgspec
# while it decodes (in C: the decoder walks no event after it); msgpack bounds ints to int64..uint64.
ExternalBlockHash = int | Annotated[bytes, msgspec.Meta(min_length=EXTERNAL_HASH_MIN_BYTES,
                                                        max_length=EXTERNAL_HASH_MAX_BYTES)]

#: ``medium`` of blocks held in the GPU block pool (offload tiers say CPU/STORAGE).
MEDIUM_GPU = "GPU"


class BlockStored(msgspec.Struct, tag=True, omit_defaults=True):
    """Blocks became full and cached. ``token_ids`` holds all their tokens."""

    block_hashes: list[ExternalBlockHash]
    parent_block_hash: ExternalBlockHash | None
    token_ids: list[int]
    block_size: Annotated[int, msgspec.Meta(ge=0)]
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    # Per-block, untagged extra hash keys (LoRA name, [mm_id, offset], salt).
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    kv_cache_spec_sliding_window: int | None = None
    locality: str | None = None
    ownership: str | None = None
    session_id: str | None = None
    lookahead_token_ids: list[list[int]] | None = None


class BlockRemoved(msgspec.Struct, tag=True, omit_defaults=True):
    """Blocks were evicted (lazily, when a free cached block is reused)."""

    block_hashes: list[ExternalBlockHash]
    medium: str | None
    group_idx: int | None = None
    locality: str | None = None
    ownership: str | None = None


class AllBlocksCleared(msgspec.Struct, tag=True, omit_defaults=True):
    """The engine's whole GPU prefix cache was reset."""


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class KVEventBatch(msgspec.Struct, array_like=True):
    """One published batch: ``[ts, events, data_parallel_rank]``.

    ``ts`` is wall-clock seconds (float64 on the wire). vLLM always fills the
    rank (0 without data parallelism); ``None`` is legal on the wire.
    """

    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


def event_to_dict(event: KVEvent) -> dict[str, Any]:
    """Every field of an event (unset ones as None), ``type`` first; for display."""
    out: dict[str, Any] = {"type": type(event).__name__}
    for name in event.__struct_fields__:
        out[name] = getattr(event, name)
    return out
