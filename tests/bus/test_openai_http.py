"""``bus/openai_http.py``'s body decoding: the fast paths answer as the plain checks did."""

from __future__ import annotations

import enum
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bus.openai_http import HttpError, decode_json_body, parse_prompt


class Tok(enum.IntEnum):
    A = 7


@pytest.mark.parametrize(("prompt", "ok"), [
    ([], True), ([0, 1, 2**32 - 1], True), ([Tok.A, 3], True),  # an int subclass is still an int
    ([1, True], False), ([1.0], False), ([1, "2"], False), ([[1], [2]], False),  # (a batch of one is fine)
])
def test_token_id_lists(prompt, ok) -> None:
    if ok:
        assert parse_prompt({"prompt": prompt}, chat=False) == (None, prompt)
    else:
        with pytest.raises(HttpError) as exc:
            parse_prompt({"prompt": prompt}, chat=False)
        assert exc.value.status == 400 and "must be a string or a list of token ids" in str(exc.value)


def test_the_first_token_id_out_of_range_is_named() -> None:
    with pytest.raises(HttpError, match=r"token id -3 is outside \[0, 4294967296\)"):
        parse_prompt({"prompt": [5, -3, 2**40]}, chat=False)
    with pytest.raises(HttpError, match=r"token id 1099511627776 is outside"):
        parse_prompt({"prompt": [5, 2**40, -3]}, chat=False)


_leaf = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=5)
_json = st.recursive(_leaf, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=3), c, max_size=3),
                     max_leaves=12)


@settings(max_examples=200, deadline=None)
@given(_json)
def test_bodies_decode_as_the_standard_library_decodes_them(value) -> None:
    raw = json.dumps({"v": value}).encode()
    assert decode_json_body(raw) == json.loads(raw)


@pytest.mark.parametrize("raw", [b'{"v": NaN}', b'{"v": 1e400}', b'{"v": "\\ud800"}'])
def test_what_only_the_standard_library_accepts_is_still_accepted(raw: bytes) -> None:
    assert decode_json_body(raw).keys() == {"v"}


@pytest.mark.parametrize("raw", [b"{", b"[1]", b"\xff", b"[" * 100_000])
def test_bad_bodies_are_a_400(raw: bytes) -> None:
    with pytest.raises(HttpError) as exc:
        decode_json_body(raw)
    assert exc.value.status == 400
