"""Redis AUTH and TLS through the URL, against real ``redis-server`` processes.

The mirror works over an authenticated (and over a TLS) connection, packed pipelines
included; wrong credentials or an unverifiable certificate give one clear error: a
``MirrorUnavailable`` from the mirror, a refusal to start from ``kvr router``.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pytest
import redis
from click.testing import CliRunner

from bus.mirror_status import Cause
from bus.redis_url import redact_url
from bus.schema import Hello
from cli.main import main
from cluster.processes import stop_process
from router.mirror import MirrorUnavailable, RedisMirror, make_redis_client
from router.mirror_health import cause_of
from tests.conftest import _need_real_service, free_port
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)
PASSWORD = "s3cret-kvr"


def _start_redis(args: list[str], ping) -> tuple[subprocess.Popen, str]:
    binary = shutil.which("redis-server")
    if binary is None:
        _need_real_service("redis-server")
    workdir = tempfile.mkdtemp(prefix="kvr-redis-sec-")
    proc = subprocess.Popen([binary, "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", workdir,
                             *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def answers() -> bool:
        assert proc.poll() is None, f"redis-server {args} exited at start"
        try:
            ping()
            return True
        except redis.RedisError:
            return False

    try:
        eventually(answers, timeout_s=10, what=f"redis-server {args} answering", interval_s=0.05)
    except AssertionError:
        stop_process(proc, sig=signal.SIGKILL)
        raise
    return proc, workdir


def _stop(proc: subprocess.Popen, workdir: str) -> None:
    stop_process(proc)
    shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(scope="module")
def auth_redis():
    """A redis-server with ``requirepass``; yields ``host:port``."""
    port = free_port()
    proc, workdir = _start_redis(["--port", str(port), "--requirepass", PASSWORD],
                                 lambda: redis.Redis(port=port, password=PASSWORD).ping())
    yield f"127.0.0.1:{port}"
    _stop(proc, workdir)


def _roundtrip(mirror: RedisMirror) -> None:
    mirror.register_worker(Hello("w1", 7, "m", 16, 100, "tcp://127.0.0.1:1"), now_s=1.0, ttl_s=5.0)
    mirror.write_batch("w1", 0, seq=3, epoch=7, stored={11: 21, 12: 22}, removed=set(), cleared=False, num_events=1,
                       now_s=1.0)
    snap = mirror.load_snapshot()[("w1", 0)]
    assert (snap.seq, snap.epoch, snap.blocks) == (3, 7, {11: 21, 12: 22})


@pytest.mark.parametrize("userinfo", [f":{PASSWORD}", f"default:{PASSWORD}"])
def test_the_mirror_works_with_the_password_in_the_url(auth_redis, userinfo) -> None:
    client = make_redis_client(f"redis://{userinfo}@{auth_redis}/0")
    client.flushdb()
    _roundtrip(RedisMirror(client=client, namespace="auth"))


@pytest.mark.parametrize("userinfo", ["", ":wrong@", "default:wrong@"])
def test_missing_or_wrong_credentials_are_one_clear_error(auth_redis, userinfo) -> None:
    mirror = RedisMirror(client=make_redis_client(f"redis://{userinfo}{auth_redis}/0"), namespace="auth")
    with pytest.raises(MirrorUnavailable) as refused:
        mirror.register_worker(Hello("w1", 7, "m", 16, 100, "tcp://127.0.0.1:1"), now_s=1.0, ttl_s=5.0)
    assert cause_of(refused.value) is Cause.AUTH  # the router's mirror health says auth, not unreachable
    with pytest.raises(MirrorUnavailable) as refused:
        mirror.load_snapshot()
    assert cause_of(refused.value) is Cause.AUTH


def test_kvr_inspect_with_wrong_credentials_says_so_without_the_password(auth_redis) -> None:
    url = f"redis://:not-{PASSWORD}@{auth_redis}/0"
    result = CliRunner().invoke(main, ["inspect", "--redis-url", url])
    assert result.exit_code == 1 and result.output.startswith(f"Error: cannot read {redact_url(url)}: Redis refused "
                                                              "the credentials (")
    assert PASSWORD not in result.output and len(result.output.splitlines()) == 1


def test_kvr_router_refuses_to_start_with_wrong_credentials(auth_redis) -> None:
    url = f"redis://:wrong@{auth_redis}/0"
    result = CliRunner().invoke(main, ["router", "--redis-url", url, "--bind-clients", "tcp://127.0.0.1:0",
                                       "--bind-workers", "tcp://127.0.0.1:0", "--bind-metrics", ""])
    assert result.exit_code == 1, result.output
    assert "Redis refused the credentials" in result.output
    assert "wrong" not in result.output  # the password is not echoed
    assert redact_url(url) in result.output


def test_redact_url() -> None:
    assert redact_url("rediss://user:pw@h:6380/0?ssl_cert_reqs=required") == "rediss://user:***@h:6380/0?ssl_cert_reqs=required"
    assert redact_url("redis://h:6379/0") == "redis://h:6379/0"


@pytest.fixture(scope="module")
def tls_redis(tmp_path_factory):
    """A TLS-only redis-server (with a password) and the CA that signed its certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    d: Path = tmp_path_factory.mktemp("tls")

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "2",
        "-subj", "/CN=kvr-test-ca")
    ssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-out",
        "server.crt", "-days", "2", "-extfile", "ext.cnf")
    port = free_port()
    ca = str(d / "ca.crt")
    proc, workdir = _start_redis(
        ["--port", "0", "--tls-port", str(port), "--tls-cert-file", str(d / "server.crt"), "--tls-key-file",
         str(d / "server.key"), "--tls-ca-cert-file", ca, "--tls-auth-clients", "no", "--requirepass", PASSWORD],
        lambda: redis.Redis(port=port, password=PASSWORD, ssl=True, ssl_ca_certs=ca).ping())
    yield f"127.0.0.1:{port}", ca
    _stop(proc, workdir)


def test_the_mirror_works_over_tls_with_the_ca_in_the_url(tls_redis) -> None:
    address, ca = tls_redis
    client = make_redis_client(f"rediss://:{PASSWORD}@{address}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}")
    client.flushdb()
    _roundtrip(RedisMirror(client=client, namespace="tls"))


def test_an_unverifiable_certificate_is_one_clear_error(tls_redis) -> None:
    address, _ = tls_redis
    url = f"rediss://:{PASSWORD}@{address}/0?ssl_cert_reqs=required"  # no CA: the system's cannot verify it
    with pytest.raises(MirrorUnavailable, match="(?i)certificate"):
        RedisMirror(client=make_redis_client(url), namespace="tls").load_snapshot()
    result = CliRunner().invoke(main, ["router", "--redis-url", url, "--bind-clients", "tcp://127.0.0.1:0",
                                       "--bind-workers", "tcp://127.0.0.1:0", "--bind-metrics", ""])
    assert result.exit_code == 1 and "TLS with Redis failed" in result.output, result.output


def test_plain_redis_cannot_talk_to_a_tls_port(tls_redis) -> None:
    address, _ = tls_redis
    with pytest.raises(MirrorUnavailable):
        RedisMirror(client=make_redis_client(f"redis://:{PASSWORD}@{address}/0"), namespace="tls").load_snapshot()
