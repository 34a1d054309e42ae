"""One definition of each default: the CLI's flags show and use the config's values."""

from __future__ import annotations

import click
import pytest

from cli.router import router_cmd
from cli.up import up_cmd
from cli.worker import worker_cmd
from core.blocks import DEFAULT_BLOCK_SIZE
from core.liveness import HeartbeatConfig
from core.policies import DEFAULT_POLICY
from router.config import RouterConfig


def _defaults(cmd: click.Command) -> dict[str, object]:
    return {p.name: p.default for p in cmd.params if isinstance(p, click.Option)}


def test_router_flags_default_to_the_router_config() -> None:
    cfg, flags = RouterConfig(), _defaults(router_cmd)
    assert {k: flags[k] for k in ("policy", "block_size", "request_timeout_s", "max_pending", "max_retries",
                                  "tentative_window_s", "router_id")} == {
        "policy": cfg.policy, "block_size": cfg.block_size, "request_timeout_s": cfg.request_timeout_s,
        "max_pending": cfg.max_pending, "max_retries": cfg.max_retries, "tentative_window_s": cfg.tentative_window_s,
        "router_id": cfg.router_id}
    assert (flags["heartbeat_interval_s"], flags["heartbeat_liveness"]) == (cfg.heartbeat.interval_s,
                                                                            cfg.heartbeat.liveness)


@pytest.mark.parametrize(("cmd", "flag", "expected"), [
    (up_cmd, "block_size", DEFAULT_BLOCK_SIZE), (up_cmd, "policy", DEFAULT_POLICY),
    (worker_cmd, "heartbeat_interval", HeartbeatConfig().interval_s),
])
def test_other_commands_use_the_same_defaults(cmd: click.Command, flag: str, expected: object) -> None:
    assert _defaults(cmd)[flag] == expected


def test_the_block_size_default_is_one_constant() -> None:
    assert RouterConfig().block_size == DEFAULT_BLOCK_SIZE == 16  # vLLM's default --block-size
