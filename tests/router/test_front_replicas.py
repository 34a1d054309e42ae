"""One HTTP front over two live router replicas and emulated workers (``kvr front``): requests
spread over both, a stopped replica gets nothing new, and requests it held before their first
token complete on the other."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from router.http_front import RouterHttpFront
from tests.router.test_replicas import BS, fleet  # noqa: F401  # the fixture
from tests.waiting import eventually

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def front(fleet):  # noqa: F811
    ctx, routers, services = fleet
    f = RouterHttpFront(client_endpoints=[r.service.clients_endpoint for r in routers], ctx=ctx,
                        request_timeout_s=30)
    f.start()
    eventually(lambda: f.stats()["routers"] and all(r["connected"] for r in f.stats()["routers"].values()),
               what="the front connected to both replicas")
    yield f, routers
    f.close()


def _post(front: RouterHttpFront, body: dict) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*front.server.server_address, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, dict(resp.getheaders()), data


def _prompt(i: int, blocks: int = 2) -> list[int]:
    return list(range(i * 1000, i * 1000 + blocks * BS))


def test_requests_spread_over_both_replicas(front) -> None:
    f, routers = front
    for i in range(6):
        status, headers, data = _post(f, {"prompt": _prompt(i), "max_tokens": 2})
        body = json.loads(data)
        assert status == 200, body
        assert headers["x-kvr-worker"] == body["kvr"]["worker_id"] in {"w1", "w2"}
        assert body["usage"]["completion_tokens"] == 2
    # One at a time, so none pending: ties rotate, and each replica routed three.
    assert [r.service.counters["requests"] for r in routers] == [3, 3]


def test_a_stopped_replica_gets_nothing_new(front) -> None:
    f, routers = front
    before = routers[1].service.counters["requests"]
    routers[0].stop()
    eventually(lambda: not f.stats()["routers"][routers[0].service.clients_endpoint]["connected"],
               what="the front saw r1 go")
    for i in range(4):
        status, _, data = _post(f, {"prompt": _prompt(i), "max_tokens": 2})
        assert status == 200, data
    assert routers[1].service.counters["requests"] == before + 4
    assert f.stats()["counters"]["front_failovers"] == 0


@pytest.mark.parametrize("fleet", ["slow"], indirect=True)
def test_requests_a_stopped_replica_held_before_any_token_complete_on_the_other(front) -> None:
    """r1 stops while its two requests are in prefill (routed, no token): the front sends each
    to r2 under the same id; all four HTTP requests end in one 200 each, streamed or not."""
    f, routers = front
    results: dict[int, tuple[int, dict, bytes]] = {}

    def one(i: int) -> None:
        results[i] = _post(f, {"prompt": _prompt(i, blocks=40), "max_tokens": 2, "stream": i % 2 == 1})

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(4)]
    for t in threads:
        t.start()
    eventually(lambda: [r.service.counters["requests"] for r in routers] == [2, 2], timeout_s=10,
               what="two requests on each replica")
    routers[0].stop()  # answers its pending requests ROUTER_RESTARTED; none had a token yet
    for t in threads:
        t.join(30)
    assert sorted(results) == [0, 1, 2, 3]
    for i, (status, _, data) in results.items():
        assert status == 200, data
        if i % 2:
            events = [line[6:] for line in data.decode().split("\n\n") if line.startswith("data: ")]
            assert events[-1] == "[DONE]" and not any('"error"' in e for e in events), events
            assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) != ""
        else:
            assert json.loads(data)["usage"]["completion_tokens"] == 2
    assert f.stats()["counters"]["front_failovers"] == 2
    assert routers[1].service.counters["requests"] == 4
