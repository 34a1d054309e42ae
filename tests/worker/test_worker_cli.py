"""``kvr worker`` as a process: its ready line and file, loopback defaults, vLLM's topic and
``--max-model-len``, what a peer router sees of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import zmq
from click.testing import CliRunner

from cli.main import main
from cluster.processes import stop_process

pytestmark = pytest.mark.timeout(60)


def spawn_ready(*args: str, ready_file: Path) -> tuple[subprocess.Popen, dict]:
    """Start ``kvr ARGS --ready-file F``; return the process and its ready line (the first stdout line)."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", *args, "--ready-file", str(ready_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
                            start_new_session=True)
    line = proc.stdout.readline()
    assert line, proc.stderr.read()[-2000:] if proc.poll() is not None else "no ready line"
    return proc, json.loads(line)


def stop(proc: subprocess.Popen) -> tuple[int, str]:
    """SIGTERM, wait (SIGKILL after 15 s); ``(exit code, stderr)``."""
    stopped = stop_process(proc, timeout_s=15)
    return stopped.returncode, stopped.stderr


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict, dict]:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), json.loads(exc.read() or b"null")


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


def test_ready_line_and_file_give_every_resolved_port_on_loopback(tmp_path) -> None:
    ready_file = tmp_path / "w1.ready.json"
    ready_file.write_text("stale")  # from an earlier run: replaced, never read as ready
    proc, ready = spawn_ready("worker", "--id", "w1", "--router", "none", "--http-port", "0", "--max-model-len",
                              "1000", "--speedup", "50", ready_file=ready_file)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    try:
        assert json.loads(ready_file.read_text()) == ready
        assert (ready["event"], ready["component"], ready["id"], ready["pid"]) == ("ready", "worker", "w1", proc.pid)
        endpoints = ready["endpoints"]
        assert sorted(endpoints) == ["events", "http", "replay"]
        assert endpoints["events"].startswith("tcp://127.0.0.1:") and endpoints["replay"].startswith("tcp://127.0.0.1:")
        assert endpoints["http"].startswith("http://127.0.0.1:")
        assert all(_port(ep) > 0 for ep in endpoints.values())  # port 0 resolved
        url = endpoints["http"]
        # vLLM's --max-model-len reaches the engine.
        status, _, models = http("GET", url + "/v1/models")
        assert status == 200 and models["data"][0]["max_model_len"] == 1000
        status, _, body = http("POST", url + "/v1/completions", {"prompt": list(range(1000)), "max_tokens": 1})
        assert status == 400 and "max_model_len 1000" in body["error"]["message"]
        # The OpenAI client's GET of a POST route: 405, not 404.
        status, headers, _ = http("GET", url + "/v1/completions")
        assert (status, headers["Allow"]) == (405, "POST")
        # vLLM's default topic: the first frame of every event message is empty.
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoints["events"])
        frames = None
        for i in range(50):  # the subscription reaches the PUB after a moment (slow joiner)
            status, _, _ = http("POST", url + "/v1/completions", {"prompt": f"hello there {i} " * 8, "max_tokens": 1})
            assert status == 200
            if sub.poll(200):
                frames = sub.recv_multipart()
                break
        assert frames is not None and frames[0] == b""
    finally:
        sub.close()
        ctx.term()
        code, stderr = stop(proc)
    assert code == 0 and not ready_file.exists()  # removed at exit
    assert " WARNING " not in stderr and "Traceback" not in stderr, stderr[-2000:]


def test_bind_host_all_interfaces_warns_and_advertises_this_host(tmp_path) -> None:
    proc, ready = spawn_ready("worker", "--id", "w2", "--router", "none", "--bind-host", "0.0.0.0",
                              ready_file=tmp_path / "ready.json")
    code, stderr = stop(proc)
    events, replay = ready["endpoints"]["events"], ready["endpoints"]["replay"]
    assert events.startswith("tcp://0.0.0.0:") and replay.startswith("tcp://0.0.0.0:")
    warnings = [ln for ln in stderr.splitlines() if " WARNING " in ln]
    assert len(warnings) == 1 and f"worker w2 listens beyond loopback without authentication: events {events}, " \
                                  f"replay {replay}." in warnings[0]
    assert code == 0


def test_max_model_len_is_the_emulated_workers_option() -> None:
    result = CliRunner().invoke(main, ["worker", "--id", "w", "--engine", "vllm", "--vllm-url", "http://127.0.0.1:1",
                                       "--kv-events-endpoint", "tcp://*:5557", "--max-model-len", "4096"])
    assert result.exit_code == 2
    assert "--max-model-len is for the emulated worker; the vLLM server takes its own" in result.output
    assert "Traceback" not in result.output


def test_a_max_model_len_over_the_kv_capacity_is_refused_at_start() -> None:
    from worker.runner import WorkerOptions, WorkerRunner

    # 10 blocks of 16 tokens, one of them vLLM's null block: 144 tokens.
    runner = WorkerRunner(WorkerOptions(worker_id="w", router_endpoint="none", num_gpu_blocks=10, max_model_len=100))
    assert runner.backend.engine.max_model_len == 100
    runner.backend.close()
    with pytest.raises(ValueError) as err:
        WorkerRunner(WorkerOptions(worker_id="w", router_endpoint="none", num_gpu_blocks=10, max_model_len=1000))
    assert str(err.value) == ("--max-model-len 1000 is more than the KV cache holds (144 tokens): lower it, "
                              "or raise --num-gpu-blocks")
