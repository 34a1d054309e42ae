"""A chat without ``max_tokens`` is uncapped end to end, as vLLM's chat endpoint is: the HTTP front
sends ``max_tokens`` None, the router dispatches ``NO_CAP``, the emulated engine draws the length
its model would stop at, and the vLLM adapter asks vLLM for the rest of the context (its
completions endpoint would otherwise default to 16)."""

from __future__ import annotations

from types import SimpleNamespace

from bus.openai_http import parse_completion_body
from bus.schema import NO_CAP, Dispatch
from router.http_front import generate_request
from worker.vllm.backend import VllmBackend
from worker.vllm.openai_client import CompletionRequest


def test_the_front_sends_a_chat_without_max_tokens_uncapped():
    chat = parse_completion_body({"messages": [{"role": "user", "content": "hi"}]}, chat=True)
    assert generate_request(chat, request_id="r1", alias=None).max_tokens is None
    capped = parse_completion_body({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 7}, chat=True)
    assert generate_request(capped, request_id="r2", alias=None).max_tokens == 7


def test_the_vllm_adapter_asks_for_the_rest_of_the_context_when_uncapped():
    known = SimpleNamespace(info=SimpleNamespace(max_model_len=100))
    unknown = SimpleNamespace(info=SimpleNamespace(max_model_len=None))
    assert VllmBackend._max_tokens(known, Dispatch("r", [1] * 30, NO_CAP)) == 70
    assert VllmBackend._max_tokens(known, Dispatch("r", [1] * 100, NO_CAP)) == 1
    assert VllmBackend._max_tokens(known, Dispatch("r", [1] * 30, 5)) == 5
    assert VllmBackend._max_tokens(unknown, Dispatch("r", [1] * 30, NO_CAP)) is None


def test_a_completion_body_without_max_tokens_sends_none():
    assert "max_tokens" not in CompletionRequest(model="m", prompt_token_ids=[1], max_tokens=None).body(stream=False)
    assert CompletionRequest(model="m", prompt_token_ids=[1], max_tokens=3).body(stream=True)["max_tokens"] == 3
