"""``kvr profiles`` lists every profile, as a table and as JSON."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import main
from core.profiles import PROFILES


def test_profiles_json_lists_every_profile_with_capacity_and_constants() -> None:
    result = CliRunner().invoke(main, ["profiles", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert [d["name"] for d in data] == list(PROFILES)
    by_name = {d["name"]: d for d in data}
    assert by_name["a100-40gb-13b"]["num_gpu_blocks"] == 924
    assert by_name["a100-40gb-13b"]["latency"]["kind"] == "step"
    assert by_name["simple"]["latency"]["prefill_per_block_s"] == 0.002


def test_profiles_table_has_a_row_per_profile() -> None:
    result = CliRunner().invoke(main, ["profiles"])
    assert result.exit_code == 0, result.output
    rows = [line.split()[0] for line in result.output.splitlines()[2:] if line.strip() and not line.startswith("latency")]
    assert rows == list(PROFILES)
