"""The mirror's health: causes told apart by exception class, transitions logged once, ok only once verified.

A fake Redis (fakeredis) behind a switch that makes every call raise the exception a real Redis
would cause; the service's mirror check is driven by hand (no thread, no timing).
"""

from __future__ import annotations

import json
import logging

import pytest
import redis

from bus import names
from bus.mirror_status import Cause, describe
from bus.schema import MirrorStatus
from router.background_mirror import BackgroundMirror
from router.mirror import MirrorUnavailable, RedisMirror, TargetSnapshot
from router.mirror_health import MirrorHealth, cause_of
from router.prometheus import render_metrics
from router.service import RouterConfig, RouterService
from tests.prometheus_text import metric_samples, metric_value

OOM = redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")


@pytest.mark.parametrize(("exc", "cause"), [
    (redis.ConnectionError("refused"), Cause.UNREACHABLE),
    (redis.TimeoutError("timed out"), Cause.UNREACHABLE),
    (ConnectionRefusedError(111, "refused"), Cause.UNREACHABLE),
    (OOM, Cause.OUT_OF_MEMORY),
    (redis.ResponseError("OOM command not allowed"), Cause.OUT_OF_MEMORY),  # the protocol code, unmapped
    (redis.AuthenticationError("wrong"), Cause.AUTH),  # a ConnectionError subclass: auth, not unreachable
    (redis.exceptions.AuthorizationError("denied"), Cause.AUTH),
    (redis.exceptions.NoPermissionError("no perm"), Cause.AUTH),
    (redis.exceptions.ClusterDownError("The cluster is down"), Cause.UNREACHABLE),  # a master is down
    (redis.exceptions.MasterDownError("link down"), Cause.UNREACHABLE),
    (redis.exceptions.SlotNotCoveredError("slot 5 not covered"), Cause.UNREACHABLE),
    (redis.exceptions.MovedError("3999 127.0.0.1:6381"), Cause.OTHER),  # resharded: the next write follows
    (redis.ResponseError("ERR unknown command"), Cause.OTHER),
    (redis.exceptions.ExecAbortError("discarded"), Cause.OTHER),
    (ValueError("bug"), Cause.OTHER),
    (None, Cause.OTHER),
])
def test_cause_of_an_exception_and_of_the_mirror_error_raised_from_it(exc, cause) -> None:
    assert cause_of(exc) is cause
    try:
        raise MirrorUnavailable("redis: failed") from exc
    except MirrorUnavailable as wrapped:
        assert cause_of(wrapped) is cause


def test_transitions_are_reported_once_and_failed_writes_counted() -> None:
    h = MirrorHealth()
    assert h.status() == MirrorStatus("ok", None, None, 0) and describe(h.status()) == "ok"
    assert h.fail(Cause.OUT_OF_MEMORY, now_s=100.0) is True
    assert h.fail(Cause.OUT_OF_MEMORY, now_s=101.0, failed_writes=4) is False
    assert h.status() == MirrorStatus("degraded", "out_of_memory", 100.0, 5)
    assert describe(h.status()) == "degraded (out_of_memory since 1970-01-01 00:01:40 UTC, 5 failed writes)"
    assert h.fail(Cause.UNREACHABLE, now_s=102.0) is True  # a new cause: reported; still degraded since 100
    assert h.status() == MirrorStatus("degraded", "unreachable", 100.0, 6)
    assert h.recover(now_s=103.0) is True and h.recover(now_s=104.0) is False
    assert h.status() == MirrorStatus("ok", None, 103.0, 0)
    assert describe({"state": "ok", "cause": None, "t_s": 5.0}) == "ok" and describe(None) == "unknown"


class Switch:
    """A Redis client that raises ``error`` on every use while it is set."""

    def __init__(self, real) -> None:
        self.real, self.error = real, None

    def __getattr__(self, name):
        if self.error is not None:
            raise self.error
        return getattr(self.real, name)


def _service(mirror) -> RouterService:
    return RouterService(RouterConfig(bind_clients="tcp://127.0.0.1:*", bind_workers="tcp://127.0.0.1:*",
                                      router_id="r1"), mirror=mirror, wall=lambda: 1000.0)


def _mirror_log(caplog) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if "mirror" in r.getMessage()]


@pytest.mark.parametrize(("exc", "cause"), [
    (OOM, "out_of_memory"), (redis.ConnectionError("refused"), "unreachable"),
    (redis.AuthenticationError("wrong"), "auth"), (redis.exceptions.NoPermissionError("no"), "auth"),
    (redis.ResponseError("ERR weird"), "other")])
@pytest.mark.parametrize("kind", ["sync", "background"])
def test_the_service_degrades_with_the_cause_and_recovers_once_the_rewrite_verified(fake_redis, caplog, exc, cause,
                                                                                      kind):
    switch = Switch(fake_redis)
    mirror = RedisMirror(client=switch, namespace="t")
    mirror = mirror if kind == "sync" else BackgroundMirror(mirror=mirror)
    svc = _service(mirror)

    def check() -> None:
        svc.check_mirror()
        if kind == "background":  # the check answered from the last completed one: let the next complete
            assert mirror.flush(5.0)

    try:
        check()
        check()
        assert svc.mirror_health.state == "ok"
        caplog.set_level(logging.INFO, logger="router.mirror_sync")
        switch.error = exc
        for _ in range(3):
            check()
        health = svc.mirror_health.status()
        assert (health.state, health.cause, health.since_s) == ("degraded", cause, 1000.0)
        assert health.failed_writes >= 2
        degraded_logs = [m for lvl, m in _mirror_log(caplog) if lvl == logging.WARNING]
        assert len(degraded_logs) == 1 and f"degraded: {cause}" in degraded_logs[0]  # once, not per failure
        svc.refresh_stats()
        assert svc.stats["mirror"]["state"] == "degraded" and svc.stats["mirror"]["cause"] == cause
        metrics = render_metrics(svc.stats)
        degraded = metric_samples(metrics, "kvr_router_mirror_degraded")
        assert sorted((labels["cause"], value) for labels, value in degraded) == sorted(
            (c.value, float(c.value == cause)) for c in Cause)

        switch.error = None
        for _ in range(4):  # back: rewrite, read back, ok
            check()
        assert svc.mirror_health.status() == MirrorStatus("ok", None, 1000.0, 0)
        info = [m for lvl, m in _mirror_log(caplog) if lvl == logging.INFO]
        assert len(info) == 1 and info[0].startswith(f"Redis mirror ok again (was degraded ({cause} since")
        assert svc.counters["mirror_resyncs"] >= 1
        svc.refresh_stats()
        assert metric_value(render_metrics(svc.stats), "kvr_router_mirror_degraded", cause=cause) == 0
    finally:
        svc.close()
        if kind == "background":
            mirror.close(timeout_s=0.5)


def test_a_rewrite_that_does_not_read_back_is_logged_and_redone(fake_redis, caplog, monkeypatch):
    switch = Switch(fake_redis)
    mirror = RedisMirror(client=switch, namespace="t")
    svc = _service(mirror)
    wrong = iter(["w1:0 holds 0 blocks, not 3"])
    real_verify = mirror.verify
    monkeypatch.setattr(mirror, "verify", lambda blocks, workers: next(wrong, None) or real_verify(blocks, workers))
    try:
        svc.check_mirror()
        switch.error = OOM
        svc.check_mirror()
        switch.error = None
        caplog.set_level(logging.INFO, logger="router.mirror_sync")
        caplog.clear()
        svc.check_mirror()  # rewrite; its read-back says it did not land
        svc.check_mirror()
        assert svc.counters["mirror_unverified"] == 1 and svc.mirror_health.state == "degraded"
        assert [m for lvl, m in _mirror_log(caplog) if lvl == logging.WARNING] == [
            "Redis mirror rewrite did not verify (w1:0 holds 0 blocks, not 3): rewriting again"]
        resyncs = svc.counters["mirror_resyncs"]
        svc.check_mirror()  # rewritten again
        svc.check_mirror()  # read back: exact
        assert svc.counters["mirror_resyncs"] == resyncs + 1 and svc.mirror_health.state == "ok"
    finally:
        svc.close()


def test_the_read_back_compares_blocks_per_target_and_live_workers(fake_redis):
    from bus.schema import Hello

    m = RedisMirror(client=fake_redis, namespace="t")
    m.replace_target(TargetSnapshot("w1", 0, 3, 1, {1: 11, 2: 12}))
    m.register_worker(Hello(worker_id="w1", epoch=1, model="m", block_size=16, num_gpu_blocks=9,
                            events_endpoint="tcp://127.0.0.1:1"), now_s=1.0, ttl_s=60.0)
    assert m.verify({("w1", 0): 2, ("w2", 0): 0}, {"w1"}) == ""
    assert m.verify({("w1", 0): 3}, {"w1", "w2"}) == "w1:0 holds 2 blocks, not 3; worker w2 not registered alive"
    m.request_verification(blocks={("w1", 0): 2}, workers=["w1"])
    assert m.take_verification() == "" and m.take_verification() is None


def test_a_background_read_back_runs_after_the_writes_queued_before_it(fake_redis):
    bg = BackgroundMirror(mirror=RedisMirror(client=fake_redis, namespace="t"))
    try:
        bg.replace_target(TargetSnapshot("w1", 0, 3, 1, {1: 11, 2: 12, 3: 13}))
        bg.request_verification(blocks={("w1", 0): 2}, workers=[])  # an older question: its answer is dropped
        bg.write_batch("w1", 0, seq=4, epoch=1, removed=[3])
        bg.request_verification(blocks={("w1", 0): 2}, workers=[])
        assert bg.flush(5.0)
        assert bg.take_verification() == "" and bg.take_verification() is None
    finally:
        bg.close()


def test_the_router_records_its_health_for_inspect(fake_redis):
    from monitor.inspect import mirror_state

    m = RedisMirror(client=fake_redis, namespace="t")
    m.record_health("r1", json.dumps({"state": "degraded", "cause": "other", "since_s": 90.0, "failed_writes": 2,
                                      "t_s": 99.0}))
    state = mirror_state(fake_redis, namespace="t", now_s=100.0)
    assert (state["state"], state["cause"], state["detail"]) == ("degraded", "other", "router r1 reports it")
    assert state["routers"]["r1"]["age_s"] == 1.0
    assert json.loads(fake_redis.hget(names.mirror_health_key("t"), "r1"))["failed_writes"] == 2
