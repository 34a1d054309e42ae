"""The emulated engine's *external* block hash (what its KV events carry).

A chained hash over (parent digest, block tokens, extra keys) with an engine seed,
like vLLM's ``hash_block_tokens``: xxh3-128 (vLLM's ``xxhash`` algorithm, 16 bytes) or
SHA-256 (32 bytes). On the wire it is the low 64 bits (last 8 bytes, big-endian) as an
unsigned int, as vLLM's default int mode sends, or the raw digest. It deliberately
differs from kvr's router hash (``core/hashing.py``): the router maps external to
its own hashes from ``BlockStored`` token ids, as it must for a real vLLM.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import msgspec
import xxhash

from core.events import ExternalBlockHash

#: Default engine hash seed: any value works; it only has to differ from the router's.
ENGINE_HASH_SEED = 0x76_6C_6C_6D  # "vllm"
HASH_ALGOS = ("xxh3_128", "sha256")

_extra_encoder = msgspec.msgpack.Encoder()
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)  # uint32: raises OverflowError outside [0, 2**32)
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


class BlockHasher:
    """The engine's chained block hash (its *external* block hash).

    ``digest_i = H(parent_digest || tokens_i as uint32 LE || msgpack(extra_i))`` with
    ``parent_0 = H(b"kvr-engine-none-hash")``; ``H`` is seeded xxh3-128 (16 bytes) or
    SHA-256 over the seed prefix (32 bytes). ``external()`` gives the wire form: the
    low 64 bits (last 8 bytes, big-endian), as vLLM's int mode, or the digest itself.
    """

    def __init__(self, *, seed: int = ENGINE_HASH_SEED, algo: str = "xxh3_128", int_hashes: bool = True) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algo {algo!r}; choose one of {HASH_ALGOS}")
        self.seed = seed
        self.algo = algo
        self.int_hashes = int_hashes
        self._seed_bytes = seed.to_bytes(8, "little", signed=False)
        self.none_hash = self._digest(b"kvr-engine-none-hash")

    def _digest(self, data: bytes) -> bytes:
        if self.algo == "xxh3_128":
            return xxhash.xxh3_128_digest(data, seed=self.seed)
        return hashlib.sha256(self._seed_bytes + data).digest()

    def hash_block(self, parent: bytes | None, token_ids: Sequence[int], extra: Any = None) -> bytes:
        """Digest of one full block given its parent's digest (``None`` = first block)."""
        data = (parent or self.none_hash) + _token_bytes(token_ids)
        if extra is not None:
            data += _extra_encoder.encode(extra)
        return self._digest(data)

    def external(self, digest: bytes) -> ExternalBlockHash:
        """The wire form of a digest (vLLM's ``maybe_convert_block_hash``)."""
        if self.int_hashes:
            return int.from_bytes(digest[-8:], "big")
        return digest
