"""``kvr router``: the routing service (clients and workers over ZMQ, index mirrored in Redis)."""

from __future__ import annotations

import logging
import signal
import time

import click

from bus import names
from bus.redis_url import redact_url
from cli.bind import bind_host_option, tcp_endpoint, warn_exposed
from cli.options import load_curve_option, namespace_option, redis_url_option
from cli.ready import announce_ready, clear_ready_file, ready_file_option
from core.liveness import DEFAULT_INTERVAL_S, DEFAULT_LIVENESS
from core.policies import POLICY_NAMES
from router.config import RouterConfig

logger = logging.getLogger(__name__)

#: The flags' defaults are the config's (one definition of each; the CLI only exposes them).
_DEFAULTS = RouterConfig()


@click.command("router")
@bind_host_option
@click.option("--bind-clients", default=None, show_default=f"tcp://<bind-host>:{names.ROUTER_CLIENTS_PORT}",
              envvar="KVR_BIND_CLIENTS", help="ROUTER endpoint for clients (kvr send, the HTTP front).")
@click.option("--bind-workers", default=None, show_default=f"tcp://<bind-host>:{names.ROUTER_WORKERS_PORT}",
              envvar="KVR_BIND_WORKERS", help="ROUTER endpoint workers register with.")
@click.option("--bind-metrics", default=None, show_default=f"tcp://<bind-host>:{names.ROUTER_METRICS_PORT}",
              envvar="KVR_BIND_METRICS", help="PUB endpoint of the metrics stream ('' disables).")
@click.option("--policy", type=click.Choice(POLICY_NAMES), default=_DEFAULTS.policy, show_default=True,
              envvar="KVR_POLICY", help="Routing policy.")
@click.option("--block-size", type=int, default=_DEFAULTS.block_size, show_default=True, envvar="KVR_BLOCK_SIZE",
              help="Tokens per KV block; workers with another block size are refused.")
@click.option("--heartbeat-interval", "heartbeat_interval_s", type=float, default=DEFAULT_INTERVAL_S, show_default=True,
              help="Seconds between heartbeats.")
@click.option("--heartbeat-liveness", type=int, default=DEFAULT_LIVENESS, show_default=True,
              help="Missed heartbeats before a worker is dead.")
@click.option("--request-timeout", "request_timeout_s", type=float, default=_DEFAULTS.request_timeout_s,
              show_default=True,
              help="Seconds before an unfinished request ends with a timeout error.")
@click.option("--max-pending", type=int, default=_DEFAULTS.max_pending, show_default=True,
              help="Requests in flight before new ones are refused as overloaded.")
@click.option("--max-retries", type=int, default=_DEFAULTS.max_retries, show_default=True,
              help="Re-routes of a request whose worker died before its first token.")
@click.option("--tentative-window", "tentative_window_s", type=float, default=_DEFAULTS.tentative_window_s,
              show_default=True,
              help="Seconds a routed request's blocks count as present on its worker (0 disables).")
@click.option("--router-id", default=_DEFAULTS.router_id, show_default=True, envvar="KVR_ROUTER_ID",
              help="Name of this router (prefix of the request ids workers see).")
@click.option("--http-host", default=None, show_default="<bind-host>", envvar="KVR_HTTP_HOST",
              help="Address of the OpenAI-compatible HTTP front.")
@click.option("--http-port", type=int, default=-1, show_default=True, envvar="KVR_HTTP_PORT",
              help="Port of the OpenAI-compatible HTTP front (/v1/completions, /v1/chat/completions, /health, "
                   "/metrics), e.g. 8000; 0 picks one; -1 (default) serves none.")
@click.option("--model-name", default=None,
              help="An alias the HTTP front also lists and accepts for any served model (/v1/models lists the "
                   "model names the workers registered).")
@click.option("--no-redis", is_flag=True, help="Run without the Redis mirror (no warm start, no sharing).")
@click.option("--tokenizer", default=None, envvar="KVR_TOKENIZER",
              help="Text prompts to token ids: 'builtin' (default), a tokenizer.json path, or a vLLM server URL "
                   "(its /tokenize, cached). Real vLLM fleets need the model's tokenizer (docs/vllm.md).")
@click.option("--curve-dir", default=None, envvar="KVR_CURVE_DIR", type=click.Path(file_okay=False),
              help="CURVE keys (kvr keys DIR): only workers whose public key is in DIR/workers and clients in "
                   "DIR/clients get in; all traffic encrypted (docs/security.md). Needs DIR/router.key_secret.")
@click.option("--max-request-bytes", type=click.IntRange(1024), default=None, envvar="KVR_MAX_REQUEST_BYTES",
              help="Largest frame accepted from a client or worker; a bigger one drops that peer's connection "
                   "[default: 16 MiB].")
@click.option("--max-event-bytes", type=click.IntRange(1024), default=None, envvar="KVR_MAX_EVENT_BYTES",
              help="Largest KV-event batch accepted (live or replayed) [default: 64 MiB].")
@click.option("--no-trust", is_flag=True, envvar="KVR_NO_TRUST",
              help="Never down-weight a worker whose reported cached tokens fall short of the prediction "
                   "(closed-loop trust, on by default). For engines that do not report cached tokens "
                   "(usage.prompt_tokens_details), which would all look like liars.")
@click.option("--peer", "peers", multiple=True, envvar="KVR_PEERS",
              help="Metrics endpoint (--bind-metrics) of another router replica on this fleet; repeatable or "
                   "comma-separated. Replicas count each other's requests in flight (docs/scaling.md); each "
                   "needs its own --router-id.")
@ready_file_option
@redis_url_option
@namespace_option
def router_cmd(bind_host: str, bind_clients: str | None, bind_workers: str | None, bind_metrics: str | None,
               policy: str, block_size: int, heartbeat_interval_s: float, heartbeat_liveness: int,
               request_timeout_s: float, max_pending: int, max_retries: int, tentative_window_s: float, router_id: str,
               http_host: str | None, http_port: int,
               model_name: str | None, no_redis: bool, redis_url: str, namespace: str, tokenizer: str | None = None,
               curve_dir: str | None = None, max_request_bytes: int | None = None,
               max_event_bytes: int | None = None, no_trust: bool = False, peers: tuple[str, ...] = (),
               ready_file: str | None = None) -> None:
    """Route requests to the worker whose KV cache already holds their prefix."""
    from core.liveness import HeartbeatConfig
    from router.config import RouterConfig
    from router.service import RouterService

    clear_ready_file(ready_file)
    bind_clients, bind_workers, bind_metrics, http_host = bind_addresses(
        bind_host, bind_clients=bind_clients, bind_workers=bind_workers, bind_metrics=bind_metrics,
        http_host=http_host)
    config = RouterConfig(
        bind_clients=bind_clients, bind_workers=bind_workers, bind_metrics=bind_metrics or None, policy=policy,
        block_size=block_size, heartbeat=HeartbeatConfig(heartbeat_interval_s, heartbeat_liveness),
        request_timeout_s=request_timeout_s, max_pending=max_pending, max_retries=max_retries,
        tentative_window_s=tentative_window_s, router_id=router_id)
    if max_request_bytes is not None:
        config.max_request_bytes = max_request_bytes
    if max_event_bytes is not None:
        config.max_event_bytes = max_event_bytes
    if no_trust:
        config.trust = None  # RouterService then builds no TrustTracker: every claim counts in full
    config.peers = tuple(e.strip() for v in peers for e in v.split(",") if e.strip())
    if config.peers and not config.bind_metrics:
        raise click.ClickException("--peer needs the metrics PUB (--bind-metrics): the other replicas subscribe to it")
    curve = load_curve_option(curve_dir, "router")
    if curve is not None:
        logger.info("CURVE on: %d worker key(s), %d client key(s) authorised", len(curve.workers), len(curve.clients))
    embedded = None
    mirror = None
    if not no_redis:
        from router.mirror import RedisMirror, make_redis_client

        if not redis_url:
            from bus.redis_server import EmbeddedRedis

            embedded = EmbeddedRedis().start()
            redis_url = embedded.url
        client = make_redis_client(redis_url)
        refused = redis_refusal(client)
        if refused is not None:
            raise click.ClickException(f"{refused} (--redis-url {redact_url(redis_url)})")
        from router.background_mirror import BackgroundMirror

        # Writes on their own thread: a slow or hung Redis never stalls routing or heartbeats.
        mirror = BackgroundMirror(mirror=RedisMirror(client=client, namespace=namespace))
    try:
        from worker.vllm.remote_tokenizer import load_router_tokenizer

        service = RouterService(config, mirror=mirror, tokenizer=load_router_tokenizer(tokenizer), curve=curve)
    except Exception as exc:
        if mirror is not None:
            mirror.close(timeout_s=0.5)
        if embedded is not None:
            embedded.stop()
        raise click.ClickException(f"router did not start: {exc}") from None
    front = None
    if http_port >= 0:
        from router.http_front import RouterHttpFront

        try:
            # The service's loop runs on the front's event loop (router/loop_driver.py): one busy
            # thread, requests and replies handed over by calls, not a socket between two threads.
            front = RouterHttpFront(service=service, host=http_host, port=http_port, model=model_name,
                                    request_timeout_s=request_timeout_s + 5,
                                    max_request_bytes=config.max_request_bytes)
        except OSError as exc:
            service.close()
            if embedded is not None:
                embedded.stop()
            raise click.ClickException(f"cannot serve HTTP on {http_host}:{http_port}: {exc.strerror}") from None
        front.start()
    signal.signal(signal.SIGTERM, lambda *_: service.stop())
    signal.signal(signal.SIGINT, lambda *_: service.stop())
    logger.info("router %s: clients %s, workers %s, metrics %s, http %s, policy %s", router_id,
                service.clients_endpoint, service.workers_endpoint, service.metrics_endpoint,
                front.url if front else None, policy)
    endpoints = {"clients": service.clients_endpoint, "workers": service.workers_endpoint,
                 "metrics": service.metrics_endpoint, "http": front.url if front else None}
    warn_exposed("router", endpoints, authenticated=() if curve is None else ("clients", "workers"))
    try:
        announce_ready(component="router", component_id=router_id, endpoints=endpoints, ready_file=ready_file)
        if front is None:
            service.run()
        else:
            while not service.stopped and front.serving:
                time.sleep(0.1)  # the front's thread turns the service; signals land here
            if not service.stopped:
                raise click.ClickException("the router's event loop stopped unexpectedly (see the log above)")
    finally:
        clear_ready_file(ready_file)
        if front is not None:
            front.close()  # stops the loop that turned the service first
            service.close()
        if mirror is not None:
            mirror.close()  # what Redis takes within 2 s; a warm start replays the rest from the workers
        if embedded is not None:
            embedded.stop()
        logger.info("router stopped: %s", dict(service.counters))


def bind_addresses(bind_host: str, *, bind_clients: str | None = None, bind_workers: str | None = None,
                   bind_metrics: str | None = None, http_host: str | None = None) -> tuple[str, str, str, str]:
    """``(clients, workers, metrics endpoints, HTTP host)``: each one given, else on ``bind_host``
    (the default ports of bus/names.py)."""
    return (bind_clients if bind_clients is not None else tcp_endpoint(bind_host, names.ROUTER_CLIENTS_PORT),
            bind_workers if bind_workers is not None else tcp_endpoint(bind_host, names.ROUTER_WORKERS_PORT),
            bind_metrics if bind_metrics is not None else tcp_endpoint(bind_host, names.ROUTER_METRICS_PORT),
            http_host if http_host is not None else bind_host)


def redis_refusal(client) -> str | None:
    """Why Redis refuses this client for good (credentials, TLS), or None.

    Redis being *down* is a fault the router rides out (it routes from memory and rewrites the
    mirror when Redis is back), so that only logs; a wrong password or a certificate that does
    not verify will not heal by waiting, so the router does not start with it.
    """
    import redis

    try:
        client.ping()
    except (redis.AuthenticationError, redis.exceptions.NoPermissionError) as exc:
        return f"Redis refused the credentials: {exc}"
    except redis.ResponseError as exc:  # e.g. a password for a Redis that has none
        return f"Redis refused the connection: {exc}"
    except redis.ConnectionError as exc:
        if "SSL" in str(exc) or "certificate" in str(exc):
            return f"TLS with Redis failed: {exc}"
        logger.warning("Redis unreachable at start (%s): routing from memory until it answers", exc)
    except redis.RedisError as exc:
        logger.warning("Redis unreachable at start (%s): routing from memory until it answers", exc)
    return None


COMMANDS = [router_cmd]
