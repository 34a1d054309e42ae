"""docker-compose.yml: parses, every service command is a valid `kvr` invocation, same topology as `kvr up`."""

from __future__ import annotations

from pathlib import Path

import click
import pytest

from cli.main import main
from monitor.cluster import ClusterConfig, LocalCluster

yaml = pytest.importorskip("yaml")  # in the test extra; skip only where it is not installed

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def dry_parse(args: list[str]) -> click.Context:
    """Parse ``kvr <args>`` like the CLI would, without running anything (raises click.UsageError)."""
    group_ctx = main.make_context("kvr", list(args), resilient_parsing=False)
    rest = [*group_ctx._protected_args, *group_ctx.args]
    name, cmd, sub_args = main.resolve_command(group_ctx, rest)
    return cmd.make_context(name, sub_args, parent=group_ctx)


def option_names(args: list[str]) -> list[str]:
    return sorted(a.split("=", 1)[0] for a in args if a.startswith("--"))


def _role(service: str) -> str:
    return service.split("-")[0]


def test_services_and_healthchecks(compose):
    services = compose["services"]
    assert sorted(services) == ["monitor", "redis", "router", "worker-0", "worker-1", "worker-2"]
    for name, svc in services.items():
        assert "test" in svc["healthcheck"], name
    assert services["router"]["depends_on"]["redis"]["condition"] == "service_healthy"
    for w in ("worker-0", "worker-1", "worker-2"):
        assert services[w]["depends_on"]["router"]["condition"] == "service_healthy"


def test_every_kvr_command_parses(compose):
    kvr_services = {n: s for n, s in compose["services"].items() if n != "redis"}
    for name, svc in kvr_services.items():
        cmd = svc["command"]
        assert cmd[0] == "kvr", name
        ctx = dry_parse(cmd[1:])
        assert ctx.info_name == _role(name)
    ctx = dry_parse(compose["services"]["worker-1"]["command"][1:])
    assert (ctx.params["worker_id"], ctx.params["advertise_host"], ctx.params["router_endpoint"]) == ("worker-1", "worker-1", "tcp://router:5556")
    with pytest.raises(click.UsageError):
        dry_parse(["worker", "--id=w", "--no-such-option"])


def test_kvr_up_runs_the_same_topology(compose):
    services = compose["services"]
    cluster = LocalCluster(ClusterConfig(workers=3, redis_url="redis://127.0.0.1:6379/0"))
    specs = [cluster.monitor_spec(), cluster.router_spec(), *(cluster.worker_spec(w) for w in cluster.worker_ids)]
    assert sorted(s.name for s in specs) == sorted(n for n in services if n != "redis")
    for spec in specs:
        # argv = python -m cli.main --log-level L <command> ...
        local = spec.argv[5:]
        dry_parse(local)
        assert option_names(local) == option_names(services[spec.name]["command"][2:]), spec.name
        assert local[0] == services[spec.name]["command"][1]
    # The same wiring: workers → router's worker port, monitor → router's metrics port.
    router = dry_parse(services["router"]["command"][1:]).params
    monitor = dry_parse(services["monitor"]["command"][1:]).params
    worker = dry_parse(services["worker-0"]["command"][1:]).params
    assert worker["router_endpoint"].rsplit(":", 1)[1] == router["bind_workers"].rsplit(":", 1)[1]
    assert monitor["metrics_endpoints"][0].rsplit(":", 1)[1] == router["bind_metrics"].rsplit(":", 1)[1]
    assert router["block_size"] == worker["block_size"] == monitor["block_size"]


def test_the_image_copies_every_installed_package():
    import tomllib

    include = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(p.rstrip("*") for p in include)
    copied = sorted(ln.split()[1] for ln in (ROOT / "Dockerfile").read_text().splitlines() if ln.startswith("COPY ")
                    and ln.split()[1] in packages)
    assert copied == packages
