"""Mooncake JSONL traces (``timestamp`` ms, ``input_length``, ``output_length``, ``hash_ids``).

Each hash id stands for ``trace_block_tokens`` (512 for Mooncake) prompt tokens;
ids are chained prefix hashes (an id always follows the same parent). Two
mappings onto the engine's ``block_size``-token blocks:

* **faithful**: id ``k`` expands to its own tokens ``k·T + i`` (i < T); the last id
  of a row contributes only ``input_length − T·(n − 1)`` tokens. The tokens of id
  k are the same wherever k appears, so equal ids give equal blocks, and since
  block hashes chain through the prefix, sharing is exactly the trace's.
* **compressed**: id ``k`` becomes one block of tokens ``k·B + i`` (i < B), so the
  prompt is ``B·len(hash_ids)`` tokens; output lengths shrink by the same factor
  ``B/T`` (at least 1 token) so the decode footprint keeps its proportion.

The request's kvr block hashes are computed from a per-(parent, id) memo, not
re-hashed per request: a million-block trace costs one hash per distinct block.
Malformed rows are counted and skipped, never fatal.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from core.blocks import DEFAULT_BLOCK_SIZE
from core.own_block_hash import ROOT_PARENT_HASH, block_hashes, hash_block
from sim.workload import SimRequest, Workload

logger = logging.getLogger(__name__)

MAPPINGS = ("faithful", "compressed")


@dataclass(frozen=True, slots=True)
class TraceRow:
    timestamp_ms: float
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...]


def read_mooncake(path: str | Path) -> tuple[list[TraceRow], int]:
    """Rows of a Mooncake JSONL file and the number of malformed lines skipped."""
    rows: list[TraceRow] = []
    bad = 0
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                row = TraceRow(float(d["timestamp"]), int(d["input_length"]), int(d["output_length"]),
                               tuple(int(h) for h in d["hash_ids"]))
                if row.input_length <= 0 or row.output_length < 0 or not row.hash_ids or min(row.hash_ids) < 0:
                    raise ValueError("non-positive length, empty or negative hash_ids")
            except (ValueError, KeyError, TypeError) as exc:
                bad += 1
                logger.warning("%s:%d: skipped malformed trace row (%s)", path, lineno, exc)
                continue
            rows.append(row)
    return rows, bad


class TraceWorkload(Workload):
    """A Mooncake trace as a workload with its own timestamps (seconds from the first row)."""

    def __init__(
        self,
        rows: list[TraceRow],
        *,
        mapping: str = "compressed",
        trace_block_tokens: int = 512,
        block_size: int = DEFAULT_BLOCK_SIZE,
        name: str = "trace",
        limit: int | None = None,
    ) -> None:
        super().__init__()
        if mapping not in MAPPINGS:
            raise ValueError(f"unknown trace mapping {mapping!r} ({', '.join(MAPPINGS)})")
        if trace_block_tokens % block_size:
            raise ValueError("trace_block_tokens must be a multiple of block_size")
        self.rows = rows[:limit] if limit is not None else rows
        self.mapping = mapping
        self.trace_block_tokens = trace_block_tokens
        self.block_size = block_size
        self.name = name
        self._t0_ms = self.rows[0].timestamp_ms if self.rows else 0.0
        # (parent kvr hash, trace id) -> kvr hashes of the id's blocks (one int when compressed)
        self._memo: dict[tuple[int, int], Any] = {}

    def num_roots(self) -> int:
        return len(self.rows)

    def root_arrival_s(self, i: int) -> float:
        return (self.rows[i].timestamp_ms - self._t0_ms) / 1000.0

    def root_requests(self, i: int) -> list[SimRequest]:
        row = self.rows[i]
        tokens, hashes = self.expand(row)
        return [SimRequest(f"{self.name}-{i}", tokens, self.output_tokens(row), block_hashes=hashes)]

    def output_tokens(self, row: TraceRow) -> int:
        if self.mapping == "faithful":
            return max(1, row.output_length)
        return max(1, math.ceil(row.output_length * self.block_size / self.trace_block_tokens))

    def prompt_tokens(self, row: TraceRow) -> int:
        """Prompt length after mapping."""
        if self.mapping == "faithful":
            return min(row.input_length, self.trace_block_tokens * len(row.hash_ids))
        return self.block_size * len(row.hash_ids)

    def longest_request_tokens(self) -> int:
        # No follow-ups. From the row lengths: expanding every row's tokens would not fit in memory.
        return max((self.prompt_tokens(r) + self.output_tokens(r) for r in self.rows), default=0)

    def engine_tokens(self, model_tokens: int) -> int:
        if self.mapping == "faithful":
            return model_tokens
        return model_tokens * self.block_size // self.trace_block_tokens

    def _id_tokens(self, k: int) -> list[int]:
        width = self.trace_block_tokens if self.mapping == "faithful" else self.block_size
        return list(range(k * width, (k + 1) * width))

    def expand(self, row: TraceRow, *, want_tokens: bool = True) -> tuple[list[int], list[int]]:
        """Token ids (empty unless ``want_tokens``) and kvr block hashes (full blocks) of one row."""
        if self.mapping == "compressed":
            return self._expand_compressed(row, want_tokens)
        n_tokens = self.prompt_tokens(row)
        tokens: list[int] = []
        hashes: list[int] = []
        parent = ROOT_PARENT_HASH
        done = 0
        width = self.trace_block_tokens if self.mapping == "faithful" else self.block_size
        for k in row.hash_ids:
            key = (parent, k)
            hs = self._memo.get(key)
            id_tokens = self._id_tokens(k) if (want_tokens or hs is None) else None
            if hs is None:
                hs = self._memo[key] = block_hashes(id_tokens, block_size=self.block_size, parent_hash=parent)
            take = min(width, n_tokens - done)
            done += take
            if want_tokens:
                tokens += id_tokens[:take]
            full = take // self.block_size
            hashes += hs[:full]
            if full < len(hs):
                break  # a partial id ends the prompt
            parent = hs[-1]
        return tokens, hashes

    def _expand_compressed(self, row: TraceRow, want_tokens: bool) -> tuple[list[int], list[int]]:
        # One id is one block: the memo holds a single hash per (parent, id).
        bs = self.block_size
        ids = row.hash_ids
        tokens = [t for k in ids for t in range(k * bs, (k + 1) * bs)] if want_tokens else []
        memo = self._memo
        hashes: list[int] = []
        parent = ROOT_PARENT_HASH
        for k in ids:
            key = (parent, k)
            h = memo.get(key)
            if h is None:
                h = memo[key] = hash_block(parent, range(k * bs, (k + 1) * bs))
            hashes.append(h)
            parent = h
        return tokens, hashes

    def block_hash_stream(self):
        """``(block_hashes, prompt_tokens)`` per row in order, for the upper bound."""
        for row in self.rows:
            _, hashes = self.expand(row, want_tokens=False)
            yield hashes, self.prompt_tokens(row)


def load_trace(path: str | Path, *, mapping: str = "compressed", trace_block_tokens: int = 512,
               block_size: int = DEFAULT_BLOCK_SIZE, limit: int | None = None) -> TraceWorkload:
    """Read ``path`` and wrap it as a workload named after the file."""
    rows, bad = read_mooncake(path)
    if bad:
        logger.warning("%s: %d malformed rows skipped", path, bad)
    name = Path(path).stem.replace("_trace", "")
    return TraceWorkload(rows, mapping=mapping, trace_block_tokens=trace_block_tokens, block_size=block_size, name=name,
                         limit=limit)
