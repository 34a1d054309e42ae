"""Preble-like workloads from published length and sharing statistics.

Statistics (Preble, ICLR'25, as encoded in Aibrix's dataset generator README;
``docs/workloads.md`` §2.4): prompt length mean ± std, shared fraction
of the prompt mean ± std, and Preble's e2e config per 2 GPUs (#prefixes,
#requests, rps). Generation follows Aibrix's ``synthetic_prefix_sharing_dataset``:
per group a base prefix of ⌊L̄·s̄⌋ tokens; per sample L ~ N(L̄, σ_L) truncated
at ≥ 1 and P ~ N(s̄·L, σ_s·L) truncated to [0, min(L, base)]; the prompt is the
base's first P tokens + L − P fresh tokens. Two requests of a group therefore
share min(P_i, P_j) tokens. Output lengths are not published in a form we
could check; the means below are assumptions (short answers, ~190 for APPS).
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from sim.workload import Root, SimRequest, Workload, numpy_rng, pick_groups, random_tokens

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrebleStats:
    prompt_mean: float
    prompt_std: float
    shared_mean: float
    shared_std: float
    num_prefixes: int
    num_requests: int
    rps: float
    output_mean: int


#: Per 2 GPUs, as Preble's e2e configs (``scale_to_gpu`` multiplies by #GPUs/2).
PREBLE_PRESETS: dict[str, PrebleStats] = {
    "toolbench": PrebleStats(1835, 742, 0.85, 0.13, 300, 3600, 12.0, 40),
    "embodied": PrebleStats(2285, 471, 0.97, 0.14, 200, 3600, 15.0, 20),
    "programming": PrebleStats(3871, 1656, 0.97, 0.074, 160, 3000, 5.0, 190),
    "videoqa": PrebleStats(9865, 5976, 0.88, 0.32, 100, 3000, 10.0, 30),
    "loogle": PrebleStats(23474, 6105, 0.91, 0.24, 24, 673, 6.0, 45),
}


@dataclass
class PrebleConfig:
    preset: str = "toolbench"
    #: Multiplies #prefixes and #requests (Preble scales them by #GPUs/2).
    scale: float = 1.0
    num_requests: int | None = None
    group_distribution: str = "uniform"
    zipf_alpha: float = 1.1
    max_prompt_len: int = 32768


class PrebleLike(Workload):
    """See the module docstring."""

    def __init__(self, config: PrebleConfig, rng: random.Random) -> None:
        super().__init__()
        if config.preset not in PREBLE_PRESETS:
            raise ValueError(f"unknown Preble preset {config.preset!r}: {sorted(PREBLE_PRESETS)}")
        self.config = c = config
        st = self.stats = PREBLE_PRESETS[c.preset]
        self.name = f"preble-{c.preset}"
        gen = numpy_rng(rng)
        num_prefixes = max(1, round(st.num_prefixes * c.scale))
        n = c.num_requests if c.num_requests is not None else max(1, round(st.num_requests * c.scale))
        base_len = int(st.prompt_mean * st.shared_mean)
        bases = [random_tokens(gen, base_len) for _ in range(num_prefixes)]
        groups = pick_groups(rng, num_prefixes, n, c.group_distribution, c.zipf_alpha)
        reqs = []
        for i, g in enumerate(groups):
            length = min(c.max_prompt_len, max(1, round(_trunc_normal(rng, st.prompt_mean, st.prompt_std, 1, None))))
            shared = round(_trunc_normal(rng, st.shared_mean * length, st.shared_std * length, 0, length))
            shared = min(shared, base_len, length)
            out_len = max(1, round(rng.expovariate(1.0 / st.output_mean)))
            prompt = bases[g][:shared] + random_tokens(gen, length - shared)
            reqs.append(SimRequest(f"{self.name}-{i}", prompt, out_len, group=g))
        self.roots = [Root([r]) for r in reqs]


def _trunc_normal(rng: random.Random, mu: float, sigma: float, lo: float | None, hi: float | None) -> float:
    """Rejection-sampled truncated normal (falls back to clipping after 100 tries)."""
    for _ in range(100):
        x = rng.gauss(mu, sigma)
        if (lo is None or x >= lo) and (hi is None or x <= hi):
            return x
    x = mu
    if lo is not None:
        x = max(lo, x)
    if hi is not None:
        x = min(hi, x)
    return x
