"""kvr's own block identity: a chained, seeded xxh3-64 over full blocks.

``hash_i = xxh3_64(parent_i (8 bytes LE) || tokens_i (uint32 LE each) || extra, seed)``
with ``parent_0 = ROOT_PARENT_HASH``. Only full blocks of ``block_size`` tokens get a
hash; a trailing partial block never does (vLLM caches only full blocks).

``extra`` folds in whatever makes the same tokens a different KV cache (a LoRA
adapter name, a ``cache_salt``): it is encoded canonically with msgpack so that
two processes on any platform agree. Never Python's ``hash()``: it is salted per
process. Values are stable across processes, platforms and releases; the golden
vectors in ``tests/core/test_hashing.py`` pin them.
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Any

import msgspec
import xxhash

#: Seed of every kvr block hash. Changing it changes every hash (and the golden vectors).
HASH_SEED = 0x6B7672  # "kvr"

#: Parent of block 0 of every chain.
ROOT_PARENT_HASH: int = xxhash.xxh3_64_intdigest(b"kvr-root-block", seed=HASH_SEED)

_MAX_TOKEN_ID = 2**32 - 1
_extra_encoder = msgspec.msgpack.Encoder()
_xxh3 = xxhash.xxh3_64_intdigest


_BIG_ENDIAN_HOST = sys.byteorder == "big"
assert array("I").itemsize == 4, "kvr hashes tokens as 4-byte unsigned ints"


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    """Token ids as uint32 little-endian, whatever the host."""
    try:
        packed = array("I", token_ids)
    except (OverflowError, TypeError) as exc:
        raise ValueError(f"token ids must be integers in [0, {_MAX_TOKEN_ID}]") from exc
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


def extra_key_bytes(extra_keys: Any) -> bytes:
    """Canonical bytes of extra hash keys (``None`` → ``b""``)."""
    if extra_keys is None:
        return b""
    return _extra_encoder.encode(extra_keys)


def hash_block(parent_hash: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one full block given its parent's kvr hash."""
    return _xxh3(parent_hash.to_bytes(8, "little") + _token_bytes(token_ids) + extra, HASH_SEED)


def block_hashes(
    token_ids: Sequence[int],
    *,
    block_size: int,
    parent_hash: int = ROOT_PARENT_HASH,
    extra_keys: Any = None,
    max_blocks: int | None = None,
) -> list[int]:
    """Chained hashes of every *full* block of ``token_ids``.

    ``parent_hash`` continues a chain (for a ``BlockStored`` that starts mid-prompt).
    ``extra_keys`` applies to every block of the chain.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    n_blocks = len(token_ids) // block_size
    if max_blocks is not None:
        n_blocks = min(n_blocks, max_blocks)
    if n_blocks == 0:
        return []
    raw = _token_bytes(token_ids[: n_blocks * block_size])
    extra = extra_key_bytes(extra_keys)
    stride = block_size * 4
    out: list[int] = []
    append = out.append
    to_bytes = int.to_bytes
    seed = HASH_SEED
    parent = parent_hash
    # The per-block loop is the router's cost per prompt block: locals only, a running offset,
    # the seed passed positionally (keyword parsing costs as much as the hash of 72 bytes).
    start = 0
    if extra:
        for _ in range(n_blocks):
            end = start + stride
            parent = _xxh3(to_bytes(parent, 8, "little") + raw[start:end] + extra, seed)
            append(parent)
            start = end
    else:
        for _ in range(n_blocks):
            end = start + stride
            parent = _xxh3(to_bytes(parent, 8, "little") + raw[start:end], seed)
            append(parent)
            start = end
    return out


def external_hash_key(external: int | bytes) -> int:
    """Normalise an engine's block hash to an unsigned 64-bit int.

    vLLM sends uint64 (often >= 2**63), a signed int64 from some encoders, or the
    raw digest as bytes; for bytes the low 64 bits are the last 8 bytes, big-endian,
    which is exactly what vLLM's int form carries.
    """
    if isinstance(external, bytes):
        return int.from_bytes(external[-8:], "big")
    return external & 0xFFFFFFFFFFFFFFFF
