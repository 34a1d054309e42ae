"""``kvr router`` as a process: the ready line gives every resolved port, workers on vLLM's default
(empty) topic are told apart, the HTTP front lists what they serve; a wider bind warns."""

from __future__ import annotations

import urllib.request

import pytest

from tests.prometheus_text import metric_value
from tests.waiting import eventually
from tests.worker.test_worker_cli import http, spawn_ready, stop

pytestmark = pytest.mark.timeout(90)

PROMPT = ("A long shared system prompt that fills a few KV blocks, so that the second request for it can hit the "
          "blocks the first one left on whichever worker ran it. ")


def test_two_workers_found_by_ready_files_share_the_empty_topic_and_are_told_apart(tmp_path) -> None:
    # Heartbeats every 0.5 s (dead after 1.5 s): a 300 ms stall of a busy machine must not read as a
    # death, which would log the WARNING this test asserts is absent.
    router, ready = spawn_ready("router", "--no-redis", "--bind-clients", "tcp://127.0.0.1:0", "--bind-workers",
                                "tcp://127.0.0.1:0", "--bind-metrics", "tcp://127.0.0.1:0", "--http-port", "0",
                                "--heartbeat-interval", "0.5", "--router-id", "r9", ready_file=tmp_path / "router.json")
    workers = []
    try:
        assert (ready["component"], ready["id"], ready["pid"]) == ("router", "r9", router.pid)
        endpoints = ready["endpoints"]
        assert sorted(endpoints) == ["clients", "http", "metrics", "workers"]
        assert all(ep.startswith(("tcp://127.0.0.1:", "http://127.0.0.1:")) and not ep.endswith(":0")
                   for ep in endpoints.values())
        for wid in ("w-a", "w-b"):  # default topic: vLLM's empty one, for both
            workers.append(spawn_ready("worker", "--id", wid, "--router", endpoints["workers"], "--speedup", "50",
                                       "--heartbeat-interval", "0.5", ready_file=tmp_path / f"{wid}.json")[0])
        url = endpoints["http"]
        eventually(lambda: _workers(url) >= 2, timeout_s=20, what="both workers registered", interval_s=0.1)
        status, _, models = http("GET", url + "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["kvr-emulated"]  # what they registered
        # The same prompt twice: the second goes where the first left its blocks, predicted from
        # that worker's own event stream (each stream on its own socket, no topic needed).
        first = _complete(url, PROMPT * 3)
        ran, other = first["kvr"]["worker_id"], ({"w-a", "w-b"} - {first["kvr"]["worker_id"]}).pop()
        # The worker's KV events reached the router's index.
        eventually(lambda: _indexed_blocks(url, ran) > 0, timeout_s=10, what="KV events indexed", interval_s=0.1)
        assert _indexed_blocks(url, other) == 0  # and only under the worker that published them
        second = _complete(url, PROMPT * 3)
        assert second["kvr"]["worker_id"] == ran
        assert second["kvr"]["predicted_cached_tokens"] == second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    finally:
        results = [stop(w) for w in workers]
        code, stderr = stop(router)
    assert code == 0 and all(c == 0 for c, _ in results)
    assert " WARNING " not in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert not (tmp_path / "router.json").exists()


def _metrics_text(url: str) -> str:
    with urllib.request.urlopen(url + "/metrics", timeout=10) as resp:
        return resp.read().decode()


def _indexed_blocks(url: str, worker_id: str) -> int:
    value = metric_value(_metrics_text(url), "kvr_router_target_indexed_blocks", worker=worker_id, dp_rank="0")
    assert value is not None, f"no indexed-blocks gauge for {worker_id}"
    return int(value)


def _workers(url: str) -> int:
    value = metric_value(_metrics_text(url), "kvr_router_workers")
    assert value is not None, "no kvr_router_workers gauge"
    return int(value)


def _complete(url: str, prompt: str) -> dict:
    body = {"model": "kvr-emulated", "prompt": prompt, "max_tokens": 1}
    status, _, body = http("POST", url + "/v1/completions", body)
    assert status == 200, body
    return body


def test_bind_host_all_interfaces_warns_about_each_unauthenticated_port(tmp_path) -> None:
    router, ready = spawn_ready("router", "--no-redis", "--bind-host", "0.0.0.0", "--bind-clients",
                                "tcp://127.0.0.1:0", "--bind-workers", "tcp://127.0.0.1:0", "--bind-metrics", "",
                                "--http-port", "0", ready_file=tmp_path / "router.json")
    code, stderr = stop(router)
    assert sorted(ready["endpoints"]) == ["clients", "http", "workers"]  # metrics disabled
    http_url = ready["endpoints"]["http"]
    assert http_url.startswith("http://0.0.0.0:")  # the front follows --bind-host
    warnings = [ln for ln in stderr.splitlines() if " WARNING " in ln]
    assert len(warnings) == 1
    assert f"router listens beyond loopback without authentication: http {http_url}." in warnings[0]
    assert code == 0
