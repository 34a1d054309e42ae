"""kvr's own block keys for both sides of the index: a stored event's blocks, a request's blocks.

Both must agree bit for bit, or the index never matches. vLLM 0.33 reports, per block, the
untagged extra keys ``[lora_name?, mm..., cache_salt?]`` (the salt on block 0 only; ``None``
for a block with none; ``docs/vllm-kv-events.md`` §5). kvr hashes a block's tokens with exactly
that per-block list (canonical msgpack, ``core/hashing.py``), and builds the same lists for a
request from its LoRA name and cache salt.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from core.hashing import ROOT_PARENT_HASH, block_hashes, extra_key_bytes, hash_block


def own_hashes_of_event(token_ids: Sequence[int], extra_keys: list[Any] | None, block_size: int,
                        parent_own: int) -> list[int]:
    """Own hashes of an event's blocks; ``extra_keys`` is vLLM's per-block list (or None)."""
    if extra_keys is None:
        return block_hashes(token_ids, block_size=block_size, parent_hash=parent_own)
    first = extra_keys[0]
    if all(k == first for k in extra_keys):  # common: no extras, or a LoRA name on every block
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

