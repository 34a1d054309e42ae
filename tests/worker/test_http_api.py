"""vLLM's HTTP face on the emulated worker (no router), checked with real HTTP over loopback."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from core.tokenizer import BuiltinTokenizer
from tests.http_helpers import http_only_worker
from worker.runner import WorkerOptions, WorkerRunner
from worker.vllm.checks import check_server
from worker.vllm.metrics import cache_config, engine_stats, parse_prometheus_text
from worker.vllm.openai_client import CompletionRequest, OpenAIClient

PROSE = (
    "The quick brown fox jumps over the lazy dog and keeps running through the forest until night falls on "
    "the quiet valley where nobody lives anymore except the old owl who watches everything from the pine."
)


@pytest.fixture(scope="module")
def worker():
    with http_only_worker("h1", seed=11) as runner:
        yield runner


def call(worker, method: str, path: str, body=None, raw: bytes | None = None):
    host, port = worker.http.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    try:
        data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, resp.read().decode(), dict(resp.getheaders())
    finally:
        conn.close()


def test_a_repeated_prompt_reports_cached_tokens(worker) -> None:
    status, text, _ = call(worker, "POST", "/v1/completions", {"model": "any", "prompt": PROSE, "max_tokens": 4})
    assert status == 200
    first = json.loads(text)
    n = len(BuiltinTokenizer().encode(PROSE))
    assert first["usage"] == {"prompt_tokens": n, "completion_tokens": 4, "total_tokens": n + 4,
                              "prompt_tokens_details": {"cached_tokens": 0}}
    assert first["object"] == "text_completion" and first["choices"][0]["finish_reason"] == "length"
    _, text, headers = call(worker, "POST", "/v1/completions", {"model": "any", "prompt": PROSE, "max_tokens": 4})
    assert headers["x-kvr-worker"] == "h1"
    assert json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16


def test_streamed_chat_has_role_deltas_finish_and_usage(worker) -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3, "stream": True,
            "stream_options": {"include_usage": True}}
    status, text, headers = call(worker, "POST", "/v1/chat/completions", body)
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    assert headers["x-kvr-worker"] == "h1"  # which worker served it, through any peer router
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:5]] == [None, None, None, "length"]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_the_vllm_adapter_accepts_the_emulated_server(worker) -> None:
    # The same start-up checks and streaming client kvr uses on a real vLLM server.
    client = OpenAIClient(base_url=worker.http_url)
    info = check_server(client, model=None, block_size=16, startup_timeout_s=5)
    assert (info.model, info.num_gpu_blocks, info.reports_cached_tokens, info.returns_token_ids) == (
        "kvr-emulated", 924, True, True)
    stream = client.stream_completion(CompletionRequest(model="kvr-emulated", prompt_token_ids=list(range(40)),
                                                        max_tokens=3))
    ids = [t for d in stream for t in d.token_ids]
    assert len(ids) == 3 and stream.usage.prompt_tokens == 40


def test_metrics_use_vllm_names_that_kvr_and_routers_parse(worker) -> None:
    call(worker, "POST", "/v1/completions", {"model": "m", "prompt": [5] * 40, "max_tokens": 1})
    status, text, _ = call(worker, "GET", "/metrics")
    assert status == 200
    metrics = parse_prometheus_text(text)
    stats = engine_stats(metrics)[0]
    assert stats.prefix_queries_tokens > 0 and stats.running == 0 and stats.kv_usage == 0.0
    cfg = cache_config(metrics)
    assert (cfg.block_size, cfg.num_gpu_blocks, cfg.enable_prefix_caching) == (16, 924, True)
    assert 'vllm:request_success_total{model_name="kvr-emulated",engine="0",finished_reason="length"}' in text
    assert "vllm:time_to_first_token_seconds_bucket" in text


def test_tokenize_detokenize_models_and_peer_router_probes(worker) -> None:
    _, text, _ = call(worker, "POST", "/tokenize", {"model": "m", "prompt": "hello world"})
    tok = json.loads(text)
    assert tok["tokens"] == BuiltinTokenizer().encode("hello world") and tok["count"] == 4  # hel lo wor ld
    _, text, _ = call(worker, "POST", "/detokenize", {"model": "m", "tokens": tok["tokens"]})
    assert json.loads(text) == {"prompt": "hello world"}
    _, text, _ = call(worker, "GET", "/v1/models")
    assert json.loads(text)["data"][0]["id"] == "kvr-emulated"
    assert call(worker, "GET", "/health")[0] == 200
    _, text, _ = call(worker, "GET", "/get_server_info")
    info = json.loads(text)
    assert info["served_model_name"] == "kvr-emulated" and "model_path" not in info and "tokenizer_path" not in info


@pytest.mark.parametrize(
    ("method", "path", "body", "status"),
    [
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", json.dumps({"model": "m", "prompt": [1] * 5000}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"model": "m", "prompt": {"x": 1}}).encode(), 400),
        ("POST", "/v1/completions", json.dumps({"model": "m", "prompt": "x", "max_tokens": -1}).encode(), 400),
        ("GET", "/nope", None, 404),
    ],
)
def test_bad_requests_get_vllm_style_errors(worker, method, path, body, status) -> None:
    got, text, _ = call(worker, method, path, raw=body)
    assert got == status
    assert json.loads(text)["error"]["code"] == status


def test_reset_prefix_cache_clears_hits(worker) -> None:
    prompt = list(range(1000, 1064))
    call(worker, "POST", "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 1})
    assert call(worker, "POST", "/reset_prefix_cache", {})[0] == 200
    _, text, _ = call(worker, "POST", "/v1/completions", {"model": "m", "prompt": prompt, "max_tokens": 1})
    assert json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0


def test_lora_adapters_are_listed_and_cache_apart_from_the_base_model() -> None:
    runner = WorkerRunner(WorkerOptions(worker_id="h2", router_endpoint="none", http_port=0, speedup=50.0, seed=1,
                                        lora_modules="ad1, ad2"))
    th = threading.Thread(target=runner.run, daemon=True)
    th.start()
    try:
        info = check_server(OpenAIClient(base_url=runner.http_url), model="kvr-emulated", block_size=16,
                            startup_timeout_s=5, probe=False)
        assert info.lora_adapters == ("ad1", "ad2")
        prompt = list(range(2000, 2040))

        def cached(model: str) -> int:
            _, text, _ = call(runner, "POST", "/v1/completions", {"model": model, "prompt": prompt, "max_tokens": 1})
            return json.loads(text)["usage"]["prompt_tokens_details"]["cached_tokens"]

        assert [cached("kvr-emulated"), cached("ad1"), cached("ad1"), cached("ad2"), cached("other")] == [
            0, 0, 32, 0, 32]
    finally:
        runner.stop()
        th.join(timeout=5)


def test_odd_fields_never_break_the_server(worker) -> None:
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 1, "stream": True, "stream_options": None}
    status, text, _ = call(worker, "POST", "/v1/completions", body)
    assert status == 200 and text.rstrip().endswith("data: [DONE]")
    status, text, _ = call(worker, "POST", "/v1/completions", {**body, "stream_options": ["x"]})
    assert (status, json.loads(text)["error"]["message"]) == (400, "'stream_options' must be an object")  # vLLM: 400
    status, text, _ = call(worker, "POST", "/v1/completions", {"model": "m", "prompt": [2**40], "max_tokens": 1})
    assert status == 400 and "token id 1099511627776 is outside" in json.loads(text)["error"]["message"]
    status, _, _ = call(worker, "POST", "/v1/chat/completions", {"model": "m", "messages": "hi"})
    assert status == 400


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"), ("GET", "/tokenize", "POST"),
    ("POST", "/v1/models", "GET"), ("POST", "/health", "GET"), ("PUT", "/v1/completions", "POST"),
    ("DELETE", "/v1/models", "GET"),
])
def test_a_known_path_under_another_method_is_405_with_allow(worker, method, path, allow) -> None:
    status, text, headers = call(worker, method, path, {} if method in ("POST", "PUT") else None)
    assert (status, headers["Allow"]) == (405, allow)
    assert json.loads(text)["error"] == {"message": f"method {method} not allowed on {path}",
                                         "type": "MethodNotAllowedError", "param": None, "code": 405}
    status, _, headers = call(worker, method, "/v1/nowhere", {} if method in ("POST", "PUT") else None)
    assert status == 404 and "Allow" not in headers


def test_detokenize_outside_the_vocabulary_is_a_400(worker) -> None:
    from core.tokenizer import BUILTIN_VOCAB_SIZE

    status, text, _ = call(worker, "POST", "/detokenize", {"tokens": [1, BUILTIN_VOCAB_SIZE]})
    assert status == 400 and str(BUILTIN_VOCAB_SIZE) in json.loads(text)["error"]["message"]
