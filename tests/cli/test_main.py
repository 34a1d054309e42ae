"""Command discovery: every cli module imports, and a broken one is reported, not fatal."""

from __future__ import annotations

import importlib
import logging

from click.testing import CliRunner

import cli.main as cli_main


def test_every_command_module_imports_and_registers():
    assert cli_main._BROKEN == {}
    expected = {"bench", "capacity", "dash", "demo", "events", "inspect", "keys", "monitor", "plot", "profiles",
                "report", "router", "send", "sim", "up", "worker"}
    assert expected <= set(cli_main.main.commands)


def test_a_module_that_fails_to_import_is_skipped_and_logged(monkeypatch):
    real = importlib.import_module

    def flaky(name, *a, **kw):
        if name == "cli.sim":
            raise ImportError("no module named 'numpy' (simulated)")
        return real(name, *a, **kw)

    monkeypatch.setattr(cli_main, "_BROKEN", {})
    monkeypatch.setattr(cli_main.importlib, "import_module", flaky)
    sim = cli_main.main.commands.pop("sim")
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        cli_main._register_commands()
        assert "sim" not in cli_main.main.commands
        assert cli_main._BROKEN == {"sim": "ImportError: no module named 'numpy' (simulated)"}
        # main() configures logging to stderr (replacing pytest's handlers), which the runner captures.
        result = CliRunner().invoke(cli_main.main, ["profiles"])
        assert result.exit_code == 0, result.output
        assert "cli.main: command module cli/sim.py failed to import" in result.stderr
    finally:
        cli_main.main.commands["sim"] = sim
        root.handlers[:] = handlers  # main() pointed logging at the runner's (now closed) stderr
        root.setLevel(level)
