"""``kvr front``: one OpenAI-compatible HTTP front over several router replicas on one fleet.

Each ``kvr router`` can serve its own front (``--http-port``); this one stands in front of all of
them: a DEALER to each router's client port, each request to the connected router with the fewest
requests pending from it, and a request whose router is lost before its first token sent again to
another (``router/front_links.py``). Its ``/health`` is 200 while a router is connected.
"""

from __future__ import annotations

import logging
import signal
import threading

import click

from cli.bind import bind_host_option, warn_exposed
from cli.options import load_curve_option
from cli.ready import announce_ready, clear_ready_file, ready_file_option
from router.config import RouterConfig

logger = logging.getLogger(__name__)

#: Port the front serves when not told (the OpenAI servers' usual one).
DEFAULT_HTTP_PORT = 8000


def router_list(values: tuple[str, ...]) -> list[str]:
    """``--router`` values (repeatable, each comma-separated) → endpoints, in order."""
    return [e.strip() for v in values for e in v.split(",") if e.strip()]


@click.command("front")
@click.option("--router", "routers", multiple=True, required=True, envvar="KVR_ROUTERS",
              help="Client endpoint of a router replica (its --bind-clients), e.g. tcp://10.0.0.5:5555; "
                   "repeatable or comma-separated.")
@bind_host_option
@click.option("--http-host", default=None, show_default="<bind-host>", envvar="KVR_HTTP_HOST",
              help="Address the HTTP front listens on.")
@click.option("--http-port", type=click.IntRange(0, 65535), default=DEFAULT_HTTP_PORT, show_default=True,
              envvar="KVR_HTTP_PORT", help="Port of the HTTP front; 0 picks one (the ready line says which).")
@click.option("--model-name", default=None,
              help="An alias /v1/models lists and the front accepts for any served model (the front does not "
                   "know the workers' model names: the routers do).")
@click.option("--request-timeout", "request_timeout_s", type=float,
              default=RouterConfig().request_timeout_s + 5, show_default=True,
              help="Seconds before a request with no end from its router is answered with a timeout.")
@click.option("--curve-dir", default=None, envvar="KVR_CURVE_DIR", type=click.Path(file_okay=False),
              help="CURVE keys (kvr keys): dial routers started with --curve-dir (docs/security.md).")
@click.option("--curve-key", default="client", show_default=True, help="Name of this front's key pair in --curve-dir.")
@ready_file_option
def front_cmd(routers: tuple[str, ...], bind_host: str, http_host: str | None, http_port: int,
              model_name: str | None, request_timeout_s: float, curve_dir: str | None, curve_key: str,
              ready_file: str | None) -> None:
    """Serve one OpenAI-compatible HTTP front over several router replicas (spread, fail over)."""
    import zmq

    from router.http_front import RouterHttpFront

    clear_ready_file(ready_file)
    endpoints = router_list(routers)
    if not endpoints:
        raise click.ClickException("--router: no endpoint given")
    if len(set(endpoints)) != len(endpoints):
        raise click.ClickException(f"--router: an endpoint is given twice: {', '.join(endpoints)}")
    curve = load_curve_option(curve_dir, curve_key)
    ctx = zmq.Context()
    try:
        for endpoint in endpoints:  # here, so a bad one is a one-line error, not a front that never serves
            _check_endpoint(ctx, endpoint)
        host = http_host if http_host is not None else bind_host
        try:
            front = RouterHttpFront(client_endpoints=endpoints, host=host, port=http_port, model=model_name,
                                    ctx=ctx, request_timeout_s=request_timeout_s, curve=curve)
        except OSError as exc:
            raise click.ClickException(f"cannot serve HTTP on {host}:{http_port}: {exc.strerror}") from None
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        front.start()
        try:
            logger.info("HTTP front %s over %d router(s): %s", front.url, len(endpoints), ", ".join(endpoints))
            warn_exposed("front", {"http": front.url})
            announce_ready(component="front", component_id="front", endpoints={"http": front.url},
                           ready_file=ready_file)
            while not stop.wait(0.1):
                if not front.serving:
                    raise click.ClickException("the front's event loop stopped unexpectedly (see the log above)")
        finally:
            clear_ready_file(ready_file)
            front.close()
    finally:
        ctx.term()


def _check_endpoint(ctx, endpoint: str) -> None:
    """Refuse an endpoint ZMQ cannot dial (a typo, an unknown transport) before serving."""
    import zmq

    sock = ctx.socket(zmq.DEALER)
    try:
        sock.connect(endpoint)
    except zmq.ZMQError as exc:
        raise click.ClickException(f"--router {endpoint!r} is not an endpoint to dial: {exc}") from None
    finally:
        sock.close(linger=0)


COMMANDS = [front_cmd]
