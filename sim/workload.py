"""Workload and arrival-process interfaces of the simulator.

A workload is a list of *roots*: each root is a burst of requests sent together
at the root's arrival time (a single request, or the siblings of a fan-out).
A request may have *follow-ups* (the next chat turn, the children of a
tree-of-thought node): the driver asks the workload for them when the request
finishes, passing the output tokens the engine produced, because the next turn's
prompt contains the previous answer.

Arrival times of roots come from an :class:`ArrivalProcess`, or from the
workload itself (a trace's timestamps). All randomness comes from an injected
``random.Random``; the same seed gives the same requests.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

logger = logging.getLogger(__name__)

#: Random prompt tokens are drawn from this vocabulary (a Llama-2-sized one).
DEFAULT_VOCAB_SIZE = 32000


@dataclass(slots=True)
class SimRequest:
    """A request as the simulated client sends it."""

    request_id: str
    token_ids: list[int]
    max_tokens: int
    group: int = -1
    #: Delay after the parent finished before this follow-up is sent (think time).
    delay_s: float = 0.0
    lora_name: str | None = None
    #: kvr block hashes of the full blocks, when the workload knows them cheaply (traces).
    block_hashes: list[int] | None = None
    #: Opaque per-workload state that follow-ups need (turn number, tree depth...).
    meta: dict = field(default_factory=dict)


@dataclass(slots=True)
class Root:
    """Requests sent together; ``arrival_s`` is None unless the workload fixes it (traces)."""

    requests: list[SimRequest]
    arrival_s: float | None = None


class Workload:
    """Base class: subclasses fill ``roots`` and may override :meth:`follow_ups`."""

    name = "workload"

    def __init__(self) -> None:
        self.roots: list[Root] = []

    def follow_ups(self, request: SimRequest, output_token_ids: Sequence[int]) -> list[SimRequest]:
        """Requests to send once ``request`` finished (none by default)."""
        return []

    # Roots are read through these three so a large trace can build its
    # requests lazily (token lists of a whole trace would not fit in memory).
    def num_roots(self) -> int:
        return len(self.roots)

    def root_arrival_s(self, i: int) -> float | None:
        return self.roots[i].arrival_s

    def root_requests(self, i: int) -> list[SimRequest]:
        return self.roots[i].requests

    def longest_request_tokens(self) -> int:
        """An upper bound on the tokens one request needs in the engine (prompt + output),
        follow-ups included; 0 without requests.

        This default measures the roots, which is exact for a workload without follow-ups. A
        workload with follow-ups adds their growth from its config. The engine never writes
        more than ``max_tokens``, so full lengths bound what the answers add."""
        return self.longest_root_tokens()

    def longest_root_tokens(self) -> int:
        """The most tokens one root request needs in the engine (prompt + output); 0 without roots."""
        return max((len(q.token_ids) + q.max_tokens for i in range(self.num_roots()) for q in self.root_requests(i)),
                   default=0)

    def engine_tokens(self, model_tokens: int) -> int:
        """``model_tokens`` of a real model's context in this workload's engine tokens (the
        same unless the workload rescales its prompts, as a compressed trace does)."""
        return model_tokens

    @property
    def has_timestamps(self) -> bool:
        n = self.num_roots()
        return n > 0 and all(self.root_arrival_s(i) is not None for i in range(n))

    def describe(self) -> dict:
        """Headline statistics of the roots (for reports and tests)."""
        reqs = [q for r in self.roots for q in r.requests]
        lens = [len(q.token_ids) for q in reqs]
        return {
            "name": self.name,
            "roots": len(self.roots),
            "root_requests": len(reqs),
            "prompt_tokens_mean": sum(lens) / len(lens) if lens else math.nan,
            "output_tokens_mean": sum(q.max_tokens for q in reqs) / len(reqs) if reqs else math.nan,
        }


def numpy_rng(rng: random.Random) -> np.random.Generator:
    """A numpy generator seeded from ``rng`` (so one seed drives both)."""
    return np.random.default_rng(rng.getrandbits(64))


def random_tokens(gen: np.random.Generator, n: int, vocab_size: int = DEFAULT_VOCAB_SIZE) -> list[int]:
    """``n`` uniform token ids."""
    if n <= 0:
        return []
    return gen.integers(0, vocab_size, size=n).tolist()


def random_lens(rng: random.Random, full_len: int, range_ratio: float, n: int) -> list[int]:
    """SGLang's ``compute_random_lens``: uniform ints in [max(1, full*ratio), full]."""
    lo = max(1, int(full_len * range_ratio))
    hi = max(lo, full_len)
    return [rng.randint(lo, hi) for _ in range(n)]


def zipf_weights(n: int, alpha: float) -> list[float]:
    """Popularity of ranks 1..n with p ∝ r^-alpha (normalised)."""
    w = [r ** -alpha for r in range(1, n + 1)]
    s = sum(w)
    return [x / s for x in w]


def pick_groups(rng: random.Random, num_groups: int, n: int, distribution: str, zipf_alpha: float) -> list[int]:
    """``n`` group indices: ``uniform`` (each group equally often, shuffled) or ``zipf``."""
    if distribution == "uniform":
        out = [i % num_groups for i in range(n)]  # counts differ by at most one
        rng.shuffle(out)
        return out
    if distribution == "zipf":
        return rng.choices(range(num_groups), weights=zipf_weights(num_groups, zipf_alpha), k=n)
    raise ValueError(f"unknown group distribution {distribution!r} (uniform, zipf)")


# ---- arrival processes ----------------------------------------------------


class ArrivalProcess:
    """Assigns arrival times to ``n`` roots."""

    #: Cap on requests in flight at once (None: open loop).
    max_concurrency: int | None = None

    def times(self, n: int, rng: random.Random) -> list[float]:
        raise NotImplementedError


@dataclass
class Poisson(ArrivalProcess):
    """Exponential gaps at ``rate_per_s`` (first root at t = gap, as SGLang)."""

    rate_per_s: float
    max_concurrency: int | None = None

    def times(self, n: int, rng: random.Random) -> list[float]:
        if self.rate_per_s <= 0:
            raise ValueError("rate must be positive")
        t, out = 0.0, []
        for _ in range(n):
            t += rng.expovariate(self.rate_per_s)
            out.append(t)
        return out


@dataclass
class Bursty(ArrivalProcess):
    """Gamma gaps with mean 1/rate and shape ``burstiness`` (vLLM's ``--burstiness``).

    burstiness 1 is Poisson; below 1 arrivals clump (CV of gaps = 1/sqrt(burstiness)).
    """

    rate_per_s: float
    burstiness: float = 0.25
    max_concurrency: int | None = None

    def times(self, n: int, rng: random.Random) -> list[float]:
        if self.rate_per_s <= 0 or self.burstiness <= 0:
            raise ValueError("rate and burstiness must be positive")
        scale = 1.0 / (self.rate_per_s * self.burstiness)
        t, out = 0.0, []
        for _ in range(n):
            t += rng.gammavariate(self.burstiness, scale)
            out.append(t)
        return out


@dataclass
class AllAtOnce(ArrivalProcess):
    """Every root at t = 0; with ``max_concurrency`` this is a closed loop."""

    max_concurrency: int | None = None

    def times(self, n: int, rng: random.Random) -> list[float]:
        return [0.0] * n


@dataclass
class TraceTimes(ArrivalProcess):
    """The workload's own timestamps divided by ``speedup``."""

    speedup: float = 1.0
    max_concurrency: int | None = None

    def times(self, n: int, rng: random.Random) -> list[float]:
        raise TypeError("TraceTimes uses the workload's timestamps; see assign_arrivals")


def assign_arrivals(workload: Workload, arrivals: ArrivalProcess, rng: random.Random) -> list[float]:
    """Arrival time of each root of ``workload`` (non-decreasing)."""
    if isinstance(arrivals, TraceTimes):
        if not workload.has_timestamps:
            raise ValueError(f"workload {workload.name!r} has no timestamps")
        if arrivals.speedup <= 0:
            raise ValueError("speedup must be positive")
        return [workload.root_arrival_s(i) / arrivals.speedup for i in range(workload.num_roots())]
    return arrivals.times(workload.num_roots(), rng)
