"""The emulated engine's *external* block hash (what its KV events carry).

A chained hash over (parent digest, block tokens, extra keys), as vLLM's
``hash_block_tokens``. Algorithms:

* ``vllm-sha256`` (default): **vLLM 0.33's default, bit for bit**: SHA-256 of the
  pickled tuple ``(parent_digest, tuple(token_ids), extra_keys)`` (highest pickle
  protocol), the first parent being ``NONE_HASH = sha256(pickle("vllm-none-hash"))``
  (vLLM without ``PYTHONHASHSEED``). Pinned by the vectors in
  ``tests/fixtures/vllm_kv_events/hash_vectors.json``, so an emulated worker's
  ``BlockStored`` bytes equal a real vLLM's for the same tokens.
* ``vllm-sha256-cbor``: vLLM's ``--prefix-caching-hash-algo sha256_cbor`` (canonical
  CBOR instead of pickle, the form other languages can recompute), same vectors file.
* ``xxh3_128`` / ``sha256``: seeded hashes over packed bytes (16 / 32-byte digests),
  for engines that must not collide with vLLM's.

On the wire a digest is the low 64 bits (last 8 bytes, big-endian) as an unsigned int,
as vLLM's default int mode sends, or the raw digest. Every algorithm differs from kvr's
router hash (``core/own_block_hash.py``): the router maps external to its own hashes from
``BlockStored`` token ids, as it must for a real vLLM.
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import sys
from array import array
from collections.abc import Sequence
from typing import Any

import msgspec
import xxhash

from core.events import ExternalBlockHash

logger = logging.getLogger(__name__)

#: Default engine hash seed: any value works; it only has to differ from the router's.
ENGINE_HASH_SEED = 0x76_6C_6C_6D  # "vllm"
HASH_ALGOS = ("vllm-sha256", "vllm-sha256-cbor", "xxh3_128", "sha256")
DEFAULT_HASH_ALGO = "vllm-sha256"
#: vLLM's NONE_HASH seed when PYTHONHASHSEED is not set (0.33).
VLLM_NONE_HASH_SEED = "vllm-none-hash"

_extra_encoder = msgspec.msgpack.Encoder()
_BIG_ENDIAN_HOST = sys.byteorder == "big"


def _token_bytes(token_ids: Sequence[int]) -> bytes:
    packed = array("I", token_ids)  # uint32: raises OverflowError outside [0, 2**32)
    if _BIG_ENDIAN_HOST:
        packed.byteswap()
    return packed.tobytes()


def _pickle_sha256(obj: Any) -> bytes:
    # vLLM's ``sha256`` hash function: pickle (highest protocol) then SHA-256. Pickling
    # bytes, tuples of ints, strings and None is deterministic across CPython 3 releases.
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    for info, size in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if n < 1 << (8 * size):
            return bytes([major << 5 | info]) + n.to_bytes(size, "big")
    raise ValueError("integer too large for CBOR")


def _cbor(obj: Any) -> bytes:
    """Canonical CBOR (RFC 8949 §4.2.1) of the types a block-hash input holds."""
    if obj is None:
        return b"\xf6"
    if isinstance(obj, bool):
        return b"\xf5" if obj else b"\xf4"
    if isinstance(obj, int):
        return _cbor_head(0, obj) if obj >= 0 else _cbor_head(1, -1 - obj)
    if isinstance(obj, bytes):
        return _cbor_head(2, len(obj)) + obj
    if isinstance(obj, str):
        raw = obj.encode("utf-8")
        return _cbor_head(3, len(raw)) + raw
    if isinstance(obj, (tuple, list)):
        return _cbor_head(4, len(obj)) + b"".join(_cbor(x) for x in obj)
    raise TypeError(f"cannot CBOR-encode {type(obj).__name__}")


def _cbor_sha256(obj: Any) -> bytes:
    # vLLM's ``sha256_cbor``: canonical CBOR then SHA-256.
    return hashlib.sha256(_cbor(obj)).digest()


class BlockHasher:
    """The engine's chained block hash (its *external* block hash); see the module docstring.

    For ``xxh3_128`` / ``sha256``: ``digest_i = H(parent_digest || tokens_i as uint32 LE
    || msgpack(extra_i))`` with ``parent_0 = H(b"kvr-engine-none-hash")``, ``H`` seeded
    by ``seed``. ``vllm-sha256`` ignores ``seed`` and uses ``none_hash_seed`` as vLLM
    uses ``PYTHONHASHSEED``. ``external()`` gives the wire form.
    """

    def __init__(self, *, seed: int = ENGINE_HASH_SEED, algo: str = DEFAULT_HASH_ALGO, int_hashes: bool = True,
                 none_hash_seed: str = VLLM_NONE_HASH_SEED) -> None:
        if algo not in HASH_ALGOS:
            raise ValueError(f"unknown hash algo {algo!r}; choose one of {HASH_ALGOS}")
        self.seed = seed
        self.algo = algo
        self.int_hashes = int_hashes
        self._seed_bytes = seed.to_bytes(8, "little", signed=False)
        self._vllm_hash = {"vllm-sha256": _pickle_sha256, "vllm-sha256-cbor": _cbor_sha256}.get(algo)
        if self._vllm_hash is not None:
            self.none_hash = self._vllm_hash(none_hash_seed)
        else:
            self.none_hash = self._digest(b"kvr-engine-none-hash")

    def _digest(self, data: bytes) -> bytes:
        if self.algo == "xxh3_128":
            return xxhash.xxh3_128_digest(data, seed=self.seed)
        return hashlib.sha256(self._seed_bytes + data).digest()

    def hash_block(self, parent: bytes | None, token_ids: Sequence[int], extra: Any = None) -> bytes:
        """Digest of one full block given its parent's digest (``None`` = first block).

        ``extra`` is vLLM's tuple of tagged extra keys (``("lora", name, path)``,
        ``("cache_salt", salt)``) or ``None``.
        """
        if self._vllm_hash is not None:
            return self._vllm_hash((parent or self.none_hash, tuple(token_ids), extra))
        data = (parent or self.none_hash) + _token_bytes(token_ids)
        if extra is not None:
            data += _extra_encoder.encode(extra)
        return self._digest(data)

    def external(self, digest: bytes) -> ExternalBlockHash:
        """The wire form of a digest (vLLM's ``maybe_convert_block_hash``)."""
        if self.int_hashes:
            return int.from_bytes(digest[-8:], "big")
        return digest
