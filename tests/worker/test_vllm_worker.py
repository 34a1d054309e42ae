"""``kvr worker --engine vllm``: the vLLM backend on the worker service's router link.

A raw ROUTER socket on 127.0.0.1 plays the router, so these tests pin the wire messages.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from bus.schema import (
    Cancel,
    Completion,
    Dispatch,
    ErrorCode,
    ErrorReply,
    Goodbye,
    Heartbeat,
    Hello,
    TokenChunk,
    Welcome,
)
from cluster.processes import stop_process
from tests.conftest import free_port
from tests.fakes.fake_vllm import FakeVllm, fake_output_token
from worker.vllm.checks import StartupError
from worker.vllm.runner import VllmWorkerOptions, VllmWorkerRunner

PROMPT = list(range(300, 340))


def test_registers_heartbeats_and_serves_dispatches(router):
    with FakeVllm(num_gpu_blocks=51) as fake:
        runner = VllmWorkerRunner(VllmWorkerOptions(
            worker_id="vllm-a", vllm_url=fake.url, kv_events_endpoint="tcp://*:5557",
            replay_endpoint="tcp://*:5558", topic="kv@vllm-a@m", router_endpoint=router.endpoint,
            heartbeat_interval_s=0.05, profile="h100-qwen3-8b"))
        thread = threading.Thread(target=runner.run, daemon=True)
        thread.start()
        try:
            hello = router.recv(Hello)
            assert (hello.worker_id, hello.engine, hello.model, hello.block_size, hello.num_gpu_blocks) == (
                "vllm-a", "vllm", fake.model, 16, 51)
            assert (hello.events_endpoint, hello.replay_endpoint, hello.topic, hello.http_url) == (
                "tcp://127.0.0.1:5557", "tcp://127.0.0.1:5558", "kv@vllm-a@m", fake.url)
            router.send(Welcome(router_id="raw", heartbeat_interval_s=0.05, heartbeat_liveness=100))
            beat = router.recv(Heartbeat)
            assert (beat.sender_id, beat.epoch, beat.dp_rank, beat.load.num_gpu_blocks) == (
                "vllm-a", hello.epoch, 0, 51)
            for rid, cached in (("r1", 0), ("r2", 32)):
                router.send(Dispatch(rid, PROMPT, max_tokens=2))
                chunks = [router.recv(TokenChunk), router.recv(TokenChunk)]
                assert [c.token_ids for c in chunks] == [[fake_output_token(PROMPT, 0)], [fake_output_token(PROMPT, 1)]]
                done = router.recv(Completion)
                assert (done.request_id, done.worker_id, done.prompt_tokens, done.cached_tokens,
                        done.output_tokens) == (rid, "vllm-a", 40, cached, 2)
            fake.token_delay_s = 0.05
            router.send(Dispatch("long", PROMPT, max_tokens=1000))
            router.recv(TokenChunk)
            router.send(Cancel("long"))
            assert router.recv(ErrorReply) == ErrorReply("long", ErrorCode.CANCELLED, "cancelled", "vllm-a")
        finally:
            runner.stop()
            thread.join(10)
        assert not thread.is_alive()
        assert router.recv(Goodbye) == Goodbye(worker_id="vllm-a", epoch=hello.epoch)


def test_runner_refuses_a_misconfigured_server():
    with FakeVllm() as fake:
        with pytest.raises(StartupError, match="block size is 16"):
            VllmWorkerRunner(VllmWorkerOptions(worker_id="w", vllm_url=fake.url, kv_events_endpoint="tcp://*:5557",
                                               block_size=64, router_endpoint=None))


def _kvr(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", "worker", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd())


def test_cli_start_up_error_is_one_clear_line_and_exit_1():
    with FakeVllm() as fake:
        proc = _kvr("--engine", "vllm", "--id", "w", "--router", f"tcp://127.0.0.1:{free_port()}",
                    "--vllm-url", fake.url, "--kv-events-endpoint", "tcp://*:5557", "--block-size", "32")
        try:
            _, err = proc.communicate(timeout=60)
        finally:
            stop_process(proc, sig=signal.SIGKILL)  # only if it hung
    assert proc.returncode == 1
    assert "vLLM block size is 16 (vllm:cache_config_info) but kvr was told 32" in err


def test_cli_registers_and_says_goodbye_on_sigterm(router):
    with FakeVllm() as fake:
        proc = _kvr("--engine", "vllm", "--id", "cli-w", "--router", router.endpoint, "--vllm-url", fake.url,
                    "--kv-events-endpoint", "tcp://kvr-router:5557", "--replay-endpoint", "tcp://*:5558",
                    "--topic", "kv@cli-w@m", "--dp-size", "2", "--model", fake.model)
        try:
            hello = router.recv(Hello, timeout_s=60)
        finally:
            stop_process(proc, timeout_s=30)
    # vLLM dials the router (central mode): the router binds; the replay socket is on vLLM's host.
    assert (hello.engine, hello.events_endpoint, hello.replay_endpoint, hello.dp_size, hello.topic) == (
        "vllm", "tcp://*:5557", "tcp://127.0.0.1:5558", 2, "kv@cli-w@m")
    assert proc.returncode == 0
    assert router.recv(Goodbye).worker_id == "cli-w"
