"""The emulated engine's GPU block pool, with vLLM v1's prefix-caching semantics.

This is a re-implementation (no vLLM code) of what vLLM 0.33's ``BlockPool`` and
the single-group ``KVCacheManager`` do, as far as a router can observe it:

* ``num_blocks`` blocks of ``block_size`` tokens. Block 0 is the *null block*
  (vLLM keeps it out of the free queue), so ``num_blocks - 1`` blocks are usable
  and ``usage`` is measured against them.
* A hash → block map of cached **full** blocks. It is not de-duplicated: when two
  requests fill a block with the same content, both blocks are cached under the
  same hash (and each gets its own ``BlockStored``); a lookup returns the one
  inserted first.
* ``get_computed_blocks``: the longest run of cached full blocks from the start of
  the prompt, capped so that the last prompt token is always computed.
* ``allocate_slots``: hit blocks are *touched* (ref count +1; a free one leaves the
  free queue), new blocks are popped from the head of the free queue; a popped block
  that still holds a cached hash is evicted right then (lazy eviction →
  ``BlockRemoved``, one event per hash). Blocks that become full at scheduling time
  are cached → one ``BlockStored`` for the run, with the parent hash and tokens.
* ``free``: a request's blocks are released last-block-first. Blocks without a hash
  go to the *head* of the free queue (reused first); cached blocks go to the *tail*,
  so the queue is an LRU over cached blocks and a request's last block is evicted
  before its first.
* ``reset_prefix_cache``: only when no block is in use → ``AllBlocksCleared``.

Block identity on the wire is the engine's *external* hash: xxh3-128 (or SHA-256)
chained over (parent digest, tokens, extra keys) with an engine seed, sent as the
low 64 bits (an unsigned int, often >= 2**63) like vLLM's default, or as the raw
digest. It deliberately differs from kvr's own router hash (``core/own_block_hash.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from core.events import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from core.external_block_hash import ENGINE_HASH_SEED, HASH_ALGOS, BlockHasher
from core.free_block_queue import FreeBlockQueue, KVCacheBlock

__all__ = [
    "BlockPool", "KVSequence", "PrefixCacheStats", "BlockHasher", "KVCacheBlock", "FreeBlockQueue",
    "ENGINE_HASH_SEED", "HASH_ALGOS", "KV_CACHE_SPEC_KIND",
]  # fmt: skip

logger = logging.getLogger(__name__)

KV_CACHE_SPEC_KIND = "full_attention"


class KVSequence:
    """A request as the pool sees it: its tokens, block hashes and blocks.

    ``num_computed_tokens`` is owned by the scheduler (the engine), as vLLM's
    ``Request.num_computed_tokens``; the pool reads it in ``allocate_slots``.
    """

    __slots__ = (
        "request_id",
        "token_ids",
        "block_hashes",
        "block_extras",
        "lora_name",
        "cache_salt",
        "blocks",
        "num_cached_blocks",
        "num_computed_tokens",
    )

    def __init__(self, request_id: str, lora_name: str | None, cache_salt: str | None) -> None:
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.block_hashes: list[bytes] = []
        self.block_extras: list[list[str] | None] = []  # wire form of extra keys, per full block
        self.lora_name = lora_name
        self.cache_salt = cache_salt
        self.blocks: list[KVCacheBlock] = []
        self.num_cached_blocks = 0
        self.num_computed_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class PrefixCacheStats:
    """Cumulative counters, as vLLM's ``vllm:prefix_cache_{queries,hits}`` (tokens)."""

    requests: int = 0
    queries_tokens: int = 0
    hits_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0
    resets: int = 0


class BlockPool:
    """vLLM v1 block pool + single-group KV-cache manager (see module docstring).

    Events (``BlockStored`` / ``BlockRemoved`` / ``AllBlocksCleared``) accumulate in
    an outbox in the order they happen; ``drain_events()`` takes them.
    """

    def __init__(
        self,
        *,
        num_blocks: int,
        block_size: int,
        enable_caching: bool = True,
        hash_fn: BlockHasher | None = None,
        enable_events: bool = True,
    ) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks must be >= 2 (block 0 is the null block), got {num_blocks}")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_caching = enable_caching
        self.hasher = hash_fn or BlockHasher()
        self.enable_events = enable_events
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self.free_block_queue = FreeBlockQueue(self.blocks)
        self.null_block = self.free_block_queue.popleft()  # never handed out, never freed
        # digest -> blocks holding it; the first is the one lookups return.
        self._cached: dict[bytes, list[KVCacheBlock]] = {}
        self._events: list[KVEvent] = []
        self._lora_ids: dict[str, int] = {}
        self.stats = PrefixCacheStats()

    # ------------------------------------------------------------------ requests

    def new_sequence(
        self, request_id: str, token_ids: Sequence[int], *, lora_name: str | None = None, cache_salt: str | None = None
    ) -> KVSequence:
        """A request's pool-side state, with the hashes of its full prompt blocks."""
        seq = KVSequence(request_id, lora_name, cache_salt)
        self.append_token_ids(seq, token_ids)
        return seq

    def append_token_ids(self, seq: KVSequence, token_ids: Sequence[int]) -> None:
        """Extend a sequence (prompt or generated tokens) and hash newly full blocks."""
        seq.token_ids.extend(token_ids)
        bs = self.block_size
        n_full = len(seq.token_ids) // bs
        hashes = seq.block_hashes
        if len(hashes) >= n_full:
            return  # most decode tokens: no block became full
        while len(hashes) < n_full:
            i = len(hashes)
            hash_extra, wire_extra = self._extra_keys(seq, i)
            parent = hashes[i - 1] if i else None
            hashes.append(self.hasher.hash_block(parent, seq.token_ids[i * bs : (i + 1) * bs], hash_extra))
            seq.block_extras.append(wire_extra)

    @staticmethod
    def _extra_keys(seq: KVSequence, block_idx: int) -> tuple[tuple[tuple[str, ...], ...] | None, list[str] | None]:
        """(tagged keys folded into the hash, untagged per-block keys on the wire).

        As vLLM 0.33: ``("lora", name, path)`` on every block (the emulator has no adapter
        files: the path is the name), ``("cache_salt", salt)`` on block 0 only.
        """
        tagged: list[tuple[str, ...]] = []
        wire: list[str] = []
        if seq.lora_name is not None:
            tagged.append(("lora", seq.lora_name, seq.lora_name))
            wire.append(seq.lora_name)
        if seq.cache_salt is not None and block_idx == 0:
            tagged.append(("cache_salt", seq.cache_salt))
            wire.append(seq.cache_salt)
        return (tuple(tagged) or None), (wire or None)

    def get_computed_blocks(self, seq: KVSequence) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of full blocks, never covering the last prompt token.

        Returns the hit blocks (not yet touched) and the number of cached tokens.
        """
        if not self.enable_caching:
            return [], 0
        max_blocks = (seq.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        cached = self._cached
        for digest in seq.block_hashes[:max_blocks]:
            holders = cached.get(digest)
            if not holders:
                break
            hits.append(holders[0])
        num_hit_tokens = len(hits) * self.block_size
        self.stats.requests += 1
        self.stats.queries_tokens += seq.num_tokens
        self.stats.hits_tokens += num_hit_tokens
        return hits, num_hit_tokens

    def num_blocks_to_allocate(self, seq: KVSequence, num_tokens: int,
                               new_computed_blocks: Sequence[KVCacheBlock]) -> int:
        """Free blocks that slots for ``num_tokens`` would consume (hit blocks now free count too)."""
        required = -(-num_tokens // self.block_size)
        new = max(0, required - len(new_computed_blocks) - len(seq.blocks))
        evictable_hits = sum(1 for b in new_computed_blocks if b.ref_cnt == 0)
        return new + evictable_hits

    def allocate_slots(
        self,
        seq: KVSequence,
        num_new_tokens: int,
        *,
        num_new_computed_tokens: int = 0,
        new_computed_blocks: Sequence[KVCacheBlock] = (),
        num_lookahead_tokens: int = 0,
    ) -> list[KVCacheBlock] | None:
        """Reserve blocks for ``num_new_tokens`` more tokens; ``None`` if they don't fit.

        ``new_computed_blocks`` are prefix hits from ``get_computed_blocks`` (only on a
        request's first scheduling). Blocks that become full are cached immediately,
        as vLLM does at scheduling time. Returns the newly allocated blocks.
        """
        if num_new_tokens <= 0:
            raise ValueError("num_new_tokens must be positive")
        bs = self.block_size
        if not new_computed_blocks and (seq.num_computed_tokens + num_new_tokens + num_lookahead_tokens
                                        <= len(seq.blocks) * bs):
            # Fast path (most decode steps): the slots exist already; only caching may be due.
            num_to_cache = min(seq.num_computed_tokens + num_new_tokens, len(seq.token_ids))
            if self.enable_caching and num_to_cache // bs > seq.num_cached_blocks:
                self._cache_blocks(seq, num_to_cache)
            return []
        num_computed = seq.num_computed_tokens + num_new_computed_tokens
        num_need_slot = num_computed + num_new_tokens + num_lookahead_tokens
        if self.num_blocks_to_allocate(seq, num_need_slot, new_computed_blocks) > len(self.free_block_queue):
            return None
        if new_computed_blocks:
            if not self.enable_caching:
                raise ValueError("prefix hits given to a pool without caching")
            if seq.blocks:
                raise ValueError("prefix hits can only be added to a request without blocks")
            self.touch(new_computed_blocks)
            seq.blocks.extend(new_computed_blocks)
            seq.num_cached_blocks = len(new_computed_blocks)
        required = -(-num_need_slot // self.block_size)
        new_blocks = self.get_new_blocks(max(0, required - len(seq.blocks)))
        seq.blocks.extend(new_blocks)
        if self.enable_caching:
            self._cache_blocks(seq, min(num_computed + num_new_tokens, seq.num_tokens))
        return new_blocks

    def free(self, seq: KVSequence) -> None:
        """Release a request's blocks, last block first (it is evicted first)."""
        blocks = seq.blocks
        seq.blocks = []
        seq.num_cached_blocks = 0
        self.free_blocks(reversed(blocks))

    # ------------------------------------------------------------------ pool ops

    def get_new_blocks(self, num_blocks: int) -> list[KVCacheBlock]:
        """Pop blocks from the head of the free queue, evicting cached ones lazily."""
        if num_blocks > len(self.free_block_queue):
            raise ValueError(f"cannot get {num_blocks} free blocks from the pool")
        blocks = self.free_block_queue.popleft_n(num_blocks)
        for b in blocks:
            if b.block_hash is not None:
                self._evict(b)
            b.ref_cnt = 1
        return blocks

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """A prefix hit: ref count +1; a free (evictable) block leaves the free queue."""
        for b in blocks:
            if b.ref_cnt == 0:
                self.free_block_queue.remove(b)
            b.ref_cnt += 1

    def free_blocks(self, ordered_blocks: Iterable[KVCacheBlock]) -> None:
        """Ref count -1; blocks reaching 0 rejoin the free queue (see module docstring)."""
        first: list[KVCacheBlock] = []
        last: list[KVCacheBlock] = []
        for b in ordered_blocks:
            b.ref_cnt -= 1
            if b.ref_cnt < 0:
                raise AssertionError(f"{b} freed more often than allocated")
            if b.ref_cnt == 0:
                (last if b.block_hash is not None and self.enable_caching else first).append(b)
        self.free_block_queue.prepend_n(first)
        self.free_block_queue.append_n(last)

    def _cache_blocks(self, seq: KVSequence, num_tokens: int) -> None:
        start = seq.num_cached_blocks
        end = num_tokens // self.block_size
        if start >= end:
            return
        for i in range(start, end):
            blk = seq.blocks[i]
            if blk.block_hash is not None:
                raise AssertionError(f"{blk} is already cached")
            digest = seq.block_hashes[i]
            blk.block_hash = digest
            holders = self._cached.get(digest)
            if holders is None:
                self._cached[digest] = [blk]
            else:
                holders.append(blk)
        seq.num_cached_blocks = end
        self.stats.stored_blocks += end - start
        if self.enable_events:
            ext = self.hasher.external
            bs = self.block_size
            lora = seq.lora_name
            self._events.append(
                BlockStored(
                    block_hashes=[ext(h) for h in seq.block_hashes[start:end]],
                    parent_block_hash=ext(seq.block_hashes[start - 1]) if start else None,
                    token_ids=seq.token_ids[start * bs : end * bs],
                    block_size=bs,
                    lora_id=self._lora_id(lora) if lora is not None else None,
                    medium=MEDIUM_GPU,
                    lora_name=lora,
                    extra_keys=list(seq.block_extras[start:end]),
                    group_idx=0,
                    kv_cache_spec_kind=KV_CACHE_SPEC_KIND,
                )
            )

    def _evict(self, block: KVCacheBlock) -> None:
        digest = block.block_hash
        assert digest is not None
        block.block_hash = None
        holders = self._cached.get(digest)
        if holders is None or block not in holders:
            return
        holders.remove(block)
        if not holders:
            del self._cached[digest]
        self.stats.evicted_blocks += 1
        if self.enable_events:
            self._events.append(BlockRemoved(block_hashes=[self.hasher.external(digest)], medium=MEDIUM_GPU,
                                             group_idx=0))

    def _lora_id(self, lora_name: str) -> int:
        # vLLM reports the adapter's integer id; the emulator numbers names as it meets them.
        return self._lora_ids.setdefault(lora_name, len(self._lora_ids) + 1)

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash; refused (False) while any block is in use."""
        if self.num_used_blocks:
            logger.warning("prefix cache not reset: %d blocks still in use", self.num_used_blocks)
            return False
        self._cached.clear()
        for b in self.blocks:
            b.block_hash = None
        self.stats.resets += 1
        if self.enable_events:
            self._events.append(AllBlocksCleared())
        return True

    def drain_events(self) -> list[KVEvent]:
        """Take every event since the last drain, in order."""
        events = self._events
        self._events = []
        return events

    # ------------------------------------------------------------------ views

    @property
    def num_usable_blocks(self) -> int:
        return self.num_blocks - 1

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_queue)

    @property
    def num_used_blocks(self) -> int:
        return self.num_usable_blocks - len(self.free_block_queue)

    @property
    def usage(self) -> float:
        """KV-cache usage in [0, 1], as vLLM's ``kv_cache_usage_perc``."""
        return 1.0 - len(self.free_block_queue) / self.num_usable_blocks

    @property
    def num_cached_hashes(self) -> int:
        return len(self._cached)

    def cached_blocks(self) -> list[KVCacheBlock]:
        """Every block holding a cached hash (free or in use), in block-id order."""
        return [b for b in self.blocks if b.block_hash is not None]

    def is_cached(self, digest: bytes) -> bool:
        return digest in self._cached
