"""``kvr router`` + ``kvr worker`` as real processes: the issue's "done when", end to end.

A worker registers, answers over ZMQ (through the router) and over HTTP; a repeated prompt
shows cached tokens; a SUB on its event endpoint sees the matching ``BlockStored``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq

from bus.client import RouterClient
from bus.schema import GenerateRequest
from bus.vllm_codec import decode_batch
from cluster.processes import stop_process
from core.events import BlockStored
from core.tokenizer import BuiltinTokenizer
from tests.conftest import free_port
from tests.waiting import eventually, succeeds

pytestmark = pytest.mark.integration

PROMPT = ("Every worker in the fleet publishes its KV events so the router can send each request to the worker "
          "that already holds its prefix; this prompt is long enough to fill several blocks of sixteen tokens.")


def _spawn(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd(), start_new_session=True)


def _wait_http(url: str, timeout_s: float = 15.0) -> None:
    def health() -> None:
        with urllib.request.urlopen(url + "/health", timeout=1):
            pass

    succeeds(health, timeout_s=timeout_s, what=f"{url} healthy", interval_s=0.1)


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def test_router_and_worker_processes_serve_zmq_and_http_with_prefix_hits() -> None:
    clients, workers, http, events, replay = (free_port() for _ in range(5))
    # Heartbeats every 0.5 s (dead after 1.5 s): a 300 ms stall of a busy machine is not a death.
    router = _spawn("router", "--bind-clients", f"tcp://127.0.0.1:{clients}", "--bind-workers",
                    f"tcp://127.0.0.1:{workers}", "--bind-metrics", "", "--no-redis", "--heartbeat-interval", "0.5")
    worker = _spawn("worker", "--id", "w1", "--router", f"tcp://127.0.0.1:{workers}", "--http-port", str(http),
                    "--events-endpoint", f"tcp://127.0.0.1:{events}", "--replay-endpoint", f"tcp://127.0.0.1:{replay}",
                    "--speedup", "20", "--seed", "5")
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    try:
        base = f"http://127.0.0.1:{http}"
        _wait_http(base)
        sub.connect(f"tcp://127.0.0.1:{events}")
        time.sleep(0.3)  # the SUB's subscription reaches the PUB (slow joiner)
        with RouterClient(endpoint=f"tcp://127.0.0.1:{clients}") as client:
            results = []
            for i in range(2):
                def completion(i: int = i):
                    return client.generate(GenerateRequest(request_id=f"z{i}", prompt=PROMPT, max_tokens=4),
                                           timeout_s=10).completion

                # The worker may still be registering with the router: retry until one completes.
                results.append(eventually(completion, timeout_s=15, what=f"a completion for z{i}", interval_s=0.2))
        n = len(BuiltinTokenizer().encode(PROMPT))
        assert [c.worker_id for c in results] == ["w1", "w1"]
        assert (results[0].cached_tokens, results[1].cached_tokens) == (0, (n - 1) // 16 * 16)
        # The same prompt over HTTP hits the blocks the ZMQ requests left.
        body = _post(base + "/v1/completions", {"model": "m", "prompt": PROMPT, "max_tokens": 2})
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] == (n - 1) // 16 * 16
        # The first request's prompt blocks were published as one BlockStored with its tokens.
        stored = []
        while sub.poll(2000):
            _topic, _seq, payload = sub.recv_multipart()
            stored += [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
            if stored and stored[0].parent_block_hash is None:
                break
        if not any(e.parent_block_hash is None for e in stored):  # live batch lost (slow joiner): replay it
            dealer = ctx.socket(zmq.DEALER)
            dealer.setsockopt(zmq.LINGER, 0)
            dealer.connect(f"tcp://127.0.0.1:{replay}")
            dealer.send_multipart([b"", (0).to_bytes(8, "big")])
            while dealer.poll(5000):
                _, _topic, seq, payload = dealer.recv_multipart()
                if seq == b"\xff" * 8:
                    break
                stored += [e for e in decode_batch(payload).events if isinstance(e, BlockStored)]
            dealer.close()
        first = next(e for e in stored if e.parent_block_hash is None)
        assert first.token_ids == BuiltinTokenizer().encode(PROMPT)[: n // 16 * 16]
    finally:
        sub.close()
        ctx.term()
        werr = stop_process(worker).stderr
        rerr = stop_process(router).stderr
    assert "registered with router" in werr, werr[-2000:]
    assert "Traceback" not in werr + rerr, (werr + rerr)[-3000:]
