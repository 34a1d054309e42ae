"""``kvr events listen`` / ``publish`` against real publishers over loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from click.testing import CliRunner

from bus.publisher_thread import PublisherThread
from bus.vllm_codec import decode_batch
from cli.events import event_line
from cli.main import main
from cluster.processes import stop_process
from core.events import AllBlocksCleared, BlockRemoved, BlockStored
from tests.bus.zmq_helpers import fixture_bin
from tests.conftest import free_port

BYTES_HASH = bytes(range(32))
EVENTS = [
    [BlockStored(block_hashes=[2**64 - 1, 2**63], parent_block_hash=None, token_ids=[1, 2, 3, 4], block_size=2,
                 lora_id=None, medium="GPU", lora_name=None, extra_keys=[None, ["mm-1", -3]], group_idx=0,
                 kv_cache_spec_kind="full_attention")],
    [BlockRemoved(block_hashes=[BYTES_HASH], medium="CPU", group_idx=1)],
    [AllBlocksCleared()],
]


@pytest.fixture
def publisher():
    thread = PublisherThread(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True,
                             topic="kv@pod-a@m")
    yield thread
    thread.close()


def test_listen_json_prints_every_field_with_exact_ints_and_hex_bytes(publisher) -> None:
    for i, events in enumerate(EVENTS):
        publisher.publish(events, 1700000000.5 + i)
    # The listener joins late: its first-contact replay from seq 0 brings all three.
    result = CliRunner().invoke(main, ["events", "listen", publisher.endpoint, "--replay-endpoint",
                                       publisher.replay_endpoint, "--json", "--count", "3", "--timeout", "10"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["seq"] for line in lines] == [0, 1, 2]
    assert lines[0] == {
        "seq": 0, "ts": 1700000000.5, "dp_rank": 0, "topic": "kv@pod-a@m", "replayed": True,
        "events": [{
            "type": "BlockStored", "block_hashes": [18446744073709551615, 9223372036854775808],
            "parent_block_hash": None, "token_ids": [1, 2, 3, 4], "block_size": 2, "lora_id": None, "medium": "GPU",
            "lora_name": None, "extra_keys": [None, ["mm-1", -3]], "group_idx": 0,
            "kv_cache_spec_kind": "full_attention", "kv_cache_spec_sliding_window": None, "locality": None,
            "ownership": None, "session_id": None, "lookahead_token_ids": None}],
    }
    # Python's json would read a float for an inexact number: prove the digits are on the line.
    assert "18446744073709551615" in result.stdout.splitlines()[0]
    assert lines[1]["events"] == [{"type": "BlockRemoved", "block_hashes": [BYTES_HASH.hex()], "medium": "CPU",
                                   "group_idx": 1, "locality": None, "ownership": None}]
    assert lines[2]["events"] == [{"type": "AllBlocksCleared"}]
    assert "batches=3" in result.stderr


def test_listen_timeout_exit_status(publisher) -> None:
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    runner = CliRunner()
    short_of_count = runner.invoke(main, ["events", "listen", endpoint, "--count", "1", "--timeout", "0.3"])
    assert short_of_count.exit_code == 1 and short_of_count.stdout == ""
    no_count = runner.invoke(main, ["events", "listen", endpoint, "--timeout", "0.3"])
    assert no_count.exit_code == 0


def test_human_line_for_a_vllm_fixture() -> None:
    batch = decode_batch(fixture_bin("01_stored_one_block"))
    (event,) = batch.events
    h = event.block_hashes[0]
    assert event_line(7, event) == (
        f"seq=7 BlockStored blocks=1 [{h:016x}] medium=GPU group=0 parent=- tokens=16 block_size=16")


def test_publish_in_vllm_connect_mode_with_drops_reaches_a_bound_listener_complete(tmp_path) -> None:
    """``tcp://127.0.0.1:P`` makes the publisher dial out (vLLM's rule); the listener binds."""
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    listener = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "events", "listen", endpoint, "--bind", "--replay-endpoint", replay,
         "--json", "--count", "30", "--timeout", "15"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    publisher = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "events", "publish", "--endpoint", endpoint, "--replay-endpoint", replay,
         "--count", "30", "--rate", "100", "--drop-rate", "0.3", "--seed", "3"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    try:
        out, err = listener.communicate(timeout=30)
    finally:
        stop_process(publisher, sig=signal.SIGKILL)
        stop_process(listener, sig=signal.SIGKILL)  # a no-op once it exited: reaped by communicate
    assert listener.returncode == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["seq"] for line in lines] == list(range(30))
    assert all(line["dp_rank"] == 0 and line["events"] for line in lines)
    assert any(line["replayed"] for line in lines)  # 30 % of the batches never arrived live
    assert "gaps=" in err and "lost=0" in err


def test_listen_reports_a_bad_endpoint_as_a_usage_error() -> None:
    result = CliRunner().invoke(main, ["events", "listen", "tcp://no-port", "--timeout", "0.1"])
    assert result.exit_code == 1 and "cannot connect tcp://no-port" in result.output


def test_topic_is_a_prefix_filter_for_live_and_replayed_batches(publisher) -> None:
    publisher.publish(EVENTS[2], 1.0)
    runner = CliRunner()
    other = runner.invoke(main, ["events", "listen", publisher.endpoint, "--replay-endpoint", publisher.replay_endpoint,
                                 "--topic", "kv@pod-b", "--json", "--count", "1", "--timeout", "1"])
    assert other.exit_code == 1 and other.stdout == ""
    mine = runner.invoke(main, ["events", "listen", publisher.endpoint, "--replay-endpoint", publisher.replay_endpoint,
                                "--topic", "kv@pod-a", "--json", "--count", "1", "--timeout", "5"])
    assert mine.exit_code == 0 and json.loads(mine.stdout)["topic"] == "kv@pod-a@m"
