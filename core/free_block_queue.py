"""KV-cache blocks and vLLM's free-block queue (eviction order of free blocks)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable, Sequence

logger = logging.getLogger(__name__)


class KVCacheBlock:
    """One block of KV cache. ``block_hash`` is set while the block is cached."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"KVCacheBlock({self.block_id}, ref={self.ref_cnt}, hash={h})"


class FreeBlockQueue:
    """Free blocks in eviction order (head = next handed out), O(1) everywhere.

    vLLM uses a hand-made doubly linked list; an ``OrderedDict`` keyed by block id
    gives the same operations (pop head, remove from the middle, push at either end)
    in C.
    """

    def __init__(self, blocks: Iterable[KVCacheBlock]) -> None:
        self._q: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in blocks)

    def __len__(self) -> int:
        return len(self._q)

    def __contains__(self, block: KVCacheBlock) -> bool:
        return block.block_id in self._q

    def popleft(self) -> KVCacheBlock:
        return self._q.popitem(last=False)[1]

    def popleft_n(self, n: int) -> list[KVCacheBlock]:
        pop = self._q.popitem
        return [pop(last=False)[1] for _ in range(n)]

    def remove(self, block: KVCacheBlock) -> None:
        del self._q[block.block_id]

    def append_n(self, blocks: Sequence[KVCacheBlock]) -> None:
        for b in blocks:
            self._q[b.block_id] = b

    def prepend_n(self, blocks: Sequence[KVCacheBlock]) -> None:
        """Put ``blocks`` at the head, ``blocks[0]`` first."""
        q = self._q
        for b in reversed(blocks):
            q[b.block_id] = b
            q.move_to_end(b.block_id, last=False)

    def block_ids(self) -> list[int]:
        """Head to tail (for tests and debugging)."""
        return list(self._q)
