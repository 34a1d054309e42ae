from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from bus import names
from bus.schema import Hello, WorkerLoad
from cli.main import main
from monitor.inspect import inspect_state
from router.mirror import RedisMirror


def _populate(client) -> None:
    m = RedisMirror(client=client, namespace="t")
    for i, wid in enumerate(("w0", "w1")):
        m.register_worker(Hello(worker_id=wid, epoch=7 + i, model="m", block_size=16, num_gpu_blocks=900,
                                events_endpoint=f"tcp://127.0.0.1:{6000 + i}"), now_s=100.0, ttl_s=60.0)
    m.touch_worker("w0", epoch=7, load=WorkerLoad(running=2, waiting=1, kv_usage=0.25), now_s=105.0, ttl_s=60.0)
    # 0xAA (a shared system prompt) on both; 0xBB only on w0; w1 has two external hashes for 0xCC.
    m.write_batch("w0", 0, seq=4, epoch=7, stored={1: 0xAA, 2: 0xBB}, num_events=2, now_s=108.0)
    m.write_batch("w1", 0, seq=9, epoch=8, stored={11: 0xAA, 12: 0xCC, 13: 0xCC}, num_events=3, now_s=109.0)
    client.hset(names.routers_key("t"), "router-1", 109.5)
    client.delete(names.worker_alive_key("t", "w1"))  # w1's liveness expired


def test_inspect_state_reads_the_schema(fake_redis):
    _populate(fake_redis)
    s = inspect_state(fake_redis, namespace="t", now_s=110.0, top=2)
    assert [(w["worker_id"], w["alive"], w["epoch"]) for w in s["workers"]] == [("w0", True, 7), ("w1", False, 8)]
    assert s["workers"][0]["load"]["running"] == 2.0 and s["workers"][0]["registered_age_s"] == 10.0
    assert [(t["target"], t["seq"], t["epoch"], t["blocks"], t["events"], t["updated_age_s"])
            for t in s["targets"]] == [("w0:0", 4, 7, 2, 2, 2.0), ("w1:0", 9, 8, 3, 3, 1.0)]
    assert s["hottest_prefixes"] == [{"block_hash": f"{0xAA:016x}", "targets": 2},
                                     {"block_hash": f"{0xBB:016x}", "targets": 1}]
    assert (s["indexed_blocks"], s["distinct_blocks"]) == (5, 3)
    assert s["routers"] == {"router-1": {"last_seen_age_s": 0.5}}


@pytest.mark.integration
def test_kvr_inspect_against_real_redis(redis_client, redis_server):
    _populate(redis_client)
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", "--redis-url", redis_server, "--namespace", "t", "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert [t["blocks"] for t in data["targets"]] == [2, 3]
    res = runner.invoke(main, ["inspect", "--redis-url", redis_server, "--namespace", "t"])
    assert res.exit_code == 0, res.output
    assert "w0:0" in res.stdout and f"{0xAA:016x}" in res.stdout and "router-1" in res.stdout
    res = runner.invoke(main, ["inspect", "--redis-url", ""], env={"KVR_REDIS_URL": ""})
    assert res.exit_code == 2 and "--redis-url" in res.output


@pytest.mark.integration
def test_kvr_inspect_reads_the_running_clusters_redis_and_namespace(redis_client, redis_server):
    import os

    from cli import user_state
    from tests.conftest import free_port

    _populate(redis_client)
    user_state.publish({"redis_url": redis_server, "namespace": "t", "pid": os.getpid()})
    runner = CliRunner()
    res = runner.invoke(main, ["inspect", "--json"])
    assert res.exit_code == 0, res.output
    assert [t["blocks"] for t in json.loads(res.stdout)["targets"]] == [2, 3]
    res = runner.invoke(main, ["inspect", "--json", "--namespace", "other"])  # an explicit namespace wins
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["targets"] == []
    # So does an explicit URL (here: nothing there), and the error never shows a password.
    dead = f"redis://:s3cret@127.0.0.1:{free_port()}/0"
    res = runner.invoke(main, ["inspect"], env={"KVR_REDIS_URL": dead})
    assert res.exit_code == 1 and res.output.startswith(f"Error: cannot read {dead.replace('s3cret', '***')}: ")
    assert "s3cret" not in res.output


@pytest.mark.integration
def test_kvr_inspect_says_the_mirror_is_out_of_memory_instead_of_plain_dead_workers(redis_client, redis_server):
    _populate(redis_client)
    before = redis_client.config_get("maxmemory*")
    redis_client.config_set("maxmemory-policy", "noeviction")
    redis_client.config_set("maxmemory", max(1, int(redis_client.info("memory")["used_memory"]) - 1024))
    try:
        runner = CliRunner()
        res = runner.invoke(main, ["inspect", "--redis-url", redis_server, "--namespace", "t", "--json"])
        assert res.exit_code == 0, res.output
        data = json.loads(res.stdout)
        assert (data["mirror"]["state"], data["mirror"]["cause"]) == ("degraded", "out_of_memory")
        # w1's liveness key is gone: with the routers unable to write, that says nothing about w1.
        assert [(w["worker_id"], w["alive"], w.get("alive_unknown")) for w in data["workers"]] == [
            ("w0", True, False), ("w1", False, True)]
        res = runner.invoke(main, ["inspect", "--redis-url", redis_server, "--namespace", "t"])
        assert res.exit_code == 0, res.output
        assert "unknown (out_of_memory)" in res.stdout and "mirror: degraded (out_of_memory)" in res.stdout
    finally:
        redis_client.config_set("maxmemory", before["maxmemory"])
        redis_client.config_set("maxmemory-policy", before["maxmemory-policy"])
    data = json.loads(CliRunner().invoke(main, ["inspect", "--redis-url", redis_server, "--namespace", "t",
                                                "--json"]).stdout)
    assert data["mirror"]["state"] == "ok" and "alive_unknown" not in data["workers"][1]


def test_inspect_reports_the_routers_own_health_report(fake_redis):
    _populate(fake_redis)
    fake_redis.hset(names.mirror_health_key("t"), "router-1", json.dumps(
        {"state": "degraded", "cause": "auth", "since_s": 100.0, "failed_writes": 3, "t_s": 109.0}))
    s = inspect_state(fake_redis, namespace="t", now_s=110.0)
    assert (s["mirror"]["state"], s["mirror"]["cause"]) == ("degraded", "auth")
    assert s["mirror"]["routers"]["router-1"]["age_s"] == 1.0
    assert [w.get("alive_unknown") for w in s["workers"]] == [False, True]


def test_kvr_inspect_names_why_redis_cannot_be_read():
    from tests.conftest import free_port

    res = CliRunner().invoke(main, ["inspect", "--redis-url", f"redis://127.0.0.1:{free_port()}/0"])
    assert res.exit_code == 1 and ": Redis unreachable (" in res.output and "Traceback" not in res.output
