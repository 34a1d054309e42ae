"""The emulated engine as a worker backend: the engine on a (sped-up) wall clock + vLLM's publisher.

Same duck-typed interface as ``worker/vllm/backend.VllmBackend`` (``hello``, ``submit``,
``cancel``, ``drain``, ``loads``, ``close``), so ``worker/service.py`` runs either. The
emulated engine is pure; this class gives it time:

* engine time runs ``speedup`` times faster than the wall clock, from the moment the
  backend starts: ``engine_now = (wall - start) × speedup``;
* a step that the engine says takes ``d`` seconds is *in flight* for ``d / speedup``
  wall seconds; its tokens are emitted, and its KV events published, when it ends;
  then the next step starts at once (continuous batching). Requests that arrive
  meanwhile join at the next step, as on a real server. While the engine stays busy,
  steps chain in engine time, so late wake-ups (timer granularity, a busy CPU) never
  accumulate; a stall over ``max_lag_s`` (50 ms) resyncs the engine to the wall clock
  and is counted (``resyncs``): the engine then fell behind real time;
* every step's KV events go out as one vLLM event batch (``ts`` = wall time), with
  vLLM's replay socket, from ``bus.publisher.EventPublisher`` (fault injection there).

Single-threaded: every method runs on the service loop's thread (it owns the sockets).
``worker/emulated_dp.py`` runs one of these per data-parallel rank.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from bus.publisher import EventPublisher, FaultPlan
from bus.schema import Completion, Dispatch, ErrorCode, ErrorReply, Hello, RequestStats, TokenChunk, WorkerLoad
from bus.security import Curve
from core.engine import EmulatedEngine, EngineRequest, RequestOutput, RequestRejected
from core.own_block_hash import external_hash_key
from core.profiles import get_profile
from core.tokenizer import Tokenizer, load_tokenizer
from worker.vllm.exporter import EngineSnapshot, RequestMetrics

logger = logging.getLogger(__name__)

ENGINE_NAME = "emulated"
BackendMessage = TokenChunk | Completion | ErrorReply


@dataclass(frozen=True)
class EmulatedWorkerConfig:
    """Options of ``kvr worker`` (emulated engine)."""

    worker_id: str
    model: str = "kvr-emulated"
    profile: str = "simple"
    speedup: float = 1.0
    events_endpoint: str = "tcp://127.0.0.1:0"
    events_bind: bool = True  # False: dial out to a router that binds (vLLM's "central" mode)
    replay_endpoint: str | None = "tcp://127.0.0.1:0"  # always bound, as vLLM's
    # vLLM's default topic (empty): a peer that subscribes to everything hears it. The router
    # needs no topic to tell workers apart: it subscribes to each worker's endpoint on its own socket.
    topic: str = ""
    advertise_host: str = "127.0.0.1"  # host the router dials for our bound sockets
    seed: int | None = None  # engine rng (output tokens, drawn lengths) and fault rng
    tokenizer: str | None = None  # None: built-in; else a tokenizer.json path
    faults: FaultPlan | None = None
    stream_interval: int = 1  # tokens per TokenChunk after the first (vLLM's --stream-interval)
    lora_modules: tuple[str, ...] = ()  # LoRA adapter names served over HTTP (model = adapter name)
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    buffer_steps: int = 10_000
    events_hwm: int = 100_000  # PUB high-water mark per subscriber (vLLM's KVEventsConfig.hwm)
    events_sndbuf: int = 0  # PUB kernel send buffer per connection, bytes (0: the OS's)
    dp_rank: int = 0  # this engine's data-parallel rank (worker/emulated_dp.py runs several)


class EmulatedBackend:
    """The emulated engine behind the worker service (see the module docstring)."""

    engine = ENGINE_NAME

    def __init__(
        self,
        *,
        config: EmulatedWorkerConfig,
        ctx: zmq.Context | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        curve: Curve | None = None,
    ) -> None:
        """``curve``: the KV-event PUB and replay ROUTER are CURVE servers that admit only the
        router (bus/security.py); ``Hello`` carries their public key."""
        if config.speedup <= 0:
            raise ValueError("speedup must be positive")
        if config.stream_interval < 1:
            raise ValueError("stream_interval must be >= 1")
        self.config = config
        self.profile = get_profile(config.profile)
        seed = config.seed if config.seed is not None else random.SystemRandom().randrange(2**63)
        self.tokenizer: Tokenizer = load_tokenizer(config.tokenizer)
        overrides = dict(config.engine_overrides)
        if config.tokenizer is not None:
            overrides.setdefault("output_vocab", self.tokenizer.output_vocab())
        self.engine = EmulatedEngine(profile_or_config=self.profile, rng=random.Random(seed), **overrides)
        self.topic = config.topic
        self.publisher = EventPublisher(
            endpoint=config.events_endpoint, replay_endpoint=config.replay_endpoint, topic=self.topic,
            buffer_steps=config.buffer_steps, ctx=ctx, faults=config.faults, bind=config.events_bind,
            dp_rank=config.dp_rank, hwm=config.events_hwm, sndbuf=config.events_sndbuf,
            rng=random.Random(seed ^ 0x5EED),  # faults may also be switched on later (set_faults)
            curve=curve,
        )  # fmt: skip
        self.events_endpoint, self.replay_endpoint = self._advertised()
        self._clock = clock
        self._wall = wall_clock
        self._start = clock()
        self._outbox: list[BackendMessage] = []
        self.http_url: str | None = None  # set by the runner when the HTTP API is served; sent in Hello
        self._step_end: float | None = None  # wall (monotonic) time the in-flight step ends
        self._step_outputs: list[RequestOutput] = []
        self._step_events: list = []
        self.overrun_s = 0.0
        self.resyncs = 0
        self.lag_max_s = 0.0
        self.max_lag_s = 0.05
        self._step_engine_end = 0.0
        self.steps = 0
        self.request_metrics = RequestMetrics()
        self._last_arrival_s = 0.0
        self._token_buffers: dict[str, list[int]] = {}  # request id -> tokens not yet streamed

    def _advertised(self) -> tuple[str, str | None]:
        """Endpoints for ``Hello``: the router applies vLLM's rule to them (``*`` → it binds)."""
        pub = self.publisher
        if self.config.events_bind:
            events = _with_host(pub.endpoint, self.config.advertise_host)
        else:
            events = _with_host(pub.endpoint, "*")  # we dial out: the router listens there
        replay = None if pub.replay_endpoint is None else _with_host(pub.replay_endpoint, self.config.advertise_host)
        return events, replay

    # ------------------------------------------------------------------ clock

    def engine_now(self, now: float | None = None) -> float:
        """Engine time (seconds since start × speedup)."""
        return ((self._clock() if now is None else now) - self._start) * self.config.speedup

    # ------------------------------------------------------------------ registration and load

    def hello(self, *, epoch: int, profile: str = "") -> Hello:
        eng = self.engine
        return Hello(
            worker_id=self.config.worker_id, epoch=epoch, model=self.config.model, block_size=eng.config.block_size,
            num_gpu_blocks=eng.config.num_gpu_blocks, events_endpoint=self.events_endpoint,
            replay_endpoint=self.replay_endpoint, topic=self.topic, dp_size=1, profile=profile or self.config.profile,
            engine=ENGINE_NAME, http_url=self.http_url,
            events_curve_key=self.publisher.curve.public_z85 if self.publisher.curve is not None else "",
            max_model_len=eng.max_model_len,
        )  # fmt: skip

    def load(self, dp_rank: int = 0) -> WorkerLoad:
        ld = self.engine.load()
        return WorkerLoad(
            running=ld.running, waiting=ld.waiting, queued_prefill_tokens=ld.queued_prefill_tokens,
            kv_usage=ld.kv_usage, num_free_blocks=ld.num_free_blocks, num_gpu_blocks=self.engine.config.num_gpu_blocks,
        )  # fmt: skip

    def loads(self) -> dict[int, WorkerLoad]:
        return {0: self.load(0)}

    @property
    def num_in_flight(self) -> int:
        ld = self.engine.load()
        return ld.running + ld.waiting

    # ------------------------------------------------------------------ requests

    def submit(self, dispatch: Dispatch) -> None:
        """Queue a request; its messages come out of :meth:`drain` as steps end."""
        if self.engine.has_request(dispatch.request_id):
            # A re-sent dispatch (the router retried over a flaky link): the first one answers.
            logger.warning("duplicate dispatch %s ignored (already running)", dispatch.request_id)
            return
        if dispatch.dp_rank not in (self.config.dp_rank, -1):  # -1: any rank (local requests)
            self._outbox.append(self._error(dispatch.request_id, ErrorCode.BAD_REQUEST,
                                            f"no DP rank {dispatch.dp_rank} on this worker"))
            return
        # max_tokens <= 0: the engine draws a length (HTTP chat requests without max_tokens).
        max_tokens = dispatch.max_tokens if dispatch.max_tokens > 0 else None
        req = EngineRequest(
            dispatch.request_id, list(dispatch.token_ids), max_tokens, dispatch.lora_name, dispatch.cache_salt
        )
        try:
            self._last_arrival_s = self.engine_now()
            self.engine.add_request(req, now=self._last_arrival_s)
        except RequestRejected as exc:
            code = ErrorCode.PROMPT_TOO_LONG if "max_model_len" in str(exc) else ErrorCode.BAD_REQUEST
            self._outbox.append(self._error(dispatch.request_id, code, str(exc)))

    def cancel(self, request_id: str, *, code: ErrorCode = ErrorCode.CANCELLED, message: str = "cancelled") -> bool:
        """Abort a request; it ends with one ``ErrorReply`` (``CANCELLED``). False if unknown."""
        out = self.engine.abort(request_id, now=self.engine_now())
        if out is None:
            return False
        self._step_outputs = [o for o in self._step_outputs if o.request_id != request_id]
        self._token_buffers.pop(request_id, None)
        self._outbox.append(self._error(request_id, code, message))
        return True

    def drain(self) -> list[BackendMessage]:
        out = self._outbox
        self._outbox = []
        return out

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's reset → ``AllBlocksCleared``; refused while blocks are in use unless
        ``reset_running_requests`` (running requests are preempted and recompute)."""
        ok = self.engine.reset_prefix_cache(reset_running_requests=reset_running_requests)
        if ok:
            events = self.engine.drain_events()
            if self._step_end is not None:
                self._step_events.extend(events)  # after the events of the step in flight, as on vLLM
            else:
                self.publisher.publish(events, ts=self._wall())
        return ok

    def set_faults(self, faults: FaultPlan | None) -> None:
        """Change the event plane's fault injection at run time (a fault at a chosen moment: benchmarks)."""
        self.publisher.faults = faults
        logger.warning("event-plane faults now %s", faults)

    def cached_block_keys(self) -> list[int]:
        """The engine's truth: external hash keys (as the router indexes them) of every cached block."""
        ext = self.engine.pool.hasher.external
        return sorted(external_hash_key(ext(b.block_hash)) for b in self.engine.pool.cached_blocks())

    def restart_publisher(self) -> None:
        """Fault: look like a restarted vLLM publisher (seq back to 0, empty replay ring)."""
        self.publisher.restart()
        logger.warning("publisher restarted: seq back to 0")

    # ------------------------------------------------------------------ time

    def advance(self, now: float | None = None) -> float | None:
        """Finish the step in flight if its time has come, start the next; returns the next due time.

        While the engine stays busy, steps follow each other in *engine* time and their
        wall due times are derived from it, so timer granularity and small delays never
        accumulate; only a lag over ``max_lag_s`` makes the engine resync to the wall
        clock (the engine then falls behind real time, counted in ``overrun_s``).
        """
        now = self._clock() if now is None else now
        busy_until = None
        if self._step_end is not None:
            if now < self._step_end:
                return self._step_end
            lag = now - self._step_end
            self.overrun_s += lag
            self.lag_max_s = max(self.lag_max_s, lag)
            self._finish_step()
            if lag <= self.max_lag_s:
                busy_until = self._step_engine_end
            else:
                self.resyncs += 1
        if not self.engine.has_work():
            return None
        start = self.engine_now(now) if busy_until is None else busy_until
        # Never start a step before a request that is already queued arrived.
        start = max(start, self._last_arrival_s)
        result = self.engine.step(start)
        self.steps += 1
        self._step_outputs = result.outputs
        self._step_events = self.engine.drain_events()
        self._step_engine_end = start + result.duration_s
        self._step_end = self._start + self._step_engine_end / self.config.speedup
        if result.duration_s == 0.0 and not result.outputs:
            # Nothing could be scheduled (should not happen with work queued): do not spin.
            self._step_end = now + 0.001
        return self._step_end

    def _finish_step(self) -> None:
        self._step_end = None
        interval = self.config.stream_interval
        buffers = self._token_buffers
        for o in self._step_outputs:
            if o.new_token_ids:
                # The first token goes out at once; later ones every `interval` tokens and at the end.
                buf = buffers.get(o.request_id)
                if buf is None:
                    buffers[o.request_id] = []
                    self._emit_tokens(o.request_id, o.new_token_ids)
                else:
                    buf.extend(o.new_token_ids)
                    if len(buf) >= interval or o.finished:
                        self._emit_tokens(o.request_id, buf)
                        buffers[o.request_id] = []
            if o.finished:
                buf = buffers.pop(o.request_id, None)
                if buf:
                    self._emit_tokens(o.request_id, buf)
            if o.finished and o.stats is not None:
                s = o.stats
                self.request_metrics.record(
                    reason=s.finish_reason, prompt_tokens=s.num_prompt_tokens, output_tokens=s.num_output_tokens,
                    ttft_s=s.ttft_s, e2e_s=s.e2e_s, queue_s=s.queue_s, prefill_s=s.prefill_s, decode_s=s.decode_s,
                )
                self._outbox.append(
                    Completion(
                        request_id=o.request_id, worker_id=self.config.worker_id, prompt_tokens=s.num_prompt_tokens,
                        cached_tokens=s.num_cached_tokens, output_tokens=s.num_output_tokens,
                        finish_reason=s.finish_reason,
                        stats=RequestStats(queue_s=s.queue_s, prefill_s=s.prefill_s, ttft_s=s.ttft_s,
                                           decode_s=s.decode_s, e2e_s=s.e2e_s, preemptions=s.preemptions),
                    )
                )  # fmt: skip
        self._step_outputs = []
        if self._step_events:
            self.publisher.publish(self._step_events, ts=self._wall())
            self._step_events = []

    def _emit_tokens(self, request_id: str, token_ids: list[int]) -> None:
        self._outbox.append(TokenChunk(request_id, token_ids, self.tokenizer.decode(token_ids)))

    def snapshot(self) -> EngineSnapshot:
        """What ``/metrics`` renders (call on the loop thread)."""
        eng = self.engine
        ld = eng.load()
        st = eng.pool.stats
        return EngineSnapshot(
            model=self.config.model, running=ld.running, waiting=ld.waiting, kv_usage=ld.kv_usage,
            prefix_queries_tokens=st.queries_tokens, prefix_hits_tokens=st.hits_tokens,
            preemptions=eng.counters.preemptions, block_size=eng.config.block_size,
            num_gpu_blocks=eng.config.num_gpu_blocks, enable_prefix_caching=eng.config.enable_prefix_caching,
            requests=copy.deepcopy(self.request_metrics),
        )  # fmt: skip

    def poll_sockets(self) -> None:
        """Serve replay requests and release delayed batches (never blocks)."""
        self.publisher.poll_replay(0)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Answer every request still in the engine, flush held batches, close the sockets."""
        if self._step_end is not None:
            self._finish_step()  # the step in flight ends early: its tokens and events go out
        for rid in self.engine.request_ids():
            self.cancel(rid, code=ErrorCode.WORKER_ERROR, message="worker is shutting down")
        self.publisher.flush_held()
        self.publisher.close()
        c = self.engine.counters
        logger.info("engine stopped: %d steps, %d requests finished, %d preemptions, %.3f s emulated busy; "
                    "step wake-up lag mean %.2f ms max %.2f ms, %d resyncs (the engine fell behind real time)",
                    c.steps, c.finished, c.preemptions, c.busy_s, self.overrun_s / max(1, self.steps) * 1e3,
                    self.lag_max_s * 1e3, self.resyncs)

    def reject(self, request_id: str, code: ErrorCode, message: str) -> None:
        """Answer a request that will not run with its one terminal ``ErrorReply``."""
        self._outbox.append(self._error(request_id, code, message))

    def _error(self, request_id: str, code: ErrorCode, message: str) -> ErrorReply:
        return ErrorReply(request_id, code, message, self.config.worker_id)


def _with_host(endpoint: str, host: str) -> str:
    """``tcp://any:port`` → ``tcp://host:port`` (other transports unchanged)."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    return f"tcp://{host}:{endpoint.rpartition(':')[2]}"
