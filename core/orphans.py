"""Parked chains: ``BlockStored`` events whose parent block the index does not know (yet).

kvr's hash of a block depends on its whole prefix, so a store whose parent external hash is
unknown cannot be placed. Instead of dropping it (llm-d's behaviour, pitfall 10 of
``docs/vllm-kv-events.md``) the index parks it here, keyed by the missing parent, and links it
when a block with that external hash is stored (a reordered batch, a replayed gap), recursively.
Parked chains expire after a TTL and are bounded in blocks per target, oldest first. A removal of
a parked block marks it, so a later link skips it (its tokens still chain the blocks after it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class ParkedChain:
    """One parked ``BlockStored``: external keys, tokens and per-block extra keys."""

    parent_key: int
    external_keys: list[int]
    token_ids: list[int]
    extra_keys: list[Any] | None
    arrived_at: float
    removed: set[int] = field(default_factory=set)
    alive: bool = True


class ParkedChains:
    """A target's parked chains: by missing parent, by own external keys, and in arrival order."""

    def __init__(self) -> None:
        self.by_parent: dict[int, list[ParkedChain]] = {}
        self.by_external: dict[int, ParkedChain] = {}
        self.fifo: deque[ParkedChain] = deque()
        self.blocks = 0

    def park(self, chain: ParkedChain) -> None:
        self.by_parent.setdefault(chain.parent_key, []).append(chain)
        for ext in chain.external_keys:
            self.by_external[ext] = chain
        self.fifo.append(chain)
        self.blocks += len(chain.external_keys)

    def take_children(self, parent_key: int) -> list[ParkedChain]:
        """Live chains waiting for ``parent_key``, unparked (the caller links them)."""
        waiting = self.by_parent.pop(parent_key, None)
        if not waiting:
            return []
        out = [c for c in waiting if c.alive]
        for chain in out:
            self._unpark(chain)
        return out

    def mark_removed(self, ext: int) -> bool:
        """A removal of a parked block; False when no parked chain holds ``ext``."""
        chain = self.by_external.pop(ext, None)
        if chain is None:
            return False
        chain.removed.add(ext)
        return True

    def expire(self, now: float, ttl_s: float, max_blocks: int) -> int:
        """Drop chains older than ``ttl_s`` or beyond ``max_blocks`` (oldest first); blocks dropped."""
        dropped = 0
        fifo = self.fifo
        while fifo:
            head = fifo[0]
            if head.alive and head.arrived_at + ttl_s > now and self.blocks <= max_blocks:
                break
            fifo.popleft()
            if head.alive:
                self._unpark(head)
                waiting = self.by_parent.get(head.parent_key)
                if waiting is not None:
                    waiting.remove(head)
                    if not waiting:
                        del self.by_parent[head.parent_key]
                dropped += len(head.external_keys)
        return dropped

    def live(self) -> list[ParkedChain]:
        return [c for c in self.fifo if c.alive]

    def clear(self) -> None:
        for chain in self.fifo:
            chain.alive = False
        self.by_parent.clear()
        self.by_external.clear()
        self.fifo.clear()
        self.blocks = 0

    def _unpark(self, chain: ParkedChain) -> None:
        chain.alive = False
        self.blocks -= len(chain.external_keys)
        for ext in chain.external_keys:
            if self.by_external.get(ext) is chain:
                del self.by_external[ext]
