"""Admission: each bad request gets its own clear reason; good ones pass."""

from __future__ import annotations

import pytest

from bus.schema import ErrorCode
from core.admission import AdmissionLimits, check_prompt_length, check_request

LIMITS = AdmissionLimits(max_prompt_tokens=100, max_output_tokens=50, vocab_size=1000, models=frozenset({"m"}))


def _check(**overrides):
    fields = dict(request_id="r1", prompt=None, token_ids=[1, 2, 3], max_tokens=10, model="m", limits=LIMITS)
    fields.update(overrides)
    return check_request(**fields)


def test_good_requests_pass() -> None:
    assert _check() is None
    assert _check(prompt="hi", token_ids=None, model=None) is None
    assert _check(max_tokens=None) is None  # no cap (a chat without max_tokens)


@pytest.mark.parametrize(
    ("overrides", "code", "fragment"),
    [
        ({"request_id": ""}, "bad_request", "request_id"),
        ({"prompt": "x"}, "bad_request", "exactly one"),
        ({"token_ids": None}, "bad_request", "exactly one"),
        ({"max_tokens": 0}, "bad_request", "max_tokens must be >= 1"),
        ({"max_tokens": -5}, "bad_request", "max_tokens must be >= 1"),
        ({"max_tokens": 10**9}, "bad_request", "exceeds the limit of 50"),
        ({"model": "other"}, "unknown_model", "'other' is not served"),
        ({"token_ids": []}, "bad_request", "empty"),
        ({"token_ids": list(range(101))}, "prompt_too_long", "101 tokens exceeds 100"),
        ({"token_ids": [1, -1]}, "bad_request", "token id -1"),
        ({"token_ids": [1, 1000]}, "bad_request", "token id 1000"),
        ({"prompt": "", "token_ids": None}, "bad_request", "prompt is empty"),
    ],
)
def test_each_rejection_names_its_reason(overrides, code, fragment) -> None:
    rejection = _check(**overrides)
    assert rejection is not None
    assert rejection.code == code
    assert ErrorCode(rejection.code)  # every code is a wire ErrorCode
    assert fragment in rejection.message


def test_prompt_length_after_tokenizing() -> None:
    assert check_prompt_length(100, LIMITS) is None
    assert check_prompt_length(101, LIMITS).code == "prompt_too_long"
    assert check_prompt_length(0, LIMITS).code == "bad_request"


def test_ints_checked_skips_only_the_type_pass() -> None:
    """The router's token ids come decoded by msgspec as list[int]: their range is still checked."""
    assert _check(token_ids=[1, 2, 3], ints_checked=True) is None
    for bad, fragment in (([1, -1], "token id -1"), ([1, 1000], "token id 1000")):
        rejection = _check(token_ids=bad, ints_checked=True)
        assert rejection is not None and rejection.code == "bad_request" and fragment in rejection.message
