"""``kvr bench fuzz`` end to end through the CLI (a few hundred cases)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import main


def test_fuzz_command_writes_its_table_and_json(tmp_path):
    res = CliRunner().invoke(main, ["bench", "fuzz", "--cases", "200", "--target", "client",
                                    "--target", "http_completions", "--json", "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    data = json.loads((tmp_path / "fuzz.json").read_text())
    rows = {r["decoder"]: r for r in data["tables"]["fuzz"]}
    assert set(rows) == {"client", "http_completions"}
    assert all(r["cases"] == 200 and r["crashes"] == 0 and r["hangs (>1 s)"] == 0 for r in rows.values())
    assert "| client |" in (tmp_path / "fuzz.md").read_text()


def test_an_unknown_target_is_a_usage_error(tmp_path):
    res = CliRunner().invoke(main, ["bench", "fuzz", "--cases", "10", "--target", "nope", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "unknown fuzz targets ['nope']" in res.output
