"""SGLang's ``generated-shared-prefix`` dataset (``bench_serving.py``).

G groups each with a random system prompt; G·P requests, each its group's
system prompt + a 2-token separator (``"\\n\\n"``) + a random question; shuffled
unless ordered. Lengths follow ``compute_random_lens`` with ``range_ratio``
(1 = fixed). Extensions seen in forks: Zipf group popularity and multi-turn
(``num_turns``: each next turn is the previous prompt + answer + a new question).

Drifting popularity (``drift_every`` > 0, Zipf only): the requests come in arrival order, each
drawing a popularity *rank* from the Zipf law; in phase k (requests k·D .. k·D + D − 1, D =
``drift_every``) rank r is group (r + k·``drift_step``) mod G, so every D requests the ranking
rotates by ``drift_step`` groups and the hot prefixes change. The drift is counted in requests,
not seconds, so every probe of a goodput search replays the same sequence; at a Poisson rate R
it happens every D / R seconds.
Infinite-cache bound with 16-token blocks and defaults: 15/16·2048/2178 ≈ 0.88.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sim.workload import Root, SimRequest, Workload, numpy_rng, pick_groups, random_lens, random_tokens

logger = logging.getLogger(__name__)

#: Token ids standing for the "\n\n" separator between system prompt and question.
SEPARATOR_TOKENS = [271, 271]


@dataclass
class GspConfig:
    """SGLang's flags (``--gsp-*``) with their defaults."""

    num_groups: int = 64
    prompts_per_group: int = 16
    system_prompt_len: int = 2048
    question_len: int = 128
    output_len: int = 256
    range_ratio: float = 1.0
    ordered: bool = False
    num_turns: int = 1
    group_distribution: str = "uniform"
    zipf_alpha: float = 1.1
    #: Requests per popularity phase (0: no drift); see the module docstring.
    drift_every: int = 0
    #: Groups the popularity ranking rotates by at each phase.
    drift_step: int = 1
    #: LoRA adapters (0: none). Each request names one of ``lora-0`` .. ``lora-{N-1}``, drawn
    #: uniformly: one system prompt is served under several adapters, and vLLM hashes the adapter
    #: into every block, so each (system prompt, adapter) pair is a prefix of its own. Follow-up
    #: turns keep their conversation's adapter.
    lora_adapters: int = 0


class GeneratedSharedPrefix(Workload):
    """See the module docstring."""

    name = "gsp"

    def __init__(self, config: GspConfig, rng: random.Random) -> None:
        super().__init__()
        self.config = c = config
        self._gen = numpy_rng(rng)
        self._rng = rng
        sys_lens = random_lens(rng, c.system_prompt_len, c.range_ratio, c.num_groups)
        self.system_prompts = [random_tokens(self._gen, n) for n in sys_lens]
        n = c.num_groups * c.prompts_per_group
        if c.drift_every < 0:
            raise ValueError(f"drift_every must be >= 0, got {c.drift_every}")
        if c.drift_every:
            if c.group_distribution != "zipf" or c.ordered:
                raise ValueError("drift_every needs group_distribution=zipf and no ordered (it fixes the order)")
            ranks = pick_groups(rng, c.num_groups, n, c.group_distribution, c.zipf_alpha)
            groups = [self.group_of_rank(r, i) for i, r in enumerate(ranks)]
        elif c.group_distribution == "uniform":
            groups = [g for g in range(c.num_groups) for _ in range(c.prompts_per_group)]
        else:
            groups = sorted(pick_groups(rng, c.num_groups, n, c.group_distribution, c.zipf_alpha))
        q_lens = random_lens(rng, c.question_len, c.range_ratio, n)
        o_lens = random_lens(rng, c.output_len, c.range_ratio, n)
        reqs = []
        if c.lora_adapters < 0:
            raise ValueError(f"lora_adapters must be >= 0, got {c.lora_adapters}")
        # Drawn only with adapters, after the rest: without them the workload is what it always was.
        loras = [f"lora-{rng.randrange(c.lora_adapters)}" for _ in range(n)] if c.lora_adapters else [None] * n
        for i, (g, q, o) in enumerate(zip(groups, q_lens, o_lens, strict=True)):
            prompt = self.system_prompts[g] + SEPARATOR_TOKENS + random_tokens(self._gen, q)
            reqs.append(SimRequest(f"gsp-{i}", prompt, o, group=g, lora_name=loras[i], meta={"turn": 1}))
        if not c.ordered and not c.drift_every:
            rng.shuffle(reqs)
        self.roots = [Root([r]) for r in reqs]

    def group_of_rank(self, rank: int, request_index: int) -> int:
        """The group holding popularity ``rank`` (0: the hottest) when request ``request_index``
        (in arrival order) is drawn."""
        c = self.config
        phase = request_index // c.drift_every if c.drift_every else 0
        return (rank + phase * c.drift_step) % c.num_groups

    def longest_request_tokens(self) -> int:
        # Turn k+1 = turn k's prompt + its answer (<= output_len) + a question (<= question_len).
        c = self.config
        grow = max(1, c.question_len) + max(1, c.output_len)
        return self.longest_root_tokens() + (c.num_turns - 1) * grow if self.roots else 0

    def follow_ups(self, request: SimRequest, output_token_ids: Sequence[int]) -> list[SimRequest]:
        turn = request.meta["turn"]
        if turn >= self.config.num_turns:
            return []
        c = self.config
        q = random_lens(self._rng, c.question_len, c.range_ratio, 1)[0]
        o = random_lens(self._rng, c.output_len, c.range_ratio, 1)[0]
        prompt = request.token_ids + list(output_token_ids) + random_tokens(self._gen, q)
        base = request.request_id.rsplit("/", 1)[0]
        return [SimRequest(f"{base}/t{turn + 1}", prompt, o, group=request.group, lora_name=request.lora_name,
                           meta={"turn": turn + 1})]
