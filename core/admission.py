"""Request admission: what a router accepts, and a clear reason when it does not.

Pure: the router calls :func:`check_request` on every request before routing;
the result code names an ``ErrorCode`` value of ``bus/schema.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AdmissionLimits:
    """Limits a request must respect. Token counts in tokens."""

    max_prompt_tokens: int = 131_072
    max_output_tokens: int = 32_768
    vocab_size: int = 2**32  # token ids must lie in [0, vocab_size)
    max_prompt_chars: int = 4 * 131_072 * 4
    models: frozenset[str] = frozenset()  # empty = any model
    max_id_chars: int = 256


@dataclass(frozen=True)
class Rejection:
    code: str  # an ErrorCode value
    message: str


def check_request(
    *,
    request_id: str,
    prompt: str | None,
    token_ids: Sequence[int] | None,
    max_tokens: int | None,
    model: str | None,
    limits: AdmissionLimits,
    ints_checked: bool = False,
) -> Rejection | None:
    """``None`` if the request may be routed, else why not (checked cheapest first).

    ``ints_checked``: ``token_ids`` are known to be plain ints already (decoded by msgspec as
    ``list[int]``, which refuses bools and floats), so only their range is checked: one pass less
    over the prompt on the router's hot path."""
    if not request_id or len(request_id) > limits.max_id_chars:
        return Rejection("bad_request", f"request_id must be 1..{limits.max_id_chars} characters")
    if (prompt is None) == (token_ids is None):
        return Rejection("bad_request", "give exactly one of prompt or token_ids")
    # None: no cap (the engine stops at end of sequence or at its context).
    if max_tokens is not None and (isinstance(max_tokens, bool) or max_tokens < 1):
        return Rejection("bad_request", f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens is not None and max_tokens > limits.max_output_tokens:
        return Rejection("bad_request", f"max_tokens {max_tokens} exceeds the limit of {limits.max_output_tokens}")
    if limits.models and model is not None and model not in limits.models:
        served = ", ".join(sorted(limits.models))
        return Rejection("unknown_model", f"model {model!r} is not served here (served: {served})")
    if prompt is not None:
        if not prompt:
            return Rejection("bad_request", "prompt is empty")
        if len(prompt) > limits.max_prompt_chars:
            return Rejection("prompt_too_long", f"prompt of {len(prompt)} characters exceeds {limits.max_prompt_chars}")
        return None
    assert token_ids is not None
    if not token_ids:
        return Rejection("bad_request", "token_ids is empty")
    if len(token_ids) > limits.max_prompt_tokens:
        return Rejection("prompt_too_long", f"prompt of {len(token_ids)} tokens exceeds {limits.max_prompt_tokens}")
    # Fast path in C (this runs per request): all plain ints, within range.
    if ((ints_checked or set(map(type, token_ids)) == {int})
            and min(token_ids) >= 0 and max(token_ids) < limits.vocab_size):
        return None
    bad = next((t for t in token_ids
                if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < limits.vocab_size), None)
    if bad is not None:
        return Rejection("bad_request", f"token id {bad!r} is outside [0, {limits.vocab_size})")
    return None


def check_prompt_length(num_prompt_tokens: int, limits: AdmissionLimits) -> Rejection | None:
    """After tokenizing a text prompt: the same length limit as for token ids."""
    if num_prompt_tokens == 0:
        return Rejection("bad_request", "prompt tokenizes to no tokens")
    if num_prompt_tokens > limits.max_prompt_tokens:
        return Rejection("prompt_too_long", f"prompt of {num_prompt_tokens} tokens exceeds {limits.max_prompt_tokens}")
    return None
