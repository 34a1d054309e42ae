"""SGLang router's ``cache_aware`` policy, faithful to its published rule.

Rule (``docs/anchors.md`` §2, ``sgl-model-gateway/src/policies/cache_aware.rs``):

1. Load = requests in flight *at this router*. The pool is imbalanced iff
   ``max − min > balance_abs_threshold`` (64) **and** ``max > balance_rel_threshold × min`` (1.5).
   Then: the least-loaded worker (first in order on ties, as ``min_by_key``).
2. Otherwise the longest prefix match in the approximate tree; with
   ``match_rate = matched / prompt`` above ``cache_threshold`` (0.3, strictly greater) the
   matched worker wins, else the least-loaded worker.
3. Every selection inserts the request into the chosen worker's branch of the tree (no
   correction afterwards). Every ``eviction_interval_s`` (120 s) each worker's branch is cut
   to ``max_tree_size_tokens`` by evicting least-recently-used entries, leaves first.

The tree is SGLang's own *approximation*: it is built from the requests this policy routed, never
from KV events, so the policy ignores ``WorkerState.overlap_blocks``. Adaptation: SGLang's HTTP
tree matches characters; kvr matches full blocks of token ids (its gRPC ``TokenTree`` works on
tokens, and chained block hashes are a radix tree with one node per block). Among the workers
holding the deepest matched node we take the most recently used one (SGLang takes an arbitrary
one).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

from core.policies.base import Decision, RouteRequest, WorkerState
from core.prefix_index import WorkerKey


class SglangCacheAwarePolicy:
    name = "sglang"

    def __init__(
        self,
        *,
        block_size: int = 16,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 120.0,
        max_tree_size_tokens: int = 2**26,
    ) -> None:
        self.block_size = block_size
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_blocks = max(1, max_tree_size_tokens // block_size)
        # own block hash -> {worker: (last access, depth)}; a chained hash names its whole prefix.
        self._tree: dict[int, dict[WorkerKey, tuple[float, int]]] = {}
        self._sizes: dict[WorkerKey, int] = {}
        self._next_eviction_s: float | None = None

    # ------------------------------------------------------------------ the approximate tree

    def match(self, block_hashes: Sequence[int]) -> tuple[int, dict[WorkerKey, tuple[float, int]]]:
        """Deepest matched node: (matched blocks, workers holding it)."""
        tree = self._tree
        matched = 0
        holders: dict[WorkerKey, tuple[float, int]] = {}
        for h in block_hashes:
            node = tree.get(h)
            if not node:
                break
            matched += 1
            holders = node
        return matched, holders

    def insert(self, block_hashes: Sequence[int], target: WorkerKey, now: float) -> None:
        tree = self._tree
        added = 0
        for depth, h in enumerate(block_hashes):
            node = tree.get(h)
            if node is None:
                node = tree[h] = {}
            if target not in node:
                added += 1
            node[target] = (now, depth)
        self._sizes[target] = self._sizes.get(target, 0) + added

    def tree_blocks(self, target: WorkerKey) -> int:
        return self._sizes.get(target, 0)

    def evict(self) -> None:
        """Cut every worker's branch to ``max_tree_blocks``: oldest first, deepest first on ties."""
        for target, size in list(self._sizes.items()):
            excess = size - self.max_tree_blocks
            if excess <= 0:
                continue
            entries = []
            for h, node in self._tree.items():
                seen = node.get(target)
                if seen is not None:
                    entries.append((seen[0], -seen[1], h))  # (last access, deeper first, hash)
            for _, _, h in heapq.nsmallest(excess, entries):
                node = self._tree[h]
                del node[target]
                if not node:
                    del self._tree[h]
            self._sizes[target] = size - excess

    def forget(self, target: WorkerKey) -> None:
        for h in [h for h, node in self._tree.items() if target in node]:
            node = self._tree[h]
            del node[target]
            if not node:
                del self._tree[h]
        self._sizes.pop(target, None)

    # ------------------------------------------------------------------ the rule

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        if self._next_eviction_s is None:
            self._next_eviction_s = now + self.eviction_interval_s
        elif now >= self._next_eviction_s:
            self.evict()
            self._next_eviction_s = now + self.eviction_interval_s
        loads = [w.load.in_flight for w in candidates]
        lo, hi = min(loads), max(loads)
        least = candidates[loads.index(lo)]
        hashes = request.block_hashes
        if hi - lo > self.balance_abs_threshold and hi > self.balance_rel_threshold * lo:
            chosen, reason = least, f"imbalanced (max {hi}, min {lo} in flight): least loaded"
            matched = 0
        else:
            live = {w.target: w for w in candidates}
            matched, holders = self.match(hashes)
            holders = {t: v for t, v in holders.items() if t in live}
            rate = matched * self.block_size / request.prompt_tokens if request.prompt_tokens else 0.0
            if holders and rate > self.cache_threshold:
                best = max(holders.items(), key=lambda kv: (kv[1][0], kv[0]))[0]
                chosen, reason = live[best], f"match rate {rate:.2f} > {self.cache_threshold} ({matched} blocks)"
            else:
                chosen, reason = least, f"match rate {rate:.2f} <= {self.cache_threshold}: least loaded"
        self.insert(hashes, chosen.target, now)
        scores = {w.target: float(w.load.in_flight) for w in candidates}
        return Decision(chosen.target, scores, reason, self.name, "in flight", chosen.overlap_blocks)
