"""A lying worker for the fault suite (``lying_worker`` in bench/faults.py): a real ``kvr worker``
process that, once told to, claims prefixes it does not hold.

Run as ``python -m cli._liar CLAIMS_FILE <kvr's global options> worker <kvr worker options>`` (the
entry point is in cli/: it runs kvr's own command line, which bench/ may not import).
Until ``CLAIMS_FILE`` exists it is an ordinary emulated worker. When the file appears (JSON: a
list of prompts, each a list of token ids) the worker, on its own loop thread:

* stops caching: its prefix cache is reset (published truthfully as ``AllBlocksCleared``) and
  its block pool caches nothing from then on, so every request it serves reports 0 cached tokens
  (what an engine that holds none of the claimed blocks reports);
* publishes, every ``CLAIM_PERIOD_S``, one ``BlockStored`` per prompt covering its full blocks,
  rooted (no parent), with made-up external hashes: "I hold every one of these prefixes".

The claims go out through the worker's own publisher (same socket, same seq numbers, same replay
ring), so the router has no way to tell them from true events: only the closed loop (what the
worker reports against what the router predicted, core/trust.py) can catch it. A fault injector,
so it reaches into the runner and the engine it runs; nothing else in kvr knows it exists.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

logger = logging.getLogger("bench.liar")

CLAIM_PERIOD_S = 1.0  # re-claims after the router resyncs (clears) the target; each batch is ~4,600 blocks
POLL_S = 0.05  # how often the claims file is looked for


def claims_batch(prompts: list[list[int]], *, block_size: int) -> list:
    """One rooted ``BlockStored`` per prompt over its full blocks; external hashes made up (unique)."""
    from core.events import BlockStored

    events = []
    next_hash = 0x11A2_0000_0000_0000
    for tokens in prompts:
        n = len(tokens) // block_size
        if n == 0:
            continue
        hashes = list(range(next_hash, next_hash + n))
        next_hash += n
        events.append(BlockStored(block_hashes=hashes, parent_block_hash=None, token_ids=list(tokens[:n * block_size]),
                                  block_size=block_size, lora_id=None, medium=None, lora_name=None))
    return events


def start_lying(runner, claims_path: Path) -> threading.Thread:
    """Watch for ``claims_path`` on a thread of its own; lie from then on (module docstring)."""
    thread = threading.Thread(target=_lie, args=(runner, claims_path), daemon=True, name="kvr-liar")
    thread.start()
    return thread


def _lie(runner, claims_path: Path) -> None:
    stopped: threading.Event = runner._stopped
    while not claims_path.exists():
        if stopped.wait(POLL_S):
            return
    time.sleep(POLL_S)  # written by one write_text; let it land whole
    prompts = json.loads(claims_path.read_text())
    backend = runner.backend
    events = claims_batch(prompts, block_size=backend.engine.config.block_size)

    def go_dark() -> None:
        backend.reset_prefix_cache(True)  # truthful: AllBlocksCleared goes out
        backend.engine.pool.enable_caching = False

    runner.service.call(go_dark).result(timeout=5)
    logger.warning("lying from now on: caching nothing, claiming %d prefixes (%d blocks) every %.1f s",
                   len(events), sum(len(e.block_hashes) for e in events), CLAIM_PERIOD_S)
    while not stopped.is_set():
        runner.service.call(lambda: backend.publisher.publish(events, ts=time.time()))
        stopped.wait(CLAIM_PERIOD_S)
