"""kvr's own block identity: a chained xxh3-64 over full blocks, each block seeded by its parent.

``hash_i = xxh3_64(tokens_i (uint32 LE each) || extra_i, seed=parent_i)`` with
``parent_0 = ROOT_PARENT_HASH = xxh3_64(b"kvr-root-block", seed=HASH_SEED)``. Only full blocks
of ``block_size`` tokens get a hash; a trailing partial block never does (vLLM caches only full
blocks). (Scheme 2. Scheme 1 hashed ``parent (8 bytes LE) || tokens || extra`` with the fixed
seed ``HASH_SEED``; passing the parent as xxh3's seed instead saves building an 80-byte string
per block: ~0.1 µs of the ~0.3 µs a block cost on the routing path. ``HASH_SCHEME`` names the
scheme so that stored own hashes of another scheme are recognised, never matched.)

What it guarantees: a block's hash depends on every token and extra key of its whole prefix
(through the chain of seeds), so two prompts share a hash only where they share the prefix,
barring a 64-bit collision; xxh3 mixes its seed into every 16-byte lane and ends in a full
avalanche, so hashes are spread over all 64 bits. What it does not: xxh3 is not a cryptographic
hash and ``HASH_SEED`` is public, so someone who can choose prompts can construct two different
prefixes with equal hashes (the router would then predict a cache hit that is not there: a slower
prefill, never a wrong answer); random collisions are ~n²/2⁶⁵ among n distinct blocks.

``extra`` folds in whatever makes the same tokens a different KV cache (a LoRA
adapter name, a ``cache_salt``): it is encoded canonically with msgpack so that
two processes on any platform agree. Never Python's ``hash()``: it is salted per
process. Values are stable across processes and platforms; the golden vectors in
``tests/core/test_own_block_hash.py`` pin them (computed there from this definition with xxhash alone).
"""

from __future__ import annotations

import sys
from array import array
from collections.abc import Sequence
from typing import Any

import msgspec
import xxhash

#: Seed of the root of every chain. Changing it changes every hash (and the golden vectors).
HASH_SEED = 0x6B7672  # "kvr"
#: The definition above; stored own hashes (the Redis mirror) are tagged with it. Bump on any change.
HASH_SCHEME = "xxh3-64-parent-seeded-v2"

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


#: stride (bytes per block) -> ``slice(i * stride, (i + 1) * stride)`` for i = 0, 1, ...; grown on demand.
_BLOCK_SLICES: dict[int, list[slice]] = {}


def _block_slices(stride: int, n_blocks: int) -> list[slice]:
    """The first ``n_blocks`` block slices of a token buffer with ``stride`` bytes per block."""
    slices = _BLOCK_SLICES.get(stride)
    if slices is None or len(slices) < n_blocks:
        size = max(n_blocks, 2 * len(slices) if slices else 256)
        slices = _BLOCK_SLICES[stride] = [slice(i * stride, (i + 1) * stride) for i in range(size)]
    return slices[:n_blocks]


def extra_key_bytes(extra_keys: Any) -> bytes:
    """Canonical bytes of extra hash keys (``None`` → ``b""``)."""
    if extra_keys is None:
        return b""
    return _extra_encoder.encode(extra_keys)


def hash_block(parent_hash: int, token_ids: Sequence[int], extra: bytes = b"") -> int:
    """Hash of one full block given its parent's kvr hash."""
    return _xxh3(_token_bytes(token_ids) + extra, parent_hash)


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
    if n_blocks <= 0:  # (a negative max_blocks: none)
        return []
    n_tokens = n_blocks * block_size
    raw = None
    if len(token_ids) - n_tokens < block_size:
        # Only a partial block (or nothing) follows: pack the whole prompt rather than a copy of
        # its full blocks (the copy is one more pass over every token object, cold on the routing
        # path: ~7 of ~30 us for a 185-block prompt); the slices below read the full blocks only.
        try:
            raw = _token_bytes(token_ids)
        except ValueError:
            pass  # an invalid id in the partial block is not hashed: the full blocks alone decide
    if raw is None:
        raw = _token_bytes(token_ids[:n_tokens])
    extra = extra_key_bytes(extra_keys)
    out: list[int] = []
    append = out.append
    parent = parent_hash
    # The per-block loop is the router's cost per prompt block: locals only, each block's bytes
    # cut with a prebuilt slice object (no offset arithmetic, no slice built per block: ~20 % of
    # the loop), the seed passed positionally (keyword parsing costs as much as the hash of 64 bytes).
    slices = _block_slices(block_size * 4, n_blocks)
    if extra:
        for block in slices:
            parent = _xxh3(raw[block] + extra, parent)
            append(parent)
    else:
        for block in slices:
            parent = _xxh3(raw[block], parent)
            append(parent)
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


# --- Both sides of the index: a stored event's blocks and a request's blocks. -----------------
# They must agree bit for bit, or the index never matches. vLLM 0.33 reports, per block, the
# untagged extra keys ``[lora_name?, mm..., cache_salt?]`` (the salt on block 0 only; ``None`` for
# a block with none; ``docs/vllm-kv-events.md`` §5). kvr hashes a block's tokens with exactly that
# per-block list, and builds the same lists for a request from its LoRA name and cache salt.

def own_hashes_of_event(token_ids: Sequence[int], extra_keys: list[Any] | None, block_size: int,
                        parent_own: int) -> list[int]:
    """Own hashes of an event's blocks; ``extra_keys`` is vLLM's per-block list (or None)."""
    if extra_keys is None:
        return block_hashes(token_ids, block_size=block_size, parent_hash=parent_own)
    first = extra_keys[0]
    # Common: no extras, or a LoRA name on every block. ``count`` is one C loop comparing with
    # ``==`` as the per-block test would, except that an item that *is* ``first`` counts even when
    # unequal to itself (a NaN): one object encodes to the same bytes, so the hashes are the same.
    if extra_keys.count(first) == len(extra_keys):
        return block_hashes(token_ids, block_size=block_size, parent_hash=parent_own, extra_keys=first)
    out = []
    parent = parent_own
    for i, keys in enumerate(extra_keys):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size], extra_key_bytes(keys))
        out.append(parent)
    return out


def request_block_hashes(
    token_ids: Sequence[int],
    *,
    block_size: int,
    lora_name: str | None = None,
    cache_salt: str | None = None,
    max_blocks: int | None = None,
) -> list[int]:
    """Own hashes of a request's full blocks, with the per-block extra keys vLLM 0.33 reports.

    vLLM puts on the wire, per block, the untagged list ``[lora_name?, mm..., cache_salt?]``,
    the salt on block 0 only (``docs/vllm-kv-events.md`` §5); blocks with none report ``None``.
    Hashing the same per-block lists here makes a request's hashes equal the index's.
    """
    rest_keys = [lora_name] if lora_name is not None else None
    if cache_salt is None:
        return block_hashes(token_ids, block_size=block_size, extra_keys=rest_keys, max_blocks=max_blocks)
    if len(token_ids) < block_size or max_blocks == 0:
        return []
    first_keys = ([lora_name] if lora_name is not None else []) + [cache_salt]
    first = hash_block(ROOT_PARENT_HASH, token_ids[:block_size], extra_key_bytes(first_keys))
    rest = block_hashes(token_ids[block_size:], block_size=block_size, parent_hash=first, extra_keys=rest_keys,
                        max_blocks=None if max_blocks is None else max_blocks - 1)
    return [first, *rest]

