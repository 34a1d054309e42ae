"""Engine and block-pool speed (``kvr bench engine``): how much wall CPU emulation costs.

* **engine**: ``batch`` requests of ``prompt_tokens`` (distinct prompts) and ``output_tokens``
  each, run to completion on the pure engine as fast as the CPU allows (no clock).
  Reports emulated tokens (prefill + decode) per wall second and the *CPU share at a
  speedup*: wall seconds spent per emulated second, × speedup. A live worker at
  ``--speedup X`` keeps up while that share is below 1; N workers on C cores need it
  below C / N (8 workers on 2 cores: 0.25).
* **block pool**: request lifecycles on a warm pool (lookup, allocate, free) with half the
  prompts sharing a prefix; reports lifecycles/s and block operations/s (a block
  handed out, touched by a hit, or freed, each counts one).
"""

from __future__ import annotations

import logging
import random
import time
from typing import Any

from core.block_pool import BlockPool
from core.engine import EmulatedEngine, EngineRequest
from core.profiles import get_profile

logger = logging.getLogger(__name__)


def bench_engine(*, profile: str = "a100-80gb-8b", batch: int = 1, prompt_tokens: int = 512,
                 output_tokens: int = 256, seed: int = 0, speedup: float = 10.0) -> dict[str, Any]:
    """Run ``batch`` requests to completion; returns the figures (see the module docstring)."""
    eng = EmulatedEngine(profile_or_config=get_profile(profile), rng=random.Random(seed),
                         max_num_seqs=max(batch, 1), max_num_batched_tokens=max(8192, prompt_tokens))
    for i in range(batch):
        eng.add_request(EngineRequest(f"r{i}", [i] + [7] * (prompt_tokens - 1), max_tokens=output_tokens), 0.0)
    now = 0.0
    steps = prefill = decode = 0
    t0 = time.perf_counter()
    while eng.has_work():
        res = eng.step(now)
        eng.drain_events()
        now += res.duration_s
        steps += 1
        prefill += res.prefill_tokens
        decode += len(res.outputs)
    wall = time.perf_counter() - t0
    return {
        "suite": "engine", "profile": profile, "batch": batch, "prompt_tokens": prompt_tokens,
        "output_tokens": output_tokens, "steps": steps, "emulated_s": now, "wall_s": wall,
        "emulated_tokens_per_s": (prefill + decode) / wall, "decode_tokens_per_s": decode / wall,
        "steps_per_s": steps / wall, "wall_us_per_step": wall / steps * 1e6,
        "cpu_share_at_speedup": wall / now * speedup, "speedup": speedup,
    }


def bench_block_pool(*, requests: int = 20_000, prompt_tokens: int = 512, num_blocks: int = 4096,
                     block_size: int = 16, seed: int = 0) -> dict[str, Any]:
    """Request lifecycles on one pool (hashing done beforehand, timed separately)."""
    rng = random.Random(seed)
    pool = BlockPool(num_blocks=num_blocks, block_size=block_size)
    shared = [rng.randrange(50_000) for _ in range(prompt_tokens // 2)]
    prompts = []
    for i in range(requests):
        head = shared if i % 2 else [rng.randrange(50_000) for _ in range(prompt_tokens // 2)]
        prompts.append(head + [rng.randrange(50_000) for _ in range(prompt_tokens - len(head))])
    t0 = time.perf_counter()
    seqs = [pool.new_sequence(f"r{i}", p) for i, p in enumerate(prompts)]
    hash_wall = time.perf_counter() - t0
    ops = 0
    live: list = []
    t0 = time.perf_counter()
    for seq in seqs:
        hits, n_hit = pool.get_computed_blocks(seq)
        new = pool.allocate_slots(seq, seq.num_tokens - n_hit, num_new_computed_tokens=n_hit, new_computed_blocks=hits)
        while new is None:  # make room: free the oldest live request
            old = live.pop(0)
            ops += len(old.blocks)
            pool.free(old)
            new = pool.allocate_slots(seq, seq.num_tokens - n_hit, num_new_computed_tokens=n_hit,
                                      new_computed_blocks=hits)
        ops += len(new) + len(hits)
        live.append(seq)
        if len(live) > 4:
            old = live.pop(0)
            ops += len(old.blocks)
            pool.free(old)
        pool.drain_events()
    wall = time.perf_counter() - t0
    return {
        "suite": "block_pool", "requests": requests, "prompt_tokens": prompt_tokens, "num_blocks": num_blocks,
        "wall_s": wall, "lifecycles_per_s": requests / wall, "block_ops_per_s": ops / wall,
        "hash_blocks_per_s": requests * (prompt_tokens // block_size) / hash_wall,
        "hit_rate": pool.stats.hits_tokens / pool.stats.queries_tokens, "evictions": pool.stats.evicted_blocks,
    }
