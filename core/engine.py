"""The emulated vLLM engine: a v1-style continuous-batching scheduler over the block pool.

Pure: ``step(now)`` decides one batch, returns how long it takes (latency model) and
what it produced; nothing sleeps or reads a clock. The caller (the worker's wall-clock
loop or the simulator's virtual clock) calls ``step(now)`` again at ``now +
duration_s``; outputs of a step are stamped at its end.

Scheduling follows vLLM v1's ``Scheduler.schedule`` (FCFS policy):

1. Running requests first, in order, each taking up to its remaining tokens from the
   step's token budget (``max_num_batched_tokens``; chunked prefill splits prompts).
   When the pool cannot give a request its slots, the *newest* running request is
   preempted by recompute (blocks freed, progress reset, put back at the head of the
   waiting queue) until it fits, or the request itself is the one preempted.
2. Then, only if nothing was preempted this step, waiting requests in order while the
   budget lasts and fewer than ``max_num_seqs`` run: prefix hit (``get_computed_blocks``),
   then slots for the rest; the first one that does not fit stops admission.
3. A request whose computed tokens reach its length samples one token (a prefill chunk
   that does not finish the prompt samples nothing). It finishes after ``max_tokens``
   output tokens or at ``max_model_len``; its blocks are freed then.

Output tokens are drawn from ``rng`` over a vocabulary (by default the built-in
tokenizer's short English words, so generated text round-trips through it).
"""

from __future__ import annotations

import logging
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from core.block_pool import BlockPool, KVSequence
from core.engine_types import (
    FINISH_ABORT,
    FINISH_LENGTH,
    EngineConfig,
    EngineLoad,
    EngineRequest,
    RequestOutput,
    RequestRejected,
    RequestStats,
    StepResult,
)  # fmt: skip
from core.events import KVEvent
from core.external_block_hash import BlockHasher
from core.profiles import Profile
from core.tokenizer import default_output_vocab

__all__ = [
    "EmulatedEngine", "EngineConfig", "EngineLoad", "EngineRequest", "RequestOutput", "RequestRejected",
    "RequestStats", "StepResult", "EngineCounters", "FINISH_ABORT", "FINISH_LENGTH",
]  # fmt: skip

logger = logging.getLogger(__name__)

class _Request:
    __slots__ = (
        "request_id", "seq", "arrival_s", "max_tokens", "num_prompt_tokens", "output_token_ids",
        "first_scheduled_s", "first_token_s", "num_cached_tokens", "preemptions", "finished",
    )  # fmt: skip

    def __init__(self, request_id: str, seq: KVSequence, arrival_s: float, max_tokens: int) -> None:
        self.request_id = request_id
        self.seq = seq
        self.arrival_s = arrival_s
        self.max_tokens = max_tokens
        self.num_prompt_tokens = seq.num_tokens
        self.output_token_ids: list[int] = []
        self.first_scheduled_s: float | None = None
        self.first_token_s: float | None = None
        self.num_cached_tokens = -1  # set at first scheduling, kept across preemptions (vLLM)
        self.preemptions = 0
        self.finished = False

    def stats(self, end_s: float, reason: str) -> RequestStats:
        scheduled = self.first_scheduled_s if self.first_scheduled_s is not None else end_s
        first = self.first_token_s if self.first_token_s is not None else end_s
        return RequestStats(
            queue_s=scheduled - self.arrival_s,
            num_prompt_tokens=self.num_prompt_tokens,
            num_cached_tokens=max(0, self.num_cached_tokens),
            prefill_s=first - scheduled,
            ttft_s=first - self.arrival_s,
            decode_s=end_s - first,
            e2e_s=end_s - self.arrival_s,
            num_output_tokens=len(self.output_token_ids),
            preemptions=self.preemptions,
            finish_reason=reason,
        )


@dataclass
class EngineCounters:
    steps: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_tokens_computed: int = 0
    preemptions: int = 0
    finished: int = 0
    aborted: int = 0
    busy_s: float = 0.0


class EmulatedEngine:
    """A vLLM-v1-like engine on a ``BlockPool`` with a latency model (see module docstring)."""

    def __init__(self, *, profile_or_config: Profile | EngineConfig, rng: random.Random, **overrides: Any) -> None:
        if isinstance(profile_or_config, Profile):
            config = EngineConfig.from_profile(profile_or_config, **overrides)
        else:
            config = replace(profile_or_config, **overrides) if overrides else profile_or_config
        self.config = config
        self.rng = rng
        self.latency = config.latency
        self.pool = BlockPool(
            num_blocks=config.num_gpu_blocks,
            block_size=config.block_size,
            enable_caching=config.enable_prefix_caching,
            hash_fn=BlockHasher(seed=config.hash_seed, algo=config.hash_algo, int_hashes=config.int_block_hashes),
            enable_events=config.enable_kv_events,
        )
        capacity_tokens = self.pool.num_usable_blocks * config.block_size
        self.max_model_len = min(config.max_model_len or capacity_tokens, capacity_tokens)
        self._vocab: Sequence[int] = config.output_vocab or default_output_vocab()
        self._waiting: deque[_Request] = deque()
        self._running: list[_Request] = []
        self._requests: dict[str, _Request] = {}
        self.counters = EngineCounters()

    # ------------------------------------------------------------------ requests

    def add_request(self, req: EngineRequest, now: float) -> None:
        """Queue a request that arrived at ``now``; ``RequestRejected`` if it can never run."""
        if req.request_id in self._requests:
            raise RequestRejected(f"duplicate request id {req.request_id!r}")
        n = len(req.token_ids)
        if n == 0:
            raise RequestRejected("the prompt is empty")
        if n >= self.max_model_len:
            raise RequestRejected(
                f"the prompt ({n} tokens) leaves no room for output under max_model_len {self.max_model_len}"
            )
        try:
            valid_ids = min(req.token_ids) >= 0 and max(req.token_ids) < 2**32
        except TypeError:
            valid_ids = False
        if not valid_ids:
            raise RequestRejected("token ids must be integers in [0, 2**32)")
        if req.max_tokens is not None and req.max_tokens < 1:
            raise RequestRejected(f"max_tokens must be >= 1, got {req.max_tokens}")
        max_tokens = req.max_tokens
        if max_tokens is None:
            max_tokens = max(1, round(self.rng.expovariate(1.0 / self.config.mean_output_tokens)))
        try:
            seq = self.pool.new_sequence(req.request_id, req.token_ids, lora_name=req.lora_name,
                                         cache_salt=req.cache_salt)
        except (OverflowError, TypeError) as exc:
            raise RequestRejected("token ids must be integers in [0, 2**32)") from exc
        r = _Request(req.request_id, seq, now, max_tokens)
        self._requests[req.request_id] = r
        self._waiting.append(r)
        self.counters.prompt_tokens += n

    def abort(self, request_id: str, now: float | None = None) -> RequestOutput | None:
        """Drop a request wherever it is; its blocks are freed. ``None`` if unknown."""
        r = self._requests.pop(request_id, None)
        if r is None:
            return None
        if r in self._running:
            self._running.remove(r)
        else:
            self._waiting.remove(r)
        self.pool.free(r.seq)
        self.counters.aborted += 1
        end = now if now is not None else r.arrival_s
        return RequestOutput(request_id, [], True, r.stats(end, FINISH_ABORT))

    def has_request(self, request_id: str) -> bool:
        """Whether a request with this id is waiting or running."""
        return request_id in self._requests

    def request_ids(self) -> list[str]:
        """Ids of every request in the engine (waiting or running)."""
        return list(self._requests)

    def has_work(self) -> bool:
        return bool(self._running or self._waiting)

    def load(self) -> EngineLoad:
        queued = 0
        for r in self._waiting:
            queued += r.seq.num_tokens - r.seq.num_computed_tokens
        for r in self._running:
            if not r.output_token_ids:
                queued += r.num_prompt_tokens - r.seq.num_computed_tokens
        return EngineLoad(
            running=len(self._running),
            waiting=len(self._waiting),
            queued_prefill_tokens=queued,
            kv_usage=self.pool.usage,
            num_free_blocks=self.pool.num_free_blocks,
        )

    def drain_events(self) -> list[KVEvent]:
        return self.pool.drain_events()

    def reset_prefix_cache(self, *, reset_running_requests: bool = False) -> bool:
        """vLLM's reset (``AllBlocksCleared``): refused while blocks are in use, unless
        ``reset_running_requests`` first preempts every running request (they recompute,
        keeping their order at the head of the waiting queue), as vLLM's option does."""
        if reset_running_requests:
            while self._running:
                self._preempt(self._running.pop())
        return self.pool.reset_prefix_cache()

    # ------------------------------------------------------------------ the step

    def step(self, now: float) -> StepResult:
        """Schedule and 'run' one batch starting at ``now`` (see module docstring)."""
        cfg = self.config
        pool = self.pool
        budget = cfg.max_num_batched_tokens
        threshold = cfg.long_prefill_token_threshold
        scheduled: list[tuple[_Request, int]] = []
        preempted = 0

        running = self._running
        i = 0
        while i < len(running) and budget > 0:
            r = running[i]
            seq = r.seq
            num_new = len(seq.token_ids) - seq.num_computed_tokens
            if 0 < threshold < num_new:
                num_new = threshold
            num_new = min(num_new, budget, self.max_model_len - 1 - seq.num_computed_tokens)
            if num_new <= 0:
                i += 1
                continue
            fits = True
            while pool.allocate_slots(seq, num_new) is None:
                victim = running.pop()  # the newest running request
                self._preempt(victim)
                preempted += 1
                if victim is r:
                    fits = False
                    break
            if not fits:
                break
            scheduled.append((r, num_new))
            budget -= num_new
            i += 1

        if not preempted:
            waiting = self._waiting
            while waiting and budget > 0 and len(running) < cfg.max_num_seqs:
                r = waiting[0]
                seq = r.seq
                hits, num_hit = pool.get_computed_blocks(seq)
                num_computed = seq.num_computed_tokens + num_hit
                num_new = seq.num_tokens - num_computed
                if 0 < threshold < num_new:
                    num_new = threshold
                if not cfg.enable_chunked_prefill and num_new > budget:
                    break
                num_new = min(num_new, budget)
                if pool.allocate_slots(seq, num_new, num_new_computed_tokens=num_hit, new_computed_blocks=hits) is None:
                    break
                waiting.popleft()
                running.append(r)
                seq.num_computed_tokens = num_computed
                if r.num_cached_tokens < 0:
                    r.num_cached_tokens = num_computed
                if r.first_scheduled_s is None:
                    r.first_scheduled_s = now
                scheduled.append((r, num_new))
                budget -= num_new

        return self._run(now, scheduled, preempted)

    def _run(self, now: float, scheduled: list[tuple[_Request, int]], preempted: int) -> StepResult:
        if not scheduled:
            return StepResult(0.0, [], preempted=preempted)
        prefill_tokens = decode_seqs = kv_tokens = pairs = 0
        for r, n in scheduled:
            ctx = r.seq.num_computed_tokens
            kv_tokens += ctx
            if n == 1 and r.output_token_ids and ctx == len(r.seq.token_ids) - 1:
                decode_seqs += 1
            else:
                prefill_tokens += n
                pairs += n * (ctx + n)
        duration = self.latency.step_s(
            prefill_tokens=prefill_tokens, decode_seqs=decode_seqs, kv_tokens=kv_tokens, attention_token_pairs=pairs
        )
        end = now + duration
        outputs: list[RequestOutput] = []
        finished_any = False
        # One draw per scheduled request, in batch order (prefill chunks waste theirs).
        draws = self.rng.choices(self._vocab, k=len(scheduled))
        pool = self.pool
        for (r, n), token in zip(scheduled, draws, strict=True):
            seq = r.seq
            seq.num_computed_tokens += n
            if seq.num_computed_tokens < len(seq.token_ids):
                continue  # a prefill chunk: nothing sampled
            pool.append_token_ids(seq, (token,))
            r.output_token_ids.append(token)
            if r.first_token_s is None:
                r.first_token_s = end
            if len(r.output_token_ids) >= r.max_tokens or len(seq.token_ids) >= self.max_model_len:
                finished_any = True
                pool.free(seq)
                del self._requests[r.request_id]
                outputs.append(RequestOutput(r.request_id, [token], True, r.stats(end, FINISH_LENGTH)))
                r.finished = True
            else:
                outputs.append(RequestOutput(r.request_id, [token], False))
        if finished_any:
            self._running = [r for r in self._running if not r.finished]
            self.counters.finished += sum(1 for o in outputs if o.finished)
        c = self.counters
        c.steps += 1
        c.generated_tokens += len(outputs)
        c.prefill_tokens_computed += prefill_tokens
        c.busy_s += duration
        return StepResult(duration, outputs, len(scheduled), prefill_tokens, decode_seqs, preempted)

    def decode_steps(self, now: float, *, until_s: float, max_steps: int | None = None) -> StepResult | None:
        """Several pure-decode steps in one call, or ``None`` when the next step is not one.

        For a simulator that knows nothing can arrive before ``until_s``. The result equals
        calling ``step`` back to back from ``now`` for ``k >= 2`` steps, merged: duration the
        sum, one output per request with all its new tokens, finishes only at the last step.
        It applies only while every step would be pure decode with nothing else to decide:
        every running request is decoding and gets its token (running <= token budget),
        nothing waiting can be admitted (none waiting, or ``max_num_seqs`` running), the
        free blocks cover every slot of the ``k`` steps (so no preemption), and every step
        starts before ``until_s``. Tokens are drawn in the single-step order (step-major),
        and the same free-queue blocks are evicted, so outputs and KV events are the same
        (events of the ``k`` steps come as one batch, stores after removals).
        """
        cfg = self.config
        running = self._running
        n = len(running)
        if n == 0 or n > cfg.max_num_batched_tokens or (self._waiting and n < cfg.max_num_seqs) or now >= until_s:
            return None
        k = max_steps if max_steps is not None else 1 << 30
        kv0 = 0
        for r in running:
            seq = r.seq
            n_tok = len(seq.token_ids)
            if not r.output_token_ids or seq.num_computed_tokens != n_tok - 1:
                return None
            k = min(k, r.max_tokens - len(r.output_token_ids), self.max_model_len - n_tok)
            kv0 += seq.num_computed_tokens
        if k < 2:
            return None
        # Steps that start before until_s (a request added at t joins the step starting after t).
        step_s = self.latency.step_s
        durations: list[float] = []
        t = now
        while len(durations) < k and t < until_s:
            d = step_s(prefill_tokens=0, decode_seqs=n, kv_tokens=kv0 + n * len(durations),
                       attention_token_pairs=0)
            durations.append(d)
            t += d
        k = len(durations)
        pool = self.pool
        bs = cfg.block_size
        free = pool.num_free_blocks
        while k >= 2 and free < sum(max(0, -(-(r.seq.num_computed_tokens + k) // bs) - len(r.seq.blocks))
                                    for r in running):
            k -= 1
        if k < 2:
            return None
        end = now
        for d in durations[:k]:
            end += d  # the same float additions as k calls of step() at now, now + d0, ...
        total = end - now
        vocab = self._vocab
        choices = self.rng.choices
        drawn = [choices(vocab, k=n) for _ in range(k)]  # one batched draw per step, as k single steps
        outputs: list[RequestOutput] = []
        finished_any = False
        for i, r in enumerate(running):
            seq = r.seq
            tokens = [drawn[j][i] for j in range(k)]
            if pool.allocate_slots(seq, k) is None:  # cannot happen: the free blocks were counted
                raise AssertionError("decode_steps: slots vanished")
            pool.append_token_ids(seq, tokens)
            seq.num_computed_tokens += k
            if pool.enable_caching:
                pool._cache_blocks(seq, seq.num_computed_tokens)  # what the k-th step's allocation caches
            r.output_token_ids.extend(tokens)
            if len(r.output_token_ids) >= r.max_tokens or len(seq.token_ids) >= self.max_model_len:
                finished_any = True
                pool.free(seq)
                del self._requests[r.request_id]
                outputs.append(RequestOutput(r.request_id, tokens, True, r.stats(end, FINISH_LENGTH)))
                r.finished = True
            else:
                outputs.append(RequestOutput(r.request_id, tokens, False))
        if finished_any:
            self._running = [r for r in running if not r.finished]
            self.counters.finished += sum(1 for o in outputs if o.finished)
        c = self.counters
        c.steps += k
        c.generated_tokens += n * k
        for d in durations[:k]:
            c.busy_s += d
        return StepResult(total, outputs, n, 0, n, 0)

    def _preempt(self, r: _Request) -> None:
        """Preemption by recompute: free the blocks, restart from token 0, head of the queue."""
        self.pool.free(r.seq)
        r.seq.num_computed_tokens = 0
        r.preemptions += 1
        self.counters.preemptions += 1
        self._waiting.appendleft(r)
        logger.debug("preempted %s (%d preemptions)", r.request_id, r.preemptions)
