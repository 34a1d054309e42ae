"""Agentic bursts: tree-of-thought, multi-chain fan-out with a judge, ReAct loops.

Shapes from SGLang's RadixAttention benchmarks (``WukLab/preble@8e7906a3:benchmark/``):

* ``tot``: every question starts ``branches`` calls at once (a burst of siblings);
  each finished call forks ``branches`` children whose prompt is the parent's
  full context (prompt + answer) + a short step instruction, down to ``depth``
  levels: 2+4+8+16 = 30 calls per question with the defaults.
* ``fanout``: each question fans out to ``num_chains`` reasoning chains at once;
  when the last chain finishes, one judge call sees the question and every chain.
* ``react``: a shared instruction with exemplars, then per task ``num_steps``
  sequential calls, each appending thought/action (the answer) and an observation.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from sim.workload import Root, SimRequest, Workload, numpy_rng, random_tokens

logger = logging.getLogger(__name__)


@dataclass
class TreeOfThoughtConfig:
    num_questions: int = 32
    branches: int = 2
    depth: int = 4
    instruction_len: int = 300
    question_len: int = 200
    step_len: int = 32
    output_len: int = 256


class TreeOfThought(Workload):
    """See the module docstring."""

    name = "tot"

    def __init__(self, config: TreeOfThoughtConfig, rng: random.Random) -> None:
        super().__init__()
        self.config = c = config
        self._gen = gen = numpy_rng(rng)
        instruction = random_tokens(gen, c.instruction_len)
        # One fixed instruction per level, shared by every node at that level.
        self.step_tokens = [random_tokens(gen, c.step_len) for _ in range(c.depth + 1)]
        self.roots = []
        for q in range(c.num_questions):
            prompt = instruction + random_tokens(gen, c.question_len) + self.step_tokens[1]
            kids = [SimRequest(f"tot-{q}/{b}", list(prompt), c.output_len, group=q, meta={"level": 1})
                    for b in range(c.branches)]
            self.roots.append(Root(kids))

    def longest_request_tokens(self) -> int:
        # Level k+1 = level k's prompt + its answer (<= output_len) + a step instruction.
        c = self.config
        return self.longest_root_tokens() + (c.depth - 1) * (c.step_len + c.output_len) if self.roots else 0

    def follow_ups(self, request: SimRequest, output_token_ids: Sequence[int]) -> list[SimRequest]:
        c = self.config
        level = request.meta["level"]
        if level >= c.depth:
            return []
        prompt = request.token_ids + list(output_token_ids) + self.step_tokens[level + 1]
        return [
            SimRequest(f"{request.request_id}.{b}", list(prompt), c.output_len, group=request.group,
                       meta={"level": level + 1})
            for b in range(c.branches)
        ]


@dataclass
class FanOutConfig:
    num_questions: int = 50
    num_chains: int = 5
    instruction_len: int = 200
    question_len: int = 300
    output_len: int = 256
    judge_output_len: int = 64


class FanOut(Workload):
    """See the module docstring."""

    name = "fanout"

    def __init__(self, config: FanOutConfig, rng: random.Random) -> None:
        super().__init__()
        self.config = c = config
        gen = numpy_rng(rng)
        instruction = random_tokens(gen, c.instruction_len)
        self._judge_tokens = random_tokens(gen, 16)
        self._answers: dict[int, dict[int, list[int]]] = {}
        self._questions: dict[int, list[int]] = {}
        self.roots = []
        for q in range(c.num_questions):
            prompt = instruction + random_tokens(gen, c.question_len)
            self._questions[q] = prompt
            chains = [SimRequest(f"fanout-{q}/chain{k}", list(prompt), c.output_len, group=q, meta={"chain": k})
                      for k in range(c.num_chains)]
            self.roots.append(Root(chains))

    def longest_request_tokens(self) -> int:
        # The judge sees the question, every chain's answer (<= output_len each) and 16 tokens.
        c = self.config
        if not self.roots:
            return 0
        judge = (max(map(len, self._questions.values())) + c.num_chains * c.output_len + len(self._judge_tokens)
                 + c.judge_output_len)
        return max(self.longest_root_tokens(), judge)

    def follow_ups(self, request: SimRequest, output_token_ids: Sequence[int]) -> list[SimRequest]:
        if "chain" not in request.meta:
            return []
        got = self._answers.setdefault(request.group, {})
        got[request.meta["chain"]] = list(output_token_ids)
        if len(got) < self.config.num_chains:
            return []
        prompt = list(self._questions[request.group])
        for k in range(self.config.num_chains):  # chain order, not finish order
            prompt += got[k]
        prompt += self._judge_tokens
        del self._answers[request.group]
        return [SimRequest(f"fanout-{request.group}/judge", prompt, self.config.judge_output_len, group=request.group,
                           meta={})]


@dataclass
class ReActConfig:
    num_tasks: int = 100
    num_steps: int = 6
    instruction_len: int = 1200
    task_len: int = 100
    observation_len: int = 150
    output_len: int = 80
    think_time_s: float = 0.5


class ReAct(Workload):
    """See the module docstring."""

    name = "react"

    def __init__(self, config: ReActConfig, rng: random.Random) -> None:
        super().__init__()
        self.config = c = config
        self._gen = gen = numpy_rng(rng)
        instruction = random_tokens(gen, c.instruction_len)
        self.roots = [
            Root([SimRequest(f"react-{t}/s1", instruction + random_tokens(gen, c.task_len), c.output_len, group=t,
                             meta={"step": 1})])
            for t in range(c.num_tasks)
        ]

    def longest_request_tokens(self) -> int:
        # Step k+1 = step k's prompt + its answer (<= output_len) + an observation.
        c = self.config
        return self.longest_root_tokens() + (c.num_steps - 1) * (c.observation_len + c.output_len) if self.roots else 0

    def follow_ups(self, request: SimRequest, output_token_ids: Sequence[int]) -> list[SimRequest]:
        c = self.config
        step = request.meta["step"]
        if step >= c.num_steps:
            return []
        prompt = request.token_ids + list(output_token_ids) + random_tokens(self._gen, c.observation_len)
        return [SimRequest(f"react-{request.group}/s{step + 1}", prompt, c.output_len, group=request.group,
                           delay_s=c.think_time_s, meta={"step": step + 1})]
