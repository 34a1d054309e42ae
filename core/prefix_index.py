"""The router's exact knowledge of every worker's GPU prefix cache, built from KV events.

Targets are ``WorkerKey(worker_id, dp_rank)``: one routable engine each. The index is keyed by
kvr's **own** block hash (``core/own_block_hash.py``), computed from each ``BlockStored``'s
``token_ids`` chained from the parent's own hash; the engine's *external* hash is kept only in a
per-target ``external → own`` map, to apply ``BlockRemoved`` and to find a later event's parent.

Data layout (why it is fast): every target owns a *slot* (a bit position); ``_holders`` maps an
own block hash to an int bitmask of the slots holding it. ``overlap`` walks the request's hashes
AND-ing masks until no slot remains: a few dict lookups and int ops per leading block, whatever
the fleet size (Python ints are arbitrary width, so 512 slots cost the same code path).

Semantics, pinned by ``tests/core/test_prefix_index.py``:

* Stores are idempotent (vLLM ``kv_cache_report_mode="full"`` re-reports cached blocks). If two
  external hashes map to one own hash on a target (e.g. the same prefix reported by two KV-cache
  groups under different hashes) the block stays until both are removed.
* ``BlockRemoved`` of an unknown external hash is counted, never an error (late or duplicate).
* Orphans — a ``BlockStored`` whose parent external hash is unknown. Its own hashes cannot be
  computed (an own hash depends on the whole prefix), so it is **parked**, keyed by the missing
  parent: when a block with that external hash is stored later (a reordered batch, a replayed
  gap), the parked chain is linked and inserted, recursively. While anything is parked the
  target's effective confidence is at least ``resyncing``. Parked chains expire after
  ``orphan_ttl_s`` and are bounded by ``max_orphan_blocks`` per target (oldest dropped first);
  drops are counted. A removal of a parked block marks it removed so a later link skips it.
  We chose parking over dropping (llm-d's behaviour, pitfall 10) because reorder and replay are
  normal on a lossy PUB/SUB plane, and over guessing (treating the chain as rooted) because a
  wrong own hash would only ever produce false hits.
* Offload and placeholder events (``medium`` other than GPU, ``block_size`` 0 or no tokens),
  events of non-full-attention KV-cache groups, and events whose ``block_size`` differs from the
  router's are ignored and counted (a block-size mismatch also logs a warning once per target).
* Tentative entries (predict-on-route): ``add_tentative`` marks a request's blocks as present on
  a target until ``expires_at``; they count in ``overlap`` like real blocks. A real store or
  removal of the same own hash on that target settles (deletes) the tentative entry, as does
  clearing or removing the target.

Confidence (``fresh | resyncing | stale``) is set by the router (gap, seq reset, heartbeat loss)
and read by the policy; the index only raises it to ``resyncing`` while orphans are parked.
"""

from __future__ import annotations

import enum
import heapq
import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from operator import itemgetter
from types import MappingProxyType
from typing import NamedTuple, cast

import msgspec
import numpy as np

from core.events import MEDIUM_GPU, AllBlocksCleared, BlockRemoved, BlockStored, ExternalBlockHash, KVEventBatch
from core.orphans import ParkedChain, ParkedChains
from core.own_block_hash import ROOT_PARENT_HASH, external_hash_key, own_hashes_of_event
from core.own_block_hash import request_block_hashes as request_block_hashes  # re-exported
from core.tentative import TentativeEntries

logger = logging.getLogger(__name__)

#: KV-cache-group kinds whose blocks a request's prefix can reuse; others (sliding window, mamba) are ignored.
INDEXED_SPEC_KINDS = frozenset({None, "full_attention"})

_U64 = 0xFFFFFFFFFFFFFFFF
DEFAULT_ORPHAN_TTL_S = 30.0
DEFAULT_MAX_ORPHAN_BLOCKS = 65_536
_MASK_KEYS_MAX = 4096  # distinct slot masks remembered by ``overlap`` (see ``_mask_keys``)
_BITWISE_DECODE_MAX = 16  # masks with more set bits are decoded with numpy


class WorkerKey(NamedTuple):
    """One routable target: an engine process and its data-parallel rank."""

    worker_id: str
    dp_rank: int = 0

    def __str__(self) -> str:
        return f"{self.worker_id}/{self.dp_rank}"


# Not enum.StrEnum: that changes str()/format() of a member from "Confidence.STALE" to "stale",
# which every log line and message formatting one would then print differently.
class Confidence(str, enum.Enum):  # noqa: UP042
    """How far the router trusts a target's index entries (ordered by severity)."""

    FRESH = "fresh"
    RESYNCING = "resyncing"  # a gap, reset or orphan is being repaired; entries may be missing
    STALE = "stale"  # events stopped (heartbeat lost, replay impossible); entries may be wrong


_SEVERITY = {Confidence.FRESH: 0, Confidence.RESYNCING: 1, Confidence.STALE: 2}


class SnapshotBlocks(msgspec.Struct, tag=True, frozen=True):
    """kvr's own event: blocks already resolved to own hashes (a dump, a Redis warm start).

    ``block_hashes`` are normalised external keys (``external_hash_key``), pairwise with
    ``own_hashes``. Applying it is exactly like the stores that produced it.
    """

    block_hashes: list[int]
    own_hashes: list[int]


@dataclass
class IndexDelta:
    """What an ``apply`` changed, for the Redis mirror (append-only collector)."""

    stored: list[tuple[WorkerKey, int, int]] = field(default_factory=list)  # (target, external, own)
    removed: list[tuple[WorkerKey, int, int]] = field(default_factory=list)
    cleared: list[WorkerKey] = field(default_factory=list)


@dataclass(eq=False)
class _Target:
    key: WorkerKey
    slot: int
    # ``1 << slot``, one int object: a block held by this target alone stores this very object as
    # its mask, so the overlap walk reads one hot object instead of a fresh int per block (one cold
    # read fewer per block of a 1 M-block index).
    bit: int
    external_to_own: dict[int, int] = field(default_factory=dict)
    # Own hashes held under >= 2 external hashes: own -> count. Absent means 1 (the common case).
    extra_refs: dict[int, int] = field(default_factory=dict)
    num_blocks: int = 0
    confidence: Confidence = Confidence.FRESH
    parked: ParkedChains = field(default_factory=ParkedChains)
    removal_groups: set[int] = field(default_factory=set)  # group_idx values of indexed stores
    warned_block_size: bool = False


def _decode_mask(mask: int) -> tuple[int, ...]:
    """The set bits of ``mask``, ascending."""
    if mask.bit_count() <= _BITWISE_DECODE_MAX:
        found = []
        while mask:
            low = mask & -mask
            found.append(low.bit_length() - 1)
            mask ^= low
        return tuple(found)
    # Many targets (a fleet sharing a system prompt): the set bits found in C, not one by one.
    bits = np.unpackbits(np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), dtype=np.uint8),
                         bitorder="little")
    return tuple(np.flatnonzero(bits).tolist())


class PrefixIndex:
    """Exact, event-driven prefix index over all targets. Pure: time comes in as ``now``."""

    def __init__(
        self,
        *,
        block_size: int,
        orphan_ttl_s: float = DEFAULT_ORPHAN_TTL_S,
        max_orphan_blocks: int = DEFAULT_MAX_ORPHAN_BLOCKS,
    ) -> None:
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.block_size = block_size
        self.orphan_ttl_s = orphan_ttl_s
        self.max_orphan_blocks = max_orphan_blocks
        self.counters: Counter[str] = Counter()
        self._targets: dict[WorkerKey, _Target] = {}
        self._slots: list[_Target | None] = []
        self._free_slots: list[int] = []
        # Slot bitmask -> its targets' keys (bit order), for ``overlap``'s answer: the same few
        # masks (a fleet sharing a system prompt, a prefix's replicas) recur on every request, and
        # decoding a mask bit by bit cost ~0.3 µs per target (300 of 512 targets share a system
        # prompt in ``kvr bench overhead``). Cleared whenever a slot changes hands, and when it
        # reaches ``_MASK_KEYS_MAX`` entries.
        self._mask_keys: dict[int, tuple[WorkerKey, ...]] = {}
        self._slot_keys: list[WorkerKey | None] = []  # slot -> its target's key (``_slots[i].key``)
        self._mask_slots: dict[int, tuple[int, ...]] = {}  # slot mask -> its set bits (``mask_slots``)
        self._holders: dict[int, int] = {}  # own hash -> bitmask of slots
        # Tentative (predict-on-route) entries: own -> {slot: expires_at}, and own -> mask.
        self._tentative = TentativeEntries()
        #: Bumped whenever any target's effective confidence may have changed (callers cache on it).
        self.confidence_version = 0

    # ------------------------------------------------------------------ targets

    def add_target(self, target: WorkerKey) -> None:
        """Register a target (idempotent); ``apply`` registers unknown targets itself."""
        self._target(target)

    def _target(self, target: WorkerKey) -> _Target:
        state = self._targets.get(target)
        if state is None:
            slot = heapq.heappop(self._free_slots) if self._free_slots else len(self._slots)
            if slot == len(self._slots):
                self._slots.append(None)
                self._slot_keys.append(None)
            state = _Target(key=target, slot=slot, bit=1 << slot)
            self._slots[slot] = state
            self._slot_keys[slot] = target
            self._targets[target] = state
            self._mask_keys.clear()
            self.confidence_version += 1
        return state

    def remove_target(self, target: WorkerKey) -> None:
        """Forget a target entirely (worker dead or gone). Unknown targets are ignored."""
        state = self._targets.get(target)
        if state is None:
            return
        self._clear(state, None)
        self.confidence_version += 1
        del self._targets[target]
        self._slots[state.slot] = None
        self._slot_keys[state.slot] = None
        self._mask_keys.clear()
        heapq.heappush(self._free_slots, state.slot)

    def clear_target(self, target: WorkerKey, *, delta: IndexDelta | None = None) -> None:
        """Drop every block (and parked orphan, and tentative entry) of a target; keep it registered."""
        state = self._targets.get(target)
        if state is not None:
            self._clear(state, delta)

    def targets(self) -> list[WorkerKey]:
        return sorted(self._targets)

    def __contains__(self, target: object) -> bool:
        return target in self._targets

    # ------------------------------------------------------------------ confidence

    def set_confidence(self, target: WorkerKey, confidence: Confidence) -> None:
        state = self._target(target)
        confidence = Confidence(confidence)
        if state.confidence is not confidence:
            state.confidence = confidence
            self.confidence_version += 1

    def confidence(self, target: WorkerKey) -> Confidence:
        """The router's confidence, raised to ``resyncing`` while orphans are parked."""
        state = self._targets.get(target)
        if state is None:
            return Confidence.STALE
        if state.parked.blocks and _SEVERITY[state.confidence] < _SEVERITY[Confidence.RESYNCING]:
            return Confidence.RESYNCING
        return state.confidence

    # ------------------------------------------------------------------ counts

    def num_blocks(self, target: WorkerKey) -> int:
        state = self._targets.get(target)
        return state.num_blocks if state else 0

    def total_blocks(self) -> int:
        """Indexed (target, block) pairs over all targets."""
        return sum(s.num_blocks for s in self._targets.values())

    def num_unique_blocks(self) -> int:
        return len(self._holders)

    def orphan_blocks(self, target: WorkerKey) -> int:
        state = self._targets.get(target)
        return state.parked.blocks if state else 0

    def holders(self, own_hash: int) -> list[WorkerKey]:
        """Targets that really hold a block (tentative entries excluded)."""
        return self._mask_targets(self._holders.get(own_hash, 0))

    # ------------------------------------------------------------------ events

    def apply_batch(self, worker_id: str, batch: KVEventBatch, *, now: float, delta: IndexDelta | None = None) -> None:
        """Apply every event of one published batch to ``(worker_id, batch.data_parallel_rank)``."""
        self.apply_events(WorkerKey(worker_id, batch.data_parallel_rank or 0), batch.events, now=now, delta=delta)

    def apply(self, target: WorkerKey, event: object, *, now: float, delta: IndexDelta | None = None) -> None:
        """Apply one KV event (or a ``SnapshotBlocks``) to a target. Never raises on bad input."""
        self._apply(self._target(target), event, now, delta)

    def apply_events(self, target: WorkerKey, events: Sequence[object], *, now: float,
                     delta: IndexDelta | None = None) -> None:
        """``apply`` each event in order, looking the target up once (the ingest path: a batch at a time).

        vLLM evicts one hash per ``BlockRemoved``, so most events of a busy engine's batch are
        removals of one block: they are applied inline in one loop (``_apply_run``, which
        ``_on_removed`` runs too), its locals set up once per batch and its counters added once,
        which is most of the ingest cost saved. Everything else, and every removal while orphans
        are parked, goes through ``_apply``.
        """
        self._apply_run(self._target(target), events, now, delta)

    def _apply_run(self, state: _Target, events: Sequence[object], now: float, delta: IndexDelta | None, *,
                   removals_only: bool = False) -> None:
        """``apply_events``' loop. ``removals_only``: every event is a ``BlockRemoved`` to apply here
        whatever is parked (``_on_removed``: ``_apply`` expired the orphans already)."""
        parked = state.parked
        ext_map, holders, extra_refs = state.external_to_own, self._holders, state.extra_refs
        tentative, tslots, slot, keep = self._tentative, self._tentative.slots, state.slot, ~state.bit
        removal_groups, key = state.removal_groups, state.key
        stored_removed = delta.removed if delta is not None else None
        removed = blocks_left = 0
        for event in events:
            if not removals_only and (type(event) is not BlockRemoved or parked.fifo):
                if blocks_left:  # (``_clear`` sets num_blocks: settle first)
                    state.num_blocks -= blocks_left
                    blocks_left = 0
                self._apply(state, event, now, delta)
                continue
            ev: BlockRemoved = event  # type: ignore[assignment]  # (not cast(): a call per event)
            if ev.medium not in (None, MEDIUM_GPU):
                self.counters["ignored_offload"] += 1
                continue
            group_idx = ev.group_idx
            if group_idx is not None and removal_groups and group_idx not in removal_groups:
                self.counters["ignored_group"] += 1
                continue
            for h in ev.block_hashes:
                if type(h) is int:
                    ext = h & _U64
                else:
                    try:
                        ext = external_hash_key(h)
                    except (TypeError, AttributeError):
                        self.counters["malformed"] += 1
                        continue
                own = ext_map.pop(ext, None)
                if own is None:
                    if parked.mark_removed(ext):
                        self.counters["removed_parked"] += 1
                    else:
                        self.counters["removed_unknown"] += 1
                    continue
                removed += 1
                if extra_refs and own in extra_refs:
                    self._release(state, own)
                else:
                    mask = holders.get(own, 0) & keep
                    if mask:
                        holders[own] = mask
                    else:
                        holders.pop(own, None)
                    blocks_left += 1
                    if tslots:
                        tentative.drop(own, slot)
                if stored_removed is not None:
                    stored_removed.append((key, ext, own))
        if blocks_left:
            state.num_blocks -= blocks_left
        if removed:
            self.counters["removed_blocks"] += removed

    def _apply(self, state: _Target, event: object, now: float, delta: IndexDelta | None) -> None:
        if state.parked.fifo:
            self._expire_orphans(state, now)
        # Exact types first (the decoder's structs); isinstance keeps subclasses working.
        if type(event) is BlockRemoved:  # the commonest: vLLM evicts one hash per event
            self._on_removed(state, event, delta)
        elif type(event) is BlockStored:
            self._on_stored(state, event, now, delta)
        elif isinstance(event, BlockStored):
            self._on_stored(state, event, now, delta)
        elif isinstance(event, BlockRemoved):
            self._on_removed(state, event, delta)
        elif isinstance(event, AllBlocksCleared):
            self.counters["clears"] += 1
            self._clear(state, delta)
        elif isinstance(event, SnapshotBlocks):
            if len(event.block_hashes) != len(event.own_hashes):
                self.counters["malformed"] += 1
                logger.warning("%s: snapshot with %d external and %d own hashes ignored", state.key,
                               len(event.block_hashes), len(event.own_hashes))
                return
            for ext, own in zip(event.block_hashes, event.own_hashes, strict=True):  # lengths checked above
                self._insert(state, ext, own, delta, now)
        else:
            self.counters["unknown_event"] += 1
            logger.warning("%s: unknown event type %s ignored", state.key, type(event).__name__)

    def _on_stored(self, state: _Target, ev: BlockStored, now: float, delta: IndexDelta | None) -> None:
        n = len(ev.block_hashes)
        if ev.medium not in (None, MEDIUM_GPU) or ev.block_size == 0 or not ev.token_ids or n == 0:
            self.counters["ignored_offload"] += 1
            return
        if ev.kv_cache_spec_kind not in INDEXED_SPEC_KINDS:
            self.counters["ignored_group"] += 1
            return
        if ev.block_size != self.block_size:
            self.counters["block_size_mismatch"] += 1
            if not state.warned_block_size:
                state.warned_block_size = True
                logger.warning("%s publishes block_size %d but the router uses %d: its events are ignored",
                               state.key, ev.block_size, self.block_size)
            return
        if len(ev.token_ids) != n * self.block_size or (ev.extra_keys is not None and len(ev.extra_keys) != n):
            self.counters["malformed"] += 1
            logger.warning("%s: BlockStored with %d hashes, %d tokens, %s extra keys ignored", state.key, n,
                           len(ev.token_ids), None if ev.extra_keys is None else len(ev.extra_keys))
            return
        if ev.group_idx is not None:
            state.removal_groups.add(ev.group_idx)
        try:
            externals = [h & _U64 if type(h) is int else external_hash_key(h) for h in ev.block_hashes]
            parent_key = None if ev.parent_block_hash is None else external_hash_key(ev.parent_block_hash)
        except (TypeError, AttributeError):
            self.counters["malformed"] += 1
            return
        self.counters["stored_events"] += 1
        if parent_key is None:
            parent_own = ROOT_PARENT_HASH
        else:
            known = state.external_to_own.get(parent_key)
            if known is None:
                self._park(state, parent_key, externals, ev, now)
                return
            parent_own = known
        try:
            owns = own_hashes_of_event(ev.token_ids, ev.extra_keys, self.block_size, parent_own)
        except ValueError:
            self.counters["malformed"] += 1
            logger.warning("%s: BlockStored with invalid token ids ignored", state.key)
            return
        # One own hash per block: ``owns`` and ``externals`` have the n checked above.
        if state.parked.by_parent:
            for ext, own in zip(externals, owns, strict=True):
                self._insert(state, ext, own, delta, now)
            return
        # Fast path of _insert (no parked orphans can be waiting): same effects, fewer calls.
        ext_map, holders, bit, slot = state.external_to_own, self._holders, state.bit, state.slot
        tentative = self._tentative
        tslots, tmasks = tentative.slots, tentative.masks
        key = state.key
        record = delta.stored.append if delta is not None else None
        added = duplicates = new_blocks = 0
        for ext, own in zip(externals, owns, strict=True):
            previous = ext_map.get(ext)
            if previous == own:
                duplicates += 1
            elif previous is not None:
                self._insert(state, ext, own, delta, now)
                continue
            else:
                ext_map[ext] = own
                mask = holders.get(own, 0)
                if mask & bit:
                    state.extra_refs[own] = state.extra_refs.get(own, 1) + 1
                else:
                    holders[own] = mask | bit if mask else bit  # see _Target.bit
                    new_blocks += 1
                added += 1
                if record is not None:
                    record((key, ext, own))
            if tslots and tmasks.get(own, 0) & bit:  # this target predicted it: settled
                tentative.drop(own, slot)
        state.num_blocks += new_blocks  # (``_insert`` above counts its own: the sum is the same)
        if added:
            self.counters["stored_blocks"] += added
        if duplicates:
            self.counters["stored_duplicate"] += duplicates

    def _on_removed(self, state: _Target, ev: BlockRemoved, delta: IndexDelta | None) -> None:
        self._apply_run(state, (ev,), 0.0, delta, removals_only=True)  # (removals never read ``now``)

    # ------------------------------------------------------------------ core mutations

    def _insert(self, state: _Target, ext: int, own: int, delta: IndexDelta | None, now: float) -> None:
        """Map ``ext → own`` on a target, set its bit, settle tentative entries, link waiting orphans."""
        previous = state.external_to_own.get(ext)
        if previous == own:
            self.counters["stored_duplicate"] += 1
        else:
            if previous is not None:  # the engine reused an external hash for another prefix
                self.counters["stored_remapped"] += 1
                self._release(state, previous)
            state.external_to_own[ext] = own
            mask = self._holders.get(own, 0)
            if mask & state.bit:
                state.extra_refs[own] = state.extra_refs.get(own, 1) + 1
            else:
                self._holders[own] = mask | state.bit if mask else state.bit
                state.num_blocks += 1
            self.counters["stored_blocks"] += 1
            if delta is not None:
                delta.stored.append((state.key, ext, own))
        if self._tentative:
            self._tentative.drop(own, state.slot)
        if state.parked.by_parent:
            children = state.parked.take_children(ext)
            if children:
                self.confidence_version += 1
                for chain in children:
                    self._link(state, chain, own, delta, now)

    def _release(self, state: _Target, own: int) -> None:
        """One external hash of ``own`` left the target; clear its bit when it was the last one."""
        refs = state.extra_refs.get(own)
        if refs is not None:
            if refs <= 2:
                del state.extra_refs[own]
            else:
                state.extra_refs[own] = refs - 1
        else:
            mask = self._holders.get(own, 0) & ~state.bit
            if mask:
                self._holders[own] = mask
            else:
                self._holders.pop(own, None)
            state.num_blocks -= 1
        if self._tentative:
            self._tentative.drop(own, state.slot)

    def _clear(self, state: _Target, delta: IndexDelta | None) -> None:
        bit = state.bit
        holders = self._holders
        for own in set(state.external_to_own.values()):
            mask = holders.get(own, 0) & ~bit
            if mask:
                holders[own] = mask
            else:
                holders.pop(own, None)
        state.external_to_own.clear()
        state.extra_refs.clear()
        state.num_blocks = 0
        if state.parked.blocks:
            self.confidence_version += 1
        state.parked.clear()
        if self._tentative:
            self._tentative.drop_slot(state.slot)
        if delta is not None:
            delta.cleared.append(state.key)

    # ------------------------------------------------------------------ orphans

    def _park(self, state: _Target, parent_key: int, externals: list[int], ev: BlockStored, now: float) -> None:
        state.parked.park(ParkedChain(parent_key, externals, list(ev.token_ids), ev.extra_keys, now))
        self.confidence_version += 1
        self.counters["orphan_events"] += 1
        self.counters["orphan_blocks"] += len(externals)
        logger.debug("%s: parked %d blocks whose parent %#x is unknown", state.key, len(externals), parent_key)
        self._expire_orphans(state, now)

    def _link(self, state: _Target, chain: ParkedChain, parent_own: int, delta: IndexDelta | None, now: float) -> None:
        try:
            owns = own_hashes_of_event(chain.token_ids, chain.extra_keys, self.block_size, parent_own)
        except ValueError:
            self.counters["malformed"] += 1
            return
        linked = 0
        for ext, own in zip(chain.external_keys, owns, strict=True):  # parked only once checked
            if ext in chain.removed:
                continue
            linked += 1
            self._insert(state, ext, own, delta, now)
        self.counters["orphan_blocks_linked"] += linked

    def _expire_orphans(self, state: _Target, now: float) -> None:
        had = state.parked.blocks
        dropped = state.parked.expire(now, self.orphan_ttl_s, self.max_orphan_blocks)
        if dropped:
            self.counters["orphan_blocks_dropped"] += dropped
        if had and not state.parked.blocks:
            self.confidence_version += 1

    def expire(self, now: float) -> None:
        """Drop expired tentative entries and parked orphans everywhere (call periodically)."""
        self.expire_tentative(now)
        for state in self._targets.values():
            if state.parked.fifo:
                self._expire_orphans(state, now)

    # ------------------------------------------------------------------ tentative (predict-on-route)

    def add_tentative(self, target: WorkerKey, own_hashes: Sequence[int], expires_at: float) -> None:
        """Count ``own_hashes`` as present on ``target`` until ``expires_at`` (or settled by an event)."""
        state = self._target(target)
        # Blocks really present already need no prediction.
        self._tentative.add(state.slot, own_hashes, expires_at, held=self._holders)

    def expire_tentative(self, now: float) -> None:
        self._tentative.expire(now)

    def num_tentative(self) -> int:
        """Tentative (target, block) entries currently held."""
        return len(self._tentative)

    # ------------------------------------------------------------------ queries

    def overlap(self, own_hashes: Sequence[int], *, now: float | None = None) -> dict[WorkerKey, int]:
        """Leading blocks of a request each target holds (real or tentative); absent targets hold 0.

        ``now`` first expires tentative entries (pass it on the routing path).
        """
        out: dict[WorkerKey, int] = {}
        for mask, blocks in self.overlap_masks(own_hashes, now=now):
            self._record(out, mask, blocks)
        return out

    def overlap_masks(self, own_hashes: Sequence[int], *, now: float | None = None) -> list[tuple[int, int]]:
        """``overlap`` as ``(slot mask, blocks)`` pairs: the targets of each mask hold ``blocks``.

        Masks are disjoint and ``blocks`` > 0; ``slot_of`` and ``mask_slots`` read them. (The
        router turns them into a column of its candidates without a step per target.)
        """
        if now is not None:
            due = self._tentative.next_expiry()
            if due is not None and due <= now:
                self._tentative.expire(now)
        if not own_hashes:
            return []
        get = self._holders.get
        tget = self._tentative.masks.get
        first = own_hashes[0]
        active = get(first, 0) | tget(first, 0)
        if not active:
            return []
        out: list[tuple[int, int]] = []
        n = len(own_hashes)
        # The walk is memory-bound (a cold dict entry per block of a 1 M-block index), so the
        # holders of a chunk of blocks are looked up in C (``map``), where the CPU overlaps the
        # cache misses of successive lookups; chunks double (16, 32, 64, ...) so that a prompt
        # whose match ends early looks up few blocks past the end. The tentative masks are looked
        # up only where the real holders do not already cover every active slot (a follow-up's
        # long hit on its own worker never needs them).
        start, size = 1, 16
        while start < n:
            end = min(start + size, n)
            for i, real in enumerate(map(get, own_hashes[start:end], repeat(0)), start):
                if (real & active) != active:
                    nxt = active & (real | tget(own_hashes[i], 0))
                    if nxt != active:
                        out.append((active & ~nxt, i))
                        active = nxt
                        if not active:
                            return out
            start, size = end, size * 2
        out.append((active, n))
        return out

    def slot_of(self, target: WorkerKey) -> int:
        """The bit position of a target in ``overlap_masks``'s masks (registers unknown targets)."""
        return self._target(target).slot

    def mask_slots(self, mask: int) -> tuple[int, ...]:
        """The slots (bit positions) of a mask, ascending.

        Remembered per mask (a pure function of it, whoever holds the slots): the same few masks
        recur on every request (a system prompt's holders), and decoding one of 300 bits cost ~6 µs.
        """
        found = self._mask_slots.get(mask)
        if found is None:
            if len(self._mask_slots) >= _MASK_KEYS_MAX:
                self._mask_slots.clear()
            found = self._mask_slots[mask] = _decode_mask(mask)
        return found

    def _record(self, out: dict[WorkerKey, int], mask: int, blocks: int) -> None:
        """``out[target] = blocks`` for every target of ``mask``."""
        keys = self._mask_keys.get(mask)
        if keys is None:
            if len(self._mask_keys) >= _MASK_KEYS_MAX:
                self._mask_keys.clear()
            keys = self._mask_keys[mask] = self._keys_of_mask(mask)
        if len(keys) == 1:
            out[keys[0]] = blocks
        else:
            out.update(dict.fromkeys(keys, blocks))

    def _keys_of_mask(self, mask: int) -> tuple[WorkerKey, ...]:
        """The targets of a slot mask, in slot order."""
        slots = self.mask_slots(mask)
        keys = (self._slot_keys[slots[0]],) if len(slots) == 1 else itemgetter(*slots)(self._slot_keys)
        return cast("tuple[WorkerKey, ...]", keys)  # a mask's slots are all held

    def _mask_targets(self, mask: int) -> list[WorkerKey]:
        out = []
        while mask:
            low = mask & -mask
            out.append(cast("_Target", self._slots[low.bit_length() - 1]).key)  # a mask's slots are all held
            mask ^= low
        return sorted(out)

    # ------------------------------------------------------------------ snapshots

    def external_map(self, target: WorkerKey) -> Mapping[int, int]:
        """A target's external key → own hash map as it is now (a live view: read, never write)."""
        state = self._targets.get(target)
        return MappingProxyType(state.external_to_own) if state else MappingProxyType({})

    def own_of(self, target: WorkerKey, ext: int) -> int | None:
        """The own hash a target's external hash maps to now, or None when it is not indexed."""
        return self.external_map(target).get(ext)

    def snapshot(self, target: WorkerKey) -> list[tuple[int, int]]:
        """``(external key, own hash)`` of every indexed block of a target, sorted."""
        state = self._targets.get(target)
        return sorted(state.external_to_own.items()) if state else []

    def dump_events(self, target: WorkerKey) -> list[object]:
        """A target's state as events: applying them to an empty index restores it exactly.

        One ``SnapshotBlocks`` with the indexed blocks, then every live parked orphan as the
        ``BlockStored`` it arrived as (Dynamo's dump idea: restore goes through ``apply``).
        """
        state = self._targets.get(target)
        if state is None:
            return []
        pairs = sorted(state.external_to_own.items())
        events: list[object] = [SnapshotBlocks([e for e, _ in pairs], [o for _, o in pairs])]
        for orphan in state.parked.live():
            # A parked block removed before its parent arrived stays in the chain (the hashes
            # after it need its tokens) and its removal is re-sent right after.
            events.append(_orphan_event(orphan, self.block_size))
            removed: list[ExternalBlockHash] = [e for e in orphan.external_keys if e in orphan.removed]
            if removed:
                events.append(BlockRemoved(block_hashes=removed, medium=MEDIUM_GPU))
        return events


def _orphan_event(orphan: ParkedChain, block_size: int) -> BlockStored:
    return BlockStored(block_hashes=list(orphan.external_keys), parent_block_hash=orphan.parent_key,
                       token_ids=list(orphan.token_ids), block_size=block_size, lora_id=None,
                       medium=MEDIUM_GPU, lora_name=None, extra_keys=orphan.extra_keys)
