"""``kvr monitor``: fold the router's metrics stream into dumps and Prometheus metrics."""

from __future__ import annotations

import logging
import signal

import click

from bus import names
from cli.bind import bind_host_option, warn_exposed
from cli.ready import announce_ready, clear_ready_file, ready_file_option

logger = logging.getLogger(__name__)

DEFAULT_METRICS_ENDPOINT = f"tcp://127.0.0.1:{names.ROUTER_METRICS_PORT}"
DEFAULT_HTTP_PORT = 9470


@click.command("monitor")
@click.option(
    "--metrics-endpoint", "metrics_endpoints", multiple=True, default=[DEFAULT_METRICS_ENDPOINT], show_default=True,
    envvar="KVR_METRICS_ENDPOINT", help="Metrics PUB endpoint to connect to (repeat for router replicas).",
)
@click.option("--dump", "dump_path", type=click.Path(dir_okay=False), default="kvr-monitor.json", show_default=True,
              help="JSON dump file (written on an interval, on SIGUSR1 and at exit); '' disables.")
@click.option("--dump-interval", "dump_interval_s", type=float, default=5.0, show_default=True,
              help="Seconds between dumps.")
@bind_host_option
@click.option("--http-host", default=None, show_default="<bind-host>",
              help="Address of the HTTP face (/metrics, /json).")
@click.option("--http-port", type=int, default=DEFAULT_HTTP_PORT, show_default=True,
              help="HTTP port; -1 disables, 0 picks one.")
@click.option("--block-size", type=int, default=16, show_default=True,
              help="Tokens per KV block (cache status, match length).")
@click.option("--bucket", "bucket_s", type=float, default=5.0, show_default=True,
              help="Width of timeline buckets, seconds.")
@click.option("--sample-interval", "sample_interval_s", type=float, default=1.0, show_default=True,
              help="Seconds between series points (hit rate over time, load).")
@click.option("--label", default="", help="Name of this run in reports.")
@ready_file_option
def monitor_cmd(
    metrics_endpoints: tuple[str, ...], dump_path: str, dump_interval_s: float, bind_host: str, http_host: str | None,
    http_port: int, block_size: int, bucket_s: float, sample_interval_s: float, label: str,
    ready_file: str | None = None,
) -> None:
    """Subscribe to metrics records, keep time series, dump JSON and serve /metrics."""
    from monitor.service import MonitorService
    from monitor.state import MonitorState

    clear_ready_file(ready_file)
    http_host = http_host if http_host is not None else bind_host
    state = MonitorState(block_size=block_size, bucket_s=bucket_s, sample_interval_s=sample_interval_s, label=label)
    service = MonitorService(
        metrics_endpoints=list(metrics_endpoints),
        state=state,
        dump_path=dump_path or None,
        dump_interval_s=dump_interval_s,
        http_host=http_host,
        http_port=None if http_port < 0 else http_port,
    )
    # Handlers first: once /healthz answers, SIGUSR1 and SIGTERM are safe to send.
    signal.signal(signal.SIGUSR1, lambda *_: service.request_dump())
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    try:
        service.start()
    except OSError as exc:
        raise click.ClickException(f"cannot serve HTTP on {http_host}:{http_port}: {exc.strerror}") from None
    url = None if service.http_port is None else f"http://{http_host}:{service.http_port}"
    warn_exposed("monitor", {"http": url})
    try:
        announce_ready(component="monitor", component_id=label or "monitor", endpoints={"http": url},
                       ready_file=ready_file)
        service.run()
    finally:
        clear_ready_file(ready_file)
        service.close()
        logger.info("monitor stopped after %d records (%d dumps)", state.records, service.dumps_written)


COMMANDS = [monitor_cmd]
