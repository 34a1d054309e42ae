"""``kvr front``: one HTTP front over router replicas, as a process (its ready line, requests over
both replicas, a clean stop) and its one-line errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cli.front import router_list
from cli.main import main
from tests.router.test_replicas import fleet  # noqa: F401  # the fixture
from tests.worker.test_worker_cli import http, spawn_ready, stop

pytestmark = pytest.mark.timeout(90)


def test_help_names_the_router_option() -> None:
    result = CliRunner().invoke(main, ["front", "--help"])
    assert result.exit_code == 0 and "--router" in result.output and "--http-port" in result.output


def test_router_list_takes_repeats_and_commas() -> None:
    assert router_list(("tcp://a:1, tcp://b:2", "tcp://c:3")) == ["tcp://a:1", "tcp://b:2", "tcp://c:3"]
    assert router_list((" , ",)) == []


@pytest.mark.parametrize("routers", [["bogus"], ["tcp://127.0.0.1:1,tcp://127.0.0.1:1"], [","]])
def test_a_bad_router_list_is_a_one_line_error(routers: list[str]) -> None:
    result = CliRunner().invoke(main, ["front", *(a for r in routers for a in ("--router", r)), "--http-port", "0"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --router"), result.output


def test_a_busy_http_port_is_a_one_line_error() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = CliRunner().invoke(main, ["front", "--router", "tcp://127.0.0.1:1", "--http-port", str(port)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [result.output.strip()]
    assert result.output.startswith(f"Error: cannot serve HTTP on 127.0.0.1:{port}")


def test_the_front_serves_over_both_replicas_and_stops_cleanly(fleet, tmp_path) -> None:  # noqa: F811
    _, routers, _ = fleet
    endpoints = [r.service.clients_endpoint for r in routers]
    ready_file = tmp_path / "front.json"
    proc, ready = spawn_ready("front", "--router", ",".join(endpoints), "--http-port", "0", "--model-name", "m",
                              ready_file=ready_file)
    try:
        assert (ready["component"], ready["id"], ready["pid"]) == ("front", "front", proc.pid)
        url = ready["endpoints"]["http"]
        assert list(ready["endpoints"]) == ["http"] and url.startswith("http://127.0.0.1:") and ready_file.exists()
        from tests.waiting import eventually

        def health() -> bool:
            import urllib.error
            import urllib.request

            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as resp:
                    return resp.read().decode().startswith("2 of 2 router(s) connected")
            except urllib.error.HTTPError:
                return False

        eventually(health, timeout_s=10, what="the front connected to both replicas", interval_s=0.05)
        status, _, models = http("GET", url + "/v1/models")
        assert status == 200 and [m["id"] for m in models["data"]] == ["m"]
        for i in range(4):
            status, headers, body = http("POST", url + "/v1/completions",
                                         {"model": "m", "prompt": list(range(i * 100, i * 100 + 32)), "max_tokens": 2})
            assert status == 200 and headers["x-kvr-worker"] == body["kvr"]["worker_id"], body
        assert [r.service.counters["requests"] for r in routers] == [2, 2]
    finally:
        code, stderr = stop(proc)
    assert code == 0 and "Traceback" not in stderr, stderr[-2000:]
    assert not ready_file.exists()
