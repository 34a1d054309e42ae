"""``kvr up``: a supervised local cluster (Redis, router, N workers, monitor)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path

import click

from cli.options import namespace_option, redis_url_option
from cli.user_state import KEEP_RUNS
from core.blocks import DEFAULT_BLOCK_SIZE
from core.policies import DEFAULT_POLICY, POLICY_NAMES

logger = logging.getLogger(__name__)

#: Well-known local ports, so ``kvr send`` and ``kvr dash`` work without flags.
DEFAULT_CLIENT_PORT = 5555
DEFAULT_WORKER_PORT = 5556
DEFAULT_METRICS_PORT = 5557
DEFAULT_MONITOR_PORT = 9470


@click.command("up")
@click.option("--workers", "-n", type=click.IntRange(1, 64), default=3, show_default=True, help="Emulated workers.")
@click.option("--routers", type=click.IntRange(1, 16), default=1, show_default=True,
              help="Router replicas sharing the fleet: every worker registers with each, each keeps its own exact "
                   "index and counts the others' requests in flight (docs/scaling.md).")
@redis_url_option
@click.option("--redis-kind", type=click.Choice(["auto", "redis-server", "fakeredis"]), default="auto",
              show_default=True,
              help="Embedded Redis when no --redis-url: redis-server if on PATH (auto), else fakeredis.")
@click.option("--redis-cluster", "redis_cluster_masters", type=click.IntRange(min=3), default=None,
              help="Embedded Redis as a Redis Cluster of this many masters (redis-server and redis-cli on PATH; "
                   "no replicas, no persistence); the router gets its redis+cluster:// URL.")
@namespace_option
@click.option("--policy", type=click.Choice(POLICY_NAMES), default=DEFAULT_POLICY, show_default=True,
              help="Routing policy of the router.")
@click.option("--profile", default="", help="Latency profile of the workers (default: the worker's).")
@click.option("--speedup", type=float, default=1.0, show_default=True,
              help="Run the emulated engines this much faster.")
@click.option("--block-size", type=int, default=DEFAULT_BLOCK_SIZE, show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help=f"Logs, monitor.json and cluster.json (default: a new STATE/runs/up-<time>-<pid>, kept after "
                   f"the stop; older ones are pruned, the newest {KEEP_RUNS} kept).")
@click.option("--client-port", type=int, default=DEFAULT_CLIENT_PORT, show_default=True,
              help="Router client port (0: any).")
@click.option("--worker-port", type=int, default=DEFAULT_WORKER_PORT, show_default=True,
              help="Router worker port (0: any).")
@click.option("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, show_default=True,
              help="Router metrics PUB port (0: any).")
@click.option("--monitor-port", type=int, default=DEFAULT_MONITOR_PORT, show_default=True,
              help="Monitor HTTP port (0: any).")
@click.option("--no-monitor", is_flag=True, help="Do not start the monitor.")
@click.option("--front-port", type=click.IntRange(0, 65535), default=None,
              help="Also start `kvr front`, one OpenAI HTTP front over every router replica, on this port "
                   "(0: any) [default: none].")
@click.option("--ready-timeout", "ready_timeout_s", type=float, default=60.0, show_default=True)
@click.option("--router-arg", "router_args", multiple=True, help="Extra argument for `kvr router` (repeatable).")
@click.option("--worker-arg", "worker_args", multiple=True, help="Extra argument for every `kvr worker` (repeatable).")
@click.option("--curve", is_flag=True,
              help="ZMQ CURVE on the bus: keys generated into RUN_DIR/keys, router and workers authenticated "
                   "(docs/security.md); `kvr send` finds the client key through the state file (elsewhere: "
                   "--curve-dir RUN_DIR/keys).")
@click.pass_context
def up_cmd(ctx: click.Context, workers: int, redis_url: str, redis_kind: str, namespace: str, policy: str, profile: str,
           speedup: float, block_size: int, run_dir: str | None, client_port: int, worker_port: int, metrics_port: int,
           monitor_port: int, no_monitor: bool, ready_timeout_s: float, router_args: tuple[str, ...],
           worker_args: tuple[str, ...], curve: bool = False, redis_cluster_masters: int | None = None,
           routers: int = 1, front_port: int | None = None) -> None:
    """Start Redis, the router, WORKERS workers and the monitor; Ctrl-C stops them all.

    Once ready it records itself in STATE/current.json (mode 0600; STATE is $KVR_STATE_DIR, else
    $XDG_STATE_HOME/kvr, else ~/.local/state/kvr), so `kvr send`, `kvr dash`, `kvr inspect` and
    `kvr plot` find it without flags; the file is removed at the stop. The run directory
    (logs/, monitor.json, cluster.json) is kept after the stop, failed or not: see --run-dir.

    Exit code: 0 after a clean stop; 10 Redis, 11 router, 12 a worker, 13 the monitor, 14 the front failed
    (its log's last lines are printed).
    """
    from bus.redis_url import redact_url
    from cli import user_state
    from cluster.local import ClusterConfig, LocalCluster
    from cluster.supervisor import ComponentFailed

    if redis_cluster_masters:
        import shutil

        if redis_url:
            raise click.UsageError("--redis-cluster starts its own Redis Cluster: give it or --redis-url, not both")
        if redis_kind == "fakeredis" or not (shutil.which("redis-server") and shutil.which("redis-cli")):
            raise click.UsageError("--redis-cluster needs redis-server and redis-cli on PATH")
    run_dir = run_dir or str(user_state.new_run_dir("up"))
    keys_dir = None
    front_args: list[str] = []
    if curve:
        from bus.security import SecurityError, generate_keys

        keys_dir = Path(run_dir) / "keys"
        try:
            generate_keys(keys_dir)
        except SecurityError as exc:
            raise click.ClickException(str(exc)) from None
        router_args = (*router_args, "--curve-dir", str(keys_dir))
        front_args = ["--curve-dir", str(keys_dir)]
        worker_args = (*worker_args, "--curve-dir", str(keys_dir))
    log_level = logging.getLevelName(logging.getLogger().level)
    cluster = LocalCluster(ClusterConfig(
        workers=workers, routers=routers, redis_url=redis_url, redis_kind=redis_kind,
        redis_cluster_masters=redis_cluster_masters or 0,
        namespace=namespace, policy=policy,
        profile=profile, speedup=speedup, block_size=block_size, monitor=not no_monitor, run_dir=run_dir,
        client_port=client_port, worker_port=worker_port, metrics_port=metrics_port, monitor_http_port=monitor_port,
        front_http_port=front_port, front_args=front_args, ready_timeout_s=ready_timeout_s,
        router_args=list(router_args), worker_args=list(worker_args),
        log_level=log_level if isinstance(log_level, str) else "INFO",
    ))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    logs = cluster.run_dir / "logs"
    try:
        cluster.start()
    except ComponentFailed as exc:
        click.echo(f"kvr up: {exc}", err=True)
        click.echo(f"kvr up: logs in {logs}", err=True)
        ctx.exit(cluster.exit_code())
    info = {
        "client_endpoint": cluster.client_endpoint,
        "client_endpoints": cluster.client_endpoints,
        "worker_endpoint": cluster.worker_endpoint,
        "metrics_endpoint": cluster.metrics_endpoint,
        "monitor_url": cluster.monitor_url if not no_monitor else None,
        "front_url": cluster.front_url,
        "redis_url": cluster.redis_url,
        "redis_kind": cluster.redis_kind,
        "namespace": namespace,
        "workers": cluster.worker_ids,
        "run_dir": str(cluster.run_dir.resolve()),
        "cluster_json": str((cluster.run_dir / "cluster.json").resolve()),
        "dump": str(cluster.dump_path.resolve()) if not no_monitor else None,
        "logs": str(logs.resolve()),
        "pid": os.getpid(),
        "pids": {name: cluster.supervisor.pid(name) for name in cluster.supervisor.names},
        "curve_dir": str(keys_dir.resolve()) if keys_dir else None,
    }
    try:
        previous = user_state.running_cluster()
    except user_state.NoCluster:
        previous = None
    try:
        # cluster.json and current.json hold the Redis URL (maybe with its password): 0600 both.
        user_state.write_private_json(Path(info["cluster_json"]), info)
        state_path = user_state.publish(info)
        click.echo(ready_message(info, workers=workers, state_path=state_path,
                                 masked_redis=redact_url(cluster.redis_url),
                                 previous_pid=previous["pid"] if previous else None))
        code = 0
        while not stop.wait(0.5):
            try:
                cluster.check()
            except ComponentFailed as exc:
                click.echo(f"kvr up: {exc}", err=True)
                code = cluster.exit_code()
                break
    finally:
        codes = cluster.stop()
        user_state.withdraw()
        click.echo("kvr cluster stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items())
                   + f"; run dir kept: {info['run_dir']}", err=True)
    ctx.exit(code)


def ready_message(info: dict, *, workers: int, state_path: Path, masked_redis: str, previous_pid: int | None) -> str:
    """What `kvr up` prints once ready: where everything is, and the next commands to try.

    The first line is stable (scripts wait for it); the Redis URL is the masked one.
    """
    run_dir = Path(info["run_dir"])
    lines = [f"kvr cluster ready: {workers} workers, redis {masked_redis} ({info['redis_kind']}), "
             f"namespace {info['namespace']}"]
    if previous_pid is not None:
        lines.append(f"  (another `kvr up`, pid {previous_pid}, is still running; commands now default to this one)")
    lines += [
        f"  router:   clients {info['client_endpoint']}, workers {info['worker_endpoint']}, "
        f"metrics {info['metrics_endpoint']}",
        *(f"  replica:  clients {ep}" for ep in info.get("client_endpoints", [])[1:]),
        *([f"  front:    {info['front_url']}  (OpenAI HTTP over every router)"] if info.get("front_url") else []),
        f"  monitor:  {info['monitor_url'] or 'off (--no-monitor)'}",
        f"  run dir:  {run_dir}  (kept after the stop)",
        f"  found by: {state_path}  (kvr send/dash/inspect/plot use it when given no endpoint)",
        "try:",
        '  kvr send "hello"',
        "  kvr send -i                  # a chat: each turn reuses the conversation's prefix",
    ]
    if info["monitor_url"]:
        lines.append("  kvr dash                     # live dashboard")
    lines.append("  kvr inspect                  # what Redis holds: workers, index, hottest prefixes")
    from urllib.parse import urlsplit

    from bus import names
    from bus.redis_url import is_cluster_url

    pattern = names.namespace_pattern(info["namespace"])
    if is_cluster_url(masked_redis):  # one node's SCAN sees its slots only: ask every master
        seed = urlsplit(masked_redis)
        lines.append(f"  redis-cli --cluster call {seed.hostname}:{seed.port} KEYS '{pattern}'")
    else:
        lines.append(f"  redis-cli -u {masked_redis} --scan --pattern '{pattern}'")
    if info["monitor_url"]:
        lines.append(f"  curl -s {info['monitor_url']}/metrics")
        lines.append(f"  kvr plot {info['dump']}")
    lines.append(f"logs: {info['logs']}    Ctrl-C stops everything")
    return "\n".join(lines)


COMMANDS = [up_cmd]
