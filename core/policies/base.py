"""The routing-policy interface: what a policy sees about each worker, and what it answers.

A policy is a small stateful object (round-robin keeps a counter, SGLang's rule keeps its own
approximate tree). ``choose`` is pure apart from that state: time comes in as ``now`` and
randomness from the ``rng`` the caller passes (a ``random.Random``), so the live router and the
simulator make the same decisions from the same inputs.

Every ``Decision`` explains itself: ``scores`` has one number per candidate (the policy's own
unit, named in ``score_unit``; lower is better unless the unit says otherwise) and ``reason``
is one line a person can read in a DEBUG log.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from core.prefix_index import Confidence, WorkerKey


@runtime_checkable
class LatencyModel(Protocol):
    """The part of the engine's latency model a router needs (``core/latency.py`` implements it)."""

    def prefill_s(self, *, new_tokens: int, cached_tokens: int = 0) -> float:
        """Seconds to prefill ``new_tokens`` uncached tokens after ``cached_tokens`` cached ones."""
        ...


@dataclass(frozen=True, slots=True)
class LinearPrefillModel:
    """``prefill = base + per_token × new tokens``: the fallback when no engine model is given.

    Defaults are the H100 / 7B row of ``docs/workloads.md`` §3.2 (6 ms + 0.33 ms per 16-token block).
    """

    base_s: float = 0.006
    per_token_s: float = 0.33e-3 / 16

    def prefill_s(self, *, new_tokens: int, cached_tokens: int = 0) -> float:
        if new_tokens <= 0:
            return 0.0
        return self.base_s + self.per_token_s * new_tokens


@dataclass(frozen=True, slots=True)
class RouteRequest:
    """What a policy knows about the request being routed."""

    request_id: str
    prompt_tokens: int
    block_hashes: Sequence[int]  # kvr's own hashes of the prompt's full blocks
    token_ids: Sequence[int] = ()  # the prompt (hash-based baselines key on its start)
    lora_name: str | None = None
    max_tokens: int = 16


#: Output tokens a request is expected to fill KV with, at most. ``max_tokens`` is a bound clients
#: set far above what they generate (EOS comes first), and vLLM allocates decode blocks as it goes,
#: so the KV a request will hold is estimated as min(max_tokens, this).
DECODE_ESTIMATE_CAP_TOKENS = 512


def decode_blocks_estimate(max_tokens: int, block_size: int) -> int:
    """KV blocks a request's output is expected to fill (see ``DECODE_ESTIMATE_CAP_TOKENS``)."""
    return -(-min(max(max_tokens, 0), DECODE_ESTIMATE_CAP_TOKENS) // block_size)


class WorkerLoad(NamedTuple):
    """A target's load: the engine's last heartbeat merged with the router's own accounting.

    ``in_flight`` and ``active_blocks`` are this router's (requests dispatched and not finished,
    and the distinct prompt blocks they use, shared prefixes counted once, as Dynamo does);
    ``queued_prefill_tokens`` is the larger of the engine's report and the router's
    not-yet-started prefill work, so a second router's load still shows.
    (A NamedTuple, as ``WorkerState``: one is built per candidate per request, and tuples
    build several times faster than frozen dataclasses.)
    """

    in_flight: int = 0
    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    active_blocks: int = 0
    kv_usage: float = 0.0
    decode_blocks: int = 0  # output blocks this router's requests in flight will still fill


_IDLE = WorkerLoad()


class WorkerState(NamedTuple):
    """One routable candidate as the policy sees it."""

    target: WorkerKey
    overlap_blocks: int = 0
    load: WorkerLoad = _IDLE
    confidence: Confidence = Confidence.FRESH
    capacity_blocks: int = 0


#: Row codes of ``FleetColumns.confidence`` (the order of ``Confidence``).
CONFIDENCE_CODES: tuple[Confidence, ...] = tuple(Confidence)


@dataclass(frozen=True, slots=True)
class FleetColumns:
    """The candidates of one request as numpy columns: row ``i`` is ``states[i]`` with ``overlap[i]``.

    ``states`` are the candidates with overlap 0 (sorted by target, as ``choose``'s); the other
    columns repeat their numbers (``WorkerLoad`` fields, capacity, confidence as an index into
    ``CONFIDENCE_CODES``) so that a policy can score a large fleet without a Python step per
    candidate (``KvrPolicy.choose_columns``). Columns are int64 and must not be written.
    """

    states: Sequence[WorkerState]
    overlap: np.ndarray
    in_flight: np.ndarray
    queued_prefill_tokens: np.ndarray
    active_blocks: np.ndarray
    decode_blocks: np.ndarray
    capacity_blocks: np.ndarray
    confidence: np.ndarray

    def state(self, i: int) -> WorkerState:
        """Candidate ``i`` as ``choose`` would see it (with its overlap)."""
        b = self.states[i]
        return WorkerState(b[0], int(self.overlap[i]), b[2], b[3], b[4])

    @classmethod
    def of(cls, candidates: Sequence[WorkerState]) -> FleetColumns:
        """Columns of a candidate list (tests; the router keeps its columns up to date itself)."""
        def col(values: Iterable[int]) -> np.ndarray:
            return np.fromiter(values, dtype=np.int64, count=len(candidates))

        codes = {c: i for i, c in enumerate(CONFIDENCE_CODES)}
        return cls([WorkerState(w[0], 0, w[2], w[3], w[4]) for w in candidates],
                   col(w[1] for w in candidates), col(w[2][0] for w in candidates), col(w[2][3] for w in candidates),
                   col(w[2][4] for w in candidates), col(w[2][6] for w in candidates), col(w[4] for w in candidates),
                   col(codes[w[3]] for w in candidates))


class LazyScores(Mapping[WorkerKey, float]):
    """A decision's per-candidate scores, built on first read.

    A policy has its scores at hand in its own form (a list beside the candidates); turning them
    into a dict keyed by target costs a hash per candidate on every decision, while only a DEBUG
    log or a test reads them. ``build`` is called at most once.
    """

    __slots__ = ("_build", "_dict")

    def __init__(self, build: Callable[[], dict[WorkerKey, float]]) -> None:
        self._build: Callable[[], dict[WorkerKey, float]] | None = build
        self._dict: dict[WorkerKey, float] | None = None

    def _scores(self) -> dict[WorkerKey, float]:
        if self._dict is None:
            assert self._build is not None  # set until the one build
            self._dict = self._build()
            self._build = None  # release the candidates it holds
        return self._dict

    def __getitem__(self, target: WorkerKey) -> float:
        return self._scores()[target]

    def __iter__(self) -> Iterator[WorkerKey]:
        return iter(self._scores())

    def __len__(self) -> int:
        return len(self._scores())

    def __repr__(self) -> str:
        return repr(self._scores())


@dataclass(frozen=True, slots=True)
class Decision:
    """A policy's answer, with its explanation."""

    target: WorkerKey
    scores: Mapping[WorkerKey, float]  # a dict, or a LazyScores
    reason: str
    policy: str
    score_unit: str = "cost"
    overlap_blocks: int = 0  # the chosen target's overlap, as the policy saw it

    def explain(self) -> str:
        """One line for a DEBUG log: the reason, then every candidate's score."""
        ranked = ", ".join(f"{t}={s:.6g}" for t, s in sorted(self.scores.items(), key=lambda kv: (kv[1], kv[0])))
        return f"[{self.policy}] → {self.target}: {self.reason} | {self.score_unit}: {ranked}"


class RoutingPolicy(Protocol):
    """One routing rule. ``candidates`` is never empty and is sorted by target."""

    name: str

    def choose(self, request: RouteRequest, candidates: Sequence[WorkerState], *, now: float,
               rng: random.Random) -> Decision:
        ...

    def forget(self, target: WorkerKey) -> None:
        """A target left the fleet: drop any per-target state."""
        ...


def pick_min(scores: Sequence[tuple[float, WorkerState]], rng: random.Random) -> WorkerState:
    """The candidate with the lowest score; ties broken uniformly at random with ``rng``."""
    best = min(s for s, _ in scores)
    tied = [w for s, w in scores if s == best]
    return tied[0] if len(tied) == 1 else tied[rng.randrange(len(tied))]


def shifted_softmax_index(costs: Sequence[float], temperature: float, u: float) -> int:
    """Index drawn with ``p ∝ exp(−(c − min c) / T)`` from the uniform draw ``u`` in [0, 1)."""
    lo = min(costs)
    weights = [math.exp(-(c - lo) / temperature) for c in costs]
    target = u * sum(weights)
    acc = 0.0
    for i, w in enumerate(weights):
        acc += w
        if target < acc:
            return i
    return len(costs) - 1
