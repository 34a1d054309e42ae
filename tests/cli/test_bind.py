"""cli/bind.py and the router's bind addresses: loopback unless told, one switch, a warning beyond it."""

from __future__ import annotations

import logging
import socket

import pytest

from cli.bind import default_advertise_host, endpoint_host, is_loopback, tcp_endpoint, warn_exposed
from cli.router import bind_addresses
from tests.cli.parse import dry_parse


def test_every_socket_defaults_to_loopback_and_bind_host_moves_them_all() -> None:
    router = dry_parse(["router"]).params
    worker = dry_parse(["worker", "--id", "w"]).params
    monitor = dry_parse(["monitor"]).params
    assert router["bind_host"] == worker["bind_host"] == monitor["bind_host"] == "127.0.0.1"
    assert bind_addresses("127.0.0.1") == ("tcp://127.0.0.1:5555", "tcp://127.0.0.1:5556", "tcp://127.0.0.1:5557",
                                           "127.0.0.1")
    assert bind_addresses("0.0.0.0") == ("tcp://0.0.0.0:5555", "tcp://0.0.0.0:5556", "tcp://0.0.0.0:5557", "0.0.0.0")
    # An option that names its own endpoint or host wins over --bind-host.
    assert bind_addresses("0.0.0.0", bind_clients="tcp://127.0.0.1:0", bind_metrics="", http_host="10.0.0.1") == (
        "tcp://127.0.0.1:0", "tcp://0.0.0.0:5556", "", "10.0.0.1")
    assert tcp_endpoint("::", 5555) == "tcp://[::]:5555"


def test_bind_host_comes_from_the_environment(monkeypatch) -> None:
    monkeypatch.setenv("KVR_BIND_HOST", "0.0.0.0")
    for args in (["router"], ["worker", "--id", "w"], ["monitor"]):
        assert dry_parse(args).params["bind_host"] == "0.0.0.0", args


def test_what_counts_as_loopback() -> None:
    hosts = {ep: endpoint_host(ep) for ep in ("tcp://127.0.0.1:5555", "tcp://*:5555", "tcp://0.0.0.0:1",
                                              "tcp://[::1]:7", "http://localhost:8000/x", "ipc:///tmp/s",
                                              "inproc://x", "tcp://eth0:5555")}
    assert hosts == {"tcp://127.0.0.1:5555": "127.0.0.1", "tcp://*:5555": "*", "tcp://0.0.0.0:1": "0.0.0.0",
                     "tcp://[::1]:7": "::1", "http://localhost:8000/x": "localhost", "ipc:///tmp/s": None,
                     "inproc://x": None, "tcp://eth0:5555": "eth0"}
    assert [h for h in hosts.values() if h is not None and is_loopback(h)] == ["127.0.0.1", "::1", "localhost"]
    assert is_loopback("127.0.0.2")  # the whole 127/8


def test_the_advertised_host_of_a_wildcard_bind_is_this_hosts_name() -> None:
    assert default_advertise_host("127.0.0.1") == "127.0.0.1"
    assert default_advertise_host("10.1.2.3") == "10.1.2.3"
    assert default_advertise_host("0.0.0.0") == socket.gethostname()


@pytest.mark.parametrize("authenticated,named", [
    ((), ["clients tcp://0.0.0.0:5555", "http http://0.0.0.0:8000"]),  # CURVE off: every exposed port
    (("clients",), ["http http://0.0.0.0:8000"]),  # CURVE on: HTTP is never covered
])
def test_a_warning_names_each_unauthenticated_port_beyond_loopback(caplog, authenticated, named) -> None:
    caplog.set_level(logging.WARNING, logger="cli.bind")
    endpoints = {"clients": "tcp://0.0.0.0:5555", "workers": "tcp://127.0.0.1:5556", "metrics": None,
                 "local": "ipc:///tmp/kvr", "http": "http://0.0.0.0:8000"}
    assert warn_exposed("router", endpoints, authenticated=authenticated) == named
    [record] = caplog.records
    assert record.levelno == logging.WARNING
    assert record.getMessage().startswith(f"router listens beyond loopback without authentication: {', '.join(named)}.")


def test_no_warning_on_loopback(caplog) -> None:
    caplog.set_level(logging.WARNING, logger="cli.bind")
    assert warn_exposed("worker w1", {"events": "tcp://127.0.0.1:4000", "http": "http://127.0.0.1:8000"}) == []
    assert caplog.records == []
