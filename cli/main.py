"""``kvr``: the click entry point.

Subcommands live in one module each under ``cli/`` and export ``COMMANDS``, a
list of click commands; they are discovered here so that adding a command never
touches this file. Command modules import heavy packages (matplotlib, zmq
services) inside the command body so ``kvr --help`` stays fast.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil

import click

import cli
from cli.options import setup_logging

logger = logging.getLogger(__name__)

_NOT_COMMAND_MODULES = {"main", "options"}
#: Command modules that failed to import → why; reported by ``main`` when it runs.
_BROKEN: dict[str, str] = {}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "auto_envvar_prefix": "KVR"})
@click.option(
    "--log-level",
    envvar="KVR_LOG_LEVEL",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
)
@click.version_option(package_name="kvr")
def main(log_level: str) -> None:
    """kvr: a KV-cache-aware router for LLM inference fleets."""
    setup_logging(log_level)
    for name, why in _BROKEN.items():
        logger.error("command module cli/%s.py failed to import, its commands are missing: %s", name, why)


def _register_commands() -> None:
    for info in sorted(pkgutil.iter_modules(cli.__path__), key=lambda m: m.name):
        if info.name in _NOT_COMMAND_MODULES or info.name.startswith("_"):
            continue
        try:
            module = importlib.import_module(f"cli.{info.name}")
        except Exception as exc:  # noqa: BLE001 - one broken command must not take every other one down
            _BROKEN[info.name] = f"{type(exc).__name__}: {exc}"
            continue
        for command in getattr(module, "COMMANDS", ()):
            main.add_command(command)


_register_commands()

if __name__ == "__main__":
    main()
