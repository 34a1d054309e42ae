"""Realistic KV-event streams of a whole fleet, to fill a prefix index to a given size.

The shape follows vLLM's GPU block pool under a chat workload (``docs/workloads.md``):

* a fleet-wide set of system prompts (``system_blocks`` blocks each); a conversation starts with
  one of them; the first time a worker computes a system prompt it stores its blocks with no
  parent, later conversations on that worker reuse them (no event);
* every request stores its own new blocks (``suffix_blocks``) in one ``BlockStored`` chained to
  the last cached block by ``parent_block_hash``; a follow-up turn of a conversation chains to
  the previous turn's last block (multi-turn growth), as vLLM reports it;
* external block hashes are random uint64s (half above 2**63, like vLLM's), so the index must
  map them to its own hashes; ``extra_keys=[None]*n``, ``group_idx=0``, ``full_attention``;
* events of ``events_per_batch`` requests of one worker form one ``KVEventBatch`` (one engine step).

Nothing is evicted: the stream only grows the index, to exactly the requested number of
(target, block) pairs or just past it. :class:`FleetEvents` also keeps a bounded sample of the
conversations it created, from which :meth:`FleetEvents.requests` draws routing requests that
hit the index the way live traffic would (follow-ups: a long hit on one worker; new
conversations: the system prompt on many workers).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from core.events import BlockStored, KVEventBatch

VOCAB_SIZE = 151_936  # Qwen3's vocabulary: token ids are drawn below it


@dataclass
class Conversation:
    worker: int
    tokens: list[int]  # the whole prompt so far (system prompt + turns), full blocks only
    last_external: int  # external hash of its last stored block


class FleetEvents:
    """Event batches for ``n_workers`` workers, round-robin, until ``target_blocks`` are stored."""

    def __init__(
        self,
        *,
        n_workers: int,
        block_size: int = 16,
        seed: int = 0,
        n_system_prompts: int = 32,
        system_blocks: tuple[int, int] = (4, 32),
        suffix_blocks: tuple[int, int] = (4, 48),
        follow_up_prob: float = 0.5,
        max_conversation_blocks: int = 256,
        events_per_batch: int = 4,
        sample_size: int = 4096,
        record: bool = True,
    ) -> None:
        self.n_workers = n_workers
        self.block_size = block_size
        self.follow_up_prob = follow_up_prob
        self.suffix_blocks = suffix_blocks
        self.max_conversation_blocks = max_conversation_blocks
        self.events_per_batch = events_per_batch
        self.sample_size = sample_size
        self.record = record
        self._gen = np.random.default_rng(seed)
        self._rnd = random.Random(seed)
        self.system_prompts = [self._tokens(self._rnd.randint(*system_blocks)) for _ in range(n_system_prompts)]
        # Per worker: system prompt index -> external hash of its last block (once computed there).
        self._system_on: list[dict[int, int]] = [{} for _ in range(n_workers)]
        self._open: list[list[Conversation]] = [[] for _ in range(n_workers)]  # follow-up candidates
        self.sample: list[Conversation] = []
        self._seen = 0
        self.stored_blocks = 0
        self.batches = 0

    def _tokens(self, n_blocks: int) -> list[int]:
        return self._gen.integers(0, VOCAB_SIZE, size=n_blocks * self.block_size).tolist()

    def _externals(self, n: int) -> list[int]:
        return self._gen.integers(0, 2**64, size=n, dtype=np.uint64).tolist()

    def _stored(self, parent: int | None, tokens: list[int]) -> tuple[BlockStored, int]:
        n = len(tokens) // self.block_size
        ext = self._externals(n)
        self.stored_blocks += n
        return BlockStored(ext, parent, tokens, self.block_size, None, "GPU", None, [None] * n, 0,
                           "full_attention"), ext[-1]

    def _request_events(self, w: int) -> list[BlockStored]:
        rnd = self._rnd
        events = []
        open_ = self._open[w]
        new = self._tokens(rnd.randint(*self.suffix_blocks))
        if open_ and rnd.random() < self.follow_up_prob:
            conv = open_[rnd.randrange(len(open_))]
            ev, conv.last_external = self._stored(conv.last_external, new)
            conv.tokens = conv.tokens + new
            events.append(ev)
            if len(conv.tokens) // self.block_size >= self.max_conversation_blocks:
                open_.remove(conv)
            return events
        p = rnd.randrange(len(self.system_prompts))
        parent = self._system_on[w].get(p)
        if parent is None:
            ev, parent = self._stored(None, self.system_prompts[p])
            self._system_on[w][p] = parent
            events.append(ev)
        ev, last = self._stored(parent, new)
        events.append(ev)
        conv = Conversation(w, self.system_prompts[p] + new if self.record else [], last)
        if len(open_) >= 64:
            open_.pop(rnd.randrange(len(open_)))
        open_.append(conv)
        if self.record:
            self._reservoir(conv)
        return events

    def _reservoir(self, conv: Conversation) -> None:
        self._seen += 1
        if len(self.sample) < self.sample_size:
            self.sample.append(conv)
        else:
            j = self._rnd.randrange(self._seen)
            if j < self.sample_size:
                self.sample[j] = conv

    def batches_until(self, target_blocks: int) -> Iterator[tuple[int, KVEventBatch]]:
        """``(worker index, batch)`` round-robin over workers until ``target_blocks`` are stored."""
        w = 0
        while self.stored_blocks < target_blocks:
            events: list = []
            for _ in range(self.events_per_batch):
                events += self._request_events(w)
            self.batches += 1
            yield w, KVEventBatch(ts=float(self.batches), events=events, data_parallel_rank=None)
            w = (w + 1) % self.n_workers

    def requests(self, n: int, *, seed: int = 1, follow_up_share: float = 0.7,
                 tail_blocks: tuple[int, int] = (1, 16)) -> list[list[int]]:
        """``n`` prompts: follow-ups of sampled conversations, or new ones on a system prompt.

        Tails are fresh tokens plus a partial last block (so the last token is never cached).
        """
        if not self.sample:
            raise ValueError("no conversations recorded (record=False or nothing generated)")
        rnd = random.Random(seed)
        gen = np.random.default_rng(seed)
        out = []
        for _ in range(n):
            if rnd.random() < follow_up_share:
                head = self.sample[rnd.randrange(len(self.sample))].tokens
            else:
                head = self.system_prompts[rnd.randrange(len(self.system_prompts))]
            tail = gen.integers(0, VOCAB_SIZE, size=rnd.randint(*tail_blocks) * self.block_size + 7).tolist()
            out.append(head + tail)
        return out
