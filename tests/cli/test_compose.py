"""docker-compose.yml and docker-compose.vllm.yml: they parse, every service command is a valid `kvr`
invocation, the same topology as `kvr up`, pinned images, ports published on the host's loopback only."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import pytest

from bus import names
from cli.bind import tcp_endpoint
from cluster.local import ClusterConfig, LocalCluster
from tests.cli.parse import dry_parse

yaml = pytest.importorskip("yaml")  # in the test extra; skip only where it is not installed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def compose_vllm() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.vllm.yml").read_text())


def option_names(args: list[str]) -> list[str]:
    return sorted(a.split("=", 1)[0] for a in args if a.startswith("--"))


def _role(service: str) -> str:
    return service.split("-")[0]


def test_services_and_healthchecks(compose):
    services = compose["services"]
    assert sorted(services) == ["front", "monitor", "redis", "router", "router-1", "worker-0", "worker-1",
                                "worker-2"]
    for name, svc in services.items():
        assert "test" in svc["healthcheck"], name
    assert services["router"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert services["router-1"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for w in ("worker-0", "worker-1", "worker-2", "front"):
        assert services[w]["depends_on"]["router"]["condition"] == "service_healthy"
        assert services[w]["depends_on"]["router-1"]["condition"] == "service_healthy"


def test_every_kvr_command_parses(compose):
    kvr_services = {n: s for n, s in compose["services"].items() if n != "redis"}
    for name, svc in kvr_services.items():
        cmd = svc["command"]
        assert cmd[0] == "kvr", name
        ctx = dry_parse(cmd[1:])
        assert ctx.info_name == _role(name)
    ctx = dry_parse(compose["services"]["worker-1"]["command"][1:])
    assert (ctx.params["worker_id"], ctx.params["advertise_host"], ctx.params["router_endpoint"]) == (
        "worker-1", "worker-1", "tcp://router:5556,tcp://router-1:5556")
    with pytest.raises(click.UsageError):
        dry_parse(["worker", "--id=w", "--no-such-option"])


# What the containers add to `kvr up`'s commands, and what they leave to --bind-host's defaults.
COMPOSE_ONLY = {"router": {"--bind-host", "--http-port"}, "worker": {"--bind-host"}, "monitor": {"--bind-host"},
                "front": {"--bind-host"}}
# --ready-file: kvr up learns the ports its children bound from it (compose uses healthchecks).
UP_ONLY = {"router": {"--bind-clients", "--bind-workers", "--bind-metrics", "--ready-file"}, "worker": {"--http-host"},
           "monitor": {"--http-host", "--ready-file"}, "front": {"--http-host", "--ready-file"}}


def _router_endpoint(params: dict, name: str, port: int) -> str:
    return params[name] if params[name] is not None else tcp_endpoint(params["bind_host"], port)


def test_kvr_up_runs_the_same_topology(compose):
    services = compose["services"]
    cluster = LocalCluster(ClusterConfig(workers=3, routers=2, redis_url="redis://127.0.0.1:6379/0",
                                         front_http_port=8000))
    specs = [cluster.monitor_spec(), *(cluster.router_spec(r) for r in cluster.router_names),
             *(cluster.worker_spec(w) for w in cluster.worker_ids), cluster.front_spec()]
    assert sorted(s.name for s in specs) == sorted(n for n in services if n != "redis")
    for spec in specs:
        # argv = python -m cli.main --log-level L <command> ...
        local = spec.argv[5:]
        dry_parse(local)
        role = _role(spec.name)
        assert (set(option_names(local)) - UP_ONLY[role]
                == set(option_names(services[spec.name]["command"][2:])) - COMPOSE_ONLY[role]), spec.name
        assert local[0] == services[spec.name]["command"][1]
    # The same wiring: workers → router's worker port, monitor → router's metrics port.
    router = dry_parse(services["router"]["command"][1:]).params
    monitor = dry_parse(services["monitor"]["command"][1:]).params
    worker = dry_parse(services["worker-0"]["command"][1:]).params
    replica = dry_parse(services["router-1"]["command"][1:]).params
    assert [e.rsplit(":", 1)[1] for e in worker["router_endpoint"].split(",")] == [
        _router_endpoint(r, "bind_workers", names.ROUTER_WORKERS_PORT).rsplit(":", 1)[1] for r in (router, replica)]
    assert [e.rsplit(":", 1)[1] for e in monitor["metrics_endpoints"]] == [
        _router_endpoint(r, "bind_metrics", names.ROUTER_METRICS_PORT).rsplit(":", 1)[1] for r in (router, replica)]
    # Each replica's --peer is the other's metrics PUB, each has its own id.
    assert (router["peers"], replica["peers"]) == (("tcp://router-1:5557",), ("tcp://router:5557",))
    assert router["router_id"] != replica["router_id"]
    assert router["block_size"] == worker["block_size"] == monitor["block_size"]
    # The front dials both replicas' client ports.
    front = dry_parse(services["front"]["command"][1:]).params
    assert [e.rsplit(":", 1)[1] for e in ",".join(front["routers"]).split(",")] == [
        _router_endpoint(r, "bind_clients", names.ROUTER_CLIENTS_PORT).rsplit(":", 1)[1] for r in (router, replica)]


@pytest.mark.parametrize("which", ["compose", "compose_vllm"])
def test_ports_are_published_on_the_hosts_loopback_only(which, request):
    # CURVE is off in both: a port published on every interface would open the router to the network.
    services = request.getfixturevalue(which)["services"]
    published = {name: svc.get("ports", []) for name, svc in services.items()}
    assert all(port.startswith("127.0.0.1:") for ports in published.values() for port in ports), published
    router = dry_parse(services["router"]["command"][1:]).params
    client_port = _router_endpoint(router, "bind_clients", names.ROUTER_CLIENTS_PORT).rsplit(":", 1)[1]
    assert sorted(published["router"]) == sorted([f"127.0.0.1:{client_port}:{client_port}",
                                                  f"127.0.0.1:{router['http_port']}:{router['http_port']}"])
    if which == "compose":
        monitor = dry_parse(services["monitor"]["command"][1:]).params
        assert published["monitor"] == [f"127.0.0.1:{monitor['http_port']}:{monitor['http_port']}"]


@pytest.mark.parametrize("which", ["compose", "compose_vllm"])
def test_containers_bind_all_interfaces_and_the_router_serves_http(which, request):
    services = request.getfixturevalue(which)["services"]
    for name, svc in services.items():
        command = svc.get("command", [])
        if command[:1] != ["kvr"]:
            continue
        params = dry_parse(command[1:]).params
        if params.get("engine") == "vllm":
            continue  # the adapter binds nothing: vLLM binds its own sockets
        assert params["bind_host"] == "0.0.0.0", name  # reachable from the other containers
    router = dry_parse(services["router"]["command"][1:]).params
    assert router["http_port"] > 0 and router["http_host"] is None  # the front, on --bind-host


def test_images_are_pinned(compose, compose_vllm):
    exact = re.compile(r"^[\w./-]+:v?\d+\.\d+\.\d+(-[\w.-]+)?$")  # a release, not a moving tag
    for services in (compose["services"], compose_vllm["services"]):
        for name, svc in services.items():
            if "build" in svc:
                continue  # kvr itself, built from the Dockerfile
            assert exact.match(svc["image"]), (name, svc["image"])
    base = next(ln.split()[1] for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("FROM "))
    assert exact.match(base), base
    # vLLM: the release whose KV-event wire format the conformance fixtures were captured from.
    readme = (ROOT / "tests/fixtures/vllm_kv_events/README.md").read_text()
    fixture_version = re.search(r"^\| `\.` \(top level\) \| (\d+\.\d+\.\d+) ", readme, re.M).group(1)
    vllm_images = {svc["image"] for svc in compose_vllm["services"].values() if "vllm-openai" in svc.get("image", "")}
    assert vllm_images == {f"vllm/vllm-openai:v{fixture_version}"}


def test_vllm_servers_and_their_adapters_agree(compose_vllm):
    services = compose_vllm["services"]
    router = dry_parse(services["router"]["command"][1:]).params
    for server, adapter in (("vllm-a", "worker-a"), ("vllm-b", "worker-b")):
        config = json.loads(next(a.split("=", 1)[1] for a in services[server]["command"]
                                 if a.startswith("--kv-events-config=")))
        params = dry_parse(services[adapter]["command"][1:]).params
        assert params["engine"] == "vllm" and params["vllm_url"] == f"http://{server}:8000"
        assert params["kv_events_endpoint"] == config["endpoint"]
        assert params["replay_endpoint"] == config["replay_endpoint"]
        assert params["topic"] == config.get("topic", "") == ""  # vLLM's default topic on both sides
        assert params["router_endpoint"].rsplit(":", 1)[1] == str(names.ROUTER_WORKERS_PORT)
        assert router["bind_workers"] is None  # the default port, on --bind-host


def test_the_image_copies_every_installed_package():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted({p.split(".")[0] for p in include})  # "core" and "core.*": one top-level package
    copied = sorted(ln.split()[1] for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("COPY ")
                    and ln.split()[1] in packages)
    assert copied == packages
