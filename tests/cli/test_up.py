"""``LocalCluster`` and ``kvr up`` with real processes over loopback (real redis-server or fakeredis)."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from bus.client import RouterClient
from bus.schema import GenerateRequest
from cli.main import main
from cluster.local import ClusterConfig, LocalCluster, kvr_argv
from cluster.processes import pid_running, stop_process
from cluster.supervisor import ComponentSpec, Supervisor
from monitor.dashboard import fetch_dump
from tests.conftest import free_port
from tests.waiting import eventually

pytestmark = pytest.mark.integration

PROMPT = "the same long system prompt for every request " * 12


def test_local_cluster_routes_by_cache_feeds_the_monitor_and_stops_everything(redis_server, tmp_path):
    cluster = LocalCluster(ClusterConfig(workers=2, redis_url=redis_server, speedup=50, run_dir=tmp_path,
                                         namespace="t-up", ready_timeout_s=30, dump_interval_s=0.5))
    with cluster:
        pids = [cluster.supervisor.pid(n) for n in cluster.supervisor.names]
        # The router first (the others dial the ports it reports), the monitor stopped last.
        assert cluster.supervisor.names == ["router", "monitor", "worker-0", "worker-1"]
        assert sorted(cluster.alive_workers()) == ["worker-0", "worker-1"]
        with RouterClient(endpoint=cluster.client_endpoint) as client:
            results = [client.generate(GenerateRequest(request_id=f"r{i}", prompt=PROMPT, max_tokens=3), timeout_s=10)
                       for i in range(4)]
        assert all(r.completion is not None for r in results)
        # The first request computes the prompt; the rest find it cached on the same worker.
        assert results[0].completion.cached_tokens == 0
        assert {r.completion.worker_id for r in results[1:]} == {results[0].completion.worker_id}
        assert all(r.completion.cached_tokens > 0 for r in results[1:])
        def summary() -> dict:
            return fetch_dump(f"{cluster.monitor_url}/json")["summary"]

        eventually(lambda: summary()["requests"] == 4, timeout_s=10, what=lambda: f"4 requests in {summary()}",
                   interval_s=0.05)
        # A crashed worker comes back as a new incarnation (epoch) and registers again.
        epoch = cluster.alive_workers()["worker-1"]
        old_pid = cluster.supervisor.pid("worker-1")
        cluster.restart_worker("worker-1", crash=True, timeout_s=20)
        assert cluster.alive_workers()["worker-1"] != epoch and not pid_running(old_pid)
        pids.append(cluster.supervisor.pid("worker-1"))
    assert all(not pid_running(p) for p in pids)
    assert cluster.supervisor.names == []
    assert sorted(p.name for p in (tmp_path / "logs").iterdir()) == ["monitor.log", "router.log", "worker-0.log",
                                                                     "worker-1.log"]
    # The monitor's final dump at exit has every request.
    assert json.loads((tmp_path / "monitor.json").read_text())["summary"]["requests"] == 4


def _start_up(tmp_path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "cli.main", "up", "--run-dir", str(tmp_path), "--client-port", "0", "--worker-port", "0",
         "--metrics-port", "0", "--monitor-port", "0", "--ready-timeout", "30", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=os.getcwd(),
    )


def test_kvr_up_on_embedded_fakeredis_readiness_then_clean_ctrl_c(tmp_path):
    proc = _start_up(tmp_path, "--workers", "2", "--redis-kind", "fakeredis", "--speedup", "50")
    try:
        first = proc.stdout.readline()  # printed only once the cluster is ready
        assert first.startswith("kvr cluster ready: 2 workers, redis redis://127.0.0.1:"), proc.stderr.read()
        assert "(fakeredis)" in first
        info = json.loads((tmp_path / "cluster.json").read_text())
        assert sorted(info["pids"]) == ["monitor", "redis", "router", "worker-0", "worker-1"]
        with RouterClient(endpoint=info["client_endpoint"]) as client:
            r = client.generate(GenerateRequest(request_id="x", prompt=PROMPT, max_tokens=2), timeout_s=10)
        assert r.completion is not None and r.completion.worker_id in info["workers"]
        assert stop_process(proc, sig=signal.SIGINT, timeout_s=30).returncode == 0
        assert all(not pid_running(p) for p in info["pids"].values())
    finally:
        stop_process(proc, sig=signal.SIGKILL)  # a no-op after a clean stop; closes the pipes


def test_kvr_up_exit_code_names_what_failed(redis_server, tmp_path):
    # A worker that cannot start: exit 12, its log tail shown, nothing left running.
    proc = _start_up(tmp_path / "a", "--workers", "1", "--redis-url", redis_server, "--worker-arg", "--no-such-flag")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 12, err
    assert "worker-0 (worker) exited with code 2" in err and "no-such-flag" in err
    # No Redis at the given URL: exit 10.
    proc = _start_up(tmp_path / "b", "--redis-url", f"redis://127.0.0.1:{free_port()}/0")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 10 and "does not answer PING" in err


def test_kvr_up_exits_when_a_component_dies(redis_server, tmp_path):
    proc = _start_up(tmp_path, "--workers", "1", "--redis-url", redis_server, "--no-monitor", "--namespace", "t-die")
    try:
        assert proc.stdout.readline().startswith("kvr cluster ready"), proc.stderr.read()
        info = json.loads((tmp_path / "cluster.json").read_text())
        os.kill(info["pids"]["router"], signal.SIGKILL)
        assert proc.wait(timeout=30) == 11
        assert all(not pid_running(p) for p in info["pids"].values())
        assert "router (router) exited with code -9" in proc.stderr.read()
    finally:
        stop_process(proc, sig=signal.SIGKILL)  # a no-op after a clean stop; closes the pipes


def _shadowing_folder(path: Path) -> Path:
    """A folder holding packages named like kvr's, as a user's project might."""
    for pkg in ("cli", "core", "bus"):
        (path / pkg).mkdir(parents=True)
        (path / pkg / "__init__.py").write_text('raise SystemExit("shadowed: the cwd is on sys.path")\n')
        (path / pkg / "main.py").write_text('raise SystemExit("shadowed")\n')
    return path


def test_children_are_not_shadowed_by_folders_in_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(_shadowing_folder(tmp_path / "work"))
    argv = kvr_argv("--help")
    # The folder does shadow a plain `python -m cli.main` started there ...
    env = {k: v for k, v in os.environ.items() if k != "PYTHONSAFEPATH"}
    plain = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=30)
    assert plain.returncode == 1 and "shadowed: the cwd is on sys.path" in plain.stderr
    # ... but not the same command run by the supervisor.
    sup = Supervisor(log_dir=tmp_path / "logs")
    sup.start(ComponentSpec("kvr", "kvr", argv))
    eventually(sup.failed, timeout_s=30, what="a failed component", interval_s=0.05)
    (exited,) = sup.failed()
    assert exited.returncode == 0, exited.log_tail
    assert "kvr: a KV-cache-aware router for LLM inference fleets." in (tmp_path / "logs" / "kvr.log").read_text()


def test_kvr_up_from_a_shadowing_folder_is_found_through_its_state_file(tmp_path, state_dir):
    work = _shadowing_folder(tmp_path / "work")
    # -P: the parent too must not import the folder's cli/ (its children are what is tested).
    proc = subprocess.Popen(
        [sys.executable, "-P", "-m", "cli.main", "up", "-n", "1", "--redis-kind", "fakeredis", "--speedup", "50",
         "--client-port", "0", "--worker-port", "0", "--metrics-port", "0", "--monitor-port", "0",
         "--ready-timeout", "30"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work,
    )
    current = state_dir / "current.json"
    try:
        first = proc.stdout.readline()
        assert first.startswith("kvr cluster ready: 1 workers, redis redis://127.0.0.1:"), proc.stderr.read()
        info = json.loads(current.read_text())
        assert info["pid"] == proc.pid and stat.S_IMODE(current.stat().st_mode) == 0o600
        run_dir = Path(info["run_dir"])
        assert run_dir.parent == state_dir / "runs" and run_dir.name.startswith("up-")
        assert info["cluster_json"] == str(run_dir / "cluster.json") and info["dump"] == str(run_dir / "monitor.json")
        assert json.loads((run_dir / "cluster.json").read_text()) == info
        assert stat.S_IMODE((run_dir / "cluster.json").stat().st_mode) == 0o600
        # No flags: send and inspect find the cluster through the state file.
        res = CliRunner().invoke(main, ["send", "hello", "--max-tokens", "2"])
        assert res.exit_code == 0 and res.stdout.startswith("worker worker-0 "), res.output
        res = CliRunner().invoke(main, ["inspect", "--json"])
        assert res.exit_code == 0, res.output
        assert [w["worker_id"] for w in json.loads(res.stdout)["workers"]] == ["worker-0"]
        stopped = stop_process(proc, sig=signal.SIGINT, timeout_s=30)
        assert stopped.returncode == 0
        out = stopped.stdout
        assert '  kvr send "hello"' in out and f"logs: {run_dir / 'logs'}    Ctrl-C stops everything" in out
        assert not current.exists()  # withdrawn at the stop; the run is kept
        assert f"; run dir kept: {run_dir}" in stopped.stderr
        assert sorted(p.name for p in (run_dir / "logs").iterdir()) == [
            "monitor.log", "redis.log", "router.log", "worker-0.log"]
    finally:
        stop_process(proc, sig=signal.SIGKILL)  # a no-op after a clean stop; closes the pipes


def test_a_redis_password_goes_to_the_routers_environment_not_its_command_line(tmp_path):
    secret = "redis://:s3cret@127.0.0.1:6379/0"
    spec = LocalCluster(ClusterConfig(workers=1, redis_url=secret, run_dir=tmp_path)).router_spec()
    assert not any("s3cret" in a for a in spec.argv) and dict(spec.env) == {"KVR_REDIS_URL": secret}
    plain = LocalCluster(ClusterConfig(workers=1, redis_url="redis://127.0.0.1:6379/0", run_dir=tmp_path)).router_spec()
    assert plain.argv[plain.argv.index("--redis-url") + 1] == "redis://127.0.0.1:6379/0" and dict(plain.env) == {}


def test_local_cluster_with_router_replicas_serves_through_each_and_survives_one(redis_server, tmp_path):
    """kvr up --routers 2 --front-port 0: every worker registers with both replicas; a prefix placed
    through one is found cached through the other; the monitor hears both; the shared front spreads
    requests over both; one replica killed, the other serves, through the front too."""
    cluster = LocalCluster(ClusterConfig(workers=2, routers=2, redis_url=redis_server, speedup=50, run_dir=tmp_path,
                                         namespace="t-up-replicas", ready_timeout_s=30, dump_interval_s=0.5,
                                         front_http_port=0))
    with cluster:
        assert cluster.supervisor.names[:2] == ["router", "router-1"]
        assert len(set(cluster.client_endpoints)) == 2
        first, second = cluster.client_endpoints
        with RouterClient(endpoint=first) as client:
            placed = client.generate(GenerateRequest(request_id="a", prompt=PROMPT, max_tokens=3), timeout_s=10)
        assert placed.completion is not None
        holder = placed.completion.worker_id
        with RouterClient(endpoint=second) as client:
            # The second replica indexed the holder's blocks from its own subscription (within a moment).
            hits = [client.generate(GenerateRequest(request_id=f"b{i}", prompt=PROMPT, max_tokens=3), timeout_s=10)
                    for i in range(3)]
        assert all(r.completion is not None and r.completion.worker_id == holder for r in hits[1:])
        assert hits[-1].completion.cached_tokens > 0

        def summary() -> dict:
            return fetch_dump(f"{cluster.monitor_url}/json")["summary"]

        eventually(lambda: summary()["requests"] == 4, timeout_s=10, what=lambda: f"4 requests in {summary()}",
                   interval_s=0.05)
        assert cluster.supervisor.names[-1] == "front" and cluster.front_url.rsplit(":", 1)[1] != "0"
        via_front = [_front_post(cluster.front_url) for _ in range(4)]
        assert all(status == 200 for status, _ in via_front), via_front
        # The monitor hears the front's requests, whichever replica routed them.
        eventually(lambda: summary()["requests"] == 8, timeout_s=10, what=lambda: f"8 requests in {summary()}",
                   interval_s=0.05)
        cluster.supervisor.signal("router", signal.SIGKILL)
        with RouterClient(endpoint=second) as client:
            after = [client.generate(GenerateRequest(request_id=f"c{i}", prompt=PROMPT, max_tokens=2), timeout_s=10)
                     for i in range(3)]
        assert all(r.completion is not None for r in after)
        eventually(lambda: _front_health(cluster.front_url).startswith("1 of 2 router(s) connected"), timeout_s=10,
                   what="the front saw the killed replica go", interval_s=0.05)
        assert all(_front_post(cluster.front_url)[0] == 200 for _ in range(3))


def _front_post(url: str) -> tuple[int, str | None]:
    import urllib.request

    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status, resp.headers.get("x-kvr-worker")


def _front_health(url: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=5) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def test_the_front_spec_dials_every_router_with_the_front_args(tmp_path):
    cluster = LocalCluster(ClusterConfig(workers=1, routers=2, run_dir=tmp_path, client_port=5001, front_http_port=0,
                                         front_args=["--curve-dir", "/k"]))
    cluster.replica_ports["router-1"]["clients"] = 5002
    spec = cluster.front_spec()
    assert (spec.name, spec.role) == ("front", "front")
    argv = spec.argv
    assert argv[argv.index("cli.main") + 3] == "front"
    assert argv[argv.index("--router") + 1] == "tcp://127.0.0.1:5001,tcp://127.0.0.1:5002"
    assert argv[argv.index("--http-port") + 1] == "0" and argv[argv.index("--curve-dir") + 1] == "/k"
