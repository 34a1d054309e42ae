"""``kvr router`` options that shape the RouterConfig: ``--no-trust`` turns closed-loop trust off."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli.router import router_cmd
from core.trust import TrustConfig


class _Built(Exception):
    """Raised by the stand-in RouterService once it has the config: nothing binds, nothing runs."""


@pytest.fixture
def built(monkeypatch: pytest.MonkeyPatch) -> list:
    configs: list = []

    def fake_service(config, **_kw):
        configs.append(config)
        raise _Built

    monkeypatch.setattr("router.service.RouterService", fake_service)
    return configs


def _run(*args: str, env: dict | None = None):
    return CliRunner().invoke(router_cmd, ["--no-redis", *args], env=env or {})


def test_trust_is_on_by_default(built: list) -> None:
    result = _run()
    assert result.exit_code == 1 and "router did not start" in result.output
    assert built[0].trust == TrustConfig()


def test_no_trust_sets_no_trust_config(built: list) -> None:
    result = _run("--no-trust")
    assert result.exit_code == 1 and "router did not start" in result.output
    assert built[0].trust is None


def test_no_trust_from_the_environment(built: list) -> None:
    _run(env={"KVR_NO_TRUST": "1"})
    assert built[0].trust is None


def test_help_names_the_engines_it_is_for() -> None:
    out = CliRunner().invoke(router_cmd, ["--help"]).output
    assert "--no-trust" in out and "do not report cached tokens" in " ".join(out.split())
