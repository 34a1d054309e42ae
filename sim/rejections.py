"""Why the simulated engines rejected requests, and the one-line warning that says so.

An engine rejects a request that can never run. In a simulation that almost always means
the fleet's limits do not fit the workload, and the user needs to be told which limit to
raise:

* ``context``: the prompt reaches the configured ``max_model_len`` (fix: ``--max-model-len``);
* ``capacity``: the prompt reaches what one worker's KV cache holds, because the engine caps
  its context there (fix: ``--num-gpu-blocks``, or a profile with more memory);
* ``other``: anything else the engine refuses (an empty prompt, ``max_tokens`` < 1). The
  first engine message is kept as the example.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

CONTEXT = "context"
CAPACITY = "capacity"
OTHER = "other"
#: Order of the causes in a warning.
CAUSES = (CONTEXT, CAPACITY, OTHER)


@dataclass
class CauseTally:
    """The rejections of one cause."""

    count: int = 0
    longest_prompt_tokens: int = 0
    #: The limits the rejected prompts reached (several with mixed profiles).
    limits_tokens: set[int] = field(default_factory=set)
    #: The engine's message for the first rejection (shown for ``other``).
    example: str = ""


@dataclass
class Rejections:
    """Rejections of one run, by cause."""

    by_cause: dict[str, CauseTally] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(t.count for t in self.by_cause.values())

    def add(self, *, prompt_tokens: int, engine_max_model_len: int, configured_max_model_len: int | None,
            message: str) -> None:
        """Count one rejection. The engine's effective ``max_model_len`` is the configured one
        capped at its KV capacity (None configured: the capacity alone)."""
        if prompt_tokens >= engine_max_model_len:
            capped = configured_max_model_len is None or engine_max_model_len < configured_max_model_len
            cause = CAPACITY if capped else CONTEXT
        else:
            cause = OTHER
        tally = self.by_cause.setdefault(cause, CauseTally(example=message))
        tally.count += 1
        tally.longest_prompt_tokens = max(tally.longest_prompt_tokens, prompt_tokens)
        if cause != OTHER:
            tally.limits_tokens.add(engine_max_model_len)

    def merge(self, other: Rejections) -> None:
        for cause, t in other.by_cause.items():
            mine = self.by_cause.setdefault(cause, CauseTally(example=t.example))
            mine.count += t.count
            mine.longest_prompt_tokens = max(mine.longest_prompt_tokens, t.longest_prompt_tokens)
            mine.limits_tokens |= t.limits_tokens


def _limits(t: CauseTally) -> str:
    return " or ".join(str(x) for x in sorted(t.limits_tokens))


def cause_text(cause: str, tally: CauseTally) -> str:
    """What went wrong for one cause and the flag that fixes it."""
    if cause == CONTEXT:
        return (f"prompt too long for max_model_len {_limits(tally)} tokens "
                f"(longest prompt {tally.longest_prompt_tokens} tokens); raise it with --max-model-len")
    if cause == CAPACITY:
        return (f"prompt too long for one worker's KV cache of {_limits(tally)} tokens "
                f"(longest prompt {tally.longest_prompt_tokens} tokens); "
                "raise it with --num-gpu-blocks or a --profile with more memory")
    return f"refused by the engine ({tally.example})"


def rejection_message(runs: Mapping[str, tuple[int, Rejections]]) -> str | None:
    """One line for the rejections of several runs (``label -> (requests, rejections)``), or
    None when there were none. Identical counts are stated once ("N of M requests rejected
    under every policy"); different ones are listed per run. Each cause comes with its fix."""
    if not any(rej.total for _, rej in runs.values()):
        return None
    counts = {label: (rej.total, n) for label, (n, rej) in runs.items()}
    if len(set(counts.values())) == 1:
        rejected, requests = next(iter(counts.values()))
        scope = " under every policy" if len(counts) > 1 else ""
        head = f"{rejected} of {requests} requests rejected{scope}"
    else:
        head = "requests rejected (" + ", ".join(f"{label} {r} of {n}" for label, (r, n) in counts.items()) + ")"
    merged = Rejections()
    for _, rej in runs.values():
        merged.merge(rej)
    causes = [c for c in CAUSES if c in merged.by_cause]
    if len(causes) == 1:
        return f"{head}: {cause_text(causes[0], merged.by_cause[causes[0]])}"
    # Several causes: each with its count when every run counted the same (a sum over
    # the runs would count a request once per policy).
    per_run = {tuple(rej.by_cause[c].count if c in rej.by_cause else 0 for c in causes) for _, rej in runs.values()}
    same = per_run.pop() if len(per_run) == 1 else None
    parts = [(f"{same[i]} " if same else "") + cause_text(c, merged.by_cause[c]) for i, c in enumerate(causes)]
    return f"{head}: " + "; ".join(parts)


def all_rejected(runs: Mapping[str, tuple[int, Rejections]]) -> bool:
    """True when the runs had requests and the engines rejected every one of them."""
    return bool(runs) and all(n > 0 and rej.total == n for n, rej in runs.values())
