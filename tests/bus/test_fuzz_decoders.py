"""Every decoder at a socket edge under hypothesis: a valid value or its one documented error.

The targets and mutators are ``bench/fuzz.py``'s (``kvr bench fuzz`` runs 100k cases per
decoder); here hypothesis drives them with fewer cases, plus its own structure-aware strategy
(any field of a valid message replaced by arbitrary nested values) and raw bytes. The
regression tests pin the crashes the fuzzer found.
"""

from __future__ import annotations

import json
import random

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bench.fuzz import FuzzConfig, _nodes, make_case, run, run_case, targets
from bus.codec import client_decoder, encode, worker_decoder
from bus.schema import GenerateRequest
from bus.vllm_codec import DecodeError, VllmEventDecoder
from router.http_front import HttpError, parse_completion_body

TARGETS = targets()
NAMES = sorted(TARGETS)
_SEEDS = {name: t.seeds(random.Random(0)) for name, t in TARGETS.items()}

# Values msgpack can carry, nested: what a peer could put in any field.
_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
            | st.text(max_size=12) | st.binary(max_size=40))
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                            max_size=4), max_leaves=12)


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=150)
@given(rnd=st.randoms(use_true_random=False))
def test_mutated_cases_decode_or_raise_the_documented_error(name, rnd):
    target = TARGETS[name]
    outcome = run_case(target, make_case(rnd, target, _SEEDS[name]))
    assert outcome.ok, outcome.crash


_MSGPACK = [n for n in NAMES if TARGETS[n].kind == "msgpack"]


@pytest.mark.parametrize("name", _MSGPACK)
@settings(max_examples=120)
@given(data=st.data())
def test_any_field_replaced_by_any_value(name, data):
    """Structure-aware: one node of a valid message (a field, a list item, a tag) becomes anything."""
    target = TARGETS[name]
    obj = msgspec.msgpack.decode(data.draw(st.sampled_from(_SEEDS[name])))
    path = data.draw(st.sampled_from([p for p in _nodes(obj) if p]))
    parent = obj
    for p in path[:-1]:
        parent = parent[p]
    if data.draw(st.booleans()):
        parent[path[-1]] = data.draw(_values)
    else:
        del parent[path[-1]]  # a missing field, a shorter positional array
    outcome = run_case(target, msgspec.msgpack.encode(obj))
    assert outcome.ok, outcome.crash


@pytest.mark.parametrize("name", _MSGPACK)
@settings(max_examples=100)
@given(raw=st.binary(max_size=300))
def test_raw_bytes(name, raw):
    outcome = run_case(TARGETS[name], raw)
    assert outcome.ok, outcome.crash


@settings(max_examples=150)
@given(body=st.dictionaries(st.sampled_from(["prompt", "messages", "max_tokens", "max_completion_tokens", "model",
                                             "n", "stream", "stream_options", "cache_salt"]),
                            _values | st.integers(), max_size=5),
       chat=st.booleans())
def test_http_bodies_of_any_shape(body, chat):
    """The HTTP front's decoder: a request that crosses the bridge, or HttpError 400; JSON allows huge ints."""
    try:
        req = parse_completion_body(json.dumps(body, default=lambda b: b.hex()).encode(), chat=chat,
                                    request_id="cmpl-1", alias="kvr")
    except HttpError as exc:
        assert exc.status == 400 and exc.kind == "bad_request"
        return
    assert client_decoder().decode(encode(req)) == req


def test_valid_seeds_decode_on_every_target():
    for name in _MSGPACK + ["http_completions", "http_worker"]:  # the frame targets' seeds are payloads, not cases
        for seed in _SEEDS[name]:
            outcome = run_case(TARGETS[name], seed)
            assert outcome.ok and outcome.accepted, (name, outcome.crash)


def test_the_suite_counts_cases_and_reports_no_crash():
    result = run(FuzzConfig(cases=300, targets=("client", "replay_request")))
    rows = {r["decoder"]: r for r in result.tables["fuzz"]}
    assert set(rows) == {"client", "replay_request"} and "crashes" not in result.tables
    for row in rows.values():
        assert row["cases"] == 300 and row["crashes"] == 0 and row["accepted"] + row["refused"] == 300


def test_a_crash_is_reported_with_its_input():
    from bench.fuzz import Target

    def boom(frame: bytes):
        raise KeyError("x")

    outcome = run_case(Target("t", "", boom, (DecodeError,), lambda rng: [b""]), b"\x01")
    assert not outcome.ok and outcome.crash.startswith("KeyError: 'x' at ")


# ---------------------------------------------------------------------------- what the fuzzer found


@pytest.mark.parametrize("frame", [
    b'\x82\xa4type\xa6cancel\xaarequest_id\xa2\xc3\x28',  # a string that is not UTF-8
    b"\x91" * 100_000 + b"\xc0",  # arrays nested past the recursion limit
    b"\x81\xa1a" * 50_000 + b"\xc0",  # maps nested past it
])
def test_non_utf8_strings_and_deep_nesting_are_decode_errors(frame):
    """msgspec raises UnicodeDecodeError / RecursionError there; both escaped, and the router loop died."""
    for decoder in (client_decoder(), worker_decoder()):
        with pytest.raises(DecodeError):
            decoder.decode(frame)
        assert decoder.errors == 1


def test_vllm_payload_with_a_non_utf8_tag_is_a_decode_error():
    payload = b"\x93\xcb" + bytes(8) + b"\x91\x91\xab" + b"BlockSt\xc3\x28red" + b"\xc0"
    with pytest.raises(DecodeError):
        VllmEventDecoder().decode(payload)
    with pytest.raises(DecodeError):
        VllmEventDecoder().decode(b"\x93\xcb" + bytes(8) + b"\x91" * 100_000 + b"\xc0")


@pytest.mark.parametrize("raw", [b'{"prompt": "\\ud800"}', b'{"messages": [{"content": "\\udfff"}]}',
                                 b'{"prompt": "x", "model": "\\udc00"}'])
def test_lone_surrogates_in_http_bodies_are_400(raw):
    """JSON allows them, UTF-8 does not: the bridge's msgpack encode raised in its thread."""
    with pytest.raises(HttpError) as exc:
        parse_completion_body(raw, chat=b"messages" in raw, request_id="c", alias=None)
    assert exc.value.status == 400 and "does not encode" in str(exc.value)


def test_replay_request_past_the_end_of_seq_space_is_answered_with_the_end_marker():
    """A start seq of 2**64-1 made islice raise (offset > sys.maxsize) in the worker's loop."""
    from bench.fuzz import _ReplayHarness

    h = _ReplayHarness()
    assert h.run([b"id", b"", b"\xff" * 8]) == 1  # just the end marker
    assert h.run([b"id", b"", (50).to_bytes(8, "big")]) == 2 + 6  # seqs 50..55 and the end marker
    assert h.run([b"id", b"", b"\x00" * 9]) == 8  # longer than a uint64: ignored, nothing sent
    assert h.pub.counters.bad_replay_requests == 1 and h.pub.counters.replay_requests == 2


def test_http_alias_means_any_model_and_encodes():
    req = parse_completion_body(b'{"prompt": [1, 2], "model": "kvr", "max_tokens": 3}', chat=False,
                                request_id="c", alias="kvr")
    assert req == GenerateRequest("c", token_ids=[1, 2], max_tokens=3, model=None, stream=False)
