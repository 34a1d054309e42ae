"""The embedded default Redis: ``redis-server`` if on PATH, else a fakeredis TCP server.

Used when no Redis URL is given (DESIGN §5). Both kinds run as a child process
on a loopback port, so a supervisor handles them like any other component:

* :func:`embedded_redis_argv` — the command line for a port (``redis-server``
  with persistence off, or ``python -m bus.redis_server --port N``);
* :class:`EmbeddedRedis` — a context manager that starts one, waits until it
  answers PING and stops it (its own process group: nothing is left behind);
* :class:`LocalRedisCluster` — M ``redis-server`` masters on loopback made into a Redis Cluster
  (``redis-cli --cluster create``), for tests and ``kvr up --redis-cluster M``; a master can be
  killed and restarted on its port with its ``nodes.conf`` (its data is lost: no persistence).

fakeredis speaks the protocol but is single-process Python: fine for a demo
and a laptop, not for throughput numbers (benchmarks should name the kind).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import redis

from bus.redis_url import cluster_url, make_client

if TYPE_CHECKING:  # fakeredis is imported only when a fake server is made
    from fakeredis import TcpFakeServer

logger = logging.getLogger(__name__)

KINDS = ("auto", "redis-server", "fakeredis")


def free_loopback_port() -> int:
    """A TCP port nothing listens on right now on 127.0.0.1 (racy by nature: bind soon)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_cluster_node_port() -> int:
    """A free loopback port for a Redis Cluster node: its cluster bus listens on port + 10000,
    which must be a valid port and free too (an ephemeral port above 55535 makes redis-server exit)."""
    while True:
        port = free_loopback_port()
        if port + 10_000 > 65_535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10_000))
            except OSError:
                continue
        return port


def resolve_kind(kind: str = "auto") -> str:
    """``auto`` → ``redis-server`` when the binary is on PATH, else ``fakeredis``."""
    if kind not in KINDS:
        raise ValueError(f"redis kind must be one of {KINDS}, got {kind!r}")
    if kind == "auto":
        return "redis-server" if shutil.which("redis-server") else "fakeredis"
    return kind


def embedded_redis_argv(port: int, *, kind: str = "auto", workdir: str | Path | None = None) -> tuple[str, list[str]]:
    """``(resolved kind, argv)`` of a Redis listening on ``127.0.0.1:port``."""
    kind = resolve_kind(kind)
    if kind == "redis-server":
        binary = shutil.which("redis-server")
        if binary is None:
            raise FileNotFoundError("redis-server is not on PATH")
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
        if workdir is not None:
            argv += ["--dir", str(workdir)]
        return kind, argv
    return kind, [sys.executable, "-m", "bus.redis_server", "--port", str(port)]


def ping(url: str, *, timeout_s: float = 0.5) -> bool:
    """True when a Redis (or every master of a Redis Cluster URL) at ``url`` answers PING."""
    try:
        client = make_client(url, timeout_s=timeout_s)
    except (redis.RedisError, OSError):
        return False
    try:
        return bool(client.ping())
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()


class EmbeddedRedis:
    """A throwaway Redis child process on loopback: ``with EmbeddedRedis() as r: r.url``."""

    def __init__(self, *, kind: str = "auto", port: int | None = None, start_timeout_s: float = 10.0) -> None:
        self.kind = resolve_kind(kind)
        self.port = port or free_loopback_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen[bytes] | None = None
        self._workdir: str | None = None

    def start(self) -> EmbeddedRedis:
        self._workdir = tempfile.mkdtemp(prefix="kvr-redis-")
        _, argv = embedded_redis_argv(self.port, kind=self.kind, workdir=self._workdir)
        self._proc = subprocess.Popen(
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            env={**os.environ, "PYTHONPATH": _python_path()},
        )
        deadline = time.monotonic() + self._start_timeout_s
        while not ping(self.url):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                code = self._proc.poll()
                self.stop()
                raise RuntimeError(f"embedded {self.kind} on port {self.port} did not start (exit code {code})")
            time.sleep(0.05)
        logger.info("embedded %s at %s", self.kind, self.url)
        return self

    def stop(self) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                try:
                    os.killpg(self._proc.pid, signal.SIGTERM)
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    os.killpg(self._proc.pid, signal.SIGKILL)
                    self._proc.wait()
                except ProcessLookupError:
                    pass
            self._proc = None
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> EmbeddedRedis:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def cluster_node_argv(port: int, *, node_dir: str | Path, node_timeout_ms: int = 5000) -> list[str]:
    """A ``redis-server`` Redis Cluster node on ``127.0.0.1:port`` without persistence; its
    ``nodes.conf`` (the cluster's view, kept across a restart) in ``node_dir``."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise FileNotFoundError("redis-server is not on PATH")
    return [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(node_dir), "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(node_timeout_ms)]


def create_cluster(ports: list[int], *, timeout_s: float = 20.0) -> None:
    """Make the fresh nodes on ``ports`` one Redis Cluster of masters (no replicas) and wait until
    every node says ``cluster_state:ok``."""
    cli = shutil.which("redis-cli")
    if cli is None:
        raise FileNotFoundError("redis-cli is not on PATH")
    subprocess.run([cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    for port in ports:
        while not cluster_ok(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster node on port {port} did not reach cluster_state:ok")
            time.sleep(0.02)


def cluster_ok(port: int) -> bool:
    """The cluster node on ``127.0.0.1:port`` says ``cluster_state:ok`` (it serves its slots)."""
    client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        info = client.cluster("INFO")
    except (redis.RedisError, OSError):
        return False
    finally:
        client.close()
    if isinstance(info, dict):  # redis-py parses the reply into its fields
        return info.get("cluster_state") == "ok"
    text = info.decode() if isinstance(info, bytes) else str(info)
    return "cluster_state:ok" in text


class LocalRedisCluster:
    """``masters`` redis-server processes on loopback, without persistence, made one Redis Cluster
    with no replicas: ``with LocalRedisCluster(masters=3) as c: c.url``.

    Each master runs in its own directory (its ``nodes.conf``) and process group, so :meth:`stop`
    leaves nothing behind. :meth:`kill_master` and
    :meth:`start_master` restart one master on its port: it rejoins with its slots (``nodes.conf``)
    but its keys are gone. ``node_timeout_ms`` is the cluster's ``cluster-node-timeout``.
    """

    def __init__(self, *, masters: int = 3, ports: list[int] | None = None, node_timeout_ms: int = 5000,
                 start_timeout_s: float = 20.0) -> None:
        if masters < 3:
            raise ValueError(f"a Redis Cluster needs at least 3 masters, got {masters}")
        if shutil.which("redis-server") is None or shutil.which("redis-cli") is None:
            raise FileNotFoundError("redis-server and redis-cli must be on PATH for a Redis Cluster")
        self.ports = list(ports) if ports is not None else _distinct_ports(masters)
        if len(self.ports) != masters:
            raise ValueError(f"{masters} masters need {masters} ports, got {len(self.ports)}")
        self.url = cluster_url("127.0.0.1", self.ports[0])
        self._node_timeout_ms = node_timeout_ms
        self._start_timeout_s = start_timeout_s
        self._procs: dict[int, subprocess.Popen[bytes]] = {}
        self._workdir: str | None = None

    def argv(self, port: int) -> list[str]:
        assert self._workdir is not None
        node_dir = Path(self._workdir) / str(port)
        node_dir.mkdir(exist_ok=True)
        return cluster_node_argv(port, node_dir=node_dir, node_timeout_ms=self._node_timeout_ms)

    def start(self) -> LocalRedisCluster:
        self._workdir = tempfile.mkdtemp(prefix="kvr-redis-cluster-")
        try:
            for port in self.ports:
                self.start_master(port, wait_ok=False)
            create_cluster(self.ports, timeout_s=self._start_timeout_s)
        except BaseException:
            self.stop()
            raise
        logger.info("local Redis Cluster of %d masters at %s", len(self.ports), self.url)
        return self

    def start_master(self, port: int, *, wait_ok: bool = True) -> None:
        """Start (or restart, after :meth:`kill_master`) the master on ``port``."""
        self._procs[port] = subprocess.Popen(self.argv(port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                             start_new_session=True)
        deadline = time.monotonic() + self._start_timeout_s
        while not ping(f"redis://127.0.0.1:{port}/0"):
            if self._procs[port].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server (cluster node) on port {port} did not start")
            time.sleep(0.02)
        if wait_ok:
            self.wait_ok(port)

    def kill_master(self, port: int) -> None:
        """SIGKILL the master on ``port`` (its keys die with it)."""
        proc = self._procs.pop(port)
        proc.kill()
        proc.wait(10)

    def cluster_ok(self, port: int) -> bool:
        return cluster_ok(port)

    def wait_ok(self, port: int) -> None:
        deadline = time.monotonic() + self._start_timeout_s
        while not self.cluster_ok(port):
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster node on port {port} did not reach cluster_state:ok")
            time.sleep(0.02)

    def stop(self) -> None:
        for port in list(self._procs):
            proc = self._procs.pop(port)
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # no persistence: nothing to flush
                except ProcessLookupError:
                    pass
                proc.wait()
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> LocalRedisCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _distinct_ports(n: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < n:
        port = free_cluster_node_port()
        if port not in ports:
            ports.append(port)
    return ports


def _python_path() -> str:
    """PYTHONPATH that lets ``python -m bus.redis_server`` import kvr from a source checkout."""
    root = str(Path(__file__).resolve().parents[1])
    existing = os.environ.get("PYTHONPATH", "")
    return root if not existing else f"{root}{os.pathsep}{existing}"


def make_fakeredis_server(host: str, port: int) -> TcpFakeServer:
    """fakeredis's TCP server, with ``TCP_NODELAY`` on every accepted connection.

    fakeredis writes each reply of a pipeline separately; with Nagle on, every reply after the
    first waits for the client's delayed ACK (~40 ms on Linux): one mirrored event batch took
    ~45 ms instead of ~2.5 ms, and a router fed by three workers fell seconds behind its
    heartbeats (``kvr demo`` on a machine without redis-server lost requests that way).
    """
    from fakeredis import TcpFakeServer

    class NoDelayServer(TcpFakeServer):
        def get_request(self) -> tuple[socket.socket, Any]:
            conn, addr = super().get_request()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return conn, addr

    return NoDelayServer((host, port))


def serve_fakeredis(port: int, *, host: str = "127.0.0.1", stop: threading.Event | None = None) -> None:
    """Serve a fakeredis TCP server until ``stop`` is set or SIGTERM/SIGINT (blocking)."""
    server = make_fakeredis_server(host, port)
    stop = stop or threading.Event()
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    logger.info("fakeredis TCP server on %s:%d", host, port)
    try:
        while not stop.wait(0.2):
            pass
    finally:
        server.shutdown()
        server.server_close()


def main(argv: list[str] | None = None) -> int:
    """``python -m bus.redis_server --port N``: the fakeredis child of :class:`EmbeddedRedis`."""
    parser = argparse.ArgumentParser(description="fakeredis TCP server on loopback")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve_fakeredis(args.port, host=args.host, stop=stop)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s")
    sys.exit(main())
