"""The router service: sockets around ``RouterCore`` (one thread owns every socket).

::

    clients DEALER ──GenerateRequest/Cancel──▶ ROUTER (bind_clients)  ──Routed/TokenChunk/Completion/ErrorReply──▶
    workers DEALER ──Hello/Heartbeat/tokens──▶ ROUTER (bind_workers)  ──Welcome/Heartbeat/Dispatch/Cancel──▶
    worker PUB ──KV events──▶ SUB per (worker, dp_rank)   (router/ingest.py)
    metrics PUB (bind_metrics) ──[topic, RequestRecord | WorkerSample]──▶ monitor

Guarantees:

* **Exactly one terminal reply** (``Completion`` or ``ErrorReply``) per accepted request: a
  request leaves the pending table only through ``_finish``, which sends that reply.
* **Worker death** (silent for ``interval × liveness``, a ``Goodbye``, or a new epoch): its
  targets leave the core and the index; each of its requests that streamed no token yet is
  routed again elsewhere (up to ``max_retries``), the others end with ``WORKER_DIED``.
* **Bad input never crashes the loop**: undecodable frames and messages from unknown peers are
  counted and logged. Peers that are not registered get no heartbeats, so a worker that outlived
  a router restart times out and says ``Hello`` again.
* Request ids are the client's; internally each request gets a router-unique id (two clients may
  use the same ids), which is what workers see.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from bus import names
from bus.codec import DecodeError, client_decoder, encode, salvage_request_id, worker_decoder
from bus.schema import (
    PROTOCOL_VERSION, Cancel, CancelRequest, Completion, Dispatch, ErrorCode, ErrorReply, GenerateRequest, Goodbye,
    Heartbeat, Hello, Refused, RequestRecord, RequestStats, Routed, TokenChunk, Welcome, WorkerLoad as WireLoad, WorkerSample,
)  # fmt: skip
from bus.security import CLIENTS_DOMAIN, WORKERS_DOMAIN, Curve, ZapHandler, is_public_key
from bus.sockets import MAX_CONTROL_BYTES, MAX_EVENT_BYTES, MAX_REQUEST_BYTES, make_router, make_socket
from core.admission import AdmissionLimits, check_prompt_length, check_request
from core.liveness import HeartbeatConfig, LivenessTracker
from core.prefix_index import Confidence, PrefixIndex, WorkerKey
from core.routing import NoTargetsError, RouterCore, RoutingInput
from core.tokenizer import BuiltinTokenizer
from router.ingest import EventIngest
from router.mirror import MirrorUnavailable, RedisMirror

logger = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: zmq's enum flags cost an enum operation per send
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)


@dataclass
class RouterConfig:
    # Loopback unless told otherwise (``kvr router --bind-host``; cli/bind.py).
    bind_clients: str = f"tcp://127.0.0.1:{names.ROUTER_CLIENTS_PORT}"
    bind_workers: str = f"tcp://127.0.0.1:{names.ROUTER_WORKERS_PORT}"
    bind_metrics: str | None = None
    policy: str = "kvr"
    policy_options: dict = field(default_factory=dict)
    block_size: int = 16
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    request_timeout_s: float = 300.0
    max_pending: int = 4096
    max_retries: int = 2
    tentative_window_s: float = 5.0
    stats_interval_s: float = 1.0
    mirror_check_s: float = 0.25  # how often the router checks Redis is there and still holds its mirror
    housekeeping_s: float = 0.02  # liveness, heartbeats, timeouts, replay retries: at most this often
    router_id: str = "router"
    limits: AdmissionLimits = field(default_factory=AdmissionLimits)
    # Inbound frame limits (bus/sockets.py): a bigger frame drops its sender's connection.
    max_request_bytes: int = MAX_REQUEST_BYTES  # client requests and worker messages
    max_event_bytes: int = MAX_EVENT_BYTES  # KV-event batches, live and replayed


@dataclass
class _Pending:
    key: str  # router-unique id, what workers see
    client: bytes
    request: GenerateRequest
    token_ids: list[int]
    accepted_s: float
    accepted_wall_s: float
    deadline_s: float
    target: WorkerKey | None = None
    predicted_cached_tokens: int = 0
    streamed: bool = False
    first_token_s: float | None = None
    retries: int = 0
    tried: set = field(default_factory=set)


@dataclass
class _Worker:
    identity: bytes
    hello: Hello
    targets: list[WorkerKey]


class RouterService:
    """Serve clients and workers until ``stop()``. Collaborators are injectable for tests."""

    def __init__(
        self,
        config: RouterConfig,
        *,
        mirror: RedisMirror | None = None,
        ctx: zmq.Context | None = None,
        tokenizer=None,
        latency=None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
        curve: Curve | None = None,
    ) -> None:
        """``curve`` (bus/security.py): both ROUTERs are CURVE servers admitting only the
        authorised worker / client keys, and event sockets of workers that name a key are
        dialled as CURVE clients."""
        from core.policies import get_policy

        self.config = config
        self._clock, self._wall = clock, wall
        self._own_ctx = ctx is None
        self._ctx = ctx or zmq.Context()
        self.tokenizer = tokenizer or BuiltinTokenizer()
        self.index = PrefixIndex(block_size=config.block_size)
        self._latency_given = latency is not None
        policy = get_policy(config.policy, block_size=config.block_size, latency=latency, **config.policy_options)
        self.core = RouterCore(policy=policy, index=self.index, block_size=config.block_size,
                               tentative_window_s=config.tentative_window_s)
        self.mirror = mirror
        self.liveness = LivenessTracker(config.heartbeat)
        self.counters: Counter[str] = Counter()
        self.curve = curve
        self._zap = ZapHandler.for_context(self._ctx) if curve is not None else None
        self._clients, self.clients_endpoint = make_router(
            self._ctx, config.bind_clients, max_msg_size=config.max_request_bytes,
            setup=None if curve is None else lambda s: curve.serve(s, domain=CLIENTS_DOMAIN, allow=curve.clients))
        self._workers_sock, self.workers_endpoint = make_router(
            self._ctx, config.bind_workers, max_msg_size=config.max_request_bytes,
            setup=None if curve is None else lambda s: curve.serve(s, domain=WORKERS_DOMAIN, allow=curve.workers))
        self._metrics = None
        self.metrics_endpoint = None
        if config.bind_metrics:
            self._metrics = make_socket(self._ctx, zmq.PUB, max_msg_size=MAX_CONTROL_BYTES)
            self._metrics.bind(config.bind_metrics)
            self.metrics_endpoint = self._metrics.getsockopt(zmq.LAST_ENDPOINT).decode()
        self._poller = zmq.Poller()
        self._poller.register(self._clients, zmq.POLLIN)
        self._poller.register(self._workers_sock, zmq.POLLIN)
        self.ingest = EventIngest(index=self.index, poller=self._poller, ctx=self._ctx, mirror=mirror, clock=clock,
                                  wall=wall, curve=curve, max_event_bytes=config.max_event_bytes)
        self._snapshots = self.ingest.warm_start()
        self._client_decoder, self._worker_decoder = client_decoder(), worker_decoder()
        self.workers: dict[str, _Worker] = {}
        self._identities: dict[bytes, str] = {}  # worker DEALER identity -> worker id
        self._models_served: frozenset[str] = frozenset()  # of the registered workers (_refresh_fleet)
        self._min_model_len = 0  # smallest max_model_len a registered worker gave (0: none known)
        self.pending: dict[str, _Pending] = {}
        self._by_client: dict[tuple[bytes, str], str] = {}
        self._ids = itertools.count(1)
        self._next_stats_s = clock() + config.stats_interval_s
        #: This router's incarnation, in its heartbeats and Welcome (workers notice a restart by it).
        self.epoch = int(wall() * 1e6)
        self._nudged: dict[bytes, float] = {}  # unknown peer -> when it was last asked to say Hello
        self._next_mirror_check_s = clock()
        self._mirror_generation: str | None = None  # Redis data set last seen (RedisMirror.router_heartbeat)
        self._mirror_down = False
        self._next_housekeeping_s = clock()
        self._stopped = False
        #: A snapshot for other threads (the HTTP front): replaced, never mutated.
        self.stats: dict = {}
        self._refresh_stats()

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        self._stopped = True

    def run(self) -> None:
        try:
            while not self._stopped:
                self.run_once()
        finally:
            self.close()

    def run_once(self, max_wait_ms: int = 100) -> None:
        now = self._clock()
        deadlines = [d for d in (self.ingest.next_deadline_s(), self._next_housekeeping_s) if d is not None]
        wait_ms = max(0, min(max_wait_ms, int((min(deadlines) - now) * 1000) + 1))
        for sock, _ in self._poller.poll(wait_ms):
            if sock is self._clients:
                self._drain(self._clients, self._client_decoder, self._on_client)
            elif sock is self._workers_sock:
                self._drain(self._workers_sock, self._worker_decoder, self._on_worker)
            else:
                try:
                    self.ingest.handle(sock)
                except Exception:  # a bug on one batch must not take routing down; the stream gap-checks on
                    self.counters["ingest_errors"] += 1
                    logger.exception("error ingesting KV events")
        now = self._clock()
        if now >= self._next_housekeeping_s:
            # O(workers + pending) upkeep, paced so a busy loop does not pay it per message.
            self._next_housekeeping_s = now + self.config.housekeeping_s
            self._tick(now)

    def _drain(self, sock: zmq.Socket, decoder, handler) -> None:
        for _ in range(1000):  # bounded: one busy peer must not starve the others
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self.counters["bad_frames"] += 1
                continue
            try:
                msg = decoder.decode(frames[1])
            except DecodeError as exc:
                self.counters["bad_messages"] += 1
                logger.warning("undecodable message from %s: %s", frames[0].hex(), exc)
                if sock is self._clients:
                    self._answer_malformed(frames[0], frames[1], exc)
                continue
            try:
                handler(frames[0], msg)
            except Exception:  # a bug handling one message must not take the router down
                self.counters["handler_errors"] += 1
                logger.exception("error handling %s", type(msg).__name__)

    def _answer_malformed(self, client: bytes, frame: bytes, exc: DecodeError) -> None:
        """A generate request with a field of the wrong type still names its id: answer it
        (``BAD_REQUEST``, msgspec's words say which field) rather than let the client wait. Not
        when that id is in flight: the error would end the client's other request."""
        rid = salvage_request_id(frame, max_chars=self.config.limits.max_id_chars)
        if rid is None or (client, rid) in self._by_client:
            return
        self.counters["rejected_bad_request"] += 1
        self._reply(client, ErrorReply(rid, ErrorCode.BAD_REQUEST, f"malformed request: {exc}"))

    def _tick(self, now: float) -> None:
        self.ingest.tick()
        deadline = self.liveness.next_deadline()
        if deadline is not None and now >= deadline:
            # Read what is waiting before declaring anyone dead: after a stall of this loop (CPU
            # starvation, a slow handler) the workers' beats sit unread, they were not silent.
            self._drain(self._workers_sock, self._worker_decoder, self._on_worker)
            now = max(now, self._clock())
        for wid in self.liveness.expired(now):
            logger.warning("worker %s missed %d heartbeats: dead", wid, self.config.heartbeat.liveness)
            self._worker_gone(str(wid), ErrorCode.WORKER_DIED, "worker stopped answering heartbeats")
        stale_after = self.config.heartbeat.interval_s * 1.5
        for wid, w in self.workers.items():
            last = self.liveness.last_seen(wid)
            stale = last is not None and now - last > stale_after
            for t in w.targets:
                if stale:
                    self.index.set_confidence(t, Confidence.STALE)
                elif self.index.confidence(t) is Confidence.STALE:
                    self.index.set_confidence(t, Confidence.FRESH)
            if self.liveness.send_due(wid, now):
                self._send_worker(w.identity, Heartbeat(sender_id=self.config.router_id, epoch=self.epoch))
                self.liveness.sent(wid, now)
        for key in [k for k, p in self.pending.items() if now >= p.deadline_s]:
            p = self.pending[key]
            if p.target is not None and p.target.worker_id in self.workers:
                self._send_worker(self.workers[p.target.worker_id].identity, Cancel(key))
            self._finish(p, ErrorReply(p.request.request_id, ErrorCode.TIMEOUT,
                                       f"no result within {self.config.request_timeout_s} s", _wid(p.target)))
        self.core.expire(now)
        if self.mirror is not None and now >= self._next_mirror_check_s:
            self._next_mirror_check_s = now + self.config.mirror_check_s
            self._check_mirror()
        if now >= self._next_stats_s:
            self._next_stats_s = now + self.config.stats_interval_s
            self._publish_samples()
            self._refresh_stats()

    # ------------------------------------------------------------------ clients

    def _on_client(self, client: bytes, msg) -> None:
        if isinstance(msg, CancelRequest):
            key = self._by_client.get((client, msg.request_id))
            if key is None:
                self.counters["cancel_unknown"] += 1
                return
            p = self.pending[key]
            if p.target is not None and p.target.worker_id in self.workers:
                self._send_worker(self.workers[p.target.worker_id].identity, Cancel(key))
            self._finish(p, ErrorReply(msg.request_id, ErrorCode.CANCELLED, "cancelled by the client", _wid(p.target)))
            return
        req: GenerateRequest = msg
        now = self._clock()
        self.counters["requests"] += 1
        if (client, req.request_id) in self._by_client:
            self.counters["rejected_bad_request"] += 1
            self._reply(client, ErrorReply(req.request_id, ErrorCode.BAD_REQUEST, "request_id already in flight"))
            return
        rejection = check_request(request_id=req.request_id, prompt=req.prompt, token_ids=req.token_ids,
                                  max_tokens=req.max_tokens, model=req.model, limits=self.config.limits)
        if rejection is not None:
            self.counters[f"rejected_{rejection.code}"] += 1
            self._reply(client, ErrorReply(req.request_id, ErrorCode(rejection.code), rejection.message))
            return
        if len(self.pending) >= self.config.max_pending:
            self.counters["overloaded"] += 1
            self._reply(client, ErrorReply(req.request_id, ErrorCode.OVERLOADED,
                                           f"{len(self.pending)} requests in flight (limit {self.config.max_pending})"))
            return
        tokens = req.token_ids if req.token_ids is not None else self.tokenizer.encode(req.prompt)
        if req.token_ids is None:
            rejection = check_prompt_length(len(tokens), self.config.limits)
            if rejection is not None:
                self.counters[f"rejected_{rejection.code}"] += 1
                self._reply(client, ErrorReply(req.request_id, ErrorCode(rejection.code), rejection.message))
                return
        unfit = self._unfit_targets(req, len(tokens))
        if isinstance(unfit, ErrorReply):
            self.counters[f"rejected_{unfit.code.value}"] += 1
            self._reply(client, unfit)
            return
        key = f"{self.config.router_id}-{next(self._ids)}"
        p = _Pending(key, client, req, tokens, now, self._wall(), now + self.config.request_timeout_s)
        if unfit:
            p.tried.update(unfit)  # never routed there, not even on a retry
        self.pending[key] = p
        self._by_client[(client, req.request_id)] = key
        self._dispatch(p, now)

    def _unfit_targets(self, req: GenerateRequest, num_tokens: int) -> set[WorkerKey] | ErrorReply:
        """Targets that cannot take ``req`` (another model, a max_model_len too short for the
        prompt), or the error when no registered worker can: what the Hellos say is answered at
        once, not after a round trip to a worker that would refuse it."""
        if (req.model is None or req.model in self.config.limits.models
                or (len(self._models_served) == 1 and req.model in self._models_served)) and (
                not self._min_model_len or num_tokens < self._min_model_len):
            return set()  # the common case: every worker can take it (no per-worker scan)
        unfit: set[WorkerKey] = set()
        other_model = longest = 0
        for w in self.workers.values():
            h = w.hello
            if req.model is not None and h.model != req.model and req.model not in self.config.limits.models:
                other_model += 1
                unfit.update(w.targets)
            elif h.max_model_len and num_tokens >= h.max_model_len:
                longest = max(longest, h.max_model_len)
                unfit.update(w.targets)
        if not self.workers or any(t not in unfit for w in self.workers.values() for t in w.targets):
            return unfit
        if other_model == len(self.workers):
            return ErrorReply(req.request_id, ErrorCode.UNKNOWN_MODEL, f"model {req.model!r} is not served here "
                              f"(served: {', '.join(sorted(self._models_served))})")
        return ErrorReply(req.request_id, ErrorCode.PROMPT_TOO_LONG,
                          f"the prompt ({num_tokens} tokens) leaves no room for output under max_model_len {longest} "
                          f"(the longest of the workers{'' if req.model is None else f' serving {req.model!r}'})")

    def _refresh_fleet(self) -> None:
        """What requests are checked against (``_unfit_targets``), on every registry change."""
        self._models_served = frozenset(w.hello.model for w in self.workers.values())
        self._min_model_len = min((w.hello.max_model_len for w in self.workers.values() if w.hello.max_model_len > 0),
                                  default=0)

    def _dispatch(self, p: _Pending, now: float) -> None:
        """Route (again) and send; a request nothing can take ends with ``NO_WORKERS``."""
        req = p.request
        try:
            res = self.core.route(RoutingInput(p.key, p.token_ids, req.max_tokens, req.lora_name, req.cache_salt,
                                               req.worker_id), now=now, exclude=p.tried)
        except NoTargetsError as exc:
            self._finish(p, ErrorReply(req.request_id, ErrorCode.NO_WORKERS, str(exc)))
            return
        d = res.decision
        p.target = d.target
        p.tried.add(d.target)
        p.predicted_cached_tokens = res.in_flight.predicted_cached_tokens
        self._reply(p.client, Routed(req.request_id, d.target.worker_id, d.target.dp_rank, d.overlap_blocks,
                                     p.predicted_cached_tokens, d.policy, d.reason))
        self._send_worker(self.workers[d.target.worker_id].identity,
                          Dispatch(p.key, p.token_ids, req.max_tokens, d.target.dp_rank, req.lora_name, req.cache_salt))

    def _finish(self, p: _Pending, terminal: Completion | ErrorReply) -> None:
        """The only way out of the pending table: exactly one terminal reply."""
        self.pending.pop(p.key, None)
        self._by_client.pop((p.client, p.request.request_id), None)
        self.core.on_finish(p.key)
        self.counters["completed" if isinstance(terminal, Completion) else f"error_{terminal.code.value}"] += 1
        if isinstance(terminal, Completion):
            gap = p.predicted_cached_tokens - terminal.cached_tokens
            self.counters["closed_loop_abs_gap_tokens"] += abs(gap)
            self.counters["predicted_cached_tokens"] += p.predicted_cached_tokens
            self.counters["actual_cached_tokens"] += terminal.cached_tokens
        self._reply(p.client, terminal)
        self._publish_request(p, terminal)

    # ------------------------------------------------------------------ workers

    def _on_worker(self, identity: bytes, msg) -> None:
        now = self._clock()
        if isinstance(msg, Hello):
            self._on_hello(identity, msg, now)
            return
        worker = self._worker_by_identity(identity)
        if worker is None:
            # A worker registered with an earlier incarnation of this router (it restarted), one this
            # router declared dead while it was stalled, or one whose Hello was lost. "Not known"
            # makes it say Hello at once instead of after its liveness timeout; at most 1/s per peer.
            self.counters["unknown_peer_messages"] += 1
            if now - self._nudged.get(identity, -1e9) >= 1.0:
                if len(self._nudged) > 10_000:
                    self._nudged.clear()
                self._nudged[identity] = now
                self.counters["unknown_peers_nudged"] += 1
                self._send_worker(identity, Heartbeat(sender_id=self.config.router_id, epoch=self.epoch, known=False))
            return
        wid = worker.hello.worker_id
        self.liveness.seen(wid, now)
        if isinstance(msg, Heartbeat):
            if msg.load is not None:
                l = msg.load
                self.core.update_load(WorkerKey(wid, msg.dp_rank), running=l.running, waiting=l.waiting,
                                      queued_prefill_tokens=l.queued_prefill_tokens, kv_usage=l.kv_usage)
            self._mirror_call(lambda: self.mirror.touch_worker(wid, epoch=worker.hello.epoch, load=msg.load,
                                                               now_s=self._wall(),
                                                               ttl_s=self.config.heartbeat.timeout_s),
                              refresh=True)
        elif isinstance(msg, Goodbye):
            self._worker_gone(wid, ErrorCode.WORKER_DIED, "worker left")
        elif isinstance(msg, (TokenChunk, Completion, ErrorReply)):
            self._on_result(wid, msg, now)

    def _on_hello(self, identity: bytes, hello: Hello, now: float) -> None:
        cfg = self.config
        if hello.protocol_version != PROTOCOL_VERSION or hello.block_size != cfg.block_size:
            reason = (f"protocol {hello.protocol_version} != {PROTOCOL_VERSION}" if hello.protocol_version != PROTOCOL_VERSION
                      else f"block_size {hello.block_size} != the router's {cfg.block_size}")
            logger.warning("refusing worker %s: %s", hello.worker_id, reason)
            self._send_worker(identity, Refused(reason))
            return
        if hello.events_curve_key and not is_public_key(hello.events_curve_key):
            logger.warning("refusing worker %s: events_curve_key is not a z85 CURVE public key", hello.worker_id)
            self._send_worker(identity, Refused("events_curve_key is not a z85 CURVE public key (40 characters)"))
            return
        old = self.workers.get(hello.worker_id)
        if old is not None and (old.hello.epoch != hello.epoch or old.hello.events_endpoint != hello.events_endpoint):
            self._worker_gone(hello.worker_id, ErrorCode.WORKER_DIED, "worker restarted")
            old = None
        if old is None:
            resume = {t.dp_rank: s for t, s in self._snapshots.items() if t.worker_id == hello.worker_id}
            targets = self.ingest.add_worker(hello, resume=resume)
            for t in targets:
                self.core.register(t, capacity_blocks=hello.num_gpu_blocks)
            self.workers[hello.worker_id] = _Worker(identity, hello, targets)
            self._identities[identity] = hello.worker_id
            self._adopt_latency(hello)
            self._refresh_fleet()
            logger.info("worker %s registered (epoch %d, %d rank(s), events %s)", hello.worker_id, hello.epoch,
                        len(targets), hello.events_endpoint)
        else:
            self._identities.pop(old.identity, None)
            old.identity = identity  # reconnected with a new DEALER; same incarnation, same index
            self._identities[identity] = hello.worker_id
        self.liveness.seen(hello.worker_id, now)
        self._refresh_stats()
        self._nudged.pop(identity, None)
        self._send_worker(identity, Welcome(cfg.router_id, cfg.heartbeat.interval_s, cfg.heartbeat.liveness,
                                            router_epoch=self.epoch))
        self.liveness.sent(hello.worker_id, now)
        self._mirror_call(lambda: self.mirror.register_worker(hello, now_s=self._wall(), ttl_s=cfg.heartbeat.timeout_s))

    def _adopt_latency(self, hello: Hello) -> None:
        """kvr's TTFT model: the engine profile the first worker names, unless one was given."""
        policy = self.core.policy
        if self._latency_given or not hello.profile or not hasattr(policy, "latency"):
            return
        try:
            from core.profiles import get_profile

            policy.latency = get_profile(hello.profile).latency
            self._latency_given = True
            logger.info("policy latency model: profile %s", hello.profile)
        except (KeyError, ValueError):
            logger.warning("unknown engine profile %r: keeping the default latency model", hello.profile)

    def _on_result(self, wid: str, msg, now: float) -> None:
        p = self.pending.get(msg.request_id)
        if p is None or p.target is None or p.target.worker_id != wid:
            self.counters["late_results"] += 1  # finished already (timeout, cancel, failover)
            return
        rid = p.request.request_id
        if isinstance(msg, TokenChunk):
            if not p.streamed:
                p.streamed = True
                p.first_token_s = now
                self.core.on_first_token(p.key, now=now)
            self._reply(p.client, msgspec.structs.replace(msg, request_id=rid))
        elif isinstance(msg, Completion):
            if p.first_token_s is None:
                p.first_token_s = now
            self._finish(p, msgspec.structs.replace(msg, request_id=rid, predicted_cached_tokens=p.predicted_cached_tokens,
                                                    retries=p.retries, dp_rank=p.target.dp_rank))
        else:
            self._finish(p, msgspec.structs.replace(msg, request_id=rid, worker_id=wid))

    def _worker_gone(self, wid: str, code: ErrorCode, why: str) -> None:
        worker = self.workers.pop(wid, None)
        self.liveness.remove(wid)
        if worker is None:
            return
        self._identities.pop(worker.identity, None)
        self._refresh_fleet()
        self.ingest.remove_worker(wid)
        self._refresh_stats()
        now = self._clock()
        lost = [rec for t in worker.targets for rec in self.core.unregister(t)]
        self._mirror_call(lambda: self.mirror.unregister_worker(wid, dp_ranks=[t.dp_rank for t in worker.targets]))
        for rec in lost:
            p = self.pending.get(rec.request_id)
            if p is None:
                continue
            if not p.streamed and p.retries < self.config.max_retries:
                p.retries += 1
                self.counters["retries"] += 1
                logger.info("request %s: worker %s gone before its first token, routing it again", p.key, wid)
                self._dispatch(p, now)
            else:
                detail = "after tokens were streamed" if p.streamed else f"after {p.retries} retries"
                self._finish(p, ErrorReply(p.request.request_id, code, f"{why} {detail}", wid))

    def _worker_by_identity(self, identity: bytes) -> _Worker | None:
        wid = self._identities.get(identity)
        return None if wid is None else self.workers.get(wid)

    # ------------------------------------------------------------------ output

    def _reply(self, client: bytes, msg) -> None:
        try:
            self._clients.send(client, _SNDMORE_NOBLOCK)
            self._clients.send(encode(msg), _NOBLOCK)
        except zmq.ZMQError as exc:  # client gone or its queue full: the reply is lost, count it
            self.counters["reply_drops"] += 1
            logger.debug("reply to %s dropped: %s", client.hex(), exc)

    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self._workers_sock.send(identity, _SNDMORE_NOBLOCK)
            self._workers_sock.send(encode(msg), _NOBLOCK)
        except zmq.ZMQError as exc:
            self.counters["worker_send_drops"] += 1
            logger.debug("message to worker %s dropped: %s", identity.hex(), exc)

    def _mirror_call(self, write: Callable[[], None], *, refresh: bool = False) -> None:
        """A Redis write that must not stop routing. ``refresh`` (a heartbeat's liveness touch) is
        skipped while Redis is known down: against a Redis that hangs rather than refuses, each
        try would stall the loop for the socket timeout, and the resync rewrites it anyway."""
        if self.mirror is None:
            return
        if refresh and self._mirror_down:
            self.counters["mirror_skipped"] += 1
            return
        try:
            write()
        except MirrorUnavailable as exc:
            self.counters["mirror_failures"] += 1
            self._mirror_down = True  # the next successful check rewrites what this write missed
            logger.debug("redis write failed: %s", exc)

    def _check_mirror(self) -> None:
        """Notice Redis going away, coming back, or coming back empty; resync the mirror then.

        Writes during an outage fail and mark their target dirty (``EventIngest``), but a Redis
        that restarted *between* two writes loses everything silently: redis-py reconnects and
        the next write succeeds into an empty data set. The generation token catches that. On
        any such transition the registry and every target are rewritten from memory; routing
        never waited on Redis in the meantime.
        """
        try:
            generation = self.mirror.router_heartbeat(self.config.router_id, now_s=self._wall(),
                                                      token=uuid.uuid4().hex)
        except MirrorUnavailable as exc:
            self.counters["mirror_failures"] += 1
            if not self._mirror_down:
                logger.warning("Redis unavailable (%s): routing from memory, mirror resync when it is back", exc)
            self._mirror_down = True
            return
        lost = self._mirror_generation is not None and generation != self._mirror_generation
        failed = self.mirror.take_write_failures()  # writes made off the routing thread that failed
        was_down, self._mirror_down = self._mirror_down or failed is not None, False
        self._mirror_generation = generation
        if lost or was_down:
            why = "came back empty (restarted or flushed)" if lost else "is back"
            logger.warning("Redis %s: rewriting the registry and %d targets from memory", why, len(self.ingest.streams))
            self.counters["mirror_resyncs"] += 1
            self.ingest.mark_mirror_lost()
            ttl_s = self.config.heartbeat.timeout_s
            for worker in self.workers.values():
                self._mirror_call(lambda w=worker: self.mirror.register_worker(w.hello, now_s=self._wall(), ttl_s=ttl_s))
            self.ingest.tick()  # the rewrite itself (dirty targets); one that fails stays dirty

    def _publish_request(self, p: _Pending, terminal: Completion | ErrorReply) -> None:
        if self._metrics is None:
            return
        now = self._clock()
        ok = isinstance(terminal, Completion)
        first = p.first_token_s if p.first_token_s is not None else now
        rec = RequestRecord(
            request_id=p.request.request_id, worker_id=_wid(p.target), arrival_s=p.accepted_wall_s,
            finish_s=p.accepted_wall_s + (now - p.accepted_s), prompt_tokens=len(p.token_ids),
            cached_tokens=terminal.cached_tokens if ok else 0, predicted_cached_tokens=p.predicted_cached_tokens,
            output_tokens=terminal.output_tokens if ok else 0, ttft_s=first - p.accepted_s, e2e_s=now - p.accepted_s,
            policy=self.config.policy, error=None if ok else terminal.code, stats=terminal.stats if ok else RequestStats())
        self._publish(names.REQUEST_METRICS_TOPIC, rec)

    def _refresh_stats(self) -> None:
        targets = {}
        live = set(self.core.targets())
        for target, stream in self.ingest.streams.items():
            if target not in live:
                continue
            load = self.core.load(target)
            targets[str(target)] = {
                "indexed_blocks": self.index.num_blocks(target), "confidence": self.index.confidence(target).value,
                "in_flight": load.in_flight, "queued_prefill_tokens": load.queued_prefill_tokens,
                "events_applied": stream.events_applied, "gaps": stream.gaps, "resets": stream.resets,
                "replays": stream.subscriber.counters.replays, "event_lag_s": round(stream.event_lag_s, 6)}
        counters = dict(self.counters)
        if self._zap is not None:  # CURVE handshakes refused (unknown keys), counted by the ZAP thread
            counters.update({f"auth_denied_{d.removeprefix('kvr-')}": n for d, n in self._zap.denied.items()})
        self.stats = {"counters": counters, "workers": len(self.workers), "pending": len(self.pending),
                      "indexed_blocks": self.index.total_blocks(), "targets": targets,
                      "models": sorted(self._models_served)}  # what /v1/models lists (the Hellos' names)

    def _publish_samples(self) -> None:
        if self._metrics is None:
            return
        t = self._wall()
        live = set(self.core.targets())
        for target, stream in self.ingest.streams.items():
            if target not in live:
                continue
            load = self.core.load(target)
            self._publish(names.WORKER_METRICS_TOPIC, WorkerSample(
                worker_id=str(target), t_s=t,
                load=WireLoad(running=load.running, waiting=load.waiting,
                              queued_prefill_tokens=load.queued_prefill_tokens, kv_usage=load.kv_usage),
                indexed_blocks=self.index.num_blocks(target), confidence=self.index.confidence(target).value,
                events_applied=stream.events_applied, event_lag_s=stream.event_lag_s, gaps=stream.gaps,
                replays=stream.subscriber.counters.replays, resets=stream.resets, evictions=stream.removed_blocks))

    def _publish(self, topic: bytes, record) -> None:
        try:
            self._metrics.send_multipart([topic, encode(record)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self.counters["metrics_drops"] += 1

    def close(self) -> None:
        """Answer every pending request, then close sockets (idempotent)."""
        for p in list(self.pending.values()):
            self._finish(p, ErrorReply(p.request.request_id, ErrorCode.ROUTER_RESTARTED, "router shutting down",
                                       _wid(p.target)))
        self.ingest.close()
        for sock in (self._clients, self._workers_sock, self._metrics):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()


def _wid(target: WorkerKey | None) -> str | None:
    return None if target is None else target.worker_id
