"""``kvr send`` against a scripted router on a real ROUTER socket (loopback)."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli.main import main
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
    res = CliRunner().invoke(main, ["send", "--router", router.endpoint, "-i"], input="first\nsecond\n/reset\nthird\n\n")
    assert res.exit_code == 0, res.output
    prompts = [r.prompt for r in router.requests]
    assert prompts == ["\nUser: first\nAssistant:", "\nUser: first\nAssistant: hi\nUser: second\nAssistant:",
                       "\nUser: third\nAssistant:"]
    described = [ln for ln in res.stdout.splitlines() if "worker w1" in ln]
    assert len(described) == 3
    assert f"cached {len(prompts[0])}/{len(prompts[1])}" in described[1]  # the previous prompt is its prefix
    assert "history cleared" in res.stdout


def test_send_without_a_router_times_out_with_a_hint():
    res = CliRunner().invoke(main, ["send", "--router", f"tcp://127.0.0.1:{free_port()}", "x", "--timeout", "0.3"])
    assert res.exit_code == 1 and "is a router listening" in res.output
    res = CliRunner().invoke(main, ["send"])
    assert res.exit_code == 2
