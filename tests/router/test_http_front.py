"""The router's OpenAI-compatible HTTP front against a live router and scripted workers."""

from __future__ import annotations

import http.client
import json

import pytest
import zmq

from bus.sockets import connectable
from core.prefix_index import WorkerKey
from router.http_front import RouterHttpFront
from router.service import RouterService
from tests.prometheus_text import metric_samples, metric_value
from tests.router.test_service import BS, FakeWorker, RunningRouter, _config, wait_for

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["socket", "in-loop"])
def stack(request):
    """A router and its HTTP front, both ways ``kvr`` can join them: the front dials the router's
    client socket (the router runs its own thread), or the router runs on the front's event loop
    (``RouterHttpFront(service=...)``, what ``kvr router`` does)."""
    ctx = zmq.Context()
    running = None
    if request.param == "socket":
        running = RunningRouter(_config())
        svc = running.service
        front = RouterHttpFront(client_endpoint=connectable(svc.clients_endpoint), model="m",
                                stats=lambda: svc.stats, ctx=ctx, request_timeout_s=10)
    else:
        svc = RouterService(_config())
        front = RouterHttpFront(service=svc, model="m", request_timeout_s=10)
    front.start()
    workers: list[FakeWorker] = []
    yield ctx, svc, front, workers
    front.close()
    if running is not None:
        running.stop()
    else:
        svc.close()
    for w in workers:
        w.close()
    ctx.term()


def _post(front: RouterHttpFront, path: str, body, raw: bytes | None = None):
    host, port = front.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("POST", path, body=raw if raw is not None else json.dumps(body),
                 headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def _get(front: RouterHttpFront, path: str):
    host, port = front.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, data


def _serve_while(workers, fn):
    """Run ``fn`` (a blocking HTTP call) in a thread while the fake workers keep pumping."""
    import threading

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("r", fn()), daemon=True)
    t.start()
    wait_for(lambda: not t.is_alive(), workers, timeout_s=10)
    return box["r"]


def test_no_workers_is_503_and_bad_json_400(stack):
    ctx, svc, front, workers = stack
    assert _get(front, "/health")[0] == 503
    status, _, data = _post(front, "/v1/completions", {"prompt": [1, 2, 3], "max_tokens": 2})
    assert status == 503 and json.loads(data)["error"]["type"] == "no_workers"
    status, _, data = _post(front, "/v1/completions", None, raw=b"{nope")
    assert status == 400 and "invalid JSON" in json.loads(data)["error"]["message"]
    assert _post(front, "/v1/completions", {"prompt": [1], "n": 2})[0] == 400
    assert _get(front, "/nowhere")[0] == 404
    assert json.loads(_get(front, "/v1/models")[1])["data"][0]["id"] == "m"


def test_completion_routes_and_reports_usage_and_prediction(stack):
    ctx, svc, front, workers = stack
    w = FakeWorker(ctx, svc.workers_endpoint, "w1")
    workers.append(w)
    w.hello()
    prompt = list(range(100, 100 + 4 * BS))
    w.store(prompt)
    wait_for(lambda: svc.index.num_blocks(WorkerKey("w1", 0)) == 4, workers)
    status, headers, data = _serve_while(workers, lambda: _post(front, "/v1/completions",
                                                               {"prompt": prompt, "max_tokens": 2}))
    body = json.loads(data)
    assert status == 200 and headers["x-kvr-worker"] == "w1"
    assert body["object"] == "text_completion" and body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 2, "total_tokens": len(prompt) + 2,
                             "prompt_tokens_details": {"cached_tokens": 32}}
    assert body["kvr"]["predicted_cached_tokens"] == 48 and body["kvr"]["policy"] == "kvr"
    assert _get(front, "/health")[0] == 200


def test_streaming_chat_sends_sse_chunks_then_done(stack):
    ctx, svc, front, workers = stack
    w = FakeWorker(ctx, svc.workers_endpoint, "w1")
    workers.append(w)
    w.hello()
    wait_for(lambda: svc.stats.get("workers") == 1, workers)
    status, headers, data = _serve_while(workers, lambda: _post(
        front, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi there"}], "stream": True,
                                        "max_tokens": 2, "stream_options": {"include_usage": True}}))
    assert status == 200 and headers["Content-Type"] == "text/event-stream"
    events = [line[len("data: "):] for line in data.decode().split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 2 and chunks[-1]["kvr"]["worker_id"] == "w1"
    status, metrics = _get(front, "/metrics")
    assert status == 200 and metric_value(metrics, "kvr_router_workers") == 1
    assert [labels for labels, _ in metric_samples(metrics, "kvr_router_target_indexed_blocks")] == [
        {"worker": "w1", "dp_rank": "0", "confidence": "fresh"}]



def _request(front: RouterHttpFront, method: str, path: str, body: bytes | None = None):
    host, port = front.server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request(method, path, body=body)
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def test_models_lists_the_served_names_the_unknown_model_error_names(stack):
    """One definition: /v1/models lists the model names the workers registered (then the front's
    alias), and an unknown model's error lists the same served names."""
    ctx, svc, front, workers = stack
    w = FakeWorker(ctx, svc.workers_endpoint, "w1")  # registers model "m"
    workers.append(w)
    w.hello()
    wait_for(lambda: svc.stats.get("models") == ["m"], workers)
    status, data = _get(front, "/v1/models")
    assert status == 200 and [c["id"] for c in json.loads(data)["data"]] == ["m"]  # the alias "m" is not repeated
    status, _, data = _serve_while(workers, lambda: _post(front, "/v1/completions",
                                                          {"prompt": [1, 2, 3], "max_tokens": 1, "model": "other"}))
    error = json.loads(data)["error"]
    assert (status, error["type"]) == (404, "unknown_model")
    assert error["message"].endswith("(served: m)")
    status, _, data = _serve_while(workers, lambda: _post(front, "/v1/completions",
                                                          {"prompt": [1, 2, 3], "max_tokens": 1}))
    assert status == 200 and json.loads(data)["model"] == "m"  # no model asked: the one served


def test_an_alias_is_listed_after_the_served_names(stack):
    ctx, svc, _, workers = stack
    front = RouterHttpFront(client_endpoint=connectable(svc.clients_endpoint), model="kvr", stats=lambda: svc.stats,
                            ctx=ctx, request_timeout_s=10)
    front.start()
    try:
        assert [c["id"] for c in json.loads(_get(front, "/v1/models")[1])["data"]] == ["kvr"]  # no workers yet
        w = FakeWorker(ctx, svc.workers_endpoint, "w1")
        workers.append(w)
        w.hello()
        wait_for(lambda: svc.stats.get("models") == ["m"], workers)
        assert [c["id"] for c in json.loads(_get(front, "/v1/models")[1])["data"]] == ["m", "kvr"]
    finally:
        front.close()
    unaliased = RouterHttpFront(client_endpoint=connectable(svc.clients_endpoint), stats=lambda: {}, ctx=ctx)
    unaliased.start()
    try:
        assert json.loads(_get(unaliased, "/v1/models")[1])["data"] == []  # nothing served, nothing listed
    finally:
        unaliased.close()


@pytest.mark.parametrize("method,path,allow", [
    ("GET", "/v1/completions", "POST"), ("GET", "/v1/chat/completions", "POST"), ("POST", "/v1/models", "GET"),
    ("POST", "/health", "GET"), ("PUT", "/v1/completions", "POST"), ("DELETE", "/metrics", "GET"),
])
def test_a_known_path_under_another_method_is_405_with_allow(stack, method, path, allow):
    _, _, front, _ = stack
    status, headers, data = _request(front, method, path, b"{}" if method in ("POST", "PUT") else None)
    assert (status, headers["Allow"]) == (405, allow)
    assert json.loads(data)["error"] == {"message": f"method {method} not allowed on {path}",
                                         "type": "MethodNotAllowedError", "param": None, "code": 405}


def test_an_unknown_path_is_404_under_any_method(stack):
    _, _, front, _ = stack
    for method in ("GET", "POST", "PUT"):
        status, headers, _ = _request(front, method, "/v1/nowhere", b"{}" if method != "GET" else None)
        assert status == 404 and "Allow" not in headers


def test_the_front_takes_a_router_endpoint_or_a_service_not_both_or_neither() -> None:
    svc = RouterService(_config())
    try:
        with pytest.raises(ValueError):
            RouterHttpFront()
        with pytest.raises(ValueError):
            RouterHttpFront(client_endpoint=connectable(svc.clients_endpoint), service=svc)
    finally:
        svc.close()
