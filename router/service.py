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
* **No result with missing tokens.** A request's chunks reach its client in their ``seq`` order
  only, and its ``Completion`` only when exactly ``Completion.chunks`` were relayed; a gap or a
  count that disagrees ends it like a worker death (re-routed if the client saw nothing yet, else
  ``WORKER_DIED``), the worker told to cancel it.
* **A replaced worker link hands over, loses nothing.** A worker that timed this router out (a
  stall) reconnects on a new connection and says ``Hello`` with the same epoch and its secret
  ``link_token``, listing the requests it still holds (``in_flight``). The router moves the worker
  to the new connection and then: each of its requests the worker does not list (the Dispatch, or
  the result, died with the old connection) is re-routed or fails with ``WORKER_DIED``; listed ones
  the router no longer waits for are cancelled. After the ``Welcome`` the worker resends every
  listed request's stream from its start; repeats are dropped by ``seq``.
* **A worker id belongs to one live connection.** Another claimant (a second process with the same
  id, or one copying id and epoch from the registry, without the link token) is refused
  (``REFUSED_DUPLICATE_ID``, a warning, ``rejected_hello_duplicate_id``) while the holder beats; it
  takes over only once the holder is silent for the heartbeat timeout. With CURVE an id is bound
  to the public key that first registered it: another key is refused for good
  (``REFUSED_KEY_MISMATCH``, ``rejected_hello_key_mismatch``).
* **Index claims are checked against results** (``core/trust.py``): a target whose reported cached
  tokens keep falling short of what its published blocks predicted (a worker claiming blocks it
  does not hold, lost ``BlockRemoved`` events) has its overlap count for nothing and its entries
  resynced (cleared, ``resyncing``) until its reports agree again; one WARNING per change,
  ``trust_downgrades`` / ``trust_recoveries``. ``RouterConfig.trust = None`` turns it off (an
  engine that reports no cached tokens would read as a liar).
* **Bad input never crashes the loop**: undecodable frames and messages from unknown peers are
  counted and logged. Peers that are not registered get no heartbeats, so a worker that outlived
  a router restart times out and says ``Hello`` again.
* Request ids are the client's; internally each request gets a router-unique id (two clients may
  use the same ids), which is what workers see.
"""

from __future__ import annotations

import itertools
import json
import logging
import time
import uuid
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import msgspec
import zmq

from bus import names
from bus.codec import DecodeError, client_decoder, encode, salvage_request_id, worker_decoder
from bus.mirror_status import Cause, as_dict, describe
from bus.schema import (
    NO_CAP,
    PROTOCOL_VERSION,
    REFUSED_DUPLICATE_ID,
    REFUSED_KEY_MISMATCH,
    Cancel,
    CancelRequest,
    Completion,
    Dispatch,
    ErrorCode,
    ErrorReply,
    GenerateRequest,
    Goodbye,
    Heartbeat,
    Hello,
    Refused,
    RequestRecord,
    RequestStats,
    Routed,
    TokenChunk,
    Welcome,
    WorkerSample,
)  # fmt: skip
from bus.schema import (
    WorkerLoad as WireLoad,
)
from bus.security import CLIENTS_DOMAIN, WORKERS_DOMAIN, Curve, ZapHandler, is_public_key
from bus.sockets import MAX_CONTROL_BYTES, MAX_EVENT_BYTES, MAX_REQUEST_BYTES, make_router, make_socket
from core.admission import AdmissionLimits, check_prompt_length, check_request
from core.liveness import HeartbeatConfig, LivenessTracker
from core.prefix_index import Confidence, PrefixIndex, WorkerKey
from core.routing import NoTargetsError, RouterCore, RoutingInput
from core.tokenizer import BuiltinTokenizer
from core.trust import TrustChange, TrustConfig, TrustTracker
from router.ingest import EventIngest
from router.mirror import MirrorUnavailable, RedisMirror
from router.mirror_health import MirrorHealth, cause_of

logger = logging.getLogger(__name__)

#: A rewrite's read-back not answered within this is asked again (the writer may have dropped it).
_VERIFY_TIMEOUT_S = 10.0
#: Replies waiting for one client's full queue; beyond that they are dropped (``reply_drops``).
MAX_CLIENT_BACKLOG = 1_000_000
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
    # Closed-loop trust (core/trust.py); None: off (workers whose engine reports no cached tokens
    # would otherwise read as liars: every prediction falls short of their 0).
    trust: TrustConfig | None = field(default_factory=TrustConfig)


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
    relayed_chunks: int = 0  # TokenChunks relayed to the client from the current target, in seq order
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
        self.trust = None if config.trust is None else TrustTracker(config=config.trust)
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
        self._metrics: zmq.Socket[bytes] | None = None
        self.metrics_endpoint = None
        if config.bind_metrics:
            self._metrics = make_socket(self._ctx, zmq.PUB, max_msg_size=MAX_CONTROL_BYTES)
            self._metrics.bind(config.bind_metrics)
            self.metrics_endpoint = self._metrics.getsockopt_string(zmq.LAST_ENDPOINT)
        self._clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full client queue raises, not drops (_reply)
        self._client_backlog: dict[bytes, deque[bytes]] = {}
        self._poller = zmq.Poller()
        self._poller.register(self._clients, zmq.POLLIN)
        self._poller.register(self._workers_sock, zmq.POLLIN)
        self.ingest = EventIngest(index=self.index, poller=self._poller, ctx=self._ctx, mirror=mirror, clock=clock,
                                  wall=wall, curve=curve, max_event_bytes=config.max_event_bytes)
        self._snapshots = self.ingest.warm_start()
        self._client_decoder, self._worker_decoder = client_decoder(), worker_decoder()
        self.workers: dict[str, _Worker] = {}
        self._identities: dict[bytes, str] = {}  # worker DEALER identity -> worker id
        #: CURVE: worker id -> the z85 public key that first registered it (for this router's life).
        self._id_keys: dict[str, str] = {}
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
        #: ok / degraded with a cause (router/mirror_health.py); ok again only once a rewrite verified.
        self.mirror_health = MirrorHealth()
        self._mirror_failures_seen = 0  # the mirror's failure counters at the last look
        self._verify_asked_s: float | None = None  # clock time a rewrite's read-back was asked; None: none
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
                self._drain_workers()
            else:
                try:
                    self.ingest.handle(sock)
                except Exception:  # a bug on one batch must not take routing down; the stream gap-checks on
                    self.counters["ingest_errors"] += 1
                    logger.exception("error ingesting KV events")
        if self._client_backlog:
            self._flush_client_backlog()
        now = self._clock()
        if now >= self._next_housekeeping_s:
            # O(workers + pending) upkeep, paced so a busy loop does not pay it per message.
            self._next_housekeeping_s = now + self.config.housekeeping_s
            self._tick(now)

    def _drain_workers(self) -> None:
        self._drain(self._workers_sock, self._worker_decoder, self._on_worker, peer_keys=self.curve is not None)

    def _drain(self, sock: zmq.Socket, decoder, handler, *, peer_keys: bool = False) -> None:
        """``peer_keys`` (the CURVE worker socket): the handler also gets the sender's public key,
        the user id the ZAP handler gave its connection (a frame property, hence copy=False)."""
        for _ in range(1000):  # bounded: one busy peer must not starve the others
            try:
                if peer_keys:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    key = parts[-1].get("User-Id")
                    frames = [f.bytes for f in parts]
                else:
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
                if peer_keys:
                    handler(frames[0], msg, peer_key=key)
                else:
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
            self._drain_workers()
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
            if self.mirror is not None:  # for `kvr inspect` (fails, and is skipped, while Redis does)
                health = json.dumps({**as_dict(self.mirror_health.status()), "t_s": self._wall()})
                self._mirror_call(lambda m: m.record_health(self.config.router_id, health), refresh=True)

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
        if req.token_ids is not None:
            tokens = req.token_ids
        else:
            assert req.prompt is not None  # check_request: exactly one of prompt / token_ids
            tokens = self.tokenizer.encode(req.prompt)
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
            # An uncapped request's output is estimated as the longest allowed (the estimate caps it).
            max_tokens = self.config.limits.max_output_tokens if req.max_tokens is None else req.max_tokens
            res = self.core.route(RoutingInput(p.key, p.token_ids, max_tokens, req.lora_name, req.cache_salt,
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
                          Dispatch(p.key, p.token_ids, req.max_tokens or NO_CAP, d.target.dp_rank, req.lora_name,
                                   req.cache_salt))

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
            if self.trust is not None and p.target is not None:
                change = self.trust.observe(p.target, predicted_tokens=p.predicted_cached_tokens,
                                            reported_tokens=terminal.cached_tokens, now=self._clock())
                if change is not None:
                    self._apply_trust(change)
        self._reply(p.client, terminal)
        self._publish_request(p, terminal)

    def _apply_trust(self, change: TrustChange) -> None:
        """A target's trust changed (core/trust.py): weight its overlap, and on a drop resync its
        entries (cleared and re-learned, ``resyncing``, as after a lost gap). Logged once per change."""
        self.core.set_trust(change.target, change.weight)
        if change.downgrade:
            self.counters["trust_downgrades"] += 1
            self.ingest.resync_target(change.target)
            logger.warning("%s: trust %.2f: %s; its overlap counts %.0f%% and its index entries are resynced",
                           change.target, change.weight, change.reason, change.weight * 100)
        else:
            self.counters["trust_recoveries"] += 1
            logger.warning("%s: trust restored: %s", change.target, change.reason)
        self._refresh_stats()

    # ------------------------------------------------------------------ workers

    def _on_worker(self, identity: bytes, msg, *, peer_key: str | None = None) -> None:
        now = self._clock()
        if isinstance(msg, Hello):
            self._on_hello(identity, msg, now, peer_key=peer_key)
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
                load = msg.load
                self.core.update_load(WorkerKey(wid, msg.dp_rank), running=load.running, waiting=load.waiting,
                                      queued_prefill_tokens=load.queued_prefill_tokens, kv_usage=load.kv_usage)
            self._mirror_call(lambda m: m.touch_worker(wid, epoch=worker.hello.epoch, load=msg.load,
                                                       now_s=self._wall(), ttl_s=self.config.heartbeat.timeout_s),
                              refresh=True)
        elif isinstance(msg, Goodbye):
            self._worker_gone(wid, ErrorCode.WORKER_DIED, "worker left")
        elif isinstance(msg, (TokenChunk, Completion, ErrorReply)):
            self._on_result(wid, msg, now)

    def _on_hello(self, identity: bytes, hello: Hello, now: float, *, peer_key: str | None = None) -> None:
        cfg = self.config
        if hello.protocol_version != PROTOCOL_VERSION or hello.block_size != cfg.block_size:
            reason = (f"protocol {hello.protocol_version} != {PROTOCOL_VERSION}"
                      if hello.protocol_version != PROTOCOL_VERSION
                      else f"block_size {hello.block_size} != the router's {cfg.block_size}")
            logger.warning("refusing worker %s: %s", hello.worker_id, reason)
            self._send_worker(identity, Refused(reason))
            return
        if hello.events_curve_key and not is_public_key(hello.events_curve_key):
            logger.warning("refusing worker %s: events_curve_key is not a z85 CURVE public key", hello.worker_id)
            self._send_worker(identity, Refused("events_curve_key is not a z85 CURVE public key (40 characters)"))
            return
        refusal = self._claim_refusal(identity, hello, now, peer_key)
        if refusal is not None:
            self.counters[f"rejected_hello_{refusal.code}"] += 1
            n = self.counters[f"rejected_hello_{refusal.code}"]
            if n <= 10 or n % 100 == 0:  # a peer that keeps trying must not flood the log
                logger.warning("refusing a Hello for worker %s (epoch %d, %d refused so far): %s", hello.worker_id,
                               hello.epoch, n, refusal.reason)
            self._send_worker(identity, refusal)
            return
        wid = hello.worker_id
        old = self.workers.get(wid)
        replaced = old is not None and old.identity != identity
        if old is not None and not _same_incarnation(old, identity, hello):
            # Another incarnation (a restart), or a claimant of an id whose holder is proven gone.
            self._worker_gone(wid, ErrorCode.WORKER_DIED, "worker restarted" if old.hello.epoch != hello.epoch
                              else "worker replaced after its heartbeat timeout")
            old = None
        if old is None:
            resume = {t.dp_rank: s for t, s in self._snapshots.items() if t.worker_id == wid}
            targets = self.ingest.add_worker(hello, resume=resume)
            for t in targets:
                self.core.register(t, capacity_blocks=hello.num_gpu_blocks)
            self.workers[wid] = _Worker(identity, hello, targets)
            self._identities[identity] = wid
            self._adopt_latency(hello)
            self._refresh_fleet()
            logger.info("worker %s registered (epoch %d, %d rank(s), events %s)", wid, hello.epoch,
                        len(targets), hello.events_endpoint)
        else:
            self._identities.pop(old.identity, None)
            old.identity = identity  # reconnected with a new DEALER; same incarnation, same index
            old.hello = hello
            self._identities[identity] = wid
        if self.curve is not None and peer_key is not None:
            self._id_keys.setdefault(wid, peer_key)
        self.liveness.seen(wid, now)
        self._refresh_stats()
        self._nudged.pop(identity, None)
        self._send_worker(identity, Welcome(cfg.router_id, cfg.heartbeat.interval_s, cfg.heartbeat.liveness,
                                            router_epoch=self.epoch))
        self.liveness.sent(wid, now)
        # After the Welcome: a request re-routed here must reach the worker after it.
        self._take_over(wid, hello, replaced=old is not None and replaced, now=now)
        self._mirror_call(lambda m: m.register_worker(hello, now_s=self._wall(), ttl_s=cfg.heartbeat.timeout_s))

    def _claim_refusal(self, identity: bytes, hello: Hello, now: float, peer_key: str | None) -> Refused | None:
        """Why this Hello may not have its worker id, or None. The id belongs to one live connection:
        the same connection, or the same incarnation on a new one (proved by ``link_token``), may
        say Hello again; anyone else waits until the holder misses its heartbeat timeout."""
        wid = hello.worker_id
        bound = self._id_keys.get(wid)
        if self.curve is not None and bound is not None and peer_key != bound:
            return Refused(f"worker id {wid!r} is bound to another CURVE key (the one that first registered it); "
                           f"this key ({peer_key or '-'}) may serve only the ids it registered",
                           code=REFUSED_KEY_MISMATCH)
        old = self.workers.get(wid)
        if old is None or old.identity == identity or _same_incarnation(old, identity, hello):
            return None
        last = self.liveness.last_seen(wid)
        if last is None or not self.liveness.is_alive(wid, now):
            return None  # the holder is proven gone: take over
        retry_after_s = max(0.0, last + self.config.heartbeat.timeout_s - now)
        return Refused(f"worker id {wid!r} is in use by a live worker (epoch {old.hello.epoch}, heard from "
                       f"{now - last:.2f} s ago): give this worker another --id", code=REFUSED_DUPLICATE_ID,
                       retry_after_s=round(retry_after_s, 3))

    def _take_over(self, wid: str, hello: Hello, *, replaced: bool, now: float) -> None:
        """Reconcile a worker's requests with what its Hello says it holds.

        Invariant: every pending request on ``wid`` either is listed in ``hello.in_flight`` (the
        worker will resend its whole stream after the Welcome) or ends now, re-routed if its client
        saw nothing yet, else with ``WORKER_DIED``. Only on a *replaced* link: on the same
        connection, Dispatches sent after the worker's Hello are still on their way to it."""
        # Keys another router handed out are not ours.
        held = set(hello.in_flight) if hello.router_epoch == self.epoch else set()
        mine: set[str] = set()
        if replaced:
            lost = [p for p in self.pending.values() if p.target is not None and p.target.worker_id == wid
                    and p.key not in held]
            mine = {p.key for p in self.pending.values() if p.target is not None and p.target.worker_id == wid}
            if lost:
                self.counters["requests_lost_with_link"] += len(lost)
                logger.warning("worker %s reconnected without %d of its requests (lost with the old connection): "
                               "routing them again or failing them", wid, len(lost))
            for p in lost:
                # Not the worker's fault: it may take the request again, on its new link.
                self._fail_or_retry(p, ErrorCode.WORKER_DIED, "its worker link was replaced and the request was lost "
                                    "with the old connection", now=now, exclude_worker=False)
            self.counters["worker_links_replaced"] += 1
            logger.info("worker %s reconnected (epoch %d): %d request(s) handed over", wid, hello.epoch,
                        len(mine & held))
        else:
            mine = {p.key for p in self.pending.values() if p.target is not None and p.target.worker_id == wid}
        worker = self.workers[wid]
        for key in held - mine:  # finished or failed over already: the worker may stop it
            self._send_worker(worker.identity, Cancel(key))

    def _fail_or_retry(self, p: _Pending, code: ErrorCode, why: str, *, now: float, cancel: bool = False,
                       exclude_worker: bool = True) -> None:
        """End ``p`` on its current worker: route it again if its client saw nothing yet and retries
        are left, else fail it with ``code``. ``cancel`` tells that worker to stop it;
        ``exclude_worker`` keeps the retry off that worker (every rank: the key stays the same)."""
        wid = _wid(p.target)
        worker = self.workers.get(wid) if wid is not None else None
        if cancel and worker is not None:
            self._send_worker(worker.identity, Cancel(p.key))
        self.core.on_finish(p.key)
        if worker is not None and exclude_worker:
            p.tried.update(worker.targets)
        elif p.target is not None:
            p.tried.discard(p.target)
        if not p.streamed and p.retries < self.config.max_retries:
            p.retries += 1
            p.relayed_chunks = 0
            self.counters["retries"] += 1
            logger.info("request %s: %s before its first token, routing it again", p.key, why)
            self._dispatch(p, now)
        else:
            detail = "after tokens were streamed" if p.streamed else f"after {p.retries} retries"
            self._finish(p, ErrorReply(p.request.request_id, code, f"{why} {detail}", wid))

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
            if msg.seq >= 0 and msg.seq != p.relayed_chunks:
                if msg.seq < p.relayed_chunks:  # resent after a reconnect: relayed already
                    self.counters["repeated_chunks_dropped"] += 1
                    return
                self.counters["reply_stream_gaps"] += 1
                logger.warning("request %s: chunk %d from worker %s, expected %d: chunks were lost", p.key, msg.seq,
                               wid, p.relayed_chunks)
                self._fail_or_retry(p, ErrorCode.WORKER_DIED, f"chunks {p.relayed_chunks}..{msg.seq - 1} of its "
                                    "stream were lost on the worker link", now=now, cancel=True)
                return
            p.relayed_chunks += 1
            if not p.streamed:
                p.streamed = True
                p.first_token_s = now
                self.core.on_first_token(p.key, now=now)
            self._reply(p.client, msgspec.structs.replace(msg, request_id=rid))
        elif isinstance(msg, Completion):
            if msg.chunks >= 0 and msg.chunks != p.relayed_chunks:
                # Never a result with missing tokens: the count the worker sent must have arrived.
                self.counters["incomplete_completions"] += 1
                logger.warning("request %s: worker %s finished after %d chunks, %d reached the router", p.key, wid,
                               msg.chunks, p.relayed_chunks)
                self._fail_or_retry(p, ErrorCode.WORKER_DIED, f"{msg.chunks - p.relayed_chunks} of its {msg.chunks} "
                                    "chunks were lost on the worker link", now=now)
                return
            if p.first_token_s is None:
                p.first_token_s = now
            self._finish(p, msgspec.structs.replace(msg, request_id=rid,
                                                    predicted_cached_tokens=p.predicted_cached_tokens,
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
        if self.trust is not None:
            for t in worker.targets:
                self.trust.forget(t)
        self._mirror_call(lambda m: m.unregister_worker(wid, dp_ranks=[t.dp_rank for t in worker.targets]))
        for rec in lost:
            p = self.pending.get(rec.request_id)
            if p is None:
                continue
            self._fail_or_retry(p, code, why, now=now)

    def _worker_by_identity(self, identity: bytes) -> _Worker | None:
        wid = self._identities.get(identity)
        return None if wid is None else self.workers.get(wid)

    # ------------------------------------------------------------------ output

    def _reply(self, client: bytes, msg) -> None:
        """Replies reach a client in order and none is dropped for a full queue (a worker's stream
        resent after a stall comes in a burst that a client reads slower): what its queue does not
        take waits in ``_client_backlog``. The client socket is ROUTER_MANDATORY, so a full queue
        says so instead of dropping silently; only a client that is gone loses its replies."""
        frame = encode(msg)
        waiting = self._client_backlog.get(client)
        if waiting is not None:
            if len(waiting) >= MAX_CLIENT_BACKLOG:
                self.counters["reply_drops"] += 1  # a client that stopped reading: bounded memory
                return
            waiting.append(frame)
        elif not self._send_client(client, frame):
            self._client_backlog[client] = deque([frame])

    def _send_client(self, client: bytes, frame: bytes) -> bool:
        """False: the client's queue is full (try again later)."""
        try:
            self._clients.send(client, _SNDMORE_NOBLOCK)
            self._clients.send(frame, _NOBLOCK)
        except zmq.Again:
            return False
        except zmq.ZMQError as exc:  # the client is gone: nobody to tell
            self.counters["reply_drops"] += 1
            logger.debug("reply to %s dropped: %s", client.hex(), exc)
        return True

    def _flush_client_backlog(self) -> None:
        for client in list(self._client_backlog):
            waiting = self._client_backlog[client]
            while waiting and self._send_client(client, waiting[0]):
                waiting.popleft()
            if not waiting:
                del self._client_backlog[client]

    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self._workers_sock.send(identity, _SNDMORE_NOBLOCK)
            self._workers_sock.send(encode(msg), _NOBLOCK)
        except zmq.ZMQError as exc:
            self.counters["worker_send_drops"] += 1
            logger.debug("message to worker %s dropped: %s", identity.hex(), exc)

    def _mirror_call(self, write: Callable[[RedisMirror], None], *, refresh: bool = False) -> None:
        """A Redis write that must not stop routing. ``refresh`` (a heartbeat's liveness touch) is
        skipped while Redis is known down: against a Redis that hangs rather than refuses, each
        try would stall the loop for the socket timeout, and the resync rewrites it anyway."""
        if self.mirror is None:
            return
        if refresh and self._mirror_down:
            self.counters["mirror_skipped"] += 1
            return
        try:
            write(self.mirror)
        except MirrorUnavailable as exc:
            self.counters["mirror_failures"] += 1
            self._mirror_down = True  # the next successful check rewrites what this write missed
            self._mirror_failed(exc)
            logger.debug("redis write failed: %s", exc)

    def _new_mirror_failures(self) -> int:
        """Redis calls that failed since the last look (the mirror's counters; a write dropped from a
        full queue counts as one)."""
        total = 0
        for name in ("failures", "dropped"):
            n = getattr(self.mirror, name, 0)
            total += n if isinstance(n, int) else 0
        new, self._mirror_failures_seen = max(0, total - self._mirror_failures_seen), total
        return new

    def _mirror_failed(self, exc: BaseException | None, *, cause: Cause | None = None) -> None:
        """Degraded (or still): logged once per state or cause change, never per failed write."""
        cause = cause or cause_of(exc)
        if self.mirror_health.fail(cause, now_s=self._wall(), failed_writes=self._new_mirror_failures()):
            logger.warning("Redis mirror degraded: %s (%s); routing goes on from memory, the mirror is "
                           "rewritten once Redis takes writes again", cause.value, exc)
        self._verify_asked_s = None  # a read-back in flight is moot: the next check rewrites again

    def _check_mirror(self) -> None:
        """Notice Redis going away, coming back, or coming back empty; resync the mirror then.

        Writes during an outage fail and mark their target dirty (``EventIngest``), but a Redis
        that restarted *between* two writes loses everything silently: redis-py reconnects and
        the next write succeeds into an empty data set. The generation token catches that. On
        any such transition the registry and every target are rewritten from memory; routing
        never waited on Redis in the meantime.
        """
        mirror = self.mirror
        if mirror is None:
            return
        try:
            generation = mirror.router_heartbeat(self.config.router_id, now_s=self._wall(),
                                                 token=uuid.uuid4().hex)
        except MirrorUnavailable as exc:
            self.counters["mirror_failures"] += 1
            self._mirror_down = True
            self._mirror_failed(exc)
            return
        lost = self._mirror_generation is not None and generation != self._mirror_generation
        failed = mirror.take_write_failures()  # writes made off the routing thread that failed
        if failed is not None:
            self._mirror_failed(failed)
        elif self.mirror_health.cause is not None:  # degraded (a cause is set exactly while it is)
            self.mirror_health.fail(self.mirror_health.cause, now_s=self._wall(),
                                    failed_writes=self._new_mirror_failures())
        was_down, self._mirror_down = self._mirror_down or failed is not None, False
        self._mirror_generation = generation
        if lost or was_down or (self.mirror_health.state != "ok" and self._verify_asked_s is None):
            if lost:
                logger.warning("Redis came back empty (restarted or flushed): rewriting the registry and %d "
                               "targets from memory", len(self.ingest.streams))
            else:
                logger.debug("Redis answers: rewriting the registry and %d targets", len(self.ingest.streams))
            self.counters["mirror_resyncs"] += 1
            self.ingest.mark_mirror_lost()
            ttl_s = self.config.heartbeat.timeout_s
            for worker in self.workers.values():
                self._mirror_call(_register(worker.hello, now_s=self._wall(), ttl_s=ttl_s))
            self.ingest.tick()  # the rewrite itself (dirty targets); one that fails stays dirty
            # Queued writes are not landed ones: read the mirror back behind them before saying so.
            mirror.request_verification(
                blocks={(t.worker_id, t.dp_rank): len(self.index.snapshot(t)) for t in self.ingest.streams},
                workers=list(self.workers))
            self._verify_asked_s = self._clock()
            return
        if self._verify_asked_s is not None:
            self._check_rewrite(mirror, asked_s=self._verify_asked_s)

    def _check_rewrite(self, mirror: RedisMirror, *, asked_s: float) -> None:
        """The read-back of a rewrite asked for at ``asked_s``: ok again once it matched; a mismatch is
        logged and rewritten."""
        answer = mirror.take_verification()
        if answer is None:
            if self._clock() - asked_s > _VERIFY_TIMEOUT_S:  # lost (e.g. dropped from a full queue)
                self._verify_asked_s = None  # the next check rewrites and asks again
            return
        self._verify_asked_s = None
        if answer:
            self.counters["mirror_unverified"] += 1
            if self.mirror_health.state == "ok":
                self._mirror_failed(None, cause=Cause.OTHER)
            logger.warning("Redis mirror rewrite did not verify (%s): rewriting again", answer)
            return
        blocks = sum(self.index.num_blocks(t) for t in self.ingest.streams)
        was = describe(self.mirror_health.status())
        if self.mirror_health.recover(now_s=self._wall()):
            logger.info("Redis mirror ok again (was %s): rewritten and verified, %d targets, %d blocks, %d workers",
                        was, len(self.ingest.streams), blocks, len(self.workers))
        else:
            logger.info("Redis mirror rewritten and verified: %d targets, %d blocks, %d workers",
                        len(self.ingest.streams), blocks, len(self.workers))

    def _publish_request(self, p: _Pending, terminal: Completion | ErrorReply) -> None:
        if self._metrics is None:
            return
        now = self._clock()
        if isinstance(terminal, Completion):
            cached, output, error, stats = terminal.cached_tokens, terminal.output_tokens, None, terminal.stats
        else:
            cached, output, error, stats = 0, 0, terminal.code, RequestStats()
        first = p.first_token_s if p.first_token_s is not None else now
        rec = RequestRecord(
            request_id=p.request.request_id, worker_id=_wid(p.target), arrival_s=p.accepted_wall_s,
            finish_s=p.accepted_wall_s + (now - p.accepted_s), prompt_tokens=len(p.token_ids),
            cached_tokens=cached, predicted_cached_tokens=p.predicted_cached_tokens,
            output_tokens=output, ttft_s=first - p.accepted_s, e2e_s=now - p.accepted_s,
            policy=self.config.policy, error=error, stats=stats)
        self._publish(self._metrics, names.REQUEST_METRICS_TOPIC, rec)

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
                "trust": self.core.trust(target),
                "events_applied": stream.events_applied, "gaps": stream.gaps, "resets": stream.resets,
                "replays": stream.subscriber.counters.replays, "event_lag_s": round(stream.event_lag_s, 6)}
        counters = dict(self.counters)
        if self._zap is not None:  # CURVE handshakes refused (unknown keys), counted by the ZAP thread
            counters.update({f"auth_denied_{d.removeprefix('kvr-')}": n for d, n in self._zap.denied.items()})
        self.stats = {"counters": counters, "workers": len(self.workers), "pending": len(self.pending),
                      "indexed_blocks": self.index.total_blocks(), "targets": targets,
                      "mirror": None if self.mirror is None else as_dict(self.mirror_health.status()),
                      "models": sorted(self._models_served)}  # what /v1/models lists (the Hellos' names)

    def _publish_samples(self) -> None:
        if self._metrics is None:
            return
        t = self._wall()
        live = set(self.core.targets())
        mirror = None if self.mirror is None else self.mirror_health.status()
        for target, stream in self.ingest.streams.items():
            if target not in live:
                continue
            load = self.core.load(target)
            self._publish(self._metrics, names.WORKER_METRICS_TOPIC, WorkerSample(
                worker_id=str(target), t_s=t,
                load=WireLoad(running=load.running, waiting=load.waiting,
                              queued_prefill_tokens=load.queued_prefill_tokens, kv_usage=load.kv_usage),
                indexed_blocks=self.index.num_blocks(target), confidence=self.index.confidence(target).value,
                events_applied=stream.events_applied, event_lag_s=stream.event_lag_s, gaps=stream.gaps,
                replays=stream.subscriber.counters.replays, resets=stream.resets, evictions=stream.removed_blocks,
                mirror=mirror))

    def _publish(self, metrics: zmq.Socket[bytes], topic: bytes, record: RequestRecord | WorkerSample) -> None:
        try:
            metrics.send_multipart([topic, encode(record)], zmq.NOBLOCK)
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


def _register(hello: Hello, *, now_s: float, ttl_s: float) -> Callable[[RedisMirror], None]:
    """The registry write for one worker, as ``RouterService._mirror_call`` takes it (a closure
    over its own arguments, so one made in a loop does not see the loop's later values)."""
    return lambda m: m.register_worker(hello, now_s=now_s, ttl_s=ttl_s)


def _wid(target: WorkerKey | None) -> str | None:
    return None if target is None else target.worker_id


def _same_incarnation(held: _Worker, identity: bytes, hello: Hello) -> bool:
    """Whether ``hello`` comes from the process that registered ``held``: on its connection, or on a
    new one with its secret link token; and still with the same epoch and event endpoint."""
    same_process = identity == held.identity or (bool(hello.link_token) and hello.link_token == held.hello.link_token)
    return same_process and hello.epoch == held.hello.epoch and hello.events_endpoint == held.hello.events_endpoint
