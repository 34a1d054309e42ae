"""Multi-turn chat in the shape of SGLang's ``benchmark/hicache/bench_multiturn.py``.

``num_clients`` clients each hold a conversation of ``num_rounds`` rounds. Round 1
is ``request_length`` random tokens (plus an optional system prompt shared by
every client); round k > 1 is the whole history (previous prompt and the
engine's answer) plus ``sub_question_length`` new tokens. A client's next round
is sent only after its answer arrives (follow-up with ``think_time_s``).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sim.workload import Root, SimRequest, Workload, numpy_rng, random_tokens

logger = logging.getLogger(__name__)


@dataclass
class MultiTurnConfig:
    """bench_multiturn's flags and defaults (``--num-clients`` ...)."""

    num_clients: int = 256
    num_rounds: int = 5
    request_length: int = 512
    sub_question_length: int | None = None
    output_length: int = 64
    system_prompt_length: int = 0
    think_time_s: float = 0.0


class MultiTurnChat(Workload):
    """See the module docstring."""

    name = "multiturn"

    def __init__(self, config: MultiTurnConfig, rng: random.Random) -> None:
        super().__init__()
        self.config = c = config
        self._gen = numpy_rng(rng)
        system = random_tokens(self._gen, c.system_prompt_length)
        self.roots = [
            Root([SimRequest(f"chat-{i}/r1", system + random_tokens(self._gen, c.request_length), c.output_length,
                             group=i, meta={"round": 1})])
            for i in range(c.num_clients)
        ]

    def longest_request_tokens(self) -> int:
        # Round k+1 = round k's prompt + its answer (<= output_length) + a sub-question.
        c = self.config
        q = c.sub_question_length if c.sub_question_length is not None else c.request_length
        return self.longest_root_tokens() + (c.num_rounds - 1) * (q + c.output_length) if self.roots else 0

    def follow_ups(self, request: SimRequest, output_token_ids: Sequence[int]) -> list[SimRequest]:
        c = self.config
        rnd = request.meta["round"]
        if rnd >= c.num_rounds:
            return []
        q = c.sub_question_length if c.sub_question_length is not None else c.request_length
        prompt = request.token_ids + list(output_token_ids) + random_tokens(self._gen, q)
        rid = f"chat-{request.group}/r{rnd + 1}"
        return [SimRequest(rid, prompt, c.output_length, group=request.group, delay_s=c.think_time_s,
                           meta={"round": rnd + 1})]
