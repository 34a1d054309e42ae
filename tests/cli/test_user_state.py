"""The per-user state file of `kvr up` and the commands that find the cluster through it."""

from __future__ import annotations

import http.server
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli import user_state
from cli.main import main
from cli.up import ready_message
from monitor.dump import write_dump
from tests.monitor.synthetic import synthetic_dump


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _record(**over) -> dict:
    return {"client_endpoint": "tcp://127.0.0.1:1", "worker_endpoint": "tcp://127.0.0.1:2",
            "metrics_endpoint": "tcp://127.0.0.1:3", "monitor_url": None, "redis_url": "redis://127.0.0.1:4/0",
            "redis_kind": "redis-server", "namespace": "default", "workers": ["worker-0"], "run_dir": "/r",
            "cluster_json": "/r/cluster.json", "dump": None, "logs": "/r/logs", "pid": os.getpid(), "pids": {},
            "curve_dir": None, **over}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# ---------------------------------------------------------------------------- the state dir


def test_state_dir_env_then_xdg_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KVR_STATE_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg"))
    assert user_state.state_dir() == tmp_path / "explicit"
    monkeypatch.delenv("KVR_STATE_DIR")
    assert user_state.state_dir() == tmp_path / "xdg" / "kvr"
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert user_state.state_dir() == tmp_path / "home" / ".local" / "state" / "kvr"
    assert user_state.current_path() == tmp_path / "home" / ".local" / "state" / "kvr" / "current.json"


def test_publish_is_private_found_and_withdrawn_only_by_its_writer(state_dir):
    with pytest.raises(user_state.NoCluster, match=r"^no `kvr up` is running \(no .*current\.json\)$"):
        user_state.running_cluster()
    record = _record(redis_url="redis://:s3cret@127.0.0.1:4/0")
    path = user_state.publish(record)
    assert path == state_dir / "current.json"
    assert _mode(path) == 0o600 and _mode(state_dir) == 0o700
    assert user_state.running_cluster() == record
    assert not user_state.withdraw(pid=os.getpid() + 1)  # another `kvr up` wrote it: left alone
    assert path.exists()
    assert user_state.withdraw()
    assert not path.exists()
    assert not user_state.withdraw()


def test_a_stale_file_is_ignored_with_the_reason(state_dir):
    pid = _dead_pid()
    user_state.publish(_record(pid=pid))
    with pytest.raises(user_state.NoCluster) as err:
        user_state.running_cluster()
    assert str(err.value) == (f"{state_dir / 'current.json'} is stale, ignored: the `kvr up` that wrote it "
                              f"(pid {pid}) is no longer running")
    res = CliRunner().invoke(main, ["send", "hello"])
    assert res.exit_code == 2
    assert res.output == (f"Error: {err.value}; pass --router ENDPOINT (or KVR_ROUTER), or start a cluster "
                          f"with `kvr up`\n")


def test_write_private_json_tightens_an_existing_file(tmp_path):
    path = tmp_path / "cluster.json"
    path.write_text("{}")
    path.chmod(0o644)
    user_state.write_private_json(path, {"a": 1})
    assert _mode(path) == 0o600 and json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.json"]  # no temp file left


def test_new_run_dir_keeps_the_newest_runs_of_its_kind_and_live_ones(state_dir):
    runs = state_dir / "runs"
    dead = _dead_pid()
    old = [runs / f"up-2020010{i // 10}-00000{i % 10}-{dead}" for i in range(12)]
    for p in old:
        p.mkdir(parents=True)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        oldest_live = runs / f"up-19990101-000000-{live.pid}"
        oldest_live.mkdir()
        demo = runs / "demo-19990101-000000-1"
        demo.mkdir()
        new = user_state.new_run_dir("up")
        assert new.parent == runs and new.name.startswith("up-") and new.name.endswith(f"-{os.getpid()}")
        assert _mode(new) == 0o700
        # The newest KEEP_RUNS (with the new one) survive, plus the run whose `kvr up` still runs.
        kept = sorted(p.name for p in runs.iterdir())
        assert kept == sorted([demo.name, oldest_live.name, new.name,
                               *(p.name for p in old[-(user_state.KEEP_RUNS - 1):])])
    finally:
        live.kill()
        live.wait()


# ---------------------------------------------------------------------------- commands without a cluster


@pytest.mark.parametrize("args, instead", [
    (["send", "hello"], "--router ENDPOINT (or KVR_ROUTER)"),
    (["inspect"], "--redis-url URL (or KVR_REDIS_URL)"),
    (["dash", "--once"], "--source URL|DUMP (or KVR_MONITOR_URL; docker compose's monitor: "
                         "http://127.0.0.1:9470/json?light=1)"),
    (["plot"], "DUMP (a stopped `kvr up` keeps RUN_DIR/monitor.json under {runs})"),
])
def test_without_flag_or_cluster_one_line_says_what_to_pass(state_dir, args, instead):
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 2
    assert res.output == (f"Error: no `kvr up` is running (no {state_dir / 'current.json'}); "
                          f"pass {instead.format(runs=state_dir / 'runs')}, or start a cluster with `kvr up`\n")


def test_dash_and_plot_of_a_cluster_without_monitor(state_dir):
    user_state.publish(_record())
    res = CliRunner().invoke(main, ["dash", "--once"])
    assert res.exit_code == 2 and res.output.startswith("Error: the running `kvr up` has no monitor (--no-monitor); ")
    res = CliRunner().invoke(main, ["plot"])
    assert res.exit_code == 2
    assert res.output == "Error: the running `kvr up` has no monitor (--no-monitor), so no dump; pass DUMP\n"


# ---------------------------------------------------------------------------- commands find the cluster


class _DumpServer:
    """Serves one dump at any path; records the paths asked for."""

    def __init__(self, dump: dict) -> None:
        body = json.dumps(dump).encode()
        paths = self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - http.server's name
                paths.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_dash_reads_the_running_clusters_monitor_and_a_flag_wins(state_dir, tmp_path):
    server = _DumpServer(synthetic_dump("from-cluster", aware=True, n=10))
    try:
        user_state.publish(_record(monitor_url=server.url))
        res = CliRunner().invoke(main, ["dash", "--once", "--width", "160"])
        assert res.exit_code == 0, res.output
        assert server.paths == ["/json?light=1"] and "from-cluster" in res.stdout
        path = write_dump(tmp_path / "d.json", synthetic_dump("from-flag", aware=True, n=10))
        res = CliRunner().invoke(main, ["dash", "--once", "--width", "160", "--source", str(path)])
        assert res.exit_code == 0, res.output
        assert "from-flag" in res.stdout and server.paths == ["/json?light=1"]
    finally:
        server.close()


def test_plot_reads_the_running_clusters_dump(state_dir, tmp_path):
    dump = write_dump(tmp_path / "run" / "monitor.json", synthetic_dump("kvr", aware=True, n=30))
    user_state.publish(_record(dump=str(dump)))
    res = CliRunner().invoke(main, ["plot"])
    assert res.exit_code == 0, res.output
    assert "latency_distribution.png" in {p.name for p in (tmp_path / "run" / "monitor-plots").iterdir()}


# ---------------------------------------------------------------------------- what `kvr up` prints


def test_ready_message_lists_the_next_commands_with_the_password_masked():
    info = _record(monitor_url="http://127.0.0.1:9470", dump="/r/monitor.json", namespace="ns",
                   redis_url="redis://:s3cret@127.0.0.1:4/0")
    text = ready_message(info, workers=1, state_path=Path("/s/current.json"),
                         masked_redis="redis://:***@127.0.0.1:4/0", previous_pid=None)
    assert "s3cret" not in text
    assert text.splitlines() == [
        "kvr cluster ready: 1 workers, redis redis://:***@127.0.0.1:4/0 (redis-server), namespace ns",
        "  router:   clients tcp://127.0.0.1:1, workers tcp://127.0.0.1:2, metrics tcp://127.0.0.1:3",
        "  monitor:  http://127.0.0.1:9470",
        "  run dir:  /r  (kept after the stop)",
        "  found by: /s/current.json  (kvr send/dash/inspect/plot use it when given no endpoint)",
        "try:",
        '  kvr send "hello"',
        "  kvr send -i                  # a chat: each turn reuses the conversation's prefix",
        "  kvr dash                     # live dashboard",
        "  kvr inspect                  # what Redis holds: workers, index, hottest prefixes",
        "  redis-cli -u redis://:***@127.0.0.1:4/0 --scan --pattern 'kvr:{ns[}:~]*'",
        "  curl -s http://127.0.0.1:9470/metrics",
        "  kvr plot /r/monitor.json",
        "logs: /r/logs    Ctrl-C stops everything",
    ]
    text = ready_message({**info, "monitor_url": None, "dump": None}, workers=1, state_path=Path("/s/current.json"),
                         masked_redis="redis://:***@127.0.0.1:4/0", previous_pid=77)
    lines = text.splitlines()
    assert lines[1] == "  (another `kvr up`, pid 77, is still running; commands now default to this one)"
    assert "  monitor:  off (--no-monitor)" in lines
    assert not any(ln.startswith(("  kvr dash", "  kvr plot", "  curl")) for ln in lines)


def test_ready_message_names_the_shared_front_after_the_replicas():
    info = _record(monitor_url=None, client_endpoints=["tcp://127.0.0.1:1", "tcp://127.0.0.1:5"],
                   front_url="http://127.0.0.1:8000")
    lines = ready_message(info, workers=1, state_path=Path("/s/current.json"), masked_redis="redis://127.0.0.1:4/0",
                          previous_pid=None).splitlines()
    at = lines.index("  replica:  clients tcp://127.0.0.1:5")
    assert lines[at + 1] == "  front:    http://127.0.0.1:8000  (OpenAI HTTP over every router)"
