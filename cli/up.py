"""``kvr up``: a supervised local cluster (Redis, router, N workers, monitor)."""

from __future__ import annotations

import json
import logging
import signal
import threading

import click

from cli.options import namespace_option, redis_url_option

logger = logging.getLogger(__name__)

#: Well-known local ports, so ``kvr send`` and ``kvr dash`` work without flags.
DEFAULT_CLIENT_PORT = 5555
DEFAULT_WORKER_PORT = 5556
DEFAULT_METRICS_PORT = 5557
DEFAULT_MONITOR_PORT = 9470


@click.command("up")
@click.option("--workers", "-n", type=click.IntRange(1, 64), default=3, show_default=True, help="Emulated workers.")
@redis_url_option
@click.option("--redis-kind", type=click.Choice(["auto", "redis-server", "fakeredis"]), default="auto", show_default=True,
              help="Embedded Redis when no --redis-url: redis-server if on PATH (auto), else fakeredis.")
@namespace_option
@click.option("--policy", default="kvr", show_default=True, help="Routing policy of the router.")
@click.option("--profile", default="", help="Latency profile of the workers (default: the worker's).")
@click.option("--speedup", type=float, default=1.0, show_default=True, help="Run the emulated engines this much faster.")
@click.option("--block-size", type=int, default=16, show_default=True)
@click.option("--run-dir", type=click.Path(file_okay=False), default=None,
              help="Logs, dump and cluster.json (default: a new temp dir).")
@click.option("--client-port", type=int, default=DEFAULT_CLIENT_PORT, show_default=True, help="Router client port (0: any).")
@click.option("--worker-port", type=int, default=DEFAULT_WORKER_PORT, show_default=True, help="Router worker port (0: any).")
@click.option("--metrics-port", type=int, default=DEFAULT_METRICS_PORT, show_default=True, help="Router metrics PUB port (0: any).")
@click.option("--monitor-port", type=int, default=DEFAULT_MONITOR_PORT, show_default=True, help="Monitor HTTP port (0: any).")
@click.option("--no-monitor", is_flag=True, help="Do not start the monitor.")
@click.option("--ready-timeout", "ready_timeout_s", type=float, default=60.0, show_default=True)
@click.option("--router-arg", "router_args", multiple=True, help="Extra argument for `kvr router` (repeatable).")
@click.option("--worker-arg", "worker_args", multiple=True, help="Extra argument for every `kvr worker` (repeatable).")
@click.option("--curve", is_flag=True,
              help="ZMQ CURVE on the bus: keys generated into RUN_DIR/keys, router and workers authenticated "
                   "(docs/security.md); clients need `kvr send --curve-dir RUN_DIR/keys`.")
@click.pass_context
def up_cmd(ctx: click.Context, workers: int, redis_url: str, redis_kind: str, namespace: str, policy: str, profile: str,
           speedup: float, block_size: int, run_dir: str | None, client_port: int, worker_port: int, metrics_port: int,
           monitor_port: int, no_monitor: bool, ready_timeout_s: float, router_args: tuple[str, ...],
           worker_args: tuple[str, ...], curve: bool = False) -> None:
    """Start Redis, the router, WORKERS workers and the monitor; Ctrl-C stops them all.

    Exit code: 0 after a clean stop; 10 Redis, 11 router, 12 a worker, 13 the monitor failed
    (its log's last lines are printed).
    """
    from monitor.cluster import ClusterConfig, LocalCluster
    from monitor.supervisor import ComponentFailed

    keys_dir = None
    if curve:
        import tempfile
        from pathlib import Path

        from bus.security import SecurityError, generate_keys

        run_dir = run_dir or tempfile.mkdtemp(prefix="kvr-run-")
        keys_dir = Path(run_dir) / "keys"
        try:
            generate_keys(keys_dir)
        except SecurityError as exc:
            raise click.ClickException(str(exc)) from None
        router_args = (*router_args, "--curve-dir", str(keys_dir))
        worker_args = (*worker_args, "--curve-dir", str(keys_dir))
    log_level = logging.getLevelName(logging.getLogger().level)
    cluster = LocalCluster(ClusterConfig(
        workers=workers, redis_url=redis_url, redis_kind=redis_kind, namespace=namespace, policy=policy,
        profile=profile, speedup=speedup, block_size=block_size, monitor=not no_monitor, run_dir=run_dir,
        client_port=client_port, worker_port=worker_port, metrics_port=metrics_port, monitor_http_port=monitor_port,
        ready_timeout_s=ready_timeout_s, router_args=list(router_args), worker_args=list(worker_args),
        log_level=log_level if isinstance(log_level, str) else "INFO",
    ))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        cluster.start()
    except ComponentFailed as exc:
        click.echo(f"kvr up: {exc}", err=True)
        ctx.exit(cluster.exit_code())
    info = {
        "client_endpoint": cluster.client_endpoint,
        "worker_endpoint": cluster.worker_endpoint,
        "metrics_endpoint": cluster.metrics_endpoint,
        "monitor_url": cluster.monitor_url if not no_monitor else None,
        "redis_url": cluster.redis_url,
        "redis_kind": cluster.redis_kind,
        "namespace": namespace,
        "workers": cluster.worker_ids,
        "run_dir": str(cluster.run_dir),
        "dump": str(cluster.dump_path) if not no_monitor else None,
        "pids": {name: cluster.supervisor.pid(name) for name in cluster.supervisor.names},
        "curve_dir": str(keys_dir) if keys_dir else None,
    }
    (cluster.run_dir / "cluster.json").write_text(json.dumps(info, indent=2) + "\n")
    from cli.router import redact_url

    click.echo(f"kvr cluster ready: {workers} workers, redis {redact_url(cluster.redis_url)} ({cluster.redis_kind})")
    curve_flag = f" --curve-dir {keys_dir}" if keys_dir else ""
    click.echo(f"  send:  kvr send --router {cluster.client_endpoint}{curve_flag} 'hello'")
    if not no_monitor:
        click.echo(f"  watch: kvr dash --source '{cluster.monitor_url}/json?light=1'    (Prometheus: {cluster.monitor_url}/metrics)")
    click.echo(f"  logs:  {cluster.run_dir / 'logs'}    Ctrl-C stops everything", nl=True)
    code = 0
    try:
        while not stop.wait(0.5):
            try:
                cluster.check()
            except ComponentFailed as exc:
                click.echo(f"kvr up: {exc}", err=True)
                code = cluster.exit_code()
                break
    finally:
        codes = cluster.stop()
        click.echo("kvr cluster stopped: " + ", ".join(f"{k}={v}" for k, v in codes.items()), err=True)
    ctx.exit(code)


COMMANDS = [up_cmd]
