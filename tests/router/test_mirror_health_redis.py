"""Mirror health against real redis-server processes: out of memory, and a password-protected Redis
started after the router. Routing never stops; the state, /health and /metrics say why; ok again
only after the mirror was rewritten and read back.
"""

from __future__ import annotations

import logging
import time

import pytest
import redis as redis_py
import zmq

from bus import names
from bus.client import RouterClient
from bus.sockets import connectable
from core.prefix_index import WorkerKey
from monitor.inspect import inspect_state
from router.background_mirror import BackgroundMirror
from router.http_front import RouterHttpFront
from router.mirror import RedisMirror, make_redis_client
from tests.prometheus_text import metric_value
from tests.router.test_http_front import _get
from tests.router.test_mirror_recovery import RedisProcess, _mirror_exact, _route
from tests.router.test_service import BS, FakeWorker, RunningRouter, _config, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]


@pytest.fixture
def redis_proc():
    proc = RedisProcess()
    yield proc
    proc.close()


@pytest.fixture
def zctx():
    ctx = zmq.Context()
    yield ctx
    ctx.term()


def _stack(ctx, url: str):
    mirror = BackgroundMirror(mirror=RedisMirror(client=make_redis_client(url, timeout_s=0.2), namespace="t"))
    running = RunningRouter(_config(mirror_check_s=0.05, stats_interval_s=0.05), mirror=mirror)
    svc = running.service
    front = RouterHttpFront(client_endpoint=connectable(svc.clients_endpoint), model="m", stats=lambda: svc.stats,
                            ctx=ctx, request_timeout_s=10)
    front.start()
    return running, svc, front, mirror


def test_out_of_memory_is_reported_routing_goes_on_and_the_mirror_comes_back_verified(zctx, redis_proc, caplog):
    caplog.set_level(logging.INFO, logger="router.mirror_sync")
    redis_proc.start()
    url = f"redis://127.0.0.1:{redis_proc.port}/0"
    running, svc, front, mirror = _stack(zctx, url)
    w1 = FakeWorker(zctx, svc.workers_endpoint, "w1")
    client = RouterClient(endpoint=svc.clients_endpoint, ctx=zctx)
    check = redis_py.Redis.from_url(url)
    prompt = list(range(100, 100 + 4 * BS))
    try:
        w1.hello()
        w1.store(prompt)
        wait_for(lambda: _mirror_exact(svc, check, ["w1"]) and svc.index.num_blocks(WorkerKey("w1", 0)) == 4, [w1])
        assert svc.stats["mirror"]["state"] == "ok"
        # Redis full (noeviction): the mirror's next writes are refused. Fill it with the mirror itself.
        check.config_set("maxmemory-policy", "noeviction")
        check.config_set("maxmemory", check.info("memory")["used_memory"] + 64 * 1024)
        base = 10_000
        while svc.mirror_health.state == "ok":
            w1.store(list(range(base, base + 500 * BS)))
            base += 500 * BS
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline and svc.mirror_health.state == "ok":
                w1.pump()
                time.sleep(0.01)
            assert base < 10_000 + 200 * 500 * BS, "the mirror never filled Redis"
        wait_for(lambda: svc.stats["mirror"]["state"] == "degraded", [w1])
        assert svc.stats["mirror"]["cause"] == "out_of_memory"
        status, body = _get(front, "/health")
        assert status == 200 and "mirror: degraded (out_of_memory since " in body.decode()
        status, body = _get(front, "/metrics")
        assert metric_value(body, "kvr_router_mirror_degraded", cause="out_of_memory") == 1
        # Routing is unaffected: the index is in memory.
        assert _route(client, [w1], "during", prompt + [1]).routed.worker_id == "w1"
        seen = inspect_state(check, namespace="t", now_s=time.time())["mirror"]
        assert (seen["state"], seen["cause"]) == ("degraded", "out_of_memory")
        indexed = svc.index.num_blocks(WorkerKey("w1", 0))
        blocks_key = names.target_blocks_key("t", "w1", 0)
        assert len(check.hgetall(blocks_key)) < indexed  # what the operator saw: blocks missing

        check.config_set("maxmemory", 0)
        wait_for(lambda: svc.mirror_health.state == "ok", [w1], timeout_s=10.0)
        assert _mirror_exact(svc, check, ["w1"]) and len(check.hgetall(blocks_key)) == indexed
        wait_for(lambda: svc.stats["mirror"]["state"] == "ok", [w1])
        status, body = _get(front, "/health")
        assert status == 200 and "mirror: ok" in body.decode()
        assert metric_value(_get(front, "/metrics")[1], "kvr_router_mirror_degraded", cause="out_of_memory") == 0
        logs = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "router.mirror_sync"]
        assert [m for lvl, m in logs if lvl == logging.WARNING and "mirror degraded" in m][0].startswith(
            "Redis mirror degraded: out_of_memory")
        assert len([m for lvl, m in logs if "mirror degraded" in m]) == 1
        assert len([m for lvl, m in logs if lvl == logging.INFO and m.startswith("Redis mirror ok again")]) == 1
    finally:
        check.close()
        client.close()
        front.close()
        w1.close()
        running.stop()
        mirror.close(timeout_s=0.5)


def test_a_password_protected_redis_started_later_is_an_auth_cause_and_no_output_shows_a_password(
        zctx, redis_proc, caplog):
    caplog.set_level(logging.DEBUG)
    url = f"redis://:wrong-pw-123@127.0.0.1:{redis_proc.port}/0"  # Redis not started yet
    running, svc, front, mirror = _stack(zctx, url)
    w1 = FakeWorker(zctx, svc.workers_endpoint, "w1")
    try:
        w1.hello()
        wait_for(lambda: svc.mirror_health.state == "degraded", [w1])
        assert svc.mirror_health.cause.value == "unreachable"
        redis_proc.start("--requirepass", "right-pw-456", password="right-pw-456")
        wait_for(lambda: svc.mirror_health.cause is not None and svc.mirror_health.cause.value == "auth", [w1])
        wait_for(lambda: svc.stats["mirror"]["cause"] == "auth", [w1])
        outputs = [_get(front, "/health")[1].decode(), _get(front, "/metrics")[1].decode(), str(svc.stats)]
        assert "mirror: degraded (auth since " in outputs[0]
        assert metric_value(outputs[1], "kvr_router_mirror_degraded", cause="auth") == 1
        outputs += [r.getMessage() for r in caplog.records] + [r.exc_text or "" for r in caplog.records]
        assert not [o for o in outputs if "wrong-pw-123" in o or "right-pw-456" in o]
        assert not [r for r in caplog.records if r.getMessage().startswith("Redis mirror rewritten")]
    finally:
        front.close()
        w1.close()
        running.stop()
        mirror.close(timeout_s=0.5)
