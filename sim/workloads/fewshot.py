"""k-shot prompting (MMLU / GSM8K / HellaSwag shape, RadixAttention benchmarks).

``num_subjects`` subjects; each has ``num_shots`` examples of ``shot_len`` tokens
shared by all its questions; a request is the subject's examples + one question
of ``question_len`` tokens. MMLU: 57–60 subjects, 5 shots, 1-token answers;
GSM8K: 1 subject, 5 shots, 256-token answers; HellaSwag: 1 subject, 20 shots.
Questions are shuffled across subjects.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass

from sim.workload import Root, SimRequest, Workload, numpy_rng, random_tokens

logger = logging.getLogger(__name__)


@dataclass
class FewShotConfig:
    num_subjects: int = 57
    num_shots: int = 5
    shot_len: int = 120
    questions_per_subject: int = 20
    question_len: int = 80
    output_len: int = 16


class FewShot(Workload):
    """See the module docstring."""

    name = "fewshot"

    def __init__(self, config: FewShotConfig, rng: random.Random) -> None:
        super().__init__()
        self.config = c = config
        gen = numpy_rng(rng)
        reqs = []
        for s in range(c.num_subjects):
            shots = random_tokens(gen, c.num_shots * c.shot_len)
            for q in range(c.questions_per_subject):
                reqs.append(SimRequest(f"fewshot-{s}-{q}", shots + random_tokens(gen, c.question_len), c.output_len,
                                       group=s))
        rng.shuffle(reqs)
        self.roots = [Root([r]) for r in reqs]
