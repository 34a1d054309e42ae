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
    rows = [line.split()[0] for line in result.output.splitlines()[2:]
            if line.strip() and not line.startswith("latency")]
    assert rows == list(PROFILES)


def test_capacity_command_gives_924_blocks_for_a100_40gb_and_a_13b_model() -> None:
    args = ["capacity", "--gpu-mem-gib", "39.39", "--weights-gib", "23.94", "--layers", "40", "--kv-heads", "40",
            "--non-kv-gib", "0.22"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("924 blocks x 16 tokens = 14784 tokens (12.5 MiB per block, 800 KiB per token)")
    bad = CliRunner().invoke(main, [*args, "--utilization", "1.5"])
    assert bad.exit_code == 2
