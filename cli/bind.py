"""Where a kvr process's listening sockets bind: loopback unless told otherwise.

Every listening socket (the router's client, worker and metrics ports and its HTTP front; a
worker's KV-event PUB, replay ROUTER and HTTP API; the monitor's HTTP face) binds
``--bind-host`` (``KVR_BIND_HOST``, default ``127.0.0.1``) unless its own option names a full
endpoint or host. ``--bind-host 0.0.0.0`` is the one switch to all interfaces (containers, a
fleet across machines); a socket bound beyond loopback that nothing authenticates (CURVE off,
or HTTP, which never has it) is named in a warning at start (docs/security.md).
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from collections.abc import Collection, Mapping

import click

logger = logging.getLogger(__name__)

LOOPBACK_HOST = "127.0.0.1"
_WILDCARDS = frozenset({"*", "0.0.0.0", "::", "[::]", ""})


def bind_host_option(func):
    """``--bind-host`` / ``KVR_BIND_HOST``: the host of every listening socket not given its own."""
    return click.option(
        "--bind-host", envvar="KVR_BIND_HOST", default=LOOPBACK_HOST, show_default=True,
        help="Address every listening socket binds unless its own option says otherwise; 0.0.0.0 binds all "
             "interfaces (containers). Beyond loopback without CURVE, a warning (docs/security.md).",
    )(func)


def tcp_endpoint(host: str, port: int) -> str:
    """``tcp://host:port`` (an IPv6 address in brackets)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"tcp://{host}:{port}"


def is_wildcard(host: str) -> bool:
    return host in _WILDCARDS


def default_advertise_host(bind_host: str) -> str:
    """The host peers dial for sockets bound on ``bind_host``: itself, or this machine's name
    when it is a wildcard (every interface)."""
    return socket.gethostname() if is_wildcard(bind_host) else bind_host


def endpoint_host(endpoint: str) -> str | None:
    """The host of a ``tcp://`` endpoint or an ``http://`` URL; None for local transports
    (``ipc://``, ``inproc://``), which no other machine reaches."""
    scheme, sep, rest = endpoint.partition("://")
    if not sep or scheme not in ("tcp", "http", "https"):
        return None
    hostport = rest.split("/", 1)[0]
    if hostport.startswith("["):
        return hostport[1 : hostport.find("]")]
    host, _, _ = hostport.rpartition(":")
    return host if host else hostport


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a wildcard, a name or an interface: assume other machines reach it


def warn_exposed(component: str, endpoints: Mapping[str, str | None], *,
                 authenticated: Collection[str] = ()) -> list[str]:
    """Warn about (and return) the ``name endpoint`` of each bound socket beyond loopback that is
    not in ``authenticated`` (CURVE servers); ``None`` endpoints are not bound."""
    exposed = []
    for name, endpoint in endpoints.items():
        host = None if endpoint is None else endpoint_host(endpoint)
        if host is not None and name not in authenticated and not is_loopback(host):
            exposed.append(f"{name} {endpoint}")
    if exposed:
        logger.warning("%s listens beyond loopback without authentication: %s. Anyone who reaches these ports can "
                       "use them (docs/security.md: CURVE for the ZMQ ports, a private network or firewall for the "
                       "rest)", component, ", ".join(exposed))
    return exposed
