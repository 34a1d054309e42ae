"""Router replicas tell each other what they have in flight on each target.

Several routers may share one fleet (each worker registers with every one of them, each keeps its
own exact index from the workers' KV events). What one replica cannot see is the others' requests
between two heartbeats of a worker: without them a replica reads an engine as idle that the others
just loaded, and replicas pile on the same worker (Dynamo syncs active sequences between router
replicas for the same reason). So every replica publishes, on its metrics PUB under
``names.PEER_LOAD_TOPIC``, its own figures per target (``RouterCore.own_load``: requests in
flight, prefill tokens not started, decode blocks, active blocks) whenever they changed, at most
every ``interval_s`` and at least every ``keepalive_s`` (the router's heartbeat interval); and
subscribes to its peers' metrics PUBs (``RouterConfig.peers``). ``RouterCore.set_peer_load`` adds a
peer's figures to each target's load; a peer silent for ``timeout_s`` (the heartbeat timeout, as for
a worker: stopped, crashed, partitioned) is forgotten, so a dead replica's requests stop counting.

Each message also carries the blocks this replica predicted on each target since its previous one
(``RouterCore.take_shared_routes``): the peers predict them there too (``predict_from_peer``), so a
new prefix routed by one replica is followed by the others' requests for it in the ~100 ms before
the worker's first ``BlockStored`` reaches them all (without this, two replicas could warm one
prefix on two workers).

Invariants: a peer's message replaces its previous one (never summed); within one incarnation
(``epoch``) an older ``seq`` is dropped; this router's own messages are never applied.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence

import zmq

from bus import names
from bus.codec import DecodeError, encode, peer_decoder
from bus.schema import PeerLoad, PeerRoute, PeerTargetEntry
from bus.sockets import MAX_CONTROL_BYTES, make_socket
from core.prefix_index import WorkerKey
from core.routing import PeerTargetLoad, RouterCore

logger = logging.getLogger(__name__)

DEFAULT_INTERVAL_S = 0.02  # the routing loop's housekeeping pace (RouterConfig.housekeeping_s)
DEFAULT_KEEPALIVE_S = 1.0
DEFAULT_TIMEOUT_S = 3.0


class PeerSync:
    def __init__(self, *, core: RouterCore, router_id: str, epoch: int, pub: zmq.Socket, peers: Sequence[str],
                 ctx: zmq.Context, counters: Counter[str], clock: Callable[[], float],
                 interval_s: float = DEFAULT_INTERVAL_S, keepalive_s: float = DEFAULT_KEEPALIVE_S,
                 timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        """``pub``: this router's metrics PUB; ``peers``: the other replicas' metrics endpoints."""
        self._core = core
        core.share_routes()
        self._router_id, self._epoch = router_id, epoch
        self._pub = pub
        self._counters = counters
        self._clock = clock
        self._interval_s, self._keepalive_s, self._timeout_s = interval_s, keepalive_s, timeout_s
        self.sub = make_socket(ctx, zmq.SUB, max_msg_size=MAX_CONTROL_BYTES)
        self.sub.setsockopt(zmq.SUBSCRIBE, names.PEER_LOAD_TOPIC)
        for endpoint in peers:
            self.sub.connect(endpoint)
        self._decoder = peer_decoder()
        self._seq = 0
        self._last_sent: dict[WorkerKey, PeerTargetLoad] | None = None
        self._next_send_s = 0.0
        self._last_send_s = -1e9
        #: peer router id -> (epoch, seq, clock time last heard)
        self.heard: dict[str, tuple[int, int, float]] = {}

    def tick(self, now: float) -> None:
        """Publish this router's figures if due; forget peers gone silent."""
        if now >= self._next_send_s:
            self._next_send_s = now + self._interval_s
            own = self._core.own_load()
            routes = self._core.take_shared_routes()
            if routes or own != self._last_sent or now - self._last_send_s >= self._keepalive_s:
                self._send(own, now, routes)
        for peer, (_, _, last) in list(self.heard.items()):
            if now - last > self._timeout_s:
                logger.warning("router replica %s silent for %.1f s: its requests no longer count", peer, now - last)
                del self.heard[peer]
                self._core.forget_peer(peer)
                self._counters["peers_forgotten"] += 1

    def _send(self, own: dict[WorkerKey, PeerTargetLoad], now: float,
              routes: Sequence[tuple[WorkerKey, list[int]]] = ()) -> None:
        self._seq += 1
        msg = PeerLoad(self._router_id, self._epoch, self._seq,
                       [PeerTargetEntry(t.worker_id, t.dp_rank, *load) for t, load in own.items()],
                       [PeerRoute(t.worker_id, t.dp_rank, hashes) for t, hashes in routes])
        try:
            self._pub.send_multipart([names.PEER_LOAD_TOPIC, encode(msg)], zmq.NOBLOCK)
        except zmq.ZMQError:
            self._counters["peer_load_drops"] += 1
            return
        self._last_sent, self._last_send_s = own, now

    def handle(self) -> None:
        """Read every peer message waiting (the service polls ``sub``)."""
        for _ in range(1000):  # bounded: a flood must not starve routing
            try:
                frames = self.sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if len(frames) != 2:
                self._counters["bad_peer_messages"] += 1
                continue
            try:
                msg = self._decoder.decode(frames[1])
            except DecodeError as exc:
                self._counters["bad_peer_messages"] += 1
                logger.warning("undecodable router-replica message: %s", exc)
                continue
            self._apply(msg)

    def _apply(self, msg: PeerLoad) -> None:
        if msg.router_id == self._router_id:
            if msg.epoch != self._epoch:  # another process calls itself this router: ids must differ
                self._counters["peer_id_conflicts"] += 1
            return
        seen = self.heard.get(msg.router_id)
        if seen is not None and seen[0] == msg.epoch and msg.seq <= seen[1]:
            self._counters["peer_load_stale"] += 1
            return
        if seen is None:
            logger.info("router replica %s heard (epoch %d): counting its requests in flight", msg.router_id,
                        msg.epoch)
        self.heard[msg.router_id] = (msg.epoch, msg.seq, self._clock())
        self._core.set_peer_load(msg.router_id, {
            WorkerKey(e.worker_id, e.dp_rank): PeerTargetLoad(e.in_flight, e.pending_prefill_tokens, e.decode_blocks,
                                                              e.active_blocks) for e in msg.targets})
        self._counters["peer_loads_applied"] += 1
        if msg.routes:
            now = self._clock()
            for route in msg.routes:
                if self._core.predict_from_peer(WorkerKey(route.worker_id, route.dp_rank), route.block_hashes,
                                                now=now):
                    self._counters["peer_routes_predicted"] += 1

    def close(self) -> None:
        self.sub.close(linger=0)
