"""A supervised local kvr cluster: Redis, router, N workers, monitor — ``kvr up``, the demo, benchmarks.

::

    with LocalCluster(ClusterConfig(workers=3, speedup=20)) as cluster:
        client = RouterClient(endpoint=cluster.client_endpoint)
        ...

Every component is a child process running a ``kvr`` subcommand (the same
commands ``docker-compose.yml`` runs), in its own process group, with its log
in ``<run_dir>/logs/<name>.log``. :meth:`LocalCluster.start` returns once the
cluster is ready: Redis answers PING, the router has N live workers registered
in Redis, the monitor answers ``/healthz`` and has received the router's first
metrics record (so no request sent after readiness is missing from its dump). A failure at any step stops
everything already started and raises :class:`~cluster.supervisor.ComponentFailed`.

Ports are picked free on 127.0.0.1 unless given. Endpoints bind on the side
that is stable (router, worker event PUBs) and connect from the volatile side.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from bus.redis_server import (
    cluster_node_argv,
    create_cluster,
    embedded_redis_argv,
    free_cluster_node_port,
    free_loopback_port,
    ping,
)
from bus.redis_url import cluster_url, redact_url
from cluster.supervisor import ComponentFailed, ComponentSpec, Supervisor, tail
from core.blocks import DEFAULT_BLOCK_SIZE
from core.policies import DEFAULT_POLICY

logger = logging.getLogger(__name__)

#: Exit codes of ``kvr up`` (and of :meth:`LocalCluster.exit_code`): which role failed.
EXIT_OK = 0
EXIT_CODES = {"redis": 10, "router": 11, "worker": 12, "monitor": 13, "front": 14}
EXIT_UNKNOWN = 1


@dataclass
class ClusterConfig:
    """What to run. ``redis_url`` empty = the embedded default (``redis_kind``); ``run_dir`` None =
    a temporary folder, removed with the :class:`LocalCluster`."""

    workers: int = 3
    routers: int = 1  # router replicas sharing the fleet (each worker registers with all; router/peers.py)
    redis_url: str = ""
    redis_kind: str = "auto"
    redis_cluster_masters: int = 0  # > 0: the embedded Redis is a Redis Cluster of this many masters
    namespace: str = "default"
    policy: str = DEFAULT_POLICY
    profile: str = ""
    speedup: float = 1.0
    block_size: int = DEFAULT_BLOCK_SIZE
    monitor: bool = True
    run_dir: str | Path | None = None
    host: str = "127.0.0.1"
    client_port: int = 0
    worker_port: int = 0
    metrics_port: int = 0
    monitor_http_port: int = 0
    front_http_port: int | None = None  # one `kvr front` over every router on this port (0: any); None: none
    dump_interval_s: float = 2.0
    router_args: list[str] = field(default_factory=list)
    replica_router_args: list[str] | None = None  # the replicas' (router-1, ...); None: router_args
    worker_args: list[str] = field(default_factory=list)
    front_args: list[str] = field(default_factory=list)
    ready_timeout_s: float = 60.0
    stop_timeout_s: float = 10.0
    log_level: str = "INFO"
    label: str = ""


def kvr_argv(*args: str, log_level: str = "INFO") -> list[str]:
    """``kvr <args>`` run by this interpreter (works from a venv, a checkout or a container).

    Run by :class:`~cluster.supervisor.Supervisor`, which keeps the current directory off the
    child's ``sys.path`` (a user's ``cli/`` or ``core/`` folder cannot shadow kvr's)."""
    return [sys.executable, "-m", "cli.main", "--log-level", log_level, *args]


class LocalCluster:
    """Start, watch and stop one local cluster (a context manager)."""

    def __init__(self, config: ClusterConfig | None = None) -> None:
        self.config = c = config or ClusterConfig()
        if c.run_dir:
            self.run_dir = Path(c.run_dir)
            self.run_dir.mkdir(parents=True, exist_ok=True)
        else:
            # A folder of its own, removed with the cluster object (its logs stay readable after
            # stop() until then): one left per cluster piled up kvr-run-* in the temp folder.
            # kvr up, kvr demo and the benchmarks name a run_dir, which is kept.
            self.run_dir = Path(tempfile.mkdtemp(prefix="kvr-run-"))
            weakref.finalize(self, shutil.rmtree, self.run_dir, ignore_errors=True)
        self.supervisor = Supervisor(log_dir=self.run_dir / "logs", stop_timeout_s=c.stop_timeout_s,
                                     base_env={**os.environ, "PYTHONPATH": _python_path()})
        self.redis_url = c.redis_url
        self.redis_kind = "external" if c.redis_url else ""
        self.redis_cluster_ports: list[int] = []
        # 0 = the component binds any free port and its ready file says which (no window between
        # picking a free port here and the child binding it, in which another process can take it).
        self.client_port = c.client_port
        self.worker_port = c.worker_port
        self.metrics_port = c.metrics_port
        self.monitor_http_port = c.monitor_http_port
        self.front_http_port = c.front_http_port
        self.worker_ids = [f"worker-{i}" for i in range(c.workers)]
        if c.routers < 1:
            raise ValueError(f"routers must be >= 1, got {c.routers}")
        # Replicas beyond the first ("router"): their ports, 0 until their ready file says. Their
        # metrics ports, and the first router's, are picked here when there are replicas: each
        # replica subscribes to the others' at start (--peer), before any of them has bound.
        self.replica_names = [f"router-{i}" for i in range(1, c.routers)]
        self.replica_ports: dict[str, dict[str, int]] = {
            name: {"clients": 0, "workers": 0, "metrics": free_loopback_port()} for name in self.replica_names}
        if self.replica_names and not self.metrics_port:
            self.metrics_port = free_loopback_port()
        self.failure: ComponentFailed | None = None
        self._started = False

    # ------------------------------------------------------------------ endpoints

    def _ep(self, port: int) -> str:
        return f"tcp://{self.config.host}:{port}"

    @property
    def client_endpoint(self) -> str:
        return self._ep(self.client_port)

    @property
    def worker_endpoint(self) -> str:
        return self._ep(self.worker_port)

    @property
    def metrics_endpoint(self) -> str:
        return self._ep(self.metrics_port)

    @property
    def router_names(self) -> list[str]:
        return ["router", *self.replica_names]

    def _router_ports(self, name: str) -> dict[str, int]:
        if name == "router":
            return {"clients": self.client_port, "workers": self.worker_port, "metrics": self.metrics_port}
        return self.replica_ports[name]

    @property
    def client_endpoints(self) -> list[str]:
        """Every router's client endpoint, the first router's first."""
        return [self._ep(self._router_ports(n)["clients"]) for n in self.router_names]

    @property
    def worker_endpoints(self) -> list[str]:
        return [self._ep(self._router_ports(n)["workers"]) for n in self.router_names]

    @property
    def metrics_endpoints(self) -> list[str]:
        return [self._ep(self._router_ports(n)["metrics"]) for n in self.router_names]

    @property
    def monitor_url(self) -> str:
        return f"http://{self.config.host}:{self.monitor_http_port}"

    @property
    def front_url(self) -> str | None:
        """The shared HTTP front over every router (None: not asked for)."""
        return None if self.front_http_port is None else f"http://{self.config.host}:{self.front_http_port}"

    @property
    def dump_path(self) -> Path:
        return self.run_dir / "monitor.json"

    # ------------------------------------------------------------------ topology

    def redis_cluster_specs(self) -> list[ComponentSpec]:
        """The masters of the embedded Redis Cluster (``redis-0`` …), not yet one cluster
        (:meth:`start` makes them one); the router's URL is ``redis+cluster://`` the first."""
        ports = [free_cluster_node_port() for _ in range(self.config.redis_cluster_masters)]
        while len(set(ports)) < len(ports):
            ports = [free_cluster_node_port() for _ in range(self.config.redis_cluster_masters)]
        self.redis_kind = f"redis-cluster of {len(ports)} masters"
        self.redis_url = cluster_url("127.0.0.1", ports[0])
        self.redis_cluster_ports = ports
        specs = []
        for i, port in enumerate(ports):
            node_dir = self.run_dir / f"redis-{i}"
            node_dir.mkdir(exist_ok=True)
            url = f"redis://127.0.0.1:{port}/0"
            specs.append(ComponentSpec(f"redis-{i}", "redis", cluster_node_argv(port, node_dir=node_dir),
                                       ready=lambda url=url: ping(url)))
        return specs

    def redis_spec(self) -> ComponentSpec | None:
        """The embedded Redis (``None`` when a URL was given)."""
        if self.config.redis_url:
            return None
        port = free_loopback_port()
        kind, argv = embedded_redis_argv(port, kind=self.config.redis_kind, workdir=self.run_dir)
        self.redis_kind = kind
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        url = self.redis_url
        return ComponentSpec("redis", "redis", argv, ready=lambda: ping(url))

    def router_spec(self, name: str = "router") -> ComponentSpec:
        """A router (``name``: "router", or a replica "router-N"); a Redis URL with a password goes in
        its environment, never on a command line (``ps`` and the supervisor's log show command lines)."""
        c = self.config
        secret = urlsplit(self.redis_url).password is not None
        ports = self._router_ports(name)
        peers = [self._ep(self._router_ports(n)["metrics"]) for n in self.router_names if n != name]
        argv = kvr_argv(
            "router",
            "--bind-clients", self._ep(ports["clients"]),
            "--bind-workers", self._ep(ports["workers"]),
            "--bind-metrics", self._ep(ports["metrics"]),
            "--policy", c.policy,
            "--block-size", str(c.block_size),
            *([] if secret else ["--redis-url", self.redis_url]),
            "--namespace", c.namespace,
            "--ready-file", str(self._ready_file(name)),
            *(["--router-id", name, *(a for p in peers for a in ("--peer", p))] if peers else []),
            *(c.router_args if name == "router" or c.replica_router_args is None else c.replica_router_args),
            log_level=c.log_level,
        )
        return ComponentSpec(name, "router", argv, ready=self._workers_registered if name == "router" else None,
                             env={"KVR_REDIS_URL": self.redis_url} if secret else {})

    def worker_spec(self, worker_id: str) -> ComponentSpec:
        """A worker: KV-event PUB, replay ROUTER and vLLM-style HTTP face on free loopback ports (port 0)."""
        c = self.config
        argv = kvr_argv(
            "worker",
            "--id", worker_id,
            "--router", ",".join(self.worker_endpoints),
            "--events-endpoint", f"tcp://{c.host}:0",
            "--replay-endpoint", f"tcp://{c.host}:0",
            "--advertise-host", c.host,
            "--block-size", str(c.block_size),
            "--speedup", f"{c.speedup:g}",
            "--http-port", "0",
            "--http-host", c.host,
            *(["--profile", c.profile] if c.profile else []),
            *c.worker_args,
            log_level=c.log_level,
        )
        return ComponentSpec(worker_id, "worker", argv)

    def front_spec(self) -> ComponentSpec:
        """``kvr front`` over every router's client port (requests spread, failed over)."""
        c = self.config
        argv = kvr_argv(
            "front",
            "--router", ",".join(self.client_endpoints),
            "--http-host", c.host,
            "--http-port", str(self.front_http_port or 0),
            "--ready-file", str(self._ready_file("front")),
            *c.front_args,
            log_level=c.log_level,
        )
        return ComponentSpec("front", "front", argv, ready=self._front_ready)

    def monitor_spec(self) -> ComponentSpec:
        c = self.config
        argv = kvr_argv(
            "monitor",
            *(a for ep in self.metrics_endpoints for a in ("--metrics-endpoint", ep)),
            "--dump", str(self.dump_path),
            "--dump-interval", f"{c.dump_interval_s:g}",
            "--http-host", c.host,
            "--http-port", str(self.monitor_http_port),
            "--block-size", str(c.block_size),
            *(["--label", c.label] if c.label else []),
            "--ready-file", str(self._ready_file("monitor")),
            log_level=c.log_level,
        )
        return ComponentSpec("monitor", "monitor", argv, ready=self._monitor_ready, stop_last=True)

    def _ready_file(self, name: str) -> Path:
        return self.run_dir / f"{name}.ready.json"

    def _read_ready(self, name: str) -> dict[str, str] | None:
        """The endpoints ``name`` wrote to its ready file once listening (None before that)."""
        try:
            record = json.loads(self._ready_file(name).read_text())
        except (OSError, ValueError):
            return None
        return record.get("endpoints") or {}

    def _monitor_ready(self) -> bool:
        endpoints = self._read_ready("monitor")
        if endpoints is None or "http" not in endpoints:
            return False
        if not self.monitor_http_port:
            self.monitor_http_port = urlsplit(endpoints["http"]).port or 0
            self.supervisor.respec("monitor", self.monitor_spec())  # a restart keeps the port
        return http_ok(f"{self.monitor_url}/healthz")

    def _front_ready(self) -> bool:
        endpoints = self._read_ready("front")
        if endpoints is None or "http" not in endpoints:
            return False
        if not self.front_http_port:
            self.front_http_port = urlsplit(endpoints["http"]).port or 0
            self.supervisor.respec("front", self.front_spec())  # a restart keeps the port
        return http_ok(f"{self.front_url}/health")  # 200 once a router is connected

    def _wait_router_bound(self, timeout_s: float, name: str = "router") -> None:
        """A router's ready file: every port it bound, those asked as 0 resolved."""
        deadline = time.monotonic() + timeout_s
        while (endpoints := self._read_ready(name)) is None:
            dead = self.supervisor.failed()
            if dead:
                raise dead[0]
            if time.monotonic() > deadline:
                raise ComponentFailed(ComponentSpec(name, "router", []),
                                      f"did not report its endpoints within {timeout_s:.0f} s", returncode=None,
                                      log_tail=tail(self.supervisor.log_path(name)))
            time.sleep(0.05)
        bound = {role: urlsplit(endpoints[role]).port or 0 for role in ("clients", "workers", "metrics")
                 if endpoints.get(role)}
        if name == "router":
            self.client_port = bound.get("clients") or self.client_port
            self.worker_port = bound.get("workers") or self.worker_port
            self.metrics_port = bound.get("metrics") or self.metrics_port
        else:
            self.replica_ports[name].update({k: v for k, v in bound.items() if v})
        self.supervisor.respec(name, self.router_spec(name))  # a restarted router keeps these ports

    # ------------------------------------------------------------------ readiness

    def alive_workers(self) -> dict[str, int]:
        """Workers the router registered in Redis whose liveness key is current (id → epoch)."""
        from router.mirror import RedisMirror, make_redis_client

        client = make_redis_client(self.redis_url, timeout_s=1.0)
        try:
            return RedisMirror(client=client, namespace=self.config.namespace).alive_workers()
        finally:
            client.close()

    def _workers_registered(self) -> bool:
        alive = self.alive_workers()
        return all(w in alive for w in self.worker_ids)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalCluster:
        """Start every component in dependency order and wait until the cluster is ready."""
        c = self.config
        t0 = time.monotonic()
        sup = self.supervisor
        try:
            redis_spec = None if c.redis_cluster_masters else self.redis_spec()
            if c.redis_cluster_masters:
                self._start_redis_cluster(c.ready_timeout_s)
            elif redis_spec is not None:
                sup.start(redis_spec)
                sup.wait_ready("redis", timeout_s=c.ready_timeout_s)
            elif not ping(self.redis_url, timeout_s=2.0):
                raise ComponentFailed(ComponentSpec("redis", "redis", []),
                                      f"at {redact_url(self.redis_url)} does not answer PING",
                                      returncode=None)
            remaining = lambda: max(1.0, c.ready_timeout_s - (time.monotonic() - t0))  # noqa: E731
            # The router first: the monitor and the workers dial the ports it reports. Records
            # published before the monitor subscribes are none (no request is sent before
            # _wait_metrics_flowing), so starting the monitor second loses nothing.
            for name in self.router_names:  # one after the other: each learns its ports from its ready file
                self._ready_file(name).unlink(missing_ok=True)
                sup.start(self.router_spec(name))
                self._wait_router_bound(remaining(), name)
            if c.monitor:
                self._ready_file("monitor").unlink(missing_ok=True)
                sup.start(self.monitor_spec())
            for w in self.worker_ids:
                sup.start(self.worker_spec(w))
            if c.monitor:
                sup.wait_ready("monitor", timeout_s=remaining())
            self._wait_workers(remaining())
            if self.front_http_port is not None:  # after the routers bound: it dials their client ports
                self._ready_file("front").unlink(missing_ok=True)
                sup.start(self.front_spec())
                sup.wait_ready("front", timeout_s=remaining())
            if c.monitor:
                self._wait_metrics_flowing(remaining())
        except ComponentFailed as exc:
            self.failure = exc
            self.stop()
            raise
        except BaseException:
            self.stop()
            raise
        self._started = True
        logger.info("cluster ready in %.1f s: %d workers, redis %s (%s), client %s, monitor %s, logs %s",
                    time.monotonic() - t0, c.workers, redact_url(self.redis_url), self.redis_kind, self.client_endpoint,
                    self.monitor_url if c.monitor else "off", self.run_dir / "logs")
        return self

    def _wait_workers(self, timeout_s: float) -> None:
        """Router readiness = every worker registered; a dead worker fails fast, named."""
        deadline = time.monotonic() + timeout_s
        while True:
            dead = self.supervisor.failed()
            if dead:
                raise dead[0]
            try:
                if self._workers_registered():
                    return
            except Exception as exc:  # Redis hiccup: not ready yet
                logger.debug("readiness: %r", exc)
            if time.monotonic() > deadline:
                missing = sorted(set(self.worker_ids) - set(self._safe_alive()))
                spec = ComponentSpec("router", "router", [])
                raise ComponentFailed(spec, f"has not registered {', '.join(missing)} after {timeout_s:.0f} s",
                                      returncode=None, log_tail=tail(self.supervisor.log_path("router")))
            time.sleep(0.1)

    def _wait_metrics_flowing(self, timeout_s: float) -> None:
        """The monitor has received a record from the router: its SUB is connected and subscribed.

        Without this, the first requests after readiness could be published before the
        subscription reached the router (ZMQ's slow joiner) and be missing from the dump.
        """
        import json

        deadline = time.monotonic() + timeout_s
        url = f"{self.monitor_url}/json"
        while time.monotonic() < deadline:
            dead = self.supervisor.failed()
            if dead:
                raise dead[0]
            try:
                with urllib.request.urlopen(url, timeout=2.0) as resp:
                    if json.loads(resp.read()).get("records", 0) > 0:
                        return
            except (OSError, ValueError) as exc:
                logger.debug("monitor not receiving yet: %r", exc)
            time.sleep(0.1)
        raise ComponentFailed(ComponentSpec("monitor", "monitor", []),
                              f"received no metrics from the router at {self.metrics_endpoint} "
                              f"within {timeout_s:.0f} s",
                              returncode=None, log_tail=tail(self.supervisor.log_path("monitor")))

    def _safe_alive(self) -> dict[str, int]:
        try:
            return self.alive_workers()
        except Exception:
            return {}

    def restart_worker(self, worker_id: str, *, crash: bool = True, wait: bool = True, timeout_s: float = 30.0) -> None:
        """Kill a worker (SIGKILL when ``crash``, else SIGTERM) and start it again.

        With ``wait``, return once the new incarnation has registered with the router.

        The new process is a new incarnation (epoch): the router drops the old
        index entries and in-flight requests are retried or answered with an error.
        """
        before = self._safe_alive().get(worker_id)
        self.supervisor.restart(worker_id, sig=signal.SIGKILL if crash else signal.SIGTERM)
        if not wait:
            return
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            epoch = self._safe_alive().get(worker_id)
            if epoch is not None and epoch != before:
                return
            self.check()
            time.sleep(0.05)
        raise ComponentFailed(ComponentSpec(worker_id, "worker", []), f"did not re-register within {timeout_s:g} s",
                              returncode=None, log_tail=tail(self.supervisor.log_path(worker_id)))

    def check(self) -> None:
        """Raise :class:`ComponentFailed` if a component died."""
        dead = self.supervisor.failed()
        if dead:
            self.failure = dead[0]
            raise dead[0]

    def _start_redis_cluster(self, timeout_s: float) -> None:
        specs = self.redis_cluster_specs()
        for spec in specs:
            self.supervisor.start(spec)
        for spec in specs:
            self.supervisor.wait_ready(spec.name, timeout_s=timeout_s)
        try:
            create_cluster(self.redis_cluster_ports, timeout_s=timeout_s)
        except (RuntimeError, OSError, subprocess.SubprocessError) as exc:
            detail = exc.stderr.decode(errors="replace")[-500:] if isinstance(exc, subprocess.CalledProcessError) \
                and exc.stderr else str(exc)
            raise ComponentFailed(specs[0], f"did not form a Redis Cluster: {detail}", returncode=None) from exc

    def exit_code(self) -> int:
        """0, or the code of the role that failed (:data:`EXIT_CODES`)."""
        if self.failure is None:
            return EXIT_OK
        return EXIT_CODES.get(self.failure.spec.role, EXIT_UNKNOWN)

    def stop(self) -> dict[str, int | None]:
        """Stop every component (workers and router first, then monitor, then Redis)."""
        codes = self.supervisor.stop()
        self._started = False
        return codes

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def http_ok(url: str) -> bool:
    """``url`` answers 200 within a second (readiness checks of HTTP components)."""
    try:
        with urllib.request.urlopen(url, timeout=1.0) as resp:
            return resp.status == 200
    except OSError:
        return False


def _python_path() -> str:
    root = str(Path(__file__).resolve().parents[1])
    existing = os.environ.get("PYTHONPATH", "")
    return root if not existing else f"{root}{os.pathsep}{existing}"
