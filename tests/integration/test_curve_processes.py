"""``kvr up --curve`` with real processes: keyed clients are served, others get nothing, and a
worker process with keys nobody authorised never registers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import redis
from click.testing import CliRunner

from bus import names
from bus.client import RouterClient
from bus.schema import GenerateRequest
from bus.security import generate_keys
from cli.main import main
from cluster.processes import stop_process

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]


def _kvr(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "cli.main", *args], text=True, cwd=os.getcwd(), **kw)


def test_kvr_up_curve_serves_keyed_clients_only_and_keeps_strangers_out(redis_server, tmp_path) -> None:
    run_dir = tmp_path / "run"
    up = _kvr("up", "--curve", "--run-dir", str(run_dir), "--workers", "2", "--redis-url", redis_server,
              "--namespace", "t-curve", "--no-monitor", "--client-port", "0", "--worker-port", "0", "--metrics-port",
              "0", "--speedup", "50", "--ready-timeout", "30", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    rogue = None
    try:
        first = up.stdout.readline()  # printed once every (authorised) worker registered
        assert first.startswith("kvr cluster ready: 2 workers"), up.stderr.read()
        info = json.loads((run_dir / "cluster.json").read_text())
        keys = info["curve_dir"]
        assert keys == str(run_dir / "keys")
        # An authorised client (kvr send with the keys) is served.
        result = CliRunner().invoke(main, ["send", "--router", info["client_endpoint"], "--curve-dir", keys,
                                           "--timeout", "10", "hello over curve"])
        assert result.exit_code == 0, result.output
        assert "worker worker-" in result.output
        # A client without keys gets no service at all.
        with RouterClient(endpoint=info["client_endpoint"]) as client:
            with pytest.raises(TimeoutError):
                client.generate(GenerateRequest(request_id="nokey", prompt="hi", max_tokens=1), timeout_s=1.5)
        # A worker process with a valid key pair that nobody authorised never registers.
        stranger = tmp_path / "stranger"
        generate_keys(stranger, ("worker",))
        (stranger / "router.key").write_bytes((run_dir / "keys" / "router.key").read_bytes())
        rogue = _kvr("worker", "--id", "rogue", "--router", info["worker_endpoint"], "--curve-dir", str(stranger),
                     "--speedup", "50", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        r = redis.Redis.from_url(redis_server)
        time.sleep(2.0)
        assert rogue.poll() is None  # it is running, retrying: just never let in
        assert sorted(m.decode() for m in r.smembers(names.workers_key("t-curve"))) == ["worker-0", "worker-1"]
        router_log = (run_dir / "logs" / "router.log").read_text()
        assert "refused a CURVE handshake on kvr-workers" in router_log
        r.close()
    finally:
        if rogue is not None:
            rogue.kill()
            rogue.wait()
        assert stop_process(up, sig=signal.SIGINT, timeout_s=30).returncode == 0
