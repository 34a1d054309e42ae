"""The router service: sockets around ``RouterCore`` (one thread owns every socket).

This module is the loop and the request lifecycle; each table it keeps lives in its own module:
the pending requests (``router/requests.py``), the worker registry (``router/registry.py``), KV-event
ingestion (``router/ingest.py``), the Redis mirror's sync and health (``router/mirror_sync.py``),
replies to clients (``router/client_replies.py``) and what it publishes (``router/stats.py``).

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

import logging
import time
from collections import Counter
from collections.abc import Callable

import msgspec
import zmq

from bus.codec import DecodeError, client_decoder, encode, salvage_request_id, worker_decoder
from bus.schema import (
    NO_CAP,
    PROTOCOL_VERSION,
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
    ReplyBatch,
    Routed,
    TokenChunk,
    Welcome,
)  # fmt: skip
from bus.security import CLIENTS_DOMAIN, WORKERS_DOMAIN, Curve, ZapHandler, is_public_key
from bus.sockets import MAX_CONTROL_BYTES, VersionedPoller, make_router, make_socket
from core.admission import check_prompt_length, check_request
from core.liveness import LivenessTracker
from core.prefix_index import Confidence, PrefixIndex, WorkerKey
from core.routing import NoTargetsError, RouterCore, RoutingInput
from core.tokenizer import BuiltinTokenizer
from core.trust import TrustChange, TrustTracker
from router.client_replies import ClientReplies
from router.config import RouterConfig
from router.ingest import EventIngest
from router.mirror import RedisMirror
from router.mirror_health import MirrorHealth
from router.mirror_sync import MirrorSync, register_write
from router.peers import PeerSync
from router.registry import WorkerRegistry, same_incarnation
from router.requests import PendingRequest, RequestTable
from router.stats import MetricsPublisher, request_record, stats_snapshot, worker_samples

__all__ = ["RouterConfig", "RouterService"]

logger = logging.getLogger(__name__)

_NOBLOCK = int(zmq.NOBLOCK)  # plain ints: zmq's enum flags cost an enum operation per send
_SNDMORE_NOBLOCK = int(zmq.NOBLOCK | zmq.SNDMORE)


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
        turn_clock: Callable[[], float] = time.monotonic,
    ) -> None:
        """``curve`` (bus/security.py): both ROUTERs are CURVE servers admitting only the
        authorised worker / client keys, and event sockets of workers that name a key are
        dialled as CURVE clients. ``turn_clock`` times the loop's own turns: a stall of the loop is
        real time even when ``clock`` is injected (tests jump it to make a worker silent)."""
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
        self._metrics: MetricsPublisher | None = None
        self.metrics_endpoint = None
        if config.bind_metrics:
            sock = make_socket(self._ctx, zmq.PUB, max_msg_size=MAX_CONTROL_BYTES)
            sock.bind(config.bind_metrics)
            self.metrics_endpoint = sock.getsockopt_string(zmq.LAST_ENDPOINT)
            self._metrics = MetricsPublisher(sock=sock, counters=self.counters)
        if config.peers and self._metrics is None:
            raise ValueError("router replicas (peers) need bind_metrics: the other replicas subscribe to it")
        self.peers = None if not config.peers or self._metrics is None else PeerSync(
            core=self.core, router_id=config.router_id, epoch=int(wall() * 1e6), pub=self._metrics.sock,
            peers=config.peers, ctx=self._ctx, counters=self.counters, clock=clock,
            keepalive_s=config.heartbeat.interval_s, timeout_s=config.heartbeat.timeout_s)
        self._clients.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a full client queue raises, not drops (ClientReplies)
        self.replies = ClientReplies(sock=self._clients, counters=self.counters)
        self._poller = VersionedPoller()
        self._poller.register(self._clients, zmq.POLLIN)
        self._poller.register(self._workers_sock, zmq.POLLIN)
        if self.peers is not None:
            self._poller.register(self.peers.sub, zmq.POLLIN)
        self.ingest = EventIngest(index=self.index, poller=self._poller, ctx=self._ctx, mirror=mirror, clock=clock,
                                  wall=wall, curve=curve, max_event_bytes=config.max_event_bytes,
                                  on_mirror_failure=self._on_ingest_mirror_failure)
        if mirror is not None and hasattr(mirror, "writer_lease_ms"):
            # One writer per fleet's mirror (replicas would race on the same keys): a lease held for
            # a heartbeat timeout, renewed on every mirror check (router/mirror_sync.py).
            mirror.writer_lease_ms = int(config.heartbeat.timeout_s * 1000)
        self.mirror_sync = None if mirror is None else MirrorSync(
            mirror=mirror, ingest=self.ingest, index=self.index, router_id=config.router_id,
            worker_ttl_s=config.heartbeat.timeout_s, counters=self.counters, clock=clock, wall=wall)
        self._snapshots = self.ingest.warm_start()
        # A restarted router that found workers in Redis expects them back within a heartbeat
        # timeout (they time the old one out, or are told "not known", and say Hello): requests
        # that arrive before the first one is back wait for it instead of failing NO_WORKERS.
        self._grace_until_s: float | None = (clock() + config.heartbeat.timeout_s) if self._snapshots else None
        self._parked: list[PendingRequest] = []
        self._client_decoder, self._worker_decoder = client_decoder(), worker_decoder()
        self.workers = WorkerRegistry(curve=curve is not None)
        self.requests = RequestTable(router_id=config.router_id)
        self._next_stats_s = clock() + config.stats_interval_s
        #: This router's incarnation, in its heartbeats and Welcome (workers notice a restart by it).
        self.epoch = int(wall() * 1e6)
        self._nudged: dict[bytes, float] = {}  # unknown peer -> when it was last asked to say Hello
        self._next_mirror_check_s = clock()
        self._next_housekeeping_s = clock()
        self._stopped = False
        self._local_clients = 0
        self._turn_clock = turn_clock
        self._last_turn_s: float | None = None  # (set by the first turn)
        #: A snapshot for other threads (the HTTP front): replaced, never mutated.
        self.stats: dict = {}
        self.refresh_stats()

    @property
    def mirror_health(self) -> MirrorHealth | None:
        return None if self.mirror_sync is None else self.mirror_sync.health

    # ------------------------------------------------------------------ loop

    def stop(self) -> None:
        self._stopped = True

    @property
    def stopped(self) -> bool:
        return self._stopped

    def run(self) -> None:
        try:
            while not self._stopped:
                self.run_once()
        finally:
            self.close()

    def _check_stall(self, now: float) -> None:
        """Called at the start of a turn and just before workers are judged dead: if this loop made
        no progress for a heartbeat interval since the last call (the process was stopped or
        starved, maybe in the middle of a turn), the workers' silence in that time is this
        router's, not theirs. Without this, a router resumed after a stall declared every worker
        dead before their new connections' Hellos were through ZMQ's handshake."""
        turn_s, last_turn_s = self._turn_clock(), self._last_turn_s
        self._last_turn_s = turn_s
        gap_s = 0.0 if last_turn_s is None else turn_s - last_turn_s
        if gap_s > self.config.heartbeat.interval_s:
            self.liveness.stalled(now, gap_s)
            self.counters["loop_stalls"] += 1
            logger.warning("router loop made no progress for %.1f s: workers get that time back to be heard", gap_s)

    def now_s(self) -> float:
        """The service's clock (monotonic seconds unless injected)."""
        return self._clock()

    def poll_sockets(self) -> list[zmq.Socket]:
        """The sockets a loop turn polls (they change as workers' event streams come and go)."""
        return [sock for sock, _ in self._poller.sockets]

    @property
    def poll_sockets_version(self) -> int:
        """Changes whenever :meth:`poll_sockets` does."""
        return self._poller.version

    def next_deadline_s(self) -> float:
        """When the loop must turn next even if no socket is readable (clock seconds)."""
        ingest = self.ingest.next_deadline_s()
        return self._next_housekeeping_s if ingest is None else min(ingest, self._next_housekeeping_s)

    def run_once(self, max_wait_ms: int = 100) -> int:
        """One turn: wait up to ``max_wait_ms`` (less when something is due) for readable sockets,
        handle them, then the upkeep that is due. Returns how many sockets were readable."""
        now = self._clock()
        self._check_stall(now)
        # A turn that may not wait (an asyncio loop's, router/loop_driver.py) skips the deadline.
        wait_ms = 0 if max_wait_ms <= 0 else max(0, min(max_wait_ms, int((self.next_deadline_s() - now) * 1000) + 1))
        ready = self._poller.poll(wait_ms)
        for sock, _ in ready:
            if sock is self._clients:
                self._drain(self._clients, self._client_decoder, self._on_client)
            elif sock is self._workers_sock:
                self._drain_workers()
            elif self.peers is not None and sock is self.peers.sub:
                self.peers.handle()
            else:
                try:
                    self.ingest.handle(sock)
                except Exception:  # a bug on one batch must not take routing down; the stream gap-checks on
                    self.counters["ingest_errors"] += 1
                    logger.exception("error ingesting KV events")
        if self.replies.backlogged:
            self.replies.flush()
        now = self._clock()
        if now >= self._next_housekeeping_s:
            # O(workers + pending) upkeep, paced so a busy loop does not pay it per message.
            self._next_housekeeping_s = now + self.config.housekeeping_s
            self.tick(now)
        return len(ready)

    # ------------------------------------------------------------------ in-process clients

    def attach_local_client(self, sink: Callable[[object], None]) -> bytes:
        """A client in this process, on this service's thread (the HTTP front when the service runs
        on its loop: ``router/loop_driver.py``): its requests come through :meth:`submit_local` and
        its replies go to ``sink`` as they are, with no socket, encoding or thread between them.
        Returns its identity (never a ZMQ peer's: those are 5 bytes from ZMQ or set by the peer,
        and a leading zero byte is reserved by ZMQ)."""
        self._local_clients += 1
        identity = b"\x00kvr-local-%d" % self._local_clients
        self.replies.add_local(identity, sink)
        return identity

    def detach_local_client(self, identity: bytes) -> None:
        self.replies.remove_local(identity)

    def submit_local(self, identity: bytes, msg: object) -> None:
        """A message from an in-process client, handled as if read from the client socket."""
        try:
            self._on_client(identity, msg)
        except Exception:  # as in _drain: a bug handling one message must not take the router down
            self.counters["handler_errors"] += 1
            logger.exception("error handling %s", type(msg).__name__)

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

    def tick(self, now: float) -> None:
        """Liveness, heartbeats, timeouts, the mirror's check and the stats, when each is due."""
        self.ingest.tick()
        deadline = self.liveness.next_deadline()
        if deadline is not None and now >= deadline:
            # Read what is waiting before declaring anyone dead: after a stall of this loop (CPU
            # starvation, a slow handler) the workers' beats sit unread, they were not silent.
            self._drain_workers()
            now = max(now, self._clock())
        self._check_stall(now)  # a stop in the middle of this turn is no worker's silence either
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
        for p in self.requests.expired(now):
            self._cancel_on_worker(p)
            self._finish(p, ErrorReply(p.request.request_id, ErrorCode.TIMEOUT,
                                       f"no result within {self.config.request_timeout_s} s", p.worker_id))
        self.core.expire(now)
        if self._grace_until_s is not None and now >= self._grace_until_s:
            self._release_parked(now, expired=True)
        if self.peers is not None:
            self.peers.tick(now)
        if self.mirror_sync is not None and now >= self._next_mirror_check_s:
            self._next_mirror_check_s = now + self.config.mirror_check_s
            self.check_mirror()
        if now >= self._next_stats_s:
            self._next_stats_s = now + self.config.stats_interval_s
            if self._metrics is not None:
                self._metrics.samples(worker_samples(core=self.core, index=self.index, streams=self.ingest.streams,
                                                     t_s=self._wall(), mirror=self._mirror_status(),
                                                     router_id=self.config.router_id))
            self.refresh_stats()
            if self.mirror_sync is not None:  # for `kvr inspect` (fails, and is skipped, while Redis does)
                self.mirror_sync.publish_health()

    def check_mirror(self) -> None:
        """Is Redis there and does it still hold the mirror? (``MirrorSync.check``)"""
        if self.mirror_sync is not None:
            self.mirror_sync.check([w.hello for w in self.workers.values()])

    # ------------------------------------------------------------------ clients

    def _on_client(self, client: bytes, msg) -> None:
        if isinstance(msg, CancelRequest):
            key = self.requests.key_of(client, msg.request_id)
            p = None if key is None else self.requests.get(key)
            if p is None:
                self.counters["cancel_unknown"] += 1
                return
            self._cancel_on_worker(p)
            self._finish(p, ErrorReply(msg.request_id, ErrorCode.CANCELLED, "cancelled by the client", p.worker_id))
            return
        req: GenerateRequest = msg
        now = self._clock()
        self.counters["requests"] += 1
        if self.requests.in_flight(client, req.request_id):
            self._reject(client, ErrorReply(req.request_id, ErrorCode.BAD_REQUEST, "request_id already in flight"))
            return
        limits = self.config.limits
        # Decoded by msgspec as list[int] (client_decoder): plain ints, only their range to check.
        rejection = check_request(request_id=req.request_id, prompt=req.prompt, token_ids=req.token_ids,
                                  max_tokens=req.max_tokens, model=req.model, limits=limits, ints_checked=True)
        if rejection is not None:
            self._reject(client, ErrorReply(req.request_id, ErrorCode(rejection.code), rejection.message))
            return
        if len(self.requests) >= self.config.max_pending:
            self.counters["overloaded"] += 1
            self.replies.send(client, ErrorReply(req.request_id, ErrorCode.OVERLOADED, f"{len(self.requests)} "
                                                 f"requests in flight (limit {self.config.max_pending})"))
            return
        if req.token_ids is not None:
            tokens = req.token_ids
        else:
            assert req.prompt is not None  # check_request: exactly one of prompt / token_ids
            tokens = self.tokenizer.encode(req.prompt)
            rejection = check_prompt_length(len(tokens), limits)
            if rejection is not None:
                self._reject(client, ErrorReply(req.request_id, ErrorCode(rejection.code), rejection.message))
                return
        unfit = self.workers.unfit_targets(req, len(tokens), limits)
        if isinstance(unfit, ErrorReply):
            self._reject(client, unfit)
            return
        p = PendingRequest(self.requests.new_key(), client, req, tokens, now, self._wall(),
                           now + self.config.request_timeout_s)
        if unfit:
            p.tried.update(unfit)  # never routed there, not even on a retry
        self.requests.add(p)
        self._dispatch(p, now)

    def _reject(self, client: bytes, error: ErrorReply) -> None:
        """A request refused before it was accepted (counted by code; it never enters the table)."""
        self.counters[f"rejected_{error.code.value}"] += 1
        self.replies.send(client, error)

    def _answer_malformed(self, client: bytes, frame: bytes, exc: DecodeError) -> None:
        """A generate request with a field of the wrong type still names its id: answer it
        (``BAD_REQUEST``, msgspec's words say which field) rather than let the client wait. Not
        when that id is in flight: the error would end the client's other request."""
        rid = salvage_request_id(frame, max_chars=self.config.limits.max_id_chars)
        if rid is None or self.requests.in_flight(client, rid):
            return
        self._reject(client, ErrorReply(rid, ErrorCode.BAD_REQUEST, f"malformed request: {exc}"))

    def _dispatch(self, p: PendingRequest, now: float) -> None:
        """Route (again) and send; a request nothing can take ends with ``NO_WORKERS``."""
        req = p.request
        try:
            # An uncapped request's output is estimated as the longest allowed (the estimate caps it).
            max_tokens = self.config.limits.max_output_tokens if req.max_tokens is None else req.max_tokens
            res = self.core.route(RoutingInput(p.key, p.token_ids, max_tokens, req.lora_name, req.cache_salt,
                                               req.worker_id), now=now, exclude=p.tried)
        except NoTargetsError as exc:
            if self._grace_until_s is not None and now < self._grace_until_s and not len(self.workers):
                self.counters["requests_parked"] += 1
                self._parked.append(p)  # dispatched when the first worker is back (_release_parked)
                return
            self._finish(p, ErrorReply(req.request_id, ErrorCode.NO_WORKERS, str(exc)))
            return
        d = res.decision
        p.target = d.target
        p.tried.add(d.target)
        p.predicted_cached_tokens = res.in_flight.predicted_cached_tokens
        self.replies.send(p.client, Routed(req.request_id, d.target.worker_id, d.target.dp_rank, d.overlap_blocks,
                                           p.predicted_cached_tokens, d.policy, d.reason))
        self._send_worker(self.workers[d.target.worker_id].identity,
                          Dispatch(p.key, p.token_ids, req.max_tokens or NO_CAP, d.target.dp_rank, req.lora_name,
                                   req.cache_salt))

    def _finish(self, p: PendingRequest, terminal: Completion | ErrorReply) -> None:
        """The only way out of the request table: exactly one terminal reply."""
        self.requests.remove(p)
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
        self.replies.send(p.client, terminal)
        if self._metrics is not None:
            self._metrics.request(request_record(p, terminal, now=self._clock(), policy=self.config.policy))

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
        self.refresh_stats()

    # ------------------------------------------------------------------ workers

    def _on_worker(self, identity: bytes, msg, *, peer_key: str | None = None) -> None:
        now = self._clock()
        if isinstance(msg, Hello):
            self._on_hello(identity, msg, now, peer_key=peer_key)
            return
        worker = self.workers.by_identity(identity)
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
                                      queued_prefill_tokens=load.queued_prefill_tokens, kv_usage=load.kv_usage,
                                      num_free_blocks=load.num_free_blocks)
            self._mirror_write(lambda m: m.touch_worker(wid, epoch=worker.hello.epoch, load=msg.load,
                                                        now_s=self._wall(), ttl_s=self.config.heartbeat.timeout_s),
                               refresh=True)
        elif isinstance(msg, Goodbye):
            self._worker_gone(wid, ErrorCode.WORKER_DIED, "worker left")
        elif isinstance(msg, (TokenChunk, Completion, ErrorReply)):
            self._on_result(wid, msg, now)
        elif isinstance(msg, ReplyBatch):
            self.counters["reply_batches"] += 1
            self.counters["batched_replies"] += len(msg.replies)
            for reply in msg.replies:
                try:
                    self._on_result(wid, reply, now)
                except Exception:  # as in _drain: one reply's bug must not lose the others
                    self.counters["handler_errors"] += 1
                    logger.exception("error handling %s", type(reply).__name__)

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
        refusal = self.workers.claim_refusal(identity, hello, now=now, peer_key=peer_key, liveness=self.liveness,
                                             timeout_s=cfg.heartbeat.timeout_s)
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
        if old is not None and not same_incarnation(old, identity, hello):
            # Another incarnation (a restart), or a claimant of an id whose holder is proven gone.
            self._worker_gone(wid, ErrorCode.WORKER_DIED, "worker restarted" if old.hello.epoch != hello.epoch
                              else "worker replaced after its heartbeat timeout")
            old = None
        if old is None:
            resume = {t.dp_rank: s for t, s in self._snapshots.items() if t.worker_id == wid}
            targets = self.ingest.add_worker(hello, resume=resume)
            for t in targets:
                self.core.register(t, capacity_blocks=hello.num_gpu_blocks)
            self.workers.add(identity, hello, targets)
            self._adopt_latency(hello)
            logger.info("worker %s registered (epoch %d, %d rank(s), events %s)", wid, hello.epoch,
                        len(targets), hello.events_endpoint)
        else:
            self.workers.relink(old, identity, hello)  # a new DEALER; same incarnation, same index
        self.workers.bind_key(wid, peer_key)
        self.liveness.seen(wid, now)
        self.refresh_stats()
        self._nudged.pop(identity, None)
        self._send_worker(identity, Welcome(cfg.router_id, cfg.heartbeat.interval_s, cfg.heartbeat.liveness,
                                            router_epoch=self.epoch, reply_batches=True))
        self.liveness.sent(wid, now)
        # After the Welcome: a request re-routed here must reach the worker after it.
        self._take_over(wid, hello, replaced=old is not None and replaced, now=now)
        self._release_parked(now)
        self._mirror_write(register_write(hello, now_s=self._wall(), ttl_s=cfg.heartbeat.timeout_s))

    def _release_parked(self, now: float, *, expired: bool = False) -> None:
        """Requests that waited for a worker after a restart: routed now (a worker is back), or, once
        the grace period is over with none back, failed ``NO_WORKERS`` (by ``_dispatch``)."""
        if expired:
            self._grace_until_s = None
        parked, self._parked = self._parked, []
        for p in parked:
            if self.requests.get(p.key) is p:  # not cancelled or timed out meanwhile
                self._dispatch(p, now)

    def _take_over(self, wid: str, hello: Hello, *, replaced: bool, now: float) -> None:
        """Reconcile a worker's requests with what its Hello says it holds.

        Invariant: every pending request on ``wid`` either is listed in ``hello.in_flight`` (the
        worker will resend its whole stream after the Welcome) or ends now, re-routed if its client
        saw nothing yet, else with ``WORKER_DIED``. Only on a *replaced* link: on the same
        connection, Dispatches sent after the worker's Hello are still on their way to it."""
        # Keys another router handed out are not ours.
        held = set(hello.in_flight) if hello.router_epoch == self.epoch else set()
        on_worker = self.requests.on_worker(wid)
        mine = {p.key for p in on_worker}
        if replaced:
            lost = [p for p in on_worker if p.key not in held]
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
        worker = self.workers[wid]
        for key in held - mine:  # finished or failed over already: the worker may stop it
            self._send_worker(worker.identity, Cancel(key))

    def _fail_or_retry(self, p: PendingRequest, code: ErrorCode, why: str, *, now: float, cancel: bool = False,
                       exclude_worker: bool = True) -> None:
        """End ``p`` on its current worker: route it again if its client saw nothing yet and retries
        are left, else fail it with ``code``. ``cancel`` tells that worker to stop it;
        ``exclude_worker`` keeps the retry off that worker (every rank: the key stays the same)."""
        wid = p.worker_id
        worker = self.workers.get(wid) if wid is not None else None
        if cancel:
            self._cancel_on_worker(p)
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
        p = self.requests.get(msg.request_id)
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
            self.replies.send(p.client, msgspec.structs.replace(msg, request_id=rid))
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
        worker = self.workers.remove(wid)
        self.liveness.remove(wid)
        if worker is None:
            return
        self.ingest.remove_worker(wid)
        self.refresh_stats()
        now = self._clock()
        lost = [rec for t in worker.targets for rec in self.core.unregister(t)]
        if self.trust is not None:
            for t in worker.targets:
                self.trust.forget(t)
        self._mirror_write(lambda m: m.unregister_worker(wid, dp_ranks=[t.dp_rank for t in worker.targets]))
        for rec in lost:
            p = self.requests.get(rec.request_id)
            if p is None:
                continue
            self._fail_or_retry(p, code, why, now=now)

    # ------------------------------------------------------------------ output

    def _cancel_on_worker(self, p: PendingRequest) -> None:
        """Tell ``p``'s worker to stop it (if that worker is still registered)."""
        worker = None if p.target is None else self.workers.get(p.target.worker_id)
        if worker is not None:
            self._send_worker(worker.identity, Cancel(p.key))

    def _send_worker(self, identity: bytes, msg) -> None:
        try:
            self._workers_sock.send(identity, _SNDMORE_NOBLOCK)
            self._workers_sock.send(encode(msg), _NOBLOCK)
        except zmq.ZMQError as exc:
            self.counters["worker_send_drops"] += 1
            logger.debug("message to worker %s dropped: %s", identity.hex(), exc)

    def _mirror_write(self, write: Callable[[RedisMirror], None], *, refresh: bool = False) -> None:
        if self.mirror_sync is not None:
            self.mirror_sync.write(write, refresh=refresh)

    def _on_ingest_mirror_failure(self, exc: BaseException) -> None:
        """A KV-event batch's mirror write failed (``EventIngest`` rewrites that target later)."""
        if self.mirror_sync is not None:
            self.mirror_sync.failed(exc)

    def _mirror_status(self):
        return None if self.mirror_sync is None else self.mirror_sync.health.status()

    def refresh_stats(self) -> None:
        """Rebuild the snapshot other threads read (``self.stats``)."""
        counters = dict(self.counters)
        if self._zap is not None:  # CURVE handshakes refused (unknown keys), counted by the ZAP thread
            counters.update({f"auth_denied_{d.removeprefix('kvr-')}": n for d, n in self._zap.denied.items()})
        self.stats = stats_snapshot(core=self.core, index=self.index, streams=self.ingest.streams, counters=counters,
                                    workers=len(self.workers), pending=len(self.requests),
                                    mirror=self._mirror_status(), models=self.workers.models_served)

    def close(self) -> None:
        """Answer every pending request, then close sockets (idempotent)."""
        for p in self.requests:
            self._finish(p, ErrorReply(p.request.request_id, ErrorCode.ROUTER_RESTARTED, "router shutting down",
                                       p.worker_id))
        self.ingest.close()
        if self.peers is not None:
            self.peers.close()
        for sock in (self._clients, self._workers_sock, None if self._metrics is None else self._metrics.sock):
            if sock is not None and not sock.closed:
                sock.close(linger=0)
        if self._own_ctx and not self._ctx.closed:
            self._ctx.term()
