"""KV-event publisher that behaves like vLLM 0.33's ``ZmqEventPublisher`` on the wire.

Live messages are ``[topic, seq u64 big-endian, payload]`` on a PUB socket; ``seq``
starts at 0 for each publisher instance (and after :meth:`EventPublisher.restart`)
and grows by one per batch. The last ``buffer_steps`` ``(seq, payload)`` pairs stay
in a ring, served by a replay ROUTER:

* request (as the ROUTER sees it): exactly ``[identity, b"", start_seq]``, start
  big-endian of any length; any other frame count is logged and ignored (no reply);
* reply, ``reply_format="0.33"``: ``[identity, b"", topic, seq, payload]`` per
  buffered batch with ``seq >= start``, then ``[identity, b"", b"", ff*8, b""]``;
* reply, ``reply_format="legacy"`` (vLLM <= 0.24): ``[identity, b"", seq, payload]``,
  then ``[identity, b"", ff*8, b""]``.

Threading model (zmq sockets are not thread-safe): **the thread that constructs an
:class:`EventPublisher` owns its sockets and is the only one allowed to call its
methods.** A worker loop calls :meth:`~EventPublisher.publish` after each engine
step and :meth:`~EventPublisher.poll_replay` between steps (with ``timeout_ms=0``
it never blocks). Code that publishes from several threads, or has no loop of
its own, uses ``bus.publisher_thread.PublisherThread``: like vLLM, a background
thread owns the publisher and is fed through a queue.

Fault injection (:class:`FaultPlan`, with an injected ``random.Random``) applies to
*live* sends only: the ring always holds the true stream, as in vLLM, where a PUB
drop under HWM pressure is recoverable by replay.
"""

from __future__ import annotations

import itertools
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from bus.security import EVENTS_DOMAIN, Curve
from bus.sockets import (
    DEFAULT_HWM,
    MAX_CONTROL_BYTES,
    SocketSetup,
    make_pub,
    make_router,
    offset_endpoint_for_dp_rank,
    vllm_binds,
)
from bus.vllm_codec import encode_batch
from core.events import KVEvent, KVEventBatch

logger = logging.getLogger(__name__)

#: The seq frame of a replay's end marker: -1 as a signed 64-bit integer.
END_SEQ = b"\xff" * 8
REPLY_FORMATS = ("0.33", "legacy")


def seq_bytes(seq: int) -> bytes:
    """The seq frame: 8 bytes, big-endian, unsigned."""
    return seq.to_bytes(8, "big")


@dataclass(frozen=True)
class FaultPlan:
    """Per-batch fault rates on live sends (at most one fault per batch, drawn in this order).

    * drop: the batch is never sent live (it is still in the replay ring);
    * duplicate: sent twice in a row;
    * reorder: held back and sent right after the next batch (or after ``delay_ms``);
    * delay: held back ``delay_ms``, sent by a later publish/poll call.
    """

    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    reorder_rate: float = 0.0
    delay_rate: float = 0.0
    delay_ms: float = 50.0

    def __post_init__(self) -> None:
        rates = (self.drop_rate, self.duplicate_rate, self.reorder_rate, self.delay_rate)
        if any(r < 0 for r in rates) or sum(rates) > 1:
            raise ValueError(f"fault rates must be >= 0 and sum to <= 1, got {rates}")

    def draw(self, rng: random.Random) -> str | None:
        """Which fault (if any) hits the next batch."""
        x = rng.random()
        for name, rate in (("drop", self.drop_rate), ("duplicate", self.duplicate_rate),
                           ("reorder", self.reorder_rate), ("delay", self.delay_rate)):
            if x < rate:
                return name
            x -= rate
        return None


@dataclass
class PublisherCounters:
    published: int = 0
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    reordered: int = 0
    delayed: int = 0
    replay_requests: int = 0
    replayed_batches: int = 0
    bad_replay_requests: int = 0
    restarts: int = 0


class EventPublisher:
    """vLLM-compatible PUB + replay ROUTER for one engine (one data-parallel rank)."""

    def __init__(
        self,
        *,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str | bytes = "",
        buffer_steps: int = 10_000,
        hwm: int = DEFAULT_HWM,
        dp_rank: int = 0,
        reply_format: str = "0.33",
        ctx: zmq.SyncContext | None = None,
        bind: bool | None = None,
        faults: FaultPlan | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.monotonic,
        curve: Curve | None = None,
        sndbuf: int = 0,
    ) -> None:
        """``endpoint``/``replay_endpoint`` are base endpoints, offset by ``dp_rank`` as vLLM does.

        ``hwm`` batches queue per subscriber before ZMQ drops live batches for it; in front of that
        the kernel buffers a connection's bytes (``sndbuf``, 0 = the OS's autotuned size, MBs on
        loopback), so a small ``sndbuf`` makes a stuck subscriber overflow the HWM soon (tests).

        With ``curve`` the PUB and the replay ROUTER are CURVE servers (this worker's key pair)
        that admit only the router's key, so nobody else can read the stream or take the
        port's place unnoticed (the router's SUB checks the server key).

        ``bind=None`` applies vLLM's bind-or-connect rule to the PUB; ``True``/``False``
        overrides it (``tcp://127.0.0.1:port`` would otherwise connect). ``faults``
        needs ``rng`` (seeded by the caller) so runs are reproducible.
        """
        if reply_format not in REPLY_FORMATS:
            raise ValueError(f"reply_format must be one of {REPLY_FORMATS}, got {reply_format!r}")
        if buffer_steps < 1:
            raise ValueError("buffer_steps must be >= 1")
        if faults is not None and rng is None:
            raise ValueError("a FaultPlan needs an injected rng")
        self.topic = topic.encode() if isinstance(topic, str) else bytes(topic)
        self.dp_rank = dp_rank
        self.reply_format = reply_format
        self.buffer_steps = buffer_steps
        self.faults = faults
        self.counters = PublisherCounters()
        self._hwm = hwm
        self._sndbuf = sndbuf
        self._bind = bind
        self._rng = rng
        self._clock = clock
        self.curve = curve
        self._own_ctx = ctx is None
        self._ctx: zmq.SyncContext = ctx if ctx is not None else zmq.Context()
        self._base_endpoint = offset_endpoint_for_dp_rank(endpoint, dp_rank)
        self._base_replay = None if replay_endpoint is None else offset_endpoint_for_dp_rank(replay_endpoint, dp_rank)
        self._ring: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        # Held live messages (faults): (release_due_s, release_after_next_send, frames)
        self._held: list[tuple[float, bool, list[bytes]]] = []
        # None only while closed (between close() or a failed open and the next open).
        self._pub: zmq.SyncSocket | None = None
        self._router: zmq.SyncSocket | None = None
        self._seq = 0
        self._open_sockets(self._base_endpoint, self._base_replay)

    # -- lifecycle ---------------------------------------------------------------------------

    def _open_sockets(self, endpoint: str, replay_endpoint: str | None) -> None:
        setup: SocketSetup | None = None
        if self.curve is not None:
            curve = self.curve

            def serve(sock: zmq.Socket[Any]) -> None:
                curve.serve(sock, domain=EVENTS_DOMAIN, allow=(curve.router_public,))
            setup = serve
        pub_setup = setup
        if self._sndbuf:
            def with_sndbuf(sock: zmq.Socket[Any], _then: SocketSetup | None = setup) -> None:
                sock.setsockopt(zmq.SNDBUF, self._sndbuf)  # before bind: connections inherit it
                if _then is not None:
                    _then(sock)
            pub_setup = with_sndbuf
        self._pub, self.endpoint = make_pub(self._ctx, endpoint, hwm=self._hwm, bind=self._bind, setup=pub_setup)
        self.replay_endpoint: str | None = None
        if replay_endpoint is not None:
            # 0.33 sizes the ROUTER's send queue for a whole ring plus the end marker.
            try:
                self._router, self.replay_endpoint = make_router(
                    self._ctx, replay_endpoint, sndhwm=2 * (self.buffer_steps + 1), max_msg_size=MAX_CONTROL_BYTES,
                    setup=setup)
            except zmq.ZMQError:
                self._close_sockets()
                raise
        logger.debug("publisher up: %s (replay %s, topic %r, rank %d)",
                     self.endpoint, self.replay_endpoint, self.topic, self.dp_rank)

    def _close_sockets(self) -> None:
        for sock in (self._pub, self._router):
            if sock is not None:
                sock.close(linger=0)
        self._pub = self._router = None

    def restart(self) -> None:
        """Look like a restarted vLLM: new sockets on the same endpoints, seq 0, empty ring."""
        # Reuse resolved endpoints so a ``:0`` port stays the port peers know.
        endpoint = self.endpoint if self._pub_bound() else self._base_endpoint
        replay = self.replay_endpoint
        self._close_sockets()
        self._seq = 0
        self._ring.clear()
        self._held.clear()
        self.counters.restarts += 1
        self._open_sockets(endpoint, replay)

    def _pub_bound(self) -> bool:
        return vllm_binds(self._base_endpoint) if self._bind is None else self._bind

    def close(self) -> None:
        """Close the sockets (linger 0) and the context if this publisher made it."""
        self._close_sockets()
        if self._own_ctx:
            self._ctx.term()

    def __enter__(self) -> EventPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- publishing --------------------------------------------------------------------------

    @property
    def next_seq(self) -> int:
        """The seq the next batch will carry."""
        return self._seq

    def publish(self, events: Sequence[KVEvent], ts: float) -> int:
        """Encode ``[ts, events, dp_rank]`` as vLLM 0.33 does and send it; returns its seq."""
        return self.publish_raw(encode_batch(KVEventBatch(ts, list(events), self.dp_rank)))

    def publish_batch(self, batch: KVEventBatch) -> int:
        """Publish a whole batch; a ``None`` rank is filled with this publisher's, as vLLM does."""
        if batch.data_parallel_rank is None:
            batch = KVEventBatch(batch.ts, batch.events, self.dp_rank)
        return self.publish_raw(encode_batch(batch))

    def publish_raw(self, payload: bytes) -> int:
        """Send arbitrary payload bytes as the next batch (ring included); returns its seq."""
        seq = self._seq
        self._seq += 1
        self._ring.append((seq, payload))
        self.counters.published += 1
        self._send_live([self.topic, seq_bytes(seq), payload])
        return seq

    def publish_frames(self, frames: Sequence[bytes]) -> None:
        """Send raw frames on the PUB (no seq, no ring): malformed-message injection."""
        assert self._pub is not None, "publisher is closed"
        self._pub.send_multipart(list(frames))

    def _send_live(self, frames: list[bytes]) -> None:
        faults = self.faults
        fault = None
        if faults is not None:
            # faults may be switched on after construction (set_faults), so check the rng here too.
            if self._rng is None:
                raise ValueError("a FaultPlan needs an injected rng")
            fault = faults.draw(self._rng)
        if fault == "drop":
            self.counters.dropped += 1
        elif fault == "duplicate":
            self.counters.duplicated += 1
            self._send(frames)
            self._send(frames)
        elif fault in ("reorder", "delay"):
            if fault == "reorder":
                self.counters.reordered += 1
            else:
                self.counters.delayed += 1
            assert faults is not None  # the fault was drawn from it
            due = self._clock() + faults.delay_ms / 1000.0
            self._held.append((due, fault == "reorder", frames))
            return  # a held batch does not release others: it is "in flight"
        else:
            self._send(frames)
        self._release_held(after_send=fault != "drop")

    def _send(self, frames: list[bytes]) -> None:
        assert self._pub is not None, "publisher is closed"
        self._pub.send_multipart(frames)  # copying beats zero-copy for messages this small
        self.counters.sent += 1

    def _release_held(self, *, after_send: bool = False) -> None:
        if not self._held:
            return
        now = self._clock()
        keep = []
        for item in self._held:
            due, after_next, frames = item
            if now >= due or (after_send and after_next):
                self._send(frames)
            else:
                keep.append(item)
        self._held = keep

    @property
    def held(self) -> int:
        """Live batches held back by reorder/delay faults, not yet sent."""
        return len(self._held)

    def flush_held(self) -> None:
        """Send every held batch now (shutdown, end of a test)."""
        for _, _, frames in self._held:
            self._send(frames)
        self._held.clear()

    # -- replay ------------------------------------------------------------------------------

    def poll_replay(self, timeout_ms: int = 0) -> int:
        """Serve replay requests waiting (up to ``timeout_ms`` for the first); returns how many.

        Also releases delayed batches that are due, so a worker loop only needs this call.
        """
        self._release_held()
        router = self._router
        if router is None:
            return 0
        served = 0
        wait = timeout_ms
        while router.poll(wait, zmq.POLLIN):
            self._serve(router.recv_multipart())
            served += 1
            wait = 0
        self._release_held()
        return served

    def _serve(self, frames: list[bytes]) -> None:
        router = self._router
        assert router is not None  # poll_replay serves only while a replay socket is open
        # vLLM answers only [identity, b"", start_seq]; anything else is ignored, no reply.
        if len(frames) != 3:
            self.counters.bad_replay_requests += 1
            logger.warning("ignoring replay request with %d frames (want 3)", len(frames))
            return
        identity, _, start_frame = frames
        if len(start_frame) > 8:  # a seq is a uint64; a longer frame is not a replay request
            self.counters.bad_replay_requests += 1
            logger.warning("ignoring replay request with a %d-byte start seq (want 8)", len(start_frame))
            return
        start = int.from_bytes(start_frame, "big")
        self.counters.replay_requests += 1
        sent = 0
        if self._ring:
            # The ring holds consecutive seqs, so the start index is arithmetic (clamped: islice
            # refuses offsets past sys.maxsize, and a start of 2**64-1 is a valid request).
            offset = min(max(0, start - self._ring[0][0]), len(self._ring))
            for seq, payload in itertools.islice(self._ring, offset, None):
                if self.reply_format == "0.33":
                    router.send_multipart([identity, b"", self.topic, seq_bytes(seq), payload])
                else:
                    router.send_multipart([identity, b"", seq_bytes(seq), payload])
                sent += 1
        end = [identity, b"", b"", END_SEQ, b""] if self.reply_format == "0.33" else [identity, b"", END_SEQ, b""]
        router.send_multipart(end)
        self.counters.replayed_batches += sent
        logger.debug("replayed %d batches from seq %d", sent, start)

