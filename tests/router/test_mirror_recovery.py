"""Redis restarting empty, or away for a while, never stops routing, and the mirror comes back exact.

Real redis-server processes (own port, restarted by the test) and real ZMQ sockets on loopback.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest
import redis as redis_py

from bus import names
from bus.client import RouterClient
from bus.schema import GenerateRequest, Welcome
from core.prefix_index import WorkerKey
from router.mirror import RedisMirror, make_redis_client
from tests.conftest import _need_real_service, free_port
from tests.router.test_service import BS, FakeWorker, RunningRouter, _config, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


class RedisProcess:
    """A redis-server without persistence that the test can stop and start on the same port,
    with extra ``redis-server`` arguments (``--maxmemory``, ``--requirepass``...)."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server")
        if self.binary is None:
            _need_real_service("redis-server")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="kvr-redis-restart-")
        self.proc: subprocess.Popen | None = None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self, *args: str, password: str | None = None) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", self.dir, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis_py.Redis(host="127.0.0.1", port=self.port, password=password)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis_py.ConnectionError:
                assert time.monotonic() < deadline and self.proc.poll() is None, "redis-server did not start"
                time.sleep(0.02)
        client.close()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(params=["sync", "background"])
def mirror_kind(request) -> str:
    """Both the plain mirror and the one ``kvr router`` runs (writes on a background thread)."""
    return request.param


def _mirror(url: str, kind: str, **client_kw):
    from router.background_mirror import BackgroundMirror

    mirror = RedisMirror(client=make_redis_client(url, **client_kw), namespace="t")
    return mirror if kind == "sync" else BackgroundMirror(mirror=mirror)


@pytest.fixture
def redis_proc():
    proc = RedisProcess()
    proc.start()
    yield proc
    proc.close()


def _mirrored(client: redis_py.Redis, wid: str) -> dict[int, int]:
    return {int(k): int(v) for k, v in client.hgetall(names.target_blocks_key("t", wid, 0)).items()}


def _mirror_exact(svc, client: redis_py.Redis, wids: list[str]) -> bool:
    try:
        return all(_mirrored(client, w) == dict(svc.index.snapshot(WorkerKey(w, 0))) for w in wids) and sorted(
            m.decode() for m in client.smembers(names.workers_key("t"))) == sorted(wids)
    except redis_py.ConnectionError:
        return False


def _route(client: RouterClient, workers, rid: str, tokens: list[int]):
    res = client.send(GenerateRequest(rid, token_ids=tokens, max_tokens=2))
    wait_for(lambda: res.done, workers, client)
    return res


def test_redis_restarting_empty_is_noticed_and_the_mirror_rewritten(ctx, redis_proc, mirror_kind):
    running = RunningRouter(_config(mirror_check_s=0.1), mirror=_mirror(redis_proc.url, mirror_kind))
    svc = running.service
    w1, w2 = FakeWorker(ctx, svc.workers_endpoint, "w1"), FakeWorker(ctx, svc.workers_endpoint, "w2")
    client = RouterClient(endpoint=svc.clients_endpoint, ctx=ctx)
    check = redis_py.Redis.from_url(redis_proc.url)
    a, b = list(range(100, 100 + 6 * BS)), list(range(900, 900 + 4 * BS))
    try:
        for w in (w1, w2):
            w.hello()
        wait_for(lambda: all(any(isinstance(m, Welcome) for m in w.received) for w in (w1, w2)), [w1, w2])
        w1.store(a)
        wait_for(lambda: _mirror_exact(svc, check, ["w1", "w2"]) and len(_mirrored(check, "w1")) == 6, [w1, w2])
        generation = check.get(names.generation_key("t"))
        assert generation is not None

        redis_proc.stop()
        # Same port, empty data set: no write has failed yet. (Writes still queued in the background
        # writer, up to ~60 ms of event batches, may land in it before the router notices: they
        # are what the rewrite below must repair.)
        redis_proc.start()
        w2.store(b)  # written into the empty Redis by the next batch, before the router notices
        wait_for(lambda: svc.index.num_blocks(WorkerKey("w2", 0)) == 4, [w1, w2])
        wait_for(lambda: _mirror_exact(svc, check, ["w1", "w2"]), [w1, w2], timeout_s=5.0)
        assert len(_mirrored(check, "w1")) == 6 and len(_mirrored(check, "w2")) == 4
        assert check.get(names.generation_key("t")) not in (None, generation)
        assert svc.counters["mirror_resyncs"] >= 1
        # The registry is back too: `kvr inspect` sees both workers with their Hello.
        assert check.hget(names.worker_key("t", "w1"), "events_endpoint").decode() == w1.pub.endpoint
        assert _route(client, [w1, w2], "after", a + [1]).routed.worker_id == "w1"
    finally:
        check.close()
        client.close()
        w1.close()
        w2.close()
        running.stop()
        if mirror_kind == "background":
            svc.mirror.close(timeout_s=0.5)


def test_routing_goes_on_while_redis_is_down_and_the_mirror_catches_up(ctx, redis_proc, mirror_kind):
    running = RunningRouter(_config(mirror_check_s=0.1), mirror=_mirror(redis_proc.url, mirror_kind, timeout_s=0.05))
    svc = running.service
    w1, w2 = FakeWorker(ctx, svc.workers_endpoint, "w1"), FakeWorker(ctx, svc.workers_endpoint, "w2")
    client = RouterClient(endpoint=svc.clients_endpoint, ctx=ctx)
    a, b = list(range(100, 100 + 6 * BS)), list(range(900, 900 + 4 * BS))
    try:
        for w in (w1, w2):
            w.hello()
        wait_for(lambda: len(svc.workers) == 2, [w1, w2])
        w1.store(a)
        wait_for(lambda: svc.index.num_blocks(WorkerKey("w1", 0)) == 6, [w1, w2])

        redis_proc.stop()
        w2.store(b)  # ingested while Redis is away: the index learns it, the write fails
        wait_for(lambda: svc.index.num_blocks(WorkerKey("w2", 0)) == 4, [w1, w2])
        for i in range(5):  # every request still gets routed by overlap, from memory
            assert _route(client, [w1, w2], f"down-{i}", b + [i]).routed.worker_id == "w2"
        wait_for(lambda: svc.counters["mirror_failures"] > 0, [w1, w2])
        assert svc.counters["completed"] == 5

        redis_proc.start()
        check = redis_py.Redis.from_url(redis_proc.url)
        try:
            wait_for(lambda: _mirror_exact(svc, check, ["w1", "w2"]), [w1, w2], timeout_s=5.0)
            assert len(_mirrored(check, "w1")) == 6 and len(_mirrored(check, "w2")) == 4
            assert svc.counters["mirror_resyncs"] >= 1
        finally:
            check.close()
    finally:
        client.close()
        w1.close()
        w2.close()
        running.stop()
        if mirror_kind == "background":
            svc.mirror.close(timeout_s=0.5)
