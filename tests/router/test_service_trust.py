"""The router's closed-loop trust (core/trust.py) over real sockets: a worker whose reported cached
tokens fall short of its published blocks loses its overlap, has its entries resynced, and gets
it back once its reports agree."""

from __future__ import annotations

import logging

import pytest
import zmq

from bus.client import RouterClient
from bus.codec import encode
from bus.schema import Completion, Dispatch, GenerateRequest, TokenChunk, Welcome
from core.prefix_index import Confidence, WorkerKey
from core.trust import TrustConfig
from router.prometheus import render_metrics
from router.service import RouterService
from tests.prometheus_text import metric_value
from tests.router.test_service import BS, FakeWorker, RunningRouter, _config, wait_for

pytestmark = pytest.mark.timeout(60)
LIAR, HONEST = WorkerKey("liar", 0), WorkerKey("honest", 0)
PROMPT = list(range(1000, 1000 + 8 * BS + 5))  # 8 full blocks: 128 tokens predicted where all are held


class ReportingWorker(FakeWorker):
    """Completes every request at once, reporting ``reports`` cached tokens."""

    reports = 0

    def on_dispatch(self, d: Dispatch) -> None:
        self.sock.send(encode(TokenChunk(d.request_id, [7])))
        self.sock.send(encode(Completion(d.request_id, self.wid, len(d.token_ids), self.reports, 1)))


def _routed(router: RouterService, client: RouterClient, workers: list[ReportingWorker], rid: str,
            *, pin: str | None = None) -> str:
    """One request for PROMPT, to its end; returns the worker it went to."""
    res = client.send(GenerateRequest(rid, token_ids=PROMPT, max_tokens=1, worker_id=pin))
    wait_for(lambda: res.done, workers, client)
    assert res.completion is not None and res.routed is not None
    return res.routed.worker_id


def _publish_and_wait(router: RouterService, w: ReportingWorker, workers: list[ReportingWorker]) -> None:
    w.store(PROMPT)
    wait_for(lambda: router.index.num_blocks(WorkerKey(w.wid, 0)) == 8, workers)


def test_a_liar_loses_its_overlap_is_resynced_and_recovers_once_its_reports_agree(
        ctx: zmq.Context, caplog: pytest.LogCaptureFixture) -> None:
    running = RunningRouter(_config(trust=TrustConfig(min_samples=4, min_distrusted_s=0.0)))
    router = running.service
    liar = ReportingWorker(ctx, router.workers_endpoint, "liar")
    honest = ReportingWorker(ctx, router.workers_endpoint, "honest")
    honest.reports = 128
    workers = [liar, honest]
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    caplog.set_level(logging.WARNING, logger="router.service")
    try:
        for w in workers:
            w.hello()
        wait_for(lambda: all(any(isinstance(m, Welcome) for m in w.received) for w in workers), workers)
        _publish_and_wait(router, liar, workers)  # claims PROMPT, reports 0 cached
        # Trusted: the claim wins every request until four reports (min_samples) fell short.
        assert [_routed(router, client, workers, f"a{i}") for i in range(4)] == ["liar"] * 4
        assert router.counters["trust_downgrades"] == 1 and router.core.trust(LIAR) == 0.0
        assert router.trust is not None and router.trust.weight(LIAR) == 0.0
        # Resynced as after a lost gap: entries cleared, resyncing.
        assert router.index.num_blocks(LIAR) == 0 and router.index.confidence(LIAR) is Confidence.RESYNCING
        # It keeps lying, and the honest worker holds PROMPT too: the claim now counts for nothing.
        _publish_and_wait(router, liar, workers)
        _publish_and_wait(router, honest, workers)
        assert {_routed(router, client, workers, f"b{i}") for i in range(8)} == {"honest"}
        assert router.counters["trust_downgrades"] == 1 and router.counters["trust_recoveries"] == 0
        # Its reports agree again (pinned requests, so that it gets some): trusted again.
        liar.reports = 128
        for i in range(4):
            assert _routed(router, client, workers, f"c{i}", pin="liar") == "liar"
        assert router.counters["trust_recoveries"] == 1 and router.core.trust(LIAR) == 1.0
        assert router.core.trust(HONEST) == 1.0 and router.counters["trust_downgrades"] == 1
        # One WARNING per transition, none per request.
        trust_logs = [r.getMessage() for r in caplog.records if "trust" in r.getMessage()]
        assert len(trust_logs) == 2
        assert trust_logs[0].startswith("liar/0: trust 0.00: reported cached tokens fell 100% short")
        assert trust_logs[1].startswith("liar/0: trust restored")
        router.refresh_stats()
        text = render_metrics(router.stats)
        assert metric_value(text, "kvr_router_trust_downgrades_total") == 1
        assert metric_value(text, "kvr_router_trust_recoveries_total") == 1
        assert router.stats["targets"]["liar/0"]["trust"] == 1.0
    finally:
        client.close()
        for w in workers:
            w.close()
        running.stop()


def test_trust_off_keeps_routing_on_the_claim(ctx: zmq.Context) -> None:
    running = RunningRouter(_config(trust=None))
    router = running.service
    liar = ReportingWorker(ctx, router.workers_endpoint, "liar")
    honest = ReportingWorker(ctx, router.workers_endpoint, "honest")
    workers = [liar, honest]
    client = RouterClient(endpoint=router.clients_endpoint, ctx=ctx)
    try:
        for w in workers:
            w.hello()
        wait_for(lambda: all(any(isinstance(m, Welcome) for m in w.received) for w in workers), workers)
        _publish_and_wait(router, liar, workers)
        assert [_routed(router, client, workers, f"a{i}") for i in range(10)] == ["liar"] * 10
        assert router.trust is None and router.counters["trust_downgrades"] == 0
        assert router.index.num_blocks(LIAR) == 8
    finally:
        client.close()
        for w in workers:
            w.close()
        running.stop()
