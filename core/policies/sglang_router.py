"""A model of sglang-router 0.3.2's ``cache_aware`` policy as the released router behaves.

Follows ``sgl-project/sglang``, ``sgl-model-gateway/src/policies/cache_aware.rs`` (the selection)
and ``sgl-model-gateway/src/policies/tree.rs`` (the multi-tenant radix tree and its eviction), as
shipped in PyPI ``sglang-router`` 0.3.2: its ``router_args.py`` gives the defaults
(``cache_threshold`` 0.3, ``balance_abs_threshold`` 64, ``balance_rel_threshold`` 1.5,
``eviction_interval_secs`` 60, ``max_tree_size`` 2**26), and the wheel's own strings and symbols
(``Tree::prefix_match_with_counts``, ``last_tenant``, ``EPOCH_COUNTER``, per-tenant "Used size"
eviction logs) place it between the revisions read. Written from a reading of that source, not
translated from it; ``docs/peer-routers.md`` records the live 0.3.2 router doing the same (a low
match goes to the least-loaded worker, equal loads to the same one every time).

What the real router does, and so what this model does:

1. Load is the router's own count of requests in flight per worker (``Worker::load``), here
   ``WorkerLoad.in_flight``. The pool is imbalanced iff ``max − min > balance_abs_threshold``
   **and** ``max > balance_rel_threshold × min``; then the least-loaded worker takes the request
   (``min_by_key``: the first in worker order on ties) and its prompt is inserted for it.
2. Otherwise one walk down the tree finds the deepest node the prompt reaches (a partly matched
   edge counts its matched part) and the *one* tenant that node reports: the tenant it cached
   (a new leaf caches the worker that created it; a split keeps the edge's), or, once that worker
   no longer holds the node, the first in the node's map, cached from then on. ``match_rate =
   matched / prompt length``; above ``cache_threshold`` (strictly) that tenant wins, else the
   least-loaded worker does. The file's header comment says "smallest tree" here; the code, and
   so the router, falls back on load. A tenant that is not a candidate (gone, or excluded on a
   retry) sends the request to the first candidate, and nothing is inserted.
3. The prompt is inserted for the chosen worker: every node on its path holds that worker,
   edges split where the prompt diverges.
4. A background thread wakes every ``eviction_interval_s`` from the router's start and cuts every
   worker whose share of the tree exceeds ``max_tree_size`` down to it, least recently used
   leaves first (a node is a leaf for a worker when none of its children holds it); a node nobody
   holds is dropped. Access order is a global counter (``EPOCH_COUNTER``), not time: an insert
   stamps its path, and one walk in eight stamps the reported tenant on the node it ended on.

So the tree never hears of KV events, evictions or cache resets: it is built only from what this
policy routed, and ``WorkerState.overlap_blocks`` (the exact index's) plays no part in the choice.
Since a node keeps reporting its creator, a prefix every prompt shares (a system prompt worth more
than 30 % of the prompt) sends every prompt to the worker that saw it first, until the
imbalance rule spills the excess.

Adaptations, each chosen to keep the behaviour and not the mechanics:

* Tokens, not characters. The real tree stores request text one character per step; the
  simulator has token ids. The tree here is the same radix tree over token ids, so the match
  rate is in tokens (a ratio: ≈ the character ratio when tokens average the same length), and
  ``max_tree_size`` becomes ``max_tree_size_tokens`` = 2**26 characters / 4 characters per
  token = 2**24 tokens per worker. Partial blocks count: the real tree matches to the character,
  so the block size plays no part.
* "First in the node's map" is a DashMap's iteration order: arbitrary but fixed for a given set
  of tenants. Here each node orders its tenants by a hash salted with a number drawn from
  ``rng`` when the node is made: as arbitrary, as stable, and the same for the same seed.
* The real walk stamps when the global counter is a multiple of 8, and inserts advance the counter
  too; here every eighth walk stamps. Revisions differ on whether an insert re-stamps the inner
  nodes of its path; this one stamps the whole path. Both only order evictions, which at the
  default bound (16 M tokens per worker) a simulation rarely reaches.
* The timer is anchored at the first ``now`` the policy sees and runs lazily: a request at ``now``
  first applies the eviction the thread would have run since the last request. Between two
  requests the tree does not change, so one eviction stands for any number of missed ticks.
* The real router keeps one tree per model; LoRA adapters of one base model share it, as here
  (the adapter name is not part of the matched text).
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence

import xxhash

from core.policies.base import Decision, RouteRequest, WorkerState
from core.prefix_index import WorkerKey

#: sglang-router 0.3.2's ``max_tree_size`` default, in characters per worker.
SGLANG_MAX_TREE_SIZE_CHARS = 2**26
#: Characters per token of English BPE text: turns the real router's character bound into tokens.
CHARS_PER_TOKEN = 4
#: A match stamps the reported tenant's access on the node once in this many walks (the real tree
#: skips the rest to spare its maps' locks; approximate LRU is enough for eviction).
MATCH_TOUCH_EVERY = 8


class _Node:
    """One edge of the radix tree: ``label`` is the token run leading to it from ``parent``."""

    __slots__ = ("children", "label", "last_tenant", "parent", "salt", "tenants")

    def __init__(self, label: tuple[int, ...], parent: _Node | None, salt: int) -> None:
        self.label = label
        self.parent = parent
        self.salt = salt  # fixes the (arbitrary) order in which this node lists its tenants
        self.children: dict[int, _Node] = {}
        self.tenants: dict[WorkerKey, int] = {}  # worker -> epoch of its last access
        self.last_tenant: WorkerKey | None = None  # the real node's cached answer to a match


def _shared(label: tuple[int, ...], tokens: tuple[int, ...], start: int) -> int:
    """How many leading tokens of ``label`` equal ``tokens[start:]``."""
    n = len(label)
    if tokens[start:start + n] == label:
        return n
    k = 0
    end = min(n, len(tokens) - start)
    while k < end and label[k] == tokens[start + k]:
        k += 1
    return k


class SglangRouterPolicy:
    name = "sglang_router"

    def __init__(
        self,
        *,
        cache_threshold: float = 0.3,
        balance_abs_threshold: int = 64,
        balance_rel_threshold: float = 1.5,
        eviction_interval_s: float = 60.0,
        max_tree_size_tokens: int = SGLANG_MAX_TREE_SIZE_CHARS // CHARS_PER_TOKEN,
    ) -> None:
        if eviction_interval_s <= 0 or max_tree_size_tokens < 0:
            raise ValueError("sglang_router needs eviction_interval_s > 0 and max_tree_size_tokens >= 0")
        self.cache_threshold = cache_threshold
        self.balance_abs_threshold = balance_abs_threshold
        self.balance_rel_threshold = balance_rel_threshold
        self.eviction_interval_s = eviction_interval_s
        self.max_tree_size_tokens = max_tree_size_tokens
        self._root = _Node((), None, 0)
        self._sizes: dict[WorkerKey, int] = {}  # tokens of the tree each worker holds
        self._epoch = 0  # the real tree's global access counter: LRU order, not time
        self._walks = 0
        self._next_eviction_s: float | None = None
        self._salt_rng: random.Random | None = None  # drawn from the caller's rng on first use

    # ------------------------------------------------------------------ the radix tree

    def _next_epoch(self) -> int:
        self._epoch += 1
        return self._epoch

    def _salt(self) -> int:
        return self._salt_rng.getrandbits(64) if self._salt_rng is not None else 0

    @staticmethod
    def _first_in_map(node: _Node) -> WorkerKey:
        """The tenant a node's map lists first: fixed by its salt, arbitrary across nodes."""
        salt = node.salt
        return min(node.tenants, key=lambda t: (xxhash.xxh3_64_intdigest(
            f"{t.worker_id}/{t.dp_rank}".encode(), seed=salt), t))

    def _walk(self, tokens: tuple[int, ...]) -> tuple[int, _Node]:
        """Tokens matched and the node the walk ends on (a partly matched edge's node counts)."""
        node = self._root
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                break
            k = _shared(child.label, tokens, i)
            i += k
            node = child
            if k < len(child.label):
                break
        return i, node

    @classmethod
    def _tenant_of(cls, node: _Node) -> WorkerKey | None:
        """The tenant a match ending on ``node`` reports: the cached one while it still holds
        the node, else the first in the node's map."""
        if node.last_tenant is not None and node.last_tenant in node.tenants:
            return node.last_tenant
        return cls._first_in_map(node) if node.tenants else None

    def match(self, token_ids: Sequence[int]) -> tuple[int, WorkerKey | None]:
        """(tokens matched, the worker a match reports) for a prompt, changing nothing."""
        matched, node = self._walk(tuple(token_ids))
        return matched, self._tenant_of(node)

    def _route_match(self, tokens: tuple[int, ...]) -> tuple[int, WorkerKey | None]:
        """``match`` with the real walk's side effects: the node caches the tenant it reports,
        and every eighth walk stamps that tenant's access on the node."""
        matched, node = self._walk(tokens)
        tenant = self._tenant_of(node)
        self._walks += 1
        if tenant is not None:
            node.last_tenant = tenant
            if self._walks % MATCH_TOUCH_EVERY == 0:
                node.tenants[tenant] = self._next_epoch()
        return matched, tenant

    def insert(self, token_ids: Sequence[int], target: WorkerKey) -> None:
        """Record that ``target`` was sent this prompt: every node on its path holds it, stamped
        with one new epoch; a new leaf remembers ``target`` as the tenant it reports."""
        tokens = tuple(token_ids)
        epoch = self._next_epoch()
        sizes = self._sizes
        sizes.setdefault(target, 0)
        node = self._root
        i = 0
        while i < len(tokens):
            child = node.children.get(tokens[i])
            if child is None:
                leaf = _Node(tokens[i:], node, self._salt())
                leaf.tenants[target] = epoch
                leaf.last_tenant = target
                node.children[tokens[i]] = leaf
                sizes[target] += len(leaf.label)
                return
            k = _shared(child.label, tokens, i)
            if k < len(child.label):
                # Split: the shared run becomes a node of its own, holding (and reporting) what
                # the whole edge held.
                mid = _Node(child.label[:k], node, self._salt())
                mid.tenants = dict(child.tenants)
                mid.last_tenant = child.last_tenant
                child.label = child.label[k:]
                child.parent = mid
                mid.children[child.label[0]] = child
                node.children[tokens[i]] = mid
                child = mid
            if target not in child.tenants:
                sizes[target] += len(child.label)
            child.tenants[target] = epoch
            node = child
            i += k

    def tree_tokens(self, target: WorkerKey) -> int:
        """Tokens of the tree held by ``target`` (the real router's per-tenant character count)."""
        return self._sizes.get(target, 0)

    def _leaves_of(self, target: WorkerKey) -> list[tuple[int, int, _Node]]:
        """Nodes holding ``target`` where no child does, as (last access, order found, node)."""
        out: list[tuple[int, int, _Node]] = []
        stack = list(self._root.children.values())
        while stack:
            node = stack.pop()
            if target not in node.tenants:
                continue  # nothing below holds it either
            held_below = False
            for child in node.children.values():
                stack.append(child)
                held_below = held_below or target in child.tenants
            if not held_below:
                out.append((node.tenants[target], len(out), node))
        return out

    def _drop(self, node: _Node, target: WorkerKey) -> None:
        del node.tenants[target]
        if not node.tenants and not node.children and node.parent is not None:
            del node.parent.children[node.label[0]]

    def evict(self) -> None:
        """Cut every worker's share of the tree to ``max_tree_size_tokens``, LRU leaves first."""
        bound = self.max_tree_size_tokens
        for target in sorted(self._sizes):
            if self._sizes[target] <= bound:
                continue
            heap = self._leaves_of(target)
            found = len(heap)  # tie order of parents that become leaves
            heapq.heapify(heap)
            while heap and self._sizes[target] > bound:
                _, _, node = heapq.heappop(heap)
                self._drop(node, target)
                self._sizes[target] -= len(node.label)
                parent = node.parent
                if (parent is not None and parent is not self._root and target in parent.tenants
                        and not any(target in c.tenants for c in parent.children.values())):
                    heapq.heappush(heap, (parent.tenants[target], found, parent))
                    found += 1

    def forget(self, target: WorkerKey) -> None:
        """The worker left: remove it from every node (the real ``remove_tenant``)."""
        stack = [self._root]
        held: list[_Node] = []
        while stack:
            node = stack.pop()
            stack.extend(node.children.values())
            if target in node.tenants:
                held.append(node)
        for node in reversed(held):  # found parents first: drop the deeper ones first
            self._drop(node, target)
        self._sizes.pop(target, None)

    # ------------------------------------------------------------------ the rule

    def _tick(self, now: float) -> None:
        """Run the eviction the background thread would have run by ``now``."""
        if self._next_eviction_s is None:
            self._next_eviction_s = now + self.eviction_interval_s
            return
        if now >= self._next_eviction_s:
            self.evict()
            missed = int((now - self._next_eviction_s) // self.eviction_interval_s) + 1
            self._next_eviction_s += missed * self.eviction_interval_s

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        if self._salt_rng is None:
            self._salt_rng = random.Random(rng.getrandbits(64) if rng is not None else 0)
        self._tick(now)
        tokens = tuple(request.token_ids)
        loads = [w.load.in_flight for w in candidates]
        lo, hi = min(loads), max(loads)
        least = candidates[loads.index(lo)]
        scores = {w.target: float(w.load.in_flight) for w in candidates}
        if hi - lo > self.balance_abs_threshold and hi > lo * self.balance_rel_threshold:
            chosen, reason = least, f"imbalanced (max {hi}, min {lo} in flight): least loaded"
        else:
            matched, tenant = self._route_match(tokens)
            rate = matched / len(tokens) if tokens else 0.0
            live = {w.target: w for w in candidates}
            if rate <= self.cache_threshold:
                chosen, reason = least, f"tree match rate {rate:.2f} <= {self.cache_threshold}: least loaded"
            elif tenant is not None and tenant in live:
                chosen = live[tenant]
                reason = f"tree match rate {rate:.2f} > {self.cache_threshold} ({matched} tokens)"
            else:
                # The tree names a worker that cannot take it (gone, or excluded on a retry): the
                # real router falls back to the first healthy worker and records nothing.
                chosen = candidates[0]
                return Decision(chosen.target, scores, f"tree names {tenant}, not a candidate: first candidate",
                                self.name, "in flight", chosen.overlap_blocks)
        self.insert(tokens, chosen.target)
        return Decision(chosen.target, scores, reason, self.name, "in flight", chosen.overlap_blocks)
