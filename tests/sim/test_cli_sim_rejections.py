"""``kvr sim`` and rejected requests: the table column, the stderr warning with its cause and fix,
an all-rejected run as a one-line error, and defaults that fit (``kvr sim --workload gsp`` runs every request)."""

from __future__ import annotations

import json

from click.testing import CliRunner

from cli.main import main

# Six rows whose compressed prompts are 16, 32 and 48 tokens (one 16-token block per hash id).
_ROWS = [{"timestamp": 100 * i, "input_length": 512 * n, "output_length": 64,
          "hash_ids": list(range(10 * i, 10 * i + n))}
         for i, n in enumerate([1, 2, 3, 1, 2, 3])]  # fmt: skip
_COMMON = ["--policy", "kvr,round_robin", "--workers", "2", "--profile", "h100-8b", "--no-progress"]


def _sim(*args: str):
    # WARNING: keeps the per-policy INFO lines out of stderr, so it holds exactly what the command says.
    return CliRunner().invoke(main, ["--log-level", "WARNING", "sim", *args])


def _trace(tmp_path) -> str:
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _ROWS))
    return str(path)


def test_context_rejections_are_a_column_and_a_warning(tmp_path):
    res = _sim("--trace", _trace(tmp_path), *_COMMON, "--max-model-len", "40")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[2].split(" | ")[-1] == "rejected |"
    assert [ln.split(" | ")[-1] for ln in lines[4:6]] == ["2 |", "2 |"]  # kvr, round_robin
    assert res.stderr.splitlines()[0] == (
        "warning: 2 of 6 requests rejected under every policy: prompt too long for max_model_len 40 tokens "
        "(longest prompt 48 tokens); raise it with --max-model-len"
    )


def test_capacity_rejections_name_the_capacity_flag(tmp_path):
    # 3 blocks = 2 usable = 32 tokens: the engine caps its context there, below the profile's 8192.
    res = _sim("--trace", _trace(tmp_path), *_COMMON, "--num-gpu-blocks", "3", "--json")
    assert res.exit_code == 0, res.output
    assert [row["rejected"] for row in json.loads(res.stdout)["policies"].values()] == [4, 4]
    assert res.stderr.splitlines()[0] == (
        "warning: 4 of 6 requests rejected under every policy: prompt too long for one worker's KV cache of 32 tokens "
        "(longest prompt 48 tokens); raise it with --num-gpu-blocks or a --profile with more memory"
    )


def test_report_with_rejections_is_byte_identical_across_runs(tmp_path):
    trace = _trace(tmp_path)
    outs = [_sim("--trace", trace, *_COMMON, "--max-model-len", "40", "--json").stdout for _ in range(2)]
    assert outs[0] == outs[1] and json.loads(outs[0])["policies"]["kvr"]["rejected"] == 2


def test_all_rejected_is_a_one_line_error(tmp_path):
    res = _sim("--trace", _trace(tmp_path), *_COMMON, "--max-model-len", "16")
    assert res.exit_code == 1
    assert res.stdout == ""
    assert res.stderr == (
        "Error: no request ran: 6 of 6 requests rejected under every policy: prompt too long for max_model_len 16 "
        "tokens (longest prompt 48 tokens); raise it with --max-model-len\n"
    )


def test_all_rejected_in_a_sweep_names_the_rate(tmp_path):
    res = _sim("--trace", _trace(tmp_path), *_COMMON, "--max-model-len", "16", "--rate-sweep", "5,10", "--json")
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: no request ran at 5 req/s: 6 of 6 requests rejected")
    assert len(res.stderr.splitlines()) == 1


def test_sweep_warns_once_when_every_rate_rejects_the_same(tmp_path):
    res = _sim("--trace", _trace(tmp_path), *_COMMON, "--max-model-len", "40", "--rate-sweep", "5,10", "--json")
    assert res.exit_code == 0, res.output
    warnings = [ln for ln in res.stderr.splitlines() if ln.startswith("warning")]
    assert warnings == [
        "warning: 2 of 6 requests rejected under every policy: prompt too long for max_model_len 40 tokens "
        "(longest prompt 48 tokens); raise it with --max-model-len"
    ]


def test_gsp_with_default_flags_runs_every_request():
    # SGLang's gsp lengths (2048-token system prompt + 2 + 128, 256 out) on the default profile
    # (context 2048): the context grows to 2178 + 256 tokens and nothing is rejected.
    args = ["--workload", "gsp", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "2", "--policy", "kvr", "--json",
            "--no-progress"]
    res = _sim(*args)
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["policies"]["kvr"]
    assert (row["requests"], row["rejected"], row["unfinished"]) == (4, 0, 0)
    assert res.stderr.splitlines()[0] == (
        "note: max_model_len 2434 tokens to fit the workload (profile simple: 2048); pin it with --max-model-len"
    )
    assert not any(ln.startswith("warning") for ln in res.stderr.splitlines())
    assert _sim(*args).stdout == res.stdout


def test_multiturn_follow_ups_fit_too():
    # Round 5 is 512 + 4 x (64 + 512) = 2816 prompt tokens: rejected under 2048 before the context grew.
    res = _sim("--workload", "multiturn", "-p", "num_clients=4", "--policy", "kvr", "--json", "--no-progress")
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["policies"]["kvr"]
    assert (row["requests"], row["rejected"]) == (20, 0)
    assert res.stderr.splitlines()[0].startswith("note: max_model_len 2880 tokens to fit the workload")


def test_an_explicit_max_model_len_is_kept():
    res = _sim("--workload", "gsp", "--gsp-num-groups", "2", "--gsp-prompts-per-group", "2", "--policy", "kvr",
               "--max-model-len", "2300", "--json", "--no-progress")
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["policies"]["kvr"]["rejected"] == 0
    assert [ln for ln in res.stderr.splitlines() if ln.startswith(("note", "warning"))] == []
