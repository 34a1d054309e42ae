"""Peer routers (sglang-router 0.3.2, vllm-router 0.1.17) front a fleet of emulated workers.

They need no kvr code: only vLLM's HTTP face (``/health``, ``/get_server_info``, ``/tokenize``,
``/v1/completions``), and for vllm-router's ``kv_aware`` policy vLLM's KV events (its subscriber
wants vLLM's default empty topic). Each router binary lives in its own venv (``docs/peer-routers.md``
§1); point ``KVR_SGLANG_ROUTER_PYTHON`` / ``KVR_VLLM_ROUTER_BIN`` at them to run these tests.
Cache-aware routing must keep a shared prefix on one worker: every repeat reports cached tokens.
"""

from __future__ import annotations

import json
import os
import subprocess
import threading
import urllib.request

import pytest

from cluster.processes import stop_process
from tests.conftest import free_port
from tests.waiting import eventually
from worker.runner import WorkerOptions, WorkerRunner

pytestmark = pytest.mark.integration

PREFIX = ("System: you are a helpful assistant who answers every question about the history of the Roman "
          "empire with care and detail, citing sources.")


def _router_cmd(kind: str, port: int, metrics_port: int, urls: list[str], events: list[str]) -> list[str]:
    if kind == "sglang":
        py = os.environ.get("KVR_SGLANG_ROUTER_PYTHON")
        if not py:
            pytest.skip("set KVR_SGLANG_ROUTER_PYTHON to a python with sglang-router==0.3.2")
        return [py, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                "--worker-urls", *urls, "--policy", "cache_aware", "--prometheus-host", "127.0.0.1",
                "--prometheus-port", str(metrics_port), "--worker-startup-check-interval", "1"]
    binary = os.environ.get("KVR_VLLM_ROUTER_BIN")
    if not binary:
        pytest.skip("set KVR_VLLM_ROUTER_BIN to a vllm-router==0.1.17 binary")
    cmd = [binary, "--host", "127.0.0.1", "--port", str(port), "--worker-urls", *urls,
           "--prometheus-host", "127.0.0.1", "--prometheus-port", str(metrics_port)]
    if kind == "vllm":
        return [*cmd, "--policy", "cache_aware"]
    # kv_aware: vllm-router subscribes to each worker's vLLM KV events itself (topic "").
    sources = [arg for url, ep in zip(urls, events, strict=True) for arg in ("--kv-event-source", f"{url}={ep}")]
    return [*cmd, "--policy", "kv_aware", *sources, "--kv-event-block-size", "16", "--kv-event-model", "kvr-emulated"]


def _kv_hits(metrics_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return sum(int(float(line.rsplit(" ", 1)[1])) for line in text.splitlines()
               if line.startswith('vllm_router_kv_placement_lookups_total{result="hit"}'))


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.mark.parametrize("kind", ["sglang", "vllm", "vllm-kv-events"])
def test_cache_aware_peer_router_keeps_a_prefix_on_one_emulated_worker(kind: str) -> None:
    port, metrics_port = free_port(), free_port()
    runners, threads, events = [], [], []
    for i in range(2):
        events.append(f"tcp://127.0.0.1:{free_port()}")
        r = WorkerRunner(WorkerOptions(worker_id=f"p{i}", router_endpoint="none", http_port=0, speedup=20.0, seed=i,
                                       events_endpoint=events[-1], topic=""))
        runners.append(r)
        threads.append(threading.Thread(target=r.run, daemon=True))
        threads[-1].start()
    cmd = _router_cmd(kind, port, metrics_port, [r.http_url for r in runners], events)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def healthy() -> bool:
            assert proc.poll() is None, f"{kind} router exited"
            try:
                with urllib.request.urlopen(base + "/health", timeout=1) as resp:
                    return resp.status == 200
            except OSError:
                return False

        eventually(healthy, timeout_s=30, what=f"{kind} router healthy", interval_s=0.2)
        cached = [_post(base + "/v1/completions", {"model": "kvr-emulated", "prompt": f"{PREFIX} Question {i}?",
                                                   "max_tokens": 2})["usage"]["prompt_tokens_details"]["cached_tokens"]
                  for i in range(4)]
        assert cached[0] == 0 and all(c >= 32 for c in cached[1:]), cached
        if kind == "vllm-kv-events":  # the decisions came from the workers' KV events
            assert _kv_hits(metrics_port) >= 2
    finally:
        stop_process(proc)
        for r in runners:
            r.stop()
        for t in threads:
            t.join(timeout=5)
