"""Tentative index entries (predict-on-route): blocks a routed request will soon store.

Right after routing a request, its blocks are *predicted* present on the chosen target until
``expires_at``, so a burst of siblings follows the first one before the engine's ``BlockStored``
arrives (Dynamo's predicted-TTL side index, folded into the same bitmask lookup here).

Layout mirrors ``PrefixIndex``: ``masks[own]`` is the bitmask of slots predicting ``own``;
``slots[own]`` their expiries: a ``(slot, expires_at)`` tuple while one slot predicts ``own`` (the
common case; one tuple is shared by every block of one ``add``, so predicting a 200-block prompt
allocates no object per block), a ``{slot: expires_at}`` dict once several do. A heap of
``(expires_at, seq, slot, owns)`` drives expiry; an entry renewed later than a heap item is left
alone when that item pops.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import cast

#: One own hash's entries: ``(slot, expires_at)`` for one slot, ``{slot: expires_at}`` for several.
Entry = tuple[int, float] | dict[int, float]


class TentativeEntries:
    """(own hash, slot) → expiry, with a per-hash slot bitmask for ``overlap``."""

    def __init__(self) -> None:
        self.slots: dict[int, Entry] = {}
        self.masks: dict[int, int] = {}
        self._heap: list[tuple[float, int, int, tuple[int, ...]]] = []
        self._seq = 0

    def __bool__(self) -> bool:
        return bool(self.slots)

    def __len__(self) -> int:
        """Entries held: (target, block) pairs."""
        return sum(1 if type(e) is tuple else len(e) for e in self.slots.values())

    def entries(self) -> dict[tuple[int, int], float]:
        """Every entry as ``(own, slot) -> expires_at`` (tests, debugging)."""
        out: dict[tuple[int, int], float] = {}
        for own, entry in self.slots.items():
            if type(entry) is tuple:
                out[(own, entry[0])] = entry[1]
            else:
                for slot, expires_at in cast("dict[int, float]", entry).items():
                    out[(own, slot)] = expires_at
        return out

    def add(self, slot: int, owns: Iterable[int], expires_at: float, *, held: Mapping[int, int] | None = None) -> None:
        """Predict ``owns`` on ``slot`` until ``expires_at`` (an earlier expiry never shortens one).

        ``held`` (own hash → slot bitmask of real blocks) skips the hashes ``slot`` really holds:
        they need no prediction (filtered here, in one comprehension: this runs per prompt block on every route).
        """
        bit = 1 << slot
        table, masks = self.slots, self.masks
        table_get = table.get
        if held is not None:
            held_get = held.get
            added = tuple([own for own in owns if not held_get(own, 0) & bit])
        else:
            added = tuple(owns)
        single = (slot, expires_at)
        for own in added:
            entry = table_get(own)
            if entry is None:
                table[own] = single
                masks[own] = bit
            elif type(entry) is tuple:
                if entry[0] != slot:
                    table[own] = {entry[0]: entry[1], slot: expires_at}
                    masks[own] |= bit
                elif entry[1] < expires_at:
                    table[own] = single
            else:
                several = cast("dict[int, float]", entry)
                previous = several.get(slot)
                if previous is None:
                    several[slot] = expires_at
                    masks[own] |= bit
                elif previous < expires_at:
                    several[slot] = expires_at
        if added:
            self._seq += 1
            heapq.heappush(self._heap, (expires_at, self._seq, slot, added))

    def next_expiry(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def expire(self, now: float) -> None:
        heap = self._heap
        table, masks = self.slots, self.masks
        table_get = table.get
        while heap and heap[0][0] <= now:
            _, _, slot, owns = heapq.heappop(heap)
            keep = ~(1 << slot)
            # ``drop`` inline: this runs on the routing path, once per block of a request routed
            # ``tentative_window_s`` ago.
            for own in owns:
                entry = table_get(own)
                if entry is None:
                    continue
                if type(entry) is tuple:
                    if entry[0] == slot and entry[1] <= now:
                        del table[own]
                        del masks[own]
                    continue
                several = cast("dict[int, float]", entry)
                expires_at = several.get(slot)
                if expires_at is not None and expires_at <= now:
                    del several[slot]
                    if several:
                        masks[own] &= keep
                    else:
                        del table[own]
                        del masks[own]

    def drop(self, own: int, slot: int) -> None:
        """Settle one entry (a real event arrived, or it expired)."""
        entry = self.slots.get(own)
        if entry is None:
            return
        if type(entry) is tuple:
            if entry[0] == slot:
                del self.slots[own]
                del self.masks[own]
            return
        several = cast("dict[int, float]", entry)
        if slot not in several:
            return
        del several[slot]
        if several:
            self.masks[own] &= ~(1 << slot)
        else:
            del self.slots[own]
            del self.masks[own]

    def drop_slot(self, slot: int) -> None:
        """Every entry of one slot (its target was cleared or removed)."""
        bit = 1 << slot
        for own in [o for o, mask in self.masks.items() if mask & bit]:
            self.drop(own, slot)
