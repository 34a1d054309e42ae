"""``kvr send`` against a scripted router on a real ROUTER socket (loopback)."""

from __future__ import annotations

import os
import threading

import pytest
import zmq
from click.testing import CliRunner

from bus.codec import client_decoder, encode
from bus.schema import Routed
from cli import user_state
from cli.main import main
from cli.send import DEFAULT_CONNECT_TIMEOUT_S
from tests.cli.parse import dry_parse
from tests.conftest import free_port
from tests.monitor.fake_router import ScriptedRouter

pytestmark = pytest.mark.integration


@pytest.fixture
def router():
    r = ScriptedRouter()
    yield r
    r.close()


def test_send_one_prompt_and_token_ids(router):
    runner = CliRunner()
    res = runner.invoke(main, ["send", "--router", router.endpoint, "hello world", "--max-tokens", "4", "--show-text"])
    assert res.exit_code == 0, res.output
    line = res.stdout.splitlines()[0]
    assert line.startswith("worker w1 (policy kvr, best overlap), cached 0/11 tokens (predicted 0), TTFT ")
    assert line.endswith("2 output tokens (length)")
    assert res.stdout.splitlines()[1] == " hi"
    assert router.requests[0].max_tokens == 4 and router.requests[0].prompt == "hello world"
    res = runner.invoke(main, ["send", "--router", router.endpoint, "--tokens", "5, 6 7", "--worker", "w9"])
    assert res.exit_code == 0, res.output
    assert router.requests[1].token_ids == [5, 6, 7] and router.requests[1].worker_id == "w9"
    res = runner.invoke(main, ["send", "--router", router.endpoint, "fail"])
    assert res.exit_code == 1 and res.stdout.startswith("error no_workers: no workers alive")


def test_interactive_chat_resends_the_history(router):
    res = CliRunner().invoke(main, ["send", "--router", router.endpoint, "-i"],
                             input="first\nsecond\n/reset\nthird\n\n")
    assert res.exit_code == 0, res.output
    prompts = [r.prompt for r in router.requests]
    assert prompts == ["\nUser: first\nAssistant:", "\nUser: first\nAssistant: hi\nUser: second\nAssistant:",
                       "\nUser: third\nAssistant:"]
    described = [ln for ln in res.stdout.splitlines() if "worker w1" in ln]
    assert len(described) == 3
    assert f"cached {len(prompts[0])}/{len(prompts[1])}" in described[1]  # the previous prompt is its prefix
    assert "history cleared" in res.stdout


def test_send_needs_a_prompt():
    res = CliRunner().invoke(main, ["send"])
    assert res.exit_code == 2


def test_a_routed_request_that_does_not_finish_ends_at_the_total_timeout():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    stop = threading.Event()

    def answer_routed_only():
        dec = client_decoder()
        while not stop.is_set():
            if sock.poll(50):
                ident, frame = sock.recv_multipart()
                req = dec.decode(frame)
                sock.send_multipart([ident, encode(Routed(req.request_id, "w1", 0, 0, 0, "kvr", ""))])

    thread = threading.Thread(target=answer_routed_only, daemon=True)
    thread.start()
    try:
        # The first reply came, so the connect timeout (shorter) does not end it: the total one does.
        res = CliRunner().invoke(main,
                                 ["send", "--router", endpoint, "x", "--timeout", "1", "--connect-timeout", "0.2"])
    finally:
        stop.set()
        thread.join(timeout=5)
        sock.close()
        ctx.term()
    assert res.exit_code == 1
    assert res.output.startswith("Error: no terminal reply for send-") and res.output.count("\n") == 1
    assert res.output.endswith(f" within 1.0 s; the router at {endpoint} answered but the request did not finish "
                               "(a longer --timeout?)\n")


def test_send_goes_to_the_running_cluster_unless_told_otherwise(router):
    user_state.publish({"client_endpoint": router.endpoint, "curve_dir": None, "pid": os.getpid()})
    res = CliRunner().invoke(main, ["send", "found"])
    assert res.exit_code == 0, res.output
    assert [r.prompt for r in router.requests] == ["found"]
    # A flag or KVR_ROUTER wins over the state file.
    user_state.publish({"client_endpoint": f"tcp://127.0.0.1:{free_port()}", "curve_dir": None, "pid": os.getpid()})
    res = CliRunner().invoke(main, ["send", "flag", "--router", router.endpoint])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(main, ["send", "env"], env={"KVR_ROUTER": router.endpoint})
    assert res.exit_code == 0, res.output
    assert [r.prompt for r in router.requests] == ["found", "flag", "env"]


def test_send_with_no_router_fails_at_the_connect_timeout_in_one_line():
    assert dry_parse(["send", "x"]).params["connect_timeout_s"] == DEFAULT_CONNECT_TIMEOUT_S == 3.0
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    # --timeout is long: only the first-reply timeout can end it.
    res = CliRunner().invoke(main, ["send", "--router", endpoint, "x", "--timeout", "60", "--connect-timeout", "0.3"])
    assert res.exit_code == 1
    assert res.output == (f"Error: no reply from a router at {endpoint} within 0.3 s: nothing accepted the connection "
                          "(no router listening there, or it refused this client's CURVE key)\n")


def test_send_to_a_silent_listener_says_it_accepted_but_did_not_answer():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    sock.bind(endpoint)
    try:
        res = CliRunner().invoke(main,
                                 ["send", "--router", endpoint, "x", "--timeout", "60", "--connect-timeout", "0.5"])
    finally:
        sock.close()
        ctx.term()
    assert res.exit_code == 1
    assert res.output == (f"Error: no reply from a router at {endpoint} within 0.5 s: "
                          "it accepted the connection but has not answered\n")
