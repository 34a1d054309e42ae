"""The vLLM codec against payloads produced by vLLM's own encoder."""

from __future__ import annotations

import json
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.vllm_codec import DecodeError, VllmEventDecoder, decode_batch, encode_batch
from core.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch, event_to_dict
from tests.conftest import FIXTURES

_TYPES = {"BlockStored": BlockStored, "BlockRemoved": BlockRemoved, "AllBlocksCleared": AllBlocksCleared}


def _from_json(value):
    """The fixtures' JSON convention: bytes as {"$bytes_hex": ...}."""
    if isinstance(value, dict) and set(value) == {"$bytes_hex"}:
        return bytes.fromhex(value["$bytes_hex"])
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _from_json(v) for k, v in value.items()}
    return value


def _meaning_to_batch(meaning: dict) -> KVEventBatch:
    events = []
    for ev in meaning["events"]:
        ev = _from_json(ev)
        cls = _TYPES[ev.pop("type")]
        events.append(cls(**{k: v for k, v in ev.items() if k in cls.__struct_fields__}))
    return KVEventBatch(meaning["ts"], events, meaning["data_parallel_rank"])


def _fixtures(folder: Path) -> list[Path]:
    found = sorted(folder.glob("*.bin"))
    assert found, f"no fixtures in {folder}"
    return found


CURRENT = _fixtures(FIXTURES)
LEGACY = _fixtures(FIXTURES / "legacy_v0_22_1")


@pytest.mark.parametrize("path", CURRENT + LEGACY, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_fixture_decodes_to_its_meaning(path: Path) -> None:
    meaning = json.loads(path.with_suffix(".json").read_text())
    batch = decode_batch(path.read_bytes())
    assert batch.ts == meaning["ts"]
    assert batch.data_parallel_rank == meaning["data_parallel_rank"]
    decoded = [event_to_dict(e) for e in batch.events]
    expected = [_from_json(e) for e in meaning["events"]]
    for got, want in zip(decoded, expected, strict=True):
        # Legacy payloads predate some fields: those decode as None.
        assert got == {k: want.get(k) for k in got}


@pytest.mark.parametrize("path", CURRENT, ids=lambda p: p.stem)
def test_fixture_reencodes_byte_for_byte_from_its_meaning(path: Path) -> None:
    meaning = json.loads(path.with_suffix(".json").read_text())
    assert encode_batch(_meaning_to_batch(meaning)) == path.read_bytes()


@pytest.mark.parametrize("path", LEGACY, ids=lambda p: p.stem)
def test_legacy_fixture_reencodes_byte_for_byte(path: Path) -> None:
    meaning = json.loads(path.with_suffix(".json").read_text())
    assert encode_batch(_meaning_to_batch(meaning), legacy=True) == path.read_bytes()


@pytest.mark.parametrize("n_fields", range(6, 13))
def test_legacy_arrays_of_every_shipped_length(n_fields: int) -> None:
    full = ["BlockStored", [2**64 - 1], None, list(range(16)), 16, None, "GPU", "lora-a", [None], 0, "full_attention",
            None]
    payload = msgspec.msgpack.encode([1.5, [full[:n_fields]], 0])
    (event,) = decode_batch(payload).events
    assert event.block_hashes == [2**64 - 1]
    assert event.token_ids == list(range(16))
    assert event.medium == ("GPU" if n_fields >= 7 else None)
    assert event.lora_name == ("lora-a" if n_fields >= 8 else None)
    assert event.kv_cache_spec_kind == ("full_attention" if n_fields >= 11 else None)


def test_uint64_above_2_63_and_byte_hashes() -> None:
    digest = bytes(range(32))
    stored = BlockStored([2**63 + 5, digest], None, list(range(32)), 16, None, "GPU", None)
    batch = decode_batch(encode_batch(KVEventBatch(2.0, [stored], 0)))
    assert batch.events[0].block_hashes == [2**63 + 5, digest]


def test_unknown_keys_are_ignored_and_unknown_types_skipped_and_counted() -> None:
    decoder = VllmEventDecoder()
    payload = msgspec.msgpack.encode(
        [
            3.0,
            [
                {"type": "BlockRemoved", "block_hashes": [9], "medium": "GPU", "future_field": {"x": 1}},
                {"type": "BlockPromoted", "block_hashes": [9]},
            ],
            None,
        ]
    )
    batch = decoder.decode(payload)
    assert batch.events == [BlockRemoved([9], "GPU")]
    assert batch.data_parallel_rank is None
    assert decoder.unknown_events == 1


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"\xc1",
        b"\x93",
        msgspec.msgpack.encode({"ts": 1}),
        msgspec.msgpack.encode([1.0]),
        msgspec.msgpack.encode(["x", [], 0]),
        msgspec.msgpack.encode([1.0, {}, 0]),
        msgspec.msgpack.encode([1.0, [], "rank"]),
        msgspec.msgpack.encode([1.0, [7], 0]),
        msgspec.msgpack.encode([1.0, [{"type": 5}], 0]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockStored"}], 0]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": ["x"], "medium": None}], 0]),
        msgspec.msgpack.encode([1.0, [{"type": "BlockRemoved", "block_hashes": [b"ab"], "medium": None}], 0]),
        msgspec.msgpack.encode([1.0, [["BlockRemoved"]], 0]),
        # Ranges the map form's fast path leaves to msgspec (core.events' Meta bounds):
        encode_batch(KVEventBatch(1.0, [BlockStored([5], None, [1] * 16, -1, None, None, None)], 0)),
        encode_batch(KVEventBatch(1.0, [BlockStored([5], b"\x01" * 7, [1] * 16, 16, None, None, None)], 0)),
        encode_batch(KVEventBatch(1.0, [BlockStored([b"\x01" * 65], None, [1] * 16, 16, None, None, None)], 0)),
        encode_batch(KVEventBatch(1.0, [BlockRemoved([3, b"\x01" * 7], "GPU")], 0)),
        b"\x93\xcb" + b"\x00" * 8 + b"\x91\xcf\xff",
    ],
)
def test_malformed_payloads_raise_only_decode_error(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        decode_batch(payload)


_hash = st.one_of(st.integers(0, 2**64 - 1), st.binary(min_size=32, max_size=32))
_opt_str = st.none() | st.sampled_from(["GPU", "CPU", "x"])
_stored = st.builds(
    lambda hashes, parent, bs, lora, medium, gi, loc: BlockStored(
        hashes, parent, list(range(len(hashes) * bs)), bs, lora, medium, None, [None] * len(hashes), gi, None, None, loc
    ),
    st.lists(_hash, min_size=1, max_size=4),
    st.none() | _hash,
    st.integers(1, 16),
    st.none() | st.integers(0, 5),
    _opt_str,
    st.none() | st.integers(0, 3),
    _opt_str,
)
_removed = st.builds(BlockRemoved, st.lists(_hash, min_size=1, max_size=4), _opt_str, st.none() | st.integers(0, 3))
_batch = st.builds(
    KVEventBatch,
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(st.one_of(_stored, _removed, st.just(AllBlocksCleared())), max_size=6),
    st.none() | st.integers(0, 7),
)


@settings(max_examples=200)
@given(_batch)
def test_round_trip_map_form(batch: KVEventBatch) -> None:
    assert decode_batch(encode_batch(batch)) == batch


@settings(max_examples=200)
@given(_batch)
def test_round_trip_legacy_form_keeps_legacy_fields(batch: KVEventBatch) -> None:
    decoded = decode_batch(encode_batch(batch, legacy=True))
    assert [type(e) for e in decoded.events] == [type(e) for e in batch.events]
    for got, want in zip(decoded.events, batch.events, strict=True):
        if isinstance(want, BlockStored):
            assert (got.block_hashes, got.parent_block_hash, got.token_ids, got.medium, got.group_idx) == (
                want.block_hashes, want.parent_block_hash, want.token_ids, want.medium, want.group_idx)
            assert got.locality is None  # not in the legacy layout
        elif isinstance(want, BlockRemoved):
            assert (got.block_hashes, got.medium, got.group_idx) == (want.block_hashes, want.medium, want.group_idx)


@settings(max_examples=300)
@given(st.binary(max_size=200))
def test_random_bytes_never_raise_anything_but_decode_error(data: bytes) -> None:
    try:
        decode_batch(data)
    except DecodeError:
        pass
