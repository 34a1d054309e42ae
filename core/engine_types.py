"""The emulated engine's value types: its config, requests, per-step and per-request results."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Any

from core.blocks import DEFAULT_BLOCK_SIZE
from core.external_block_hash import DEFAULT_HASH_ALGO, ENGINE_HASH_SEED
from core.latency import LatencyModel, SimpleLatencyModel
from core.profiles import Profile

logger = logging.getLogger(__name__)

FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


class RequestRejected(ValueError):
    """A request the engine cannot ever run (empty, too long, duplicate id)."""


@dataclass(frozen=True)
class EngineConfig:
    """Everything an ``EmulatedEngine`` needs; ``from_profile`` fills it from a profile."""

    num_gpu_blocks: int
    block_size: int = DEFAULT_BLOCK_SIZE
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    max_model_len: int | None = None  # None: what the usable blocks hold
    enable_prefix_caching: bool = True
    enable_chunked_prefill: bool = True
    long_prefill_token_threshold: int = 0
    latency: LatencyModel = field(
        default_factory=lambda: SimpleLatencyModel(prefill_base_s=15e-3, prefill_per_block_s=2e-3,
                                                   decode_per_token_s=20e-3)
    )
    mean_output_tokens: int = 128  # for requests that give no max_tokens (exponential draw)
    output_vocab: tuple[int, ...] | None = None  # None: the built-in tokenizer's words
    hash_seed: int = ENGINE_HASH_SEED
    hash_algo: str = DEFAULT_HASH_ALGO  # vLLM 0.33's own block hash (core/external_block_hash.py)
    int_block_hashes: bool = True
    enable_kv_events: bool = True

    @classmethod
    def from_profile(cls, profile: Profile, **overrides: Any) -> EngineConfig:
        base = cls(
            num_gpu_blocks=profile.num_gpu_blocks,
            block_size=profile.block_size,
            max_num_seqs=profile.max_num_seqs,
            max_num_batched_tokens=profile.max_num_batched_tokens,
            max_model_len=profile.max_model_len,
            latency=profile.latency,
        )
        return replace(base, **overrides)


@dataclass(slots=True)
class EngineRequest:
    """A request as the engine takes it: token ids, output length, cache identity."""

    request_id: str
    token_ids: list[int]
    max_tokens: int | None = None  # None: drawn from the engine's rng
    lora_name: str | None = None
    cache_salt: str | None = None


@dataclass(slots=True)
class RequestStats:
    """Per-request timing and cache figures, sent with the terminal message."""

    queue_s: float
    num_prompt_tokens: int
    num_cached_tokens: int
    prefill_s: float
    ttft_s: float
    decode_s: float
    e2e_s: float
    num_output_tokens: int
    preemptions: int
    finish_reason: str = FINISH_LENGTH


@dataclass(slots=True)
class RequestOutput:
    """What one step produced for one request."""

    request_id: str
    new_token_ids: list[int]
    finished: bool
    stats: RequestStats | None = None


@dataclass(slots=True)
class StepResult:
    duration_s: float
    outputs: list[RequestOutput]
    num_scheduled: int = 0
    prefill_tokens: int = 0
    decode_seqs: int = 0
    preempted: int = 0


@dataclass(slots=True)
class EngineLoad:
    """The load a worker reports in heartbeats."""

    running: int
    waiting: int
    queued_prefill_tokens: int
    kv_usage: float
    num_free_blocks: int
