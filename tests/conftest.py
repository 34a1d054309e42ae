"""Shared fixtures.

* ``redis_server``: a real ``redis-server`` on a free loopback port, one per test
  session. Skips when none is installed locally; *fails* when ``CI`` is set, so CI
  can never pass by skipping the integration tests.
* ``redis_client``: a client on that server, flushed before and after each test.
* ``fake_redis``: fakeredis for unit tests.
* ``rng``: a seeded ``random.Random``.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings

from cluster.processes import stop_process
from tests.waiting import eventually

# The machine is shared and noisy: hypothesis' per-example deadline would make
# property tests flaky for timing reasons that say nothing about correctness.
settings.register_profile("kvr", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("kvr")

# Test data lives in the repository (a user's clone has nothing beside it):
# vLLM's captured event frames under tests/fixtures, the Mooncake traces under traces/.
REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "vllm_kv_events"
TRACES = REPO / "traces"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """Each test gets its own kvr state dir (``KVR_STATE_DIR``, inherited by the processes it
    starts): no test reads or clobbers a user's running ``kvr up``, and the ambient endpoint
    variables that would point commands elsewhere are cleared."""
    from cli.user_state import STATE_DIR_ENV

    path = tmp_path / "kvr-state"
    monkeypatch.setenv(STATE_DIR_ENV, str(path))
    for var in ("KVR_ROUTER", "KVR_REDIS_URL", "KVR_MONITOR_URL", "KVR_NAMESPACE", "KVR_CURVE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return path


@pytest.fixture
def rng() -> random.Random:
    return random.Random(1234)


@pytest.fixture(scope="session")
def traces_dir() -> Path:
    return TRACES


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES


def _need_real_service(what: str) -> None:
    if os.environ.get("CI"):
        pytest.fail(f"{what} is required in CI but is not available")
    pytest.skip(f"{what} not installed")


@pytest.fixture(scope="session")
def redis_server():
    """Start a throwaway redis-server on loopback; yields its URL."""
    binary = shutil.which("redis-server")
    if binary is None:
        _need_real_service("redis-server")
    port = free_port()
    workdir = tempfile.mkdtemp(prefix="kvr-redis-")
    proc = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    import redis

    client = redis.Redis(host="127.0.0.1", port=port)

    def answers() -> bool:
        assert proc.poll() is None, "redis-server exited at start"
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    try:
        eventually(answers, timeout_s=10, what="redis-server answering PING", interval_s=0.05)
    except AssertionError:
        stop_process(proc, sig=signal.SIGKILL)
        raise
    client.close()
    yield f"redis://127.0.0.1:{port}/0"
    stop_process(proc)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture
def redis_client(redis_server):
    import redis

    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield client
    client.flushdb()
    client.close()


@pytest.fixture
def fake_redis():
    import fakeredis

    return fakeredis.FakeRedis()
