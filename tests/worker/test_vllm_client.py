"""worker/vllm/openai_client.py against the fake vLLM server and canned SSE replies (127.0.0.1 only)."""

from __future__ import annotations

import socket
import threading

import pytest

from tests.conftest import free_port
from tests.fakes.fake_vllm import FakeVllm, fake_output_token, fake_tokenize
from tests.waiting import eventually
from worker.vllm.openai_client import CompletionRequest, OpenAIClient, Usage, VllmHTTPError

PROMPT = list(range(100, 140))  # 40 tokens: 2 full blocks of 16


@pytest.fixture
def fake():
    with FakeVllm(lora_adapters=("sql-lora",)) as server:
        yield server


@pytest.fixture
def client(fake):
    return OpenAIClient(base_url=fake.url, connect_timeout_s=2, read_timeout_s=10)


def test_stream_relays_token_ids_and_usage_with_cached_tokens(fake, client):
    req = CompletionRequest(model=fake.model, prompt_token_ids=PROMPT, max_tokens=4)
    first = client.stream_completion(req)
    deltas = list(first)
    assert [d.token_ids for d in deltas] == [[fake_output_token(PROMPT, i)] for i in range(4)]
    assert [d.finish_reason for d in deltas] == [None, None, None, "length"]
    assert first.done and first.usage == Usage(prompt_tokens=40, completion_tokens=4, cached_tokens=0)
    second = client.stream_completion(req)
    list(second)
    # Two full blocks cached; (40 - 1) // 16 = 2 may be reused.
    assert second.usage == Usage(prompt_tokens=40, completion_tokens=4, cached_tokens=32)


def test_request_body_is_what_vllm_expects(fake, client):
    req = CompletionRequest(model="sql-lora", prompt_token_ids=PROMPT, max_tokens=2, cache_salt="tenant-a",
                            ignore_eos=True, data_parallel_rank=None)
    list(client.stream_completion(req))
    assert fake.requests[-1] == {
        "model": "sql-lora", "prompt": PROMPT, "max_tokens": 2, "stream": True, "return_token_ids": True,
        "stream_options": {"include_usage": True}, "cache_salt": "tenant-a", "ignore_eos": True,
    }
    assert "X-data-parallel-rank" not in fake.request_headers[-1]


def test_non_streamed_completion(fake, client):
    result = client.complete(CompletionRequest(model=fake.model, prompt_token_ids=PROMPT, max_tokens=3))
    assert result.token_ids == [fake_output_token(PROMPT, i) for i in range(3)]
    assert result.finish_reason == "length"
    assert result.usage == Usage(40, 3, 0)


def test_http_errors_carry_status_and_server_message(fake, client):
    with pytest.raises(VllmHTTPError) as err:
        client.stream_completion(CompletionRequest(model="nope", prompt_token_ids=PROMPT, max_tokens=1))
    assert err.value.status == 404 and "The model `nope` does not exist." in str(err.value)
    fake.fail_next = (400, "This model's maximum context length is 4096 tokens.")
    with pytest.raises(VllmHTTPError) as err:
        client.complete(CompletionRequest(model=fake.model, prompt_token_ids=PROMPT, max_tokens=1))
    assert err.value.status == 400 and "maximum context length" in str(err.value)


def test_models_tokenize_health(fake, client):
    cards = client.models()
    assert [(c.id, c.parent) for c in cards] == [(fake.model, None), ("sql-lora", fake.model)]
    assert client.tokenize("hello big world", model=fake.model) == fake_tokenize("hello big world")
    assert client.tokenize("hi", model=fake.model, add_special_tokens=False) == fake_tokenize(
        "hi", add_special_tokens=False)
    assert client.health()
    dead = OpenAIClient(base_url=f"http://127.0.0.1:{free_port()}", connect_timeout_s=0.5)
    assert not dead.health()
    with pytest.raises(VllmHTTPError, match="cannot connect"):
        dead.models()


def test_close_from_another_thread_aborts_the_stream():
    with FakeVllm(token_delay_s=0.05) as fake:
        client = OpenAIClient(base_url=fake.url, read_timeout_s=10)
        stream = client.stream_completion(CompletionRequest(model=fake.model, prompt_token_ids=PROMPT,
                                                            max_tokens=200))
        got = []
        for delta in stream:
            got.append(delta)
            if len(got) == 2:
                threading.Timer(0.01, stream.close).start()
        assert 2 <= len(got) < 200 and not stream.done
        eventually(lambda: fake.aborted, what="the server saw an abort", interval_s=0.02)
        assert fake.aborted == [fake.requests[0]]  # the server saw the client go away
        assert fake.engines[0].running == 0


# ----------------------------------------------------------------------------- canned replies


def canned_server(reply: bytes):
    """A one-shot HTTP server on 127.0.0.1 sending ``reply`` verbatim, then closing."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    srv.settimeout(5)

    def serve():
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        with conn:
            conn.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            head, _, body = data.partition(b"\r\n\r\n")
            length = int([h for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")][0].split(b":")[1])
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(reply)
        srv.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{srv.getsockname()[1]}", thread


def sse(*events: bytes) -> bytes:
    body = b"".join(events)
    return b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close\r\n\r\n" + body


def test_sse_comments_malformed_lines_and_usage_without_details():
    url, thread = canned_server(sse(
        b": ping\n\n",
        b'data: {"choices":[{"index":0,"text":"a","token_ids":[7],"finish_reason":null}]}\n\n',
        b"data: {not json\n\n",
        b"event: x\nid: 3\n",
        b'data: {"choices":[{"index":0,"text":"b","finish_reason":"stop"}]}\n\n',
        b'data: {"choices":[],"usage":{"prompt_tokens":5,"completion_tokens":2,"prompt_tokens_details":null}}\n\n',
        b"data: [DONE]\n\n",
    ))
    stream = OpenAIClient(base_url=url, read_timeout_s=5).stream_completion(
        CompletionRequest(model="m", prompt_token_ids=[1], max_tokens=2))
    deltas = list(stream)
    thread.join(5)
    assert [(d.token_ids, d.text, d.finish_reason) for d in deltas] == [([7], "a", None), ([], "b", "stop")]
    assert stream.malformed_lines == 1 and stream.done
    assert stream.usage == Usage(prompt_tokens=5, completion_tokens=2, cached_tokens=None)


def test_error_object_inside_the_stream_raises():
    url, thread = canned_server(sse(
        b'data: {"choices":[{"index":0,"text":"a","token_ids":[7]}]}\n\n',
        b'data: {"error":{"message":"engine died","type":"InternalServerError","code":500}}\n\n',
    ))
    stream = OpenAIClient(base_url=url, read_timeout_s=5).stream_completion(
        CompletionRequest(model="m", prompt_token_ids=[1], max_tokens=2))
    with pytest.raises(VllmHTTPError, match="engine died") as err:
        list(stream)
    thread.join(5)
    assert err.value.status == 500


def test_stream_cut_before_done_is_visible():
    url, thread = canned_server(sse(b'data: {"choices":[{"index":0,"text":"a","token_ids":[7]}]}\n\n'))
    stream = OpenAIClient(base_url=url, read_timeout_s=5).stream_completion(
        CompletionRequest(model="m", prompt_token_ids=[1], max_tokens=2))
    assert [d.token_ids for d in stream] == [[7]]
    thread.join(5)
    assert not stream.done and stream.usage is None


def test_old_style_error_body():
    body = b'{"object":"error","message":"bad things","type":"BadRequestError","code":400}'
    url, thread = canned_server(b"HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nContent-Length: "
                                + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    with pytest.raises(VllmHTTPError, match="HTTP 400: bad things"):
        OpenAIClient(base_url=url).stream_completion(CompletionRequest(model="m", prompt_token_ids=[1], max_tokens=1))
    thread.join(5)


def test_bad_urls_are_refused():
    with pytest.raises(ValueError):
        OpenAIClient(base_url="localhost:8000")
