"""Latency models: how long one continuous-batching step of the emulated engine takes.

Every model answers three questions (the ``LatencyModel`` protocol), used by the
engine (``step_s``), by the router's predicted-TTFT policy (``prefill_s``) and by the
simulator:

* ``step_s(prefill_tokens, decode_seqs, kv_tokens, attention_token_pairs)``: one
  forward pass that computes ``prefill_tokens`` new prompt tokens (summed over the
  batch's prefill chunks), advances ``decode_seqs`` sequences by one token, reads
  ``kv_tokens`` tokens of KV cache (the context of every scheduled sequence), and
  attends ``attention_token_pairs`` = Σ new × context over the prefill chunks.
* ``prefill_s(new_tokens, cached_tokens)``: ``new_tokens`` prefilled alone after a
  prefix hit of ``cached_tokens``.
* ``decode_token_s(batch_size, kv_tokens)``: one decode step of ``batch_size``
  sequences holding ``kv_tokens`` tokens of context in total.

Two shapes:

* ``SimpleLatencyModel``: the seed's model, ``prefill = base + blocks_to_compute ×
  per_block`` and ``decode = tokens × per_token`` (a batched decode step costs one
  ``per_token`` whatever the batch).
* ``StepLatencyModel``: the calibrated one (``docs/workloads.md`` §3.2): a
  forward pass pays a fixed framework overhead and the larger of its prefill base
  and its decode floor (the weight read), then linear prefill compute, a per-sequence
  decode cost, the KV read at ~80 % of HBM bandwidth, and Preble's attention term
  ``e × s`` for long prompts.

All times are seconds. The models are pure and cheap (a few float operations).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any, Protocol, runtime_checkable

from core.blocks import DEFAULT_BLOCK_SIZE

logger = logging.getLogger(__name__)


@runtime_checkable
class LatencyModel(Protocol):
    """What the engine, the router and the simulator ask of a latency model."""

    def prefill_s(self, *, new_tokens: int, cached_tokens: int = 0) -> float:
        """Time to prefill ``new_tokens`` alone after ``cached_tokens`` of prefix hit."""
        ...

    def step_s(
        self, *, prefill_tokens: int, decode_seqs: int, kv_tokens: int, attention_token_pairs: int = 0
    ) -> float:
        """Time of one continuous-batching step."""
        ...

    def decode_token_s(self, *, batch_size: int, kv_tokens: int) -> float:
        """Time of one decode step of ``batch_size`` sequences."""
        ...

    def constants(self) -> dict[str, Any]:
        """The model's constants, for display (``kvr profiles``)."""
        ...


@dataclass(frozen=True)
class SimpleLatencyModel:
    """The seed's model: ``base + blocks × per_block`` prefill, ``per_token`` decode."""

    prefill_base_s: float
    prefill_per_block_s: float
    decode_per_token_s: float
    block_size: int = DEFAULT_BLOCK_SIZE

    def prefill_s(self, *, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        blocks_to_compute = -(-new_tokens // self.block_size)
        return self.prefill_base_s + blocks_to_compute * self.prefill_per_block_s

    def decode_token_s(self, *, batch_size: int, kv_tokens: int = 0) -> float:
        return self.decode_per_token_s if batch_size > 0 else 0.0

    def step_s(
        self, *, prefill_tokens: int, decode_seqs: int, kv_tokens: int = 0, attention_token_pairs: int = 0
    ) -> float:
        # The seed's model has no attention term: attention_token_pairs is accepted and unused.
        prefill_s = self.prefill_s(new_tokens=prefill_tokens)
        return prefill_s + self.decode_token_s(batch_size=decode_seqs, kv_tokens=kv_tokens)

    def constants(self) -> dict[str, Any]:
        return {"kind": "simple", **asdict(self)}


@dataclass(frozen=True)
class StepLatencyModel:
    """Calibrated step model (see module docstring); constants come from a profile."""

    step_overhead_s: float
    prefill_base_s: float
    prefill_per_token_s: float
    decode_floor_s: float
    decode_per_seq_s: float
    kv_read_per_token_s: float
    attention_per_token_pair_s: float = 0.0

    def step_s(
        self, *, prefill_tokens: int, decode_seqs: int, kv_tokens: int = 0, attention_token_pairs: int = 0
    ) -> float:
        """One forward pass. ``attention_token_pairs`` is Σ new × context over prefill chunks."""
        if prefill_tokens <= 0 and decode_seqs <= 0:
            return 0.0
        base = max(self.prefill_base_s if prefill_tokens > 0 else 0.0, self.decode_floor_s if decode_seqs > 0 else 0.0)
        return (
            self.step_overhead_s
            + base
            + prefill_tokens * self.prefill_per_token_s
            + decode_seqs * self.decode_per_seq_s
            + kv_tokens * self.kv_read_per_token_s
            + attention_token_pairs * self.attention_per_token_pair_s
        )

    def prefill_s(self, *, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.step_s(
            prefill_tokens=new_tokens,
            decode_seqs=0,
            kv_tokens=cached_tokens,
            attention_token_pairs=new_tokens * (cached_tokens + new_tokens),
        )

    def decode_token_s(self, *, batch_size: int, kv_tokens: int = 0) -> float:
        return self.step_s(prefill_tokens=0, decode_seqs=batch_size, kv_tokens=kv_tokens)

    def constants(self) -> dict[str, Any]:
        return {"kind": "step", **asdict(self)}


def kv_read_per_token_s(*, kv_bytes_per_token: int, hbm_bytes_per_s: float, efficiency: float = 0.8) -> float:
    """Seconds to read one token's KV cache (all layers) at ``efficiency`` × HBM bandwidth."""
    return kv_bytes_per_token / (efficiency * hbm_bytes_per_s)
