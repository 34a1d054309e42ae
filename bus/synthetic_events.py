"""Synthetic but realistic vLLM KV-event batches (for ``kvr events publish``, demos, benchmarks).

Each step is one engine step of one request on a small LRU-managed GPU block pool,
emitted the way vLLM 0.33's GPU block pool does:

* prompts are a shared prefix (one of a few "system prompts") plus a random
  suffix, as random token ids (no tokenizer); blocks already cached are reused;
* evictions come first, one ``BlockRemoved`` per hash with ``group_idx`` (lazy
  eviction when a cached free block is handed out for the new data);
* then one ``BlockStored`` for the newly full blocks, chained by
  ``parent_block_hash``, with ``extra_keys=[None]*n``, ``group_idx=0`` and
  ``kv_cache_spec_kind="full_attention"``;
* rarely an ``AllBlocksCleared`` (a prefix-cache reset).

Block hashes are kvr's own chained xxh3-64 (uint64, half of them >= 2**63, like
vLLM's), or 32 bytes whose last 8 are that uint64 with ``bytes_hashes``. Pure:
randomness comes from the injected ``rng``; ``ts`` is the caller's business.
"""

from __future__ import annotations

import random
from collections import OrderedDict

from core.blocks import DEFAULT_BLOCK_SIZE
from core.events import AllBlocksCleared, BlockRemoved, BlockStored, ExternalBlockHash, KVEvent
from core.own_block_hash import block_hashes

#: Qwen3's vocabulary size: token ids are drawn below it.
VOCAB_SIZE = 151_936


class SyntheticKVEvents:
    """A stream of per-step event lists from an emulated prefix-cached block pool."""

    def __init__(
        self,
        *,
        rng: random.Random,
        block_size: int = DEFAULT_BLOCK_SIZE,
        capacity_blocks: int = 2048,
        n_prefixes: int = 8,
        prefix_blocks: tuple[int, int] = (1, 8),
        max_new_blocks: int = 32,
        shared_prefix_prob: float = 0.7,
        clear_prob: float = 0.001,
        bytes_hashes: bool = False,
        vocab_size: int = VOCAB_SIZE,
    ) -> None:
        self.rng = rng
        self.block_size = block_size
        self.capacity_blocks = capacity_blocks
        self.max_new_blocks = max_new_blocks
        self.shared_prefix_prob = shared_prefix_prob
        self.clear_prob = clear_prob
        self.bytes_hashes = bytes_hashes
        self.vocab_size = vocab_size
        self._prefixes = [self._tokens(rng.randint(*prefix_blocks) * block_size) for _ in range(n_prefixes)]
        self._pool: OrderedDict[int, None] = OrderedDict()  # cached block hashes, LRU first

    def _tokens(self, n: int) -> list[int]:
        return [self.rng.randrange(self.vocab_size) for _ in range(n)]

    def _external(self, h: int) -> ExternalBlockHash:
        return self.rng.randbytes(24) + h.to_bytes(8, "big") if self.bytes_hashes else h

    def next_step(self) -> list[KVEvent]:
        """The events of one engine step (never empty: vLLM publishes only steps with events)."""
        if self._pool and self.rng.random() < self.clear_prob:
            self._pool.clear()
            return [AllBlocksCleared()]
        new: list[int] = []
        while not new:  # a fully cached prompt stores nothing: draw another (random suffixes ~never hit)
            prompt = list(self.rng.choice(self._prefixes)) if self.rng.random() < self.shared_prefix_prob else []
            prompt += self._tokens(self.rng.randint(1, self.max_new_blocks) * self.block_size)
            hashes = block_hashes(prompt, block_size=self.block_size)
            cached = 0
            while cached < len(hashes) and hashes[cached] in self._pool:
                self._pool.move_to_end(hashes[cached])
                cached += 1
            new = hashes[cached : cached + self.max_new_blocks]
        events: list[KVEvent] = []
        while len(self._pool) + len(new) > self.capacity_blocks:
            evicted, _ = self._pool.popitem(last=False)
            events.append(BlockRemoved(block_hashes=[self._external(evicted)], medium="GPU", group_idx=0))
        for h in new:
            self._pool[h] = None
        bs = self.block_size
        events.append(BlockStored(
            block_hashes=[self._external(h) for h in new],
            parent_block_hash=self._external(hashes[cached - 1]) if cached > 0 else None,
            token_ids=prompt[cached * bs : (cached + len(new)) * bs],
            block_size=bs,
            lora_id=None,
            medium="GPU",
            lora_name=None,
            extra_keys=[None] * len(new),
            group_idx=0,
            kv_cache_spec_kind="full_attention",
        ))
        return events
