"""The monitor over real ZMQ sockets and real HTTP on loopback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import zmq

from bus import names
from bus.codec import encode
from monitor.dump import load_dump
from monitor.service import MonitorService
from monitor.state import MonitorState
from tests.conftest import free_port
from tests.monitor.records import request, sample

pytestmark = pytest.mark.integration


def _until(cond, timeout_s=5.0, step=None):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if step:
            step()
        if cond():
            return True
        time.sleep(0.02)
    return False


@pytest.fixture
def pub():
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUB)
    sock.setsockopt(zmq.LINGER, 0)
    port = free_port()
    sock.bind(f"tcp://127.0.0.1:{port}")
    yield sock, f"tcp://127.0.0.1:{port}"
    sock.close(linger=0)
    ctx.term()


def _get(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return resp.status, resp.read().decode()


def test_records_over_zmq_reach_the_fold_metrics_json_and_the_dump(pub, tmp_path):
    sock, endpoint = pub
    ctx = zmq.Context()
    svc = MonitorService(metrics_endpoints=[endpoint], state=MonitorState(block_size=16),
                         dump_path=tmp_path / "m.json", http_port=0, ctx=ctx)
    try:
        svc.start()
        recs = [request("a", cached=48), request("b", cached=0), sample("w0", t=time.time(), gaps=1)]

        def publish():
            # PUB drops until the subscription arrives: resend a probe until the first is folded.
            if svc.state.records == 0:
                sock.send_multipart([names.REQUEST_METRICS_TOPIC, encode(recs[0])])
            svc.poll_once(20)

        assert _until(lambda: svc.state.records >= 1, step=publish)
        sock.send_multipart([names.REQUEST_METRICS_TOPIC, encode(recs[1])])
        sock.send_multipart([names.WORKER_METRICS_TOPIC, encode(recs[2])])
        sock.send_multipart([names.REQUEST_METRICS_TOPIC, b"\xc1garbage"])
        base = svc.state.records
        assert _until(lambda: svc.state.decode_errors == 1 and svc.state.records == base + 2,
                      step=lambda: svc.poll_once(20))
        status, text = _get(f"http://127.0.0.1:{svc.http_port}/metrics")
        assert status == 200
        assert 'kvr_requests_total{cache_status="miss"} 1' in text
        assert "kvr_monitor_decode_errors_total 1" in text
        status, body = _get(f"http://127.0.0.1:{svc.http_port}/json")
        live = json.loads(body)
        assert live["summary"]["requests"] == svc.state.fold.summary()["requests"]
        assert live["workers"]["w0"]["gaps"] == 1
        assert _get(f"http://127.0.0.1:{svc.http_port}/healthz") == (200, "ok\n")
        with pytest.raises(urllib.error.HTTPError):
            _get(f"http://127.0.0.1:{svc.http_port}/nope")
        assert svc.dump_now() == tmp_path / "m.json"
        assert load_dump(tmp_path / "m.json")["summary"]["requests"] == live["summary"]["requests"]
    finally:
        svc.close()
        ctx.term()


def test_the_monitor_process_dumps_on_sigusr1_and_at_exit(pub, tmp_path):
    sock, endpoint = pub
    dump = tmp_path / "mon.json"
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cli.main", "monitor", "--metrics-endpoint", endpoint, "--dump", str(dump),
         "--dump-interval", "3600", "--http-port", str(port), "--label", "t1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=os.getcwd(),
    )
    try:
        def healthy():
            try:
                return _get(f"http://127.0.0.1:{port}/healthz")[0] == 200
            except OSError:
                return False

        # Signals only once the handlers are installed (they are before HTTP starts serving).
        assert _until(healthy, timeout_s=15), "monitor did not start"

        sent = []

        def send_and_signal():
            sock.send_multipart([names.REQUEST_METRICS_TOPIC, encode(request(f"a{len(sent)}", cached=48))])
            sent.append(1)
            proc.send_signal(signal.SIGUSR1)
            time.sleep(0.1)

        def dumped_one():
            try:
                return load_dump(dump)["summary"]["requests"] >= 1
            except Exception:
                return False

        assert _until(dumped_one, timeout_s=15, step=send_and_signal), (
            proc.stderr.read1().decode() if proc.poll() is not None else "")
        n = load_dump(dump)["summary"]["requests"]
        sock.send_multipart([names.REQUEST_METRICS_TOPIC, encode(request("z", cached=0))])
        time.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        final = load_dump(dump)
        assert final["label"] == "t1"
        # The final dump at exit has the last record (and any "a" still in flight at the SIGUSR1 dump).
        assert n + 1 <= final["summary"]["requests"] <= len(sent) + 1
        assert [r["request_id"] for r in final["recent_requests"]][-1] == "z"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
