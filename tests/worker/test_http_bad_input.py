"""The emulated worker's vLLM-compatible HTTP face on malformed input: a 4xx answer, never a 5xx or a drop."""

from __future__ import annotations

import http.client
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.http_helpers import http_only_worker, raw_http

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def worker():
    with http_only_worker("hb", seed=3) as runner:
        yield runner


def _post(worker, path: str, raw: bytes) -> tuple[int, dict]:
    host, port = worker.http.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=15)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read() or b"{}")
    finally:
        conn.close()


def _raw(worker, data: bytes) -> bytes:
    return raw_http(worker.http.server.server_address, data)


@pytest.mark.parametrize("length", ["-5", "abc"])
def test_bad_content_length_is_400_and_closes_the_connection(worker, length):
    """It was a 500 (int() / rfile.read(-5) raised); -1 would have waited for EOF. The HTTP parser
    refuses it now: the error JSON all the same."""
    reply = _raw(worker, f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n{{}}".encode())
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.split(b" ")[1] == b"400"
    # One answer, then the connection closes: the "{}" after the headers is not read as a request.
    error = json.loads(body)["error"]
    assert (error["type"], error["code"]) == ("bad_request", 400)
    assert error["message"].startswith("malformed HTTP request: ")


def test_deeply_nested_json_is_400(worker):
    status, obj = _post(worker, "/v1/completions", b"[" * 100_000)
    assert status == 400 and obj["error"]["message"].startswith("invalid JSON: maximum recursion depth")


@pytest.mark.parametrize("prompt", [[-1], [2**32], [2**70]])
def test_token_ids_outside_uint32_are_400(worker, prompt):
    status, obj = _post(worker, "/v1/completions", json.dumps({"prompt": prompt, "max_tokens": 1}).encode())
    assert (status, obj["error"]["type"]) == (400, "bad_request")
    assert obj["error"]["message"] == f"token id {prompt[0]} is outside [0, 4294967296)"  # the router's answer too


@settings(max_examples=40)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
                    max_leaves=8),
       st.sampled_from(["prompt", "max_tokens", "model", "messages", "cache_salt", "n", "stream_options",
                        "max_completion_tokens"]))
def test_fuzzed_fields_get_an_answer(worker, value, key):
    body = {"prompt": "hi", "max_tokens": 1, key: value}
    path = "/v1/chat/completions" if key == "messages" else "/v1/completions"
    status, obj = _post(worker, path, json.dumps(body).encode())
    assert status == 200 or (400 <= status < 500 and obj["error"]["code"] == status), (status, obj)


@pytest.mark.parametrize("raw", [b'{"prompt": "\\ud800", "max_tokens": 1}',
                                 b'{"messages": [{"role": "user", "content": "x\\udfff"}], "max_tokens": 1}'])
def test_lone_surrogates_are_400(worker, raw):
    """JSON allows "\\ud800", UTF-8 does not: the tokenizer raised and the worker answered 500 (kvr bench fuzz)."""
    status, obj = _post(worker, "/v1/chat/completions" if b"messages" in raw else "/v1/completions", raw)
    assert (status, obj["error"]["type"]) == (400, "bad_request")
    assert obj["error"]["message"].startswith("the request does not encode: ")
