"""What the router tells about itself: the stats snapshot, and the metrics it publishes.

* The **snapshot** (``RouterService.stats``) is what the HTTP front serves (``/health``,
  ``/metrics``, ``/v1/models``); it is rebuilt on the routing thread and replaced, never mutated,
  so other threads read it without a lock.
* The **metrics PUB** carries one ``RequestRecord`` per finished request and one ``WorkerSample``
  per live target per stats interval, to the monitor (``bus/names.py`` topics). A full queue drops
  the record (``metrics_drops``): metrics must never stall routing.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import zmq

from bus import names
from bus.codec import encode
from bus.mirror_status import as_dict
from bus.schema import Completion, ErrorReply, MirrorStatus, RequestRecord, WorkerSample
from bus.schema import WorkerLoad as WireLoad
from core.prefix_index import PrefixIndex, WorkerKey
from core.routing import RouterCore
from router.ingest import TargetStream
from router.requests import PendingRequest


def stats_snapshot(*, core: RouterCore, index: PrefixIndex, streams: Mapping[WorkerKey, TargetStream],
                   counters: Mapping[str, int], workers: int, pending: int, mirror: MirrorStatus | None,
                   models: frozenset[str]) -> dict[str, Any]:
    live = set(core.targets())
    targets = {}
    for target, stream in streams.items():
        if target not in live:
            continue
        load = core.load(target)
        targets[str(target)] = {
            "indexed_blocks": index.num_blocks(target), "confidence": index.confidence(target).value,
            "in_flight": load.in_flight, "queued_prefill_tokens": load.queued_prefill_tokens,
            "trust": core.trust(target),
            "events_applied": stream.events_applied, "gaps": stream.gaps, "resets": stream.resets,
            "replays": stream.subscriber.counters.replays, "event_lag_s": round(stream.event_lag_s, 6)}
    return {"counters": dict(counters), "workers": workers, "pending": pending,
            "indexed_blocks": index.total_blocks(), "targets": targets,
            "mirror": None if mirror is None else as_dict(mirror),
            "models": sorted(models)}  # what /v1/models lists (the Hellos' names)


def request_record(p: PendingRequest, terminal: Completion | ErrorReply, *, now: float, policy: str) -> RequestRecord:
    """The monitor's record of a request that just ended (times from the router's clock, anchored
    at the wall time it was accepted)."""
    first = p.first_token_s if p.first_token_s is not None else now
    error = terminal.code.value if isinstance(terminal, ErrorReply) else None
    done = terminal if isinstance(terminal, Completion) else None
    return RequestRecord(
        request_id=p.request.request_id, worker_id=p.worker_id, arrival_s=p.accepted_wall_s,
        ttft_s=first - p.accepted_s, e2e_s=now - p.accepted_s, prompt_tokens=len(p.token_ids),
        cached_tokens=0 if done is None else done.cached_tokens,
        output_tokens=0 if done is None else done.output_tokens,
        predicted_cached_tokens=p.predicted_cached_tokens,
        queue_s=0.0 if done is None else done.stats.queue_s, prefill_s=0.0 if done is None else done.stats.prefill_s,
        preemptions=0 if done is None else done.stats.preemptions, policy=policy, error=error)


def worker_samples(*, core: RouterCore, index: PrefixIndex, streams: Mapping[WorkerKey, TargetStream], t_s: float,
                   mirror: MirrorStatus | None, router_id: str = "") -> list[WorkerSample]:
    live = set(core.targets())
    out = []
    for target, stream in streams.items():
        if target not in live:
            continue
        load = core.load(target)
        out.append(WorkerSample(
            worker_id=str(target), t_s=t_s,
            # Capacity from the Hello: the monitor's block-utilisation plot puts the index's block
            # count in % of it, beside kv_usage, and Prometheus exports it (kvr_worker_gpu_blocks).
            load=WireLoad(running=load.running, waiting=load.waiting,
                          queued_prefill_tokens=load.queued_prefill_tokens, kv_usage=load.kv_usage,
                          num_free_blocks=core.free_blocks(target), num_gpu_blocks=core.capacity_blocks(target)),
            indexed_blocks=index.num_blocks(target), confidence=index.confidence(target).value,
            events_applied=stream.events_applied, event_lag_s=stream.event_lag_s, gaps=stream.gaps,
            replays=stream.subscriber.counters.replays, resets=stream.resets, evictions=stream.removed_blocks,
            mirror=mirror, trust=core.trust(target), router_id=router_id))
    return out


class MetricsPublisher:
    """The router's metrics PUB (``RouterConfig.bind_metrics``)."""

    def __init__(self, *, sock: zmq.Socket, counters: Counter[str]) -> None:
        self.sock = sock
        self._counters = counters

    def request(self, record: RequestRecord) -> None:
        self._send(names.REQUEST_METRICS_TOPIC, record)

    def samples(self, samples: list[WorkerSample]) -> None:
        for s in samples:
            self._send(names.WORKER_METRICS_TOPIC, s)

    def _send(self, topic: bytes, record: RequestRecord | WorkerSample) -> None:
        try:
            self.sock.send_multipart([topic, encode(record)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._counters["metrics_drops"] += 1
