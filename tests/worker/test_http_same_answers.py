"""One table of request bodies against both HTTP edges: the router's front (through a router to an
emulated worker) and that worker's own vLLM API. Both decode with bus/openai_http.py, so a body gets
the same status, error type and message from either (they drifted when each had its own decoder:
chat max_tokens 16 vs none, empty messages refused vs accepted)."""

from __future__ import annotations

import http.client
import json
import threading

import pytest
import zmq

from bus.openai_http import DEFAULT_COMPLETION_MAX_TOKENS
from bus.sockets import ANY_LOOPBACK_PORT, connectable
from core.liveness import HeartbeatConfig
from router.config import RouterConfig
from router.http_front import RouterHttpFront
from tests.router.test_service import RunningRouter
from tests.waiting import eventually
from worker.runner import WorkerOptions, WorkerRunner

pytestmark = pytest.mark.timeout(120)
BLOCKS = 16  # 256 tokens of KV cache: an uncapped chat fills the context quickly


@pytest.fixture(scope="module")
def servers():
    """``{"router": address, "worker": address}`` of the two HTTP edges in front of one engine."""
    ctx = zmq.Context()
    cfg = RouterConfig(bind_clients=ANY_LOOPBACK_PORT, bind_workers=ANY_LOOPBACK_PORT, block_size=16,
                       heartbeat=HeartbeatConfig(interval_s=0.2, liveness=5), router_id="r1", request_timeout_s=20.0)
    running = RunningRouter(cfg)
    router = running.service
    worker = WorkerRunner(WorkerOptions(worker_id="w1", router_endpoint=connectable(router.workers_endpoint),
                                        model="m", speedup=50.0, seed=1, num_gpu_blocks=BLOCKS, http_port=0,
                                        heartbeat_interval=0.2))
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    front = RouterHttpFront(client_endpoint=connectable(router.clients_endpoint), stats=lambda: router.stats,
                            ctx=ctx, request_timeout_s=20)
    front.start()
    eventually(lambda: router.workers, timeout_s=10, what="the worker registered")
    yield {"router": front.server.server_address, "worker": worker.http.server.server_address,
           "max_model_len": worker.backend.engine.max_model_len}
    front.close()
    worker.stop()
    thread.join(5)
    running.stop()
    ctx.term()


def _post(address, path: str, raw: bytes) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(*address, timeout=30)
    try:
        conn.request("POST", path, body=raw, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())
    finally:
        conn.close()


CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
REFUSED = [
    # (path, body, message): a 400 of type bad_request from both
    (CHAT, {"messages": []}, "'messages' must be a non-empty list of objects"),
    (CHAT, {"messages": "hi"}, "'messages' must be a non-empty list of objects"),
    (CHAT, {"messages": [1]}, "'messages' must be a non-empty list of objects"),
    (COMPLETIONS, {"prompt": 5}, "'prompt' must be a string or a list of token ids (batches are not supported)"),
    (COMPLETIONS, {"prompt": ["a", "b"]},
     "'prompt' must be a string or a list of token ids (batches are not supported)"),
    (COMPLETIONS, {"prompt": [1, -1]}, "token id -1 is outside [0, 4294967296)"),
    (COMPLETIONS, {"prompt": [2**32]}, "token id 4294967296 is outside [0, 4294967296)"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 0}, "'max_tokens' must be a positive integer"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": "8"}, "'max_tokens' must be a positive integer"),
    (COMPLETIONS, {"prompt": "hi", "max_completion_tokens": True}, "'max_tokens' must be a positive integer"),
    (COMPLETIONS, {"prompt": "hi", "max_tokens": 10**30}, f"'max_tokens' {10**30} is too large"),
    (COMPLETIONS, {"prompt": "hi", "n": 2}, "only n=1 is supported"),
    (COMPLETIONS, {"prompt": "hi", "cache_salt": 1}, "'cache_salt' must be a string"),
    (COMPLETIONS, {"prompt": "hi", "model": 7}, "'model' must be a string"),
    (COMPLETIONS, {"prompt": "hi", "stream": True, "stream_options": 1}, "'stream_options' must be an object"),
    (COMPLETIONS, "[1, 2]", "the request body must be a JSON object"),
]


@pytest.mark.parametrize("path,body,message", REFUSED, ids=[f"{i}-{c[2][:24]}" for i, c in enumerate(REFUSED)])
def test_both_servers_refuse_a_bad_body_alike(servers, path, body, message):
    raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
    answers = {name: _post(servers[name], path, raw) for name in ("router", "worker")}
    for status, obj in answers.values():
        assert (status, obj["error"]) == (400, {"message": message, "type": "bad_request", "param": None, "code": 400})


def test_both_servers_refuse_a_lone_surrogate_alike(servers):
    raw = b'{"prompt": "\\ud800", "max_tokens": 1}'
    answers = [_post(servers[name], COMPLETIONS, raw) for name in ("router", "worker")]
    assert answers[0] == answers[1] and answers[0][0] == 400
    assert answers[0][1]["error"]["message"].startswith("the request does not encode: ")


def test_a_completion_without_max_tokens_has_vllms_16_on_both(servers):
    for name in ("router", "worker"):
        status, obj = _post(servers[name], COMPLETIONS, json.dumps({"prompt": [1, 2, 3]}).encode())
        assert (status, obj["usage"]["completion_tokens"]) == (200, DEFAULT_COMPLETION_MAX_TOKENS), name


def test_a_chat_without_max_tokens_is_uncapped_on_both(servers):
    """vLLM: no cap but the context. On both, the emulated engine draws the length its model would
    stop at (through the router, the request crosses as max_tokens None and is dispatched NO_CAP)."""
    body = json.dumps({"messages": [{"role": "user", "content": "hi"}]}).encode()
    for name in ("router", "worker"):
        status, obj = _post(servers[name], CHAT, body)
        usage = obj["usage"]
        assert status == 200 and 1 <= usage["completion_tokens"], name
        assert usage["prompt_tokens"] + usage["completion_tokens"] <= servers["max_model_len"], name
