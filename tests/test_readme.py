"""Every shell command in README.md, run as a user would type it (docs that are tested).

Each README command is classified in :data:`PLANS`: run as written, run with an explicit
shortening flag the test adds (a long run made short, never a different command), run against
the ``kvr up`` the README starts, or skipped with the reason. A README command the table does
not know fails :func:`test_every_readme_command_is_classified`, so a new command is either run
here or excused in writing. A run fails on a non-zero exit, a traceback, or a table whose data
cells are all empty.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from cluster.processes import stop_process
from tests.readme_commands import README, empty_tables, readme_commands
from tests.waiting import eventually

REPO = README.parent


@dataclass(frozen=True)
class Plan:
    """How the test runs one README command.

    ``kind``: ``"run"`` (on its own), ``"cluster"`` (against the README's ``kvr up``), ``"up"``
    (that ``kvr up`` itself, started in the background), ``"skip"``. ``extra``: arguments
    appended to shorten a long run. ``stdin``: what a user would type.
    """

    kind: str
    extra: tuple[str, ...] = ()
    why: str = ""
    stdin: str | None = None
    run_part: int | None = None  # run only this ``&&``-part (the set-up line's last step)


_SMALL_GSP = ("--gsp-num-groups", "4", "--gsp-prompts-per-group", "8")
_SMALL_DEMO = ("--workers", "2", "--speedup", "10", "--rate", "20", "--param", "num_groups=2",
               "--param", "prompts_per_group=4", "--param", "system_prompt_len=256", "--param", "output_len=4",
               "--no-plots")  # fmt: skip
_UP_PORTS = ("--client-port", "0", "--worker-port", "0", "--metrics-port", "0", "--monitor-port", "0",
             "--speedup", "20")  # fmt: skip

PLANS: dict[str, Plan] = {
    "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e . && .venv/bin/kvr demo":
        Plan("run", _SMALL_DEMO, run_part=-1,
             why="the venv and install steps are what .ci/run does; the demo runs here, shortened"),
    "python3 -m venv .venv && .venv/bin/pip install -c constraints.txt -e '.[test]' && .venv/bin/python -m pytest -q":
        Plan("skip", why="the test suite itself (this test is part of it)"),
    "kvr up -n 4": Plan("up", _UP_PORTS),
    'kvr send "hello world"': Plan("cluster"),
    "kvr send -i": Plan("cluster", stdin="hello\nand again\n"),
    "kvr dash": Plan("cluster", ("--once",)),
    "kvr inspect": Plan("cluster"),
    "redis-cli -u REDIS_URL --scan --pattern 'kvr:*'": Plan("cluster"),
    "curl -s localhost:9470/metrics": Plan("cluster"),
    "kvr plot RUN_DIR/monitor.json": Plan("cluster"),
    "kvr report RUN_DIR/monitor.json": Plan("cluster"),
    "kvr sim --workload gsp --policy all --workers 8 --rate 8": Plan("run", _SMALL_GSP),
    "kvr sim --trace traces/mooncake_fast25_conversation_trace.jsonl --policy kvr,round_robin,sglang --json":
        Plan("run", ("--trace-limit", "1500")),
    "kvr sim --workload gsp --policy kvr,sglang --rate-sweep 2,4,8,16": Plan("run", _SMALL_GSP),
    "kvr sim --workload gsp --profile h100-8b --num-gpu-blocks 1000 --policy kvr,dynamo,round_robin "
    "--goodput --slo-ttft-p99 0.5 --plots goodput/": Plan("run", _SMALL_GSP),
    "python -m pytest -q": Plan("skip", why="the test suite itself"),
    'python -m pytest -q -m "not integration and not faults"': Plan("skip", why="a subset of the test suite"),
    "python -m pytest -q -m faults": Plan("skip", why="a subset of the test suite"),
}

_VLLM_WHY = "needs a real vLLM server and its model weights (tests/worker/test_vllm_* cover the adapter)"


def _plan(command: str) -> Plan | None:
    if command.startswith(("vllm serve", "kvr worker --engine vllm")) or "--tokenizer http://vllm-" in command:
        return Plan("skip", why=_VLLM_WHY)
    return PLANS.get(command)


def test_every_readme_command_is_classified():
    commands = readme_commands()
    unknown = [c for c in commands if _plan(c) is None]
    assert unknown == [], "README commands this test does not know: classify them in PLANS"
    stale = [c for c in PLANS if c not in commands]
    assert stale == [], "PLANS names commands the README no longer has"
    assert commands[0].endswith("kvr demo") and "pytest" in commands[1]  # the two set-up lines lead


def test_readme_command_parsing_joins_continuations_and_drops_comments():
    text = "\n".join([
        "```bash", "kvr up -n 4        # a comment", "# a comment line", "kvr send 'a # not a comment' \\",
        "  --repeat 2", "```", "```python", "print('not shell')", "```",
    ])  # fmt: skip
    assert readme_commands(text) == ["kvr up -n 4", "kvr send 'a # not a comment' --repeat 2"]


def test_empty_tables_catches_tables_whose_rows_are_all_dashes():
    good = "| policy | hit | p99 |\n|---|---:|---:|\n| kvr | 0.51 | 1.2 |\n| rr | - | - |"
    assert empty_tables(good) == []  # one blank row beside data is an honest blank
    assert empty_tables("| policy | hit | p99 |\n|---|---|---|\n| kvr | - | - |\n| rr | - | - |") == ["kvr | - | -"]
    assert empty_tables("│ metric │ a │ b │\n│ kvr │ — │ — │") == ["kvr | — | —"]
    assert empty_tables("text\n| a | b |\n| x | 1 |\n\n| a | b |\n| y | - |") == ["y | -"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # `kvr`, `python` are the ones of the environment running the tests (a user's activated venv).
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env.setdefault("COLUMNS", "160")
    return env


def _check(command: str, proc: subprocess.CompletedProcess) -> None:
    out = (proc.stdout or "") + (proc.stderr or "")
    assert proc.returncode == 0, f"{command!r} exited {proc.returncode}:\n{out[-3000:]}"
    assert "Traceback" not in out, f"{command!r} printed a traceback:\n{out[-3000:]}"
    assert empty_tables(proc.stdout or "") == [], f"{command!r} printed a table with no data:\n{proc.stdout[-3000:]}"


def _shell(command: str, *, cwd: Path, stdin: str | None = None, timeout_s: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, env=_env(), input=stdin, capture_output=True, text=True,
                          timeout=timeout_s)


STANDALONE = [c for c in readme_commands() if (_plan(c) or Plan("skip")).kind == "run"]


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("command", STANDALONE, ids=lambda c: c.split("&&")[-1].strip().replace("/", "_")[:70])
def test_standalone_readme_command_runs(command, tmp_path):
    plan = _plan(command)
    line = command.split("&&")[plan.run_part].strip() if plan.run_part is not None else command
    line = line.replace(".venv/bin/", "")  # the environment running the tests is the README's venv
    if line.startswith("kvr ") and "traces/" in line:
        line = line.replace("traces/", f"{REPO}/traces/")
    proc = _shell(" ".join([line, *plan.extra]), cwd=tmp_path, stdin=plan.stdin)
    _check(command, proc)


@pytest.fixture(scope="module")
def readme_cluster(tmp_path_factory):
    """The README's ``kvr up``, in the background, found by the other commands through the state dir."""
    home = tmp_path_factory.mktemp("readme-up")
    state = home / "state"
    up_command = next(c for c in readme_commands() if _plan(c).kind == "up")
    env = _env() | {"KVR_STATE_DIR": str(state)}
    for var in ("KVR_ROUTER", "KVR_REDIS_URL", "KVR_MONITOR_URL", "KVR_NAMESPACE", "KVR_CURVE_DIR"):
        env.pop(var, None)
    proc = subprocess.Popen(["bash", "-c", "exec " + " ".join([up_command, *_plan(up_command).extra])], cwd=home,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    current = state / "current.json"
    try:
        eventually(lambda: current.exists() or proc.poll() is not None, timeout_s=90, what="kvr up ready",
                   interval_s=0.2)
    finally:
        if not current.exists():  # exited, or not up in time: show what it said
            stopped = stop_process(proc, sig=signal.SIGKILL, kill_timeout_s=10)
            out, err = stopped.stdout or "", stopped.stderr or ""
            pytest.fail(f"kvr up did not come up (rc {stopped.returncode}):\n{out[-2000:]}\n{err[-2000:]}")
    info = json.loads(current.read_text())
    yield home, env, info
    stopped = stop_process(proc, sig=signal.SIGINT, timeout_s=60)
    out, err = stopped.stdout, stopped.stderr
    assert not stopped.killed, "kvr up did not stop on Ctrl-C"
    assert stopped.returncode == 0, err[-2000:]
    assert "Traceback" not in out + err


CLUSTER = [c for c in readme_commands() if (_plan(c) or Plan("skip")).kind == "cluster"]


def _substitute(command: str, info: dict) -> str:
    """The README's placeholders, filled in as a user would from what ``kvr up`` printed."""
    monitor = info["monitor_url"].removeprefix("http://")
    return (command.replace("REDIS_URL", info["redis_url"]).replace("RUN_DIR", info["run_dir"])
            .replace("localhost:9470", monitor))


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.parametrize("command", CLUSTER, ids=lambda c: c.replace("/", "_")[:70])
def test_cluster_readme_command_runs(command, readme_cluster):
    home, env, info = readme_cluster
    plan = _plan(command)
    if command.startswith("redis-cli") and not info["redis_url"].startswith("redis://"):
        pytest.skip("embedded fakeredis: redis-cli is for a real Redis")
    line = " ".join([_substitute(command, info), *plan.extra])
    if command.startswith("kvr plot") or command.startswith("kvr report"):
        # The monitor writes its dump every few seconds: wait for the first one.
        eventually(Path(info["run_dir"], "monitor.json").exists, timeout_s=30, what="the monitor's first dump",
                   interval_s=0.2)
    proc = subprocess.run(["bash", "-c", line], cwd=home, env=env, input=plan.stdin, capture_output=True, text=True,
                          timeout=120)
    _check(command, proc)
    if command.startswith("kvr send") and plan.stdin is None:
        assert "worker" in proc.stdout
    if command.startswith("redis-cli"):
        assert any(k.startswith("kvr:") for k in proc.stdout.split())
    if command.startswith("curl"):
        assert "kvr_" in proc.stdout
