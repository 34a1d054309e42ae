"""The model context (``max_model_len``) the simulator gives its engines when ``--max-model-len`` is not set.

A profile's ``max_model_len`` is its model's native context: 2048 tokens for the 13B-class
default ``simple``. Someone comparing routers runs a workload on a deployment whose model fits
that workload. Nobody benchmarks SGLang's gsp (2,178-token prompts plus 256 output tokens)
against a 2k-context model, and a run where every request is rejected says nothing about
routing. So, with no flag, the context grows to fit the workload's longest root request
(prompt + output), up to ``LONG_CONTEXT_TOKENS``. The workload itself keeps the upstream
defaults that users know: changing gsp's lengths would change its published 0.88 bound.

Raising the context changes no figure of a request that already fitted, because
``max_model_len`` only decides rejection and where output is cut off. KV capacity stays the
profile's, and the engine still caps the context at what one worker's cache holds, so a request
bigger than a GPU's cache is still rejected (the fix for that is ``--num-gpu-blocks``).
Follow-ups (later chat turns, tree levels) count too: each workload bounds their growth from
its config (``Workload.longest_request_tokens``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)

#: The longest context assumed without ``--max-model-len``: 128k tokens, the class of the
#: long-context models that served the Mooncake traces. Every row of the conversation trace
#: fits (the longest is 126,527 tokens with its output). A row longer than this is reported
#: as rejected: in the synthetic trace, 10 rows of up to 191,386 tokens.
LONG_CONTEXT_TOKENS = 131072


def fitted_max_model_len(*, longest_tokens: int, cap_tokens: int, profile_max_model_lens: Sequence[int]) -> int | None:
    """The ``max_model_len`` override that fits ``longest_tokens`` (prompt + output, at most
    ``cap_tokens``), or None when the smallest profile context already fits it.

    The engine rejects a prompt of ``max_model_len`` tokens or more and stops output at
    ``max_model_len``, so ``prompt + output`` tokens is exactly enough. The override applies to
    every worker, so it is never below the largest profile's own context."""
    want = min(longest_tokens, cap_tokens)
    if want <= min(profile_max_model_lens):
        return None
    return max(want, *profile_max_model_lens)
