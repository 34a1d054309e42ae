"""N emulated engines and one router core on a virtual clock, joined by direct calls.

The engines, the prefix index, the router core and the policies are the very
objects the live worker and router run (``core/``); only the transport is
replaced by events on a heap:

* a client request reaches the router at its arrival time and is routed at once;
  it reaches its engine ``network_latency_s`` later;
* an engine steps back to back while it has work: ``step(now)`` returns the
  step's duration and its outputs, which become visible at ``now + duration``;
  tokens reach the client ``network_latency_s`` after that;
* the KV events an engine emits during a step reach the router's index
  ``event_delay_s`` after the step ends (the event plane's lag);
* every ``heartbeat_interval_s`` each engine's load is sampled and handed to the
  router, so the load it sees is stale by up to that interval (0: fresh load
  before every routing decision); a peer model whose real router scrapes engine
  metrics more often says so (``load_scrape_interval_s`` on the policy, llm-d's
  50 ms), and the router is handed the load at that interval too;
* worker churn (``ClusterConfig.churn``, ``sim/churn.py``): cache resets, restarts and
  workers joining mid-run, reaching the router as they reach the live one.

Everything random comes from ``random.Random`` instances derived from one seed,
and same-time events run in scheduling order, so a run is a pure function of
its inputs: same seed, same report, byte for byte.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from core.engine import EmulatedEngine, EngineRequest, RequestRejected
from core.events import AllBlocksCleared
from core.metrics import MetricsFold, RequestRecord, infinite_cache_upper_bound
from core.policies import get_policy
from core.prefix_index import PrefixIndex, WorkerKey, request_block_hashes
from core.profiles import get_profile
from core.routing import NoTargetsError, RouterCore, RoutingInput
from sim.churn import RESET, ChurnConfig, churn_victim
from sim.clock import EventQueue
from sim.rejections import Rejections
from sim.workload import ArrivalProcess, SimRequest, Workload, assign_arrivals

logger = logging.getLogger(__name__)


@dataclass
class ClusterConfig:
    """Fleet shape and the knobs of the simulated transport."""

    num_workers: int = 8
    #: One profile name for every worker, or one per worker.
    profile: str | list[str] = "simple"
    event_delay_s: float = 0.0
    heartbeat_interval_s: float = 1.0  # the live worker's default
    network_latency_s: float = 0.0
    #: Engine config overrides for every worker (``num_gpu_blocks``, ``max_model_len`` ...).
    engine_overrides: dict[str, Any] = field(default_factory=dict)
    #: Extra keyword arguments for ``RouterCore`` (e.g. tentative window).
    router_options: dict[str, Any] = field(default_factory=dict)
    #: Run pure-decode stretches in one engine call (same results; see ``EmulatedEngine.decode_steps``).
    decode_fast_path: bool = True
    #: Width of the metrics timeline buckets (hit rate and load over time).
    timeline_bucket_s: float = 10.0
    #: Cache resets, restarts and scale-out mid-run (default: none). ``num_workers`` is the
    #: fleet at the start; each join adds one more worker.
    churn: ChurnConfig = field(default_factory=ChurnConfig)

    def profiles(self) -> list[str]:
        if isinstance(self.profile, str):
            return [self.profile] * self.num_workers
        if len(self.profile) != self.num_workers:
            raise ValueError("give one profile, or one per worker")
        return list(self.profile)

    def all_profiles(self) -> list[str]:
        """One profile per worker that ever runs: the starting fleet, then the joiners (the
        j-th joiner takes the j-th starting worker's profile, cyclically)."""
        start = self.profiles()
        return start + [start[j % len(start)] for j in range(self.churn.joins)]


@dataclass(slots=True)
class _InFlight:
    req: SimRequest
    worker: int
    arrival_s: float
    predicted_cached_tokens: int
    first_token_s: float | None = None
    output: list[int] | None = None
    #: Times this request was routed again after its worker restarted (0: first routing).
    retries: int = 0


@dataclass
class RunResult:
    """One policy's run: its metrics fold and the workload's bound in this run's arrival order."""

    policy: str
    fold: MetricsFold
    upper_bound: float
    requests: int
    unfinished: int
    rejected: int = 0
    #: Mean over engines of busy time / (first arrival .. last finish).
    busy_fraction: float = math.nan
    #: Engine calls that ran several decode steps at once (the fast path).
    fast_windows: int = 0
    #: The rejections by cause (``rejected`` is their total).
    rejections: Rejections = field(default_factory=Rejections)
    #: When the router received the last request, follow-ups included (-inf: none); with the
    #: fold's first arrival it bounds the offered load's span (sim/goodput.py).
    last_arrival_s: float = -math.inf
    #: Requests that ended with an error because their worker restarted after their first
    #: token (or with no retry or worker left): ``WORKER_DIED`` to the client.
    failed: int = 0
    #: Requests routed again because their worker restarted before their first token.
    retried: int = 0
    #: Churn events (resets and restarts) that happened during the run.
    churn_events: int = 0


class SimCluster:
    """One simulation run of ``workload`` under ``policy``. Call :meth:`run` once."""

    def __init__(
        self,
        *,
        workload: Workload,
        arrivals: ArrivalProcess,
        policy: str,
        config: ClusterConfig,
        seed: int,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.workload = workload
        self.arrivals = arrivals
        self.policy_name = policy
        self.config = config
        self.progress = progress
        master = random.Random(seed)
        # Separate streams so that one component's draws never shift another's.
        self._arrival_rng = random.Random(master.getrandbits(64))
        router_rng = random.Random(master.getrandbits(64))
        engine_seeds = [master.getrandbits(64) for _ in range(config.num_workers)]
        # Drawn after the streams above, so a run without churn draws exactly what it did before.
        engine_seeds += [master.getrandbits(64) for _ in range(config.churn.joins)]
        self._restart_rng = random.Random(master.getrandbits(64))
        self.q = EventQueue()
        profiles = [get_profile(name) for name in config.all_profiles()]
        self._profiles = profiles
        self.block_size = profiles[0].block_size
        if any(p.block_size != self.block_size for p in profiles):
            raise ValueError("every worker must use one block size")
        num_all = len(profiles)
        self.names = [f"w{i}" for i in range(num_all)]
        self.targets = [WorkerKey(n, 0) for n in self.names]
        self._target_index = {t: i for i, t in enumerate(self.targets)}
        self.engines = [
            EmulatedEngine(profile_or_config=p, rng=random.Random(s), **config.engine_overrides)
            for p, s in zip(profiles, engine_seeds, strict=True)
        ]
        self.index = PrefixIndex(block_size=self.block_size)
        pol = get_policy(policy, block_size=self.block_size, latency=profiles[0].latency)
        router_options = dict(config.router_options)
        # A peer model whose real router has no predict-on-route says so (``tentative_window_s``
        # on the policy); an explicit option (``--tentative-s``) still wins.
        policy_window_s = getattr(pol, "tentative_window_s", None)
        if policy_window_s is not None:
            router_options.setdefault("tentative_window_s", policy_window_s)
        self.router = RouterCore(policy=pol, index=self.index, block_size=self.block_size, rng=router_rng,
                                 **router_options)
        # The policy's own metrics scrape, when faster than the heartbeat (0: always fresh anyway).
        scrape_s = getattr(pol, "load_scrape_interval_s", None)
        hb_s = config.heartbeat_interval_s
        self._scrape_interval_s = scrape_s if scrape_s is not None and 0 < scrape_s < hb_s else None
        #: Workers in the fleet now (a joiner is not until it joins).
        self._live = [i < config.num_workers for i in range(num_all)]
        #: Bumped by each restart: results and events of an older incarnation are dropped.
        self._incarnation = [0] * num_all
        self._retired_busy_s = 0.0  # busy time of engines replaced by a restart
        self._churn_k = 0
        self.failed = 0
        self.retried = 0
        self.churn_events = 0
        for w in range(config.num_workers):
            self.router.register(self.targets[w], capacity_blocks=self.engines[w].config.num_gpu_blocks)
        self.fold = MetricsFold(block_size=self.block_size, timeline_bucket_s=config.timeline_bucket_s)
        for n in self.names[:config.num_workers]:
            self.fold.register_worker(n)
        self._stepping = [False] * num_all
        self._inflight: dict[str, _InFlight] = {}
        self._waiting: deque[tuple[SimRequest, float]] = deque()  # held by the client's concurrency cap
        self._bound_stream: list[tuple[list[int], int]] = []
        self._roots_done = 0
        self._dispatched = 0
        self.rejections = Rejections()
        self._want_outputs = type(workload).follow_ups is not Workload.follow_ups
        # Decode fast path: an engine may run several decode steps at once up to the
        # earliest time a request could reach it ("wake" times). Open loop: the next
        # root or follow-up send, and adds already on their way to it. Closed loop or
        # follow-ups: also any step that finishes a request (it frees a slot or sends
        # the next turn). Stale entries (time < now) are pruned lazily.
        self._reactive = arrivals.max_concurrency is not None or self._want_outputs
        self._wake: list[float] = []
        self._adds: list[list[float]] = [[] for _ in range(num_all)]
        self.fast_windows = 0
        self._pending_sends = 0
        self._last_arrival_s = -math.inf

    # ---------------------------------------------------------------- driving

    def run(self) -> RunResult:
        """Simulate until every request (and follow-up) finished."""
        times = assign_arrivals(self.workload, self.arrivals, self._arrival_rng)
        self._root_times = times
        self._num_roots = len(times)
        if times:
            self.q.schedule(times[0], "root", 0)
            heapq.heappush(self._wake, times[0])
        # Heartbeats also feed the KV-usage timeline; with interval 0 (fresh load at
        # every decision) the timeline is still sampled once a second.
        self._hb_interval = self.config.heartbeat_interval_s if self.config.heartbeat_interval_s > 0 else 1.0
        self.q.schedule(0.0, "heartbeat")
        if self._scrape_interval_s is not None:
            self.q.schedule(0.0, "load_scrape")
        churn = self.config.churn
        if churn.churns:
            self.q.schedule(churn.start_s, "churn")
            heapq.heappush(self._wake, churn.start_s)
        for j, t in enumerate(churn.join_at_s):
            self.q.schedule(t, "join", self.config.num_workers + j)
            heapq.heappush(self._wake, t)
        handlers = {
            "root": self._on_root,
            "send": self._on_send,
            "engine_add": self._on_engine_add,
            "step_done": self._on_step_done,
            "kv_events": self._on_kv_events,
            "client_done": self._on_client_done,
            "heartbeat": self._on_heartbeat,
            "load_scrape": self._on_load_scrape,
            "churn": self._on_churn,
            "join": self._on_join,
        }
        q = self.q
        while q:
            ev = q.pop()
            handlers[ev.kind](ev.payload)
        bound = infinite_cache_upper_bound(self._bound_stream, block_size=self.block_size)
        span = self.fold.duration_s
        busy_s = sum(e.counters.busy_s for e in self.engines) + self._retired_busy_s
        busy = busy_s / len(self.engines) / span if span > 0 else math.nan
        return RunResult(self.policy_name, self.fold, bound, self._dispatched, len(self._inflight) + len(self._waiting),
                         self.rejections.total, busy, self.fast_windows, self.rejections, self._last_arrival_s,
                         self.failed, self.retried, self.churn_events)

    def _busy(self) -> bool:
        return bool(self._inflight or self._waiting or self._pending_sends) or self._roots_done < self._num_roots

    # ---------------------------------------------------------------- client side

    def _on_root(self, i: int) -> None:
        now = self.q.now
        for req in self.workload.root_requests(i):
            self._submit(req, now)
        self._roots_done = i + 1
        if self.progress is not None:
            self.progress(self._roots_done, self._num_roots)
        if i + 1 < self._num_roots:
            t = max(now, self._root_times[i + 1])
            self.q.schedule(t, "root", i + 1)
            heapq.heappush(self._wake, t)

    def _submit(self, req: SimRequest, now: float) -> None:
        cap = self.arrivals.max_concurrency
        if cap is not None and len(self._inflight) >= cap:
            self._waiting.append((req, now))
            return
        self._dispatch(req, now)

    def _on_send(self, req: SimRequest) -> None:
        self._pending_sends -= 1
        self._submit(req, self.q.now)

    def _dispatch(self, req: SimRequest, now: float, *, retry_of: _InFlight | None = None,
                  exclude: tuple[WorkerKey, ...] = ()) -> None:
        """The router receives ``req`` now (or routes it again, ``retry_of``, away from
        ``exclude``): route it and send it to the chosen engine."""
        if self.config.heartbeat_interval_s <= 0:
            self._send_heartbeats(now)
        res = self.router.route(
            RoutingInput(req.request_id, req.token_ids, max_tokens=req.max_tokens, lora_name=req.lora_name), now=now,
            exclude=exclude,
        )
        w = self._target_index[res.decision.target]
        predicted = res.in_flight.predicted_cached_tokens
        if retry_of is None:
            self._bound_stream.append((res.block_hashes, len(req.token_ids)))
            fl = _InFlight(req, w, now, predicted, output=[] if self._want_outputs else None)
            self._dispatched += 1
            self._last_arrival_s = now
        else:
            # The client's clock keeps running from its first arrival; the bound saw it once.
            fl = _InFlight(req, w, retry_of.arrival_s, predicted, output=retry_of.output,
                           retries=retry_of.retries + 1)
        self._inflight[req.request_id] = fl
        t_add = now + self.config.network_latency_s
        self.q.schedule(t_add, "engine_add", (req.request_id, fl.retries))
        heapq.heappush(self._adds[w], t_add)

    def _on_client_done(self, payload: tuple[str, Any, list[int] | None]) -> None:
        """The client got the last token: record, free a concurrency slot, send follow-ups."""
        rid, stats, _ = payload
        now = self.q.now
        fl = self._inflight.pop(rid)
        self.fold.add_request(
            RequestRecord(
                request_id=rid,
                worker_id=self.names[fl.worker],
                arrival_s=fl.arrival_s,
                ttft_s=fl.first_token_s - fl.arrival_s,
                e2e_s=now - fl.arrival_s,
                prompt_tokens=stats.num_prompt_tokens,
                cached_tokens=stats.num_cached_tokens,
                output_tokens=stats.num_output_tokens,
                predicted_cached_tokens=fl.predicted_cached_tokens,
                queue_s=stats.queue_s,
                prefill_s=stats.prefill_s,
                preemptions=stats.preemptions,
            )
        )
        if self._want_outputs:
            # The engine cached the answer's full blocks too (all but the last sampled
            # token were computed); a later turn can reuse them, so the bound must see them.
            computed = fl.req.token_ids + fl.output[:-1]
            self._bound_stream.append((request_block_hashes(computed, block_size=self.block_size,
                                                            lora_name=fl.req.lora_name), 0))
            for nxt in self.workload.follow_ups(fl.req, fl.output):
                self.q.schedule(now + nxt.delay_s, "send", nxt)
                self._pending_sends += 1
                heapq.heappush(self._wake, now + nxt.delay_s)
        self._release_waiting(now)

    def _release_waiting(self, now: float) -> None:
        cap = self.arrivals.max_concurrency
        while self._waiting and (cap is None or len(self._inflight) < cap):
            req, _ = self._waiting.popleft()
            self._dispatch(req, now)

    # ---------------------------------------------------------------- engines

    def _on_engine_add(self, payload: tuple[str, int]) -> None:
        rid, attempt = payload
        fl = self._inflight.get(rid)
        if fl is None or fl.retries != attempt:
            return  # its worker restarted on the way: failed, or routed again (another add)
        req = fl.req
        eng = self.engines[fl.worker]
        try:
            eng.add_request(EngineRequest(rid, req.token_ids, req.max_tokens, lora_name=req.lora_name), self.q.now)
        except RequestRejected as exc:
            # As the live worker: an explicit error to the client, never a silent drop.
            logger.debug("engine %s rejected %s: %s", self.names[fl.worker], rid, exc)
            self.rejections.add(prompt_tokens=len(req.token_ids), engine_max_model_len=eng.max_model_len,
                                configured_max_model_len=eng.config.max_model_len, message=str(exc))
            self.router.on_finish(rid)
            del self._inflight[rid]
            self._release_waiting(self.q.now)
            return
        if not self._stepping[fl.worker]:
            self._step(fl.worker)

    def _horizon(self, w: int, now: float) -> float:
        """Earliest time a request could be added to engine ``w`` (see ``__init__``)."""
        out = math.inf
        for h in (self._wake, self._adds[w]):
            while h and h[0] < now:
                heapq.heappop(h)
            if h and h[0] < out:
                out = h[0]
        return out

    def _step(self, w: int) -> None:
        now = self.q.now
        eng = self.engines[w]
        res = eng.decode_steps(now, until_s=self._horizon(w, now)) if self.config.decode_fast_path else None
        if res is None:
            res = eng.step(now)
        else:
            self.fast_windows += 1
        if not res.outputs and res.duration_s <= 0:
            # Nothing could be scheduled (cannot happen while anything runs); the next
            # arrival restarts stepping instead of spinning at one instant.
            self._stepping[w] = False
            return
        self._stepping[w] = True
        self.q.schedule(now + res.duration_s, "step_done", (w, self._incarnation[w], res))
        if self._reactive and any(o.finished for o in res.outputs):
            heapq.heappush(self._wake, now + res.duration_s)

    def _on_step_done(self, payload) -> None:
        w, incarnation, res = payload
        if incarnation != self._incarnation[w]:
            return  # a step of an engine that restarted since: its results died with it
        now = self.q.now
        lat = self.config.network_latency_s
        eng = self.engines[w]
        for out in res.outputs:
            fl = self._inflight.get(out.request_id)
            if fl is None:
                continue
            if out.new_token_ids:
                if fl.first_token_s is None:
                    fl.first_token_s = now + lat
                    self.router.on_first_token(out.request_id, now=now + lat)
                if fl.output is not None:
                    fl.output.extend(out.new_token_ids)
            if out.finished:
                self.router.on_finish(out.request_id)
                self.q.schedule(now + lat, "client_done", (out.request_id, out.stats, None))
        self._publish_events(w, now)
        self._stepping[w] = False
        if eng.has_work():
            self._step(w)

    def _publish_events(self, w: int, now: float) -> None:
        """Send engine ``w``'s events since the last drain to the router's index."""
        events = self.engines[w].drain_events()
        if events:
            self.fold.observe_kv_events(self.names[w], events)
            self.q.schedule(now + self.config.event_delay_s, "kv_events", (w, self._incarnation[w], events, now))

    def _on_kv_events(self, payload) -> None:
        w, incarnation, events, emitted_s = payload
        if incarnation != self._incarnation[w]:
            return  # the old incarnation's stream: the live ingest dropped it with the worker
        now = self.q.now
        target = self.targets[w]
        for ev in events:
            self.index.apply(target, ev, now=now)
        self.fold.observe_event_lag(now - emitted_s)

    def _heartbeat(self, w: int, load) -> None:
        self.router.update_load(
            self.targets[w], running=load.running, waiting=load.waiting,
            queued_prefill_tokens=load.queued_prefill_tokens, kv_usage=load.kv_usage,
        )

    def _send_heartbeats(self, now: float) -> None:
        for w, eng in enumerate(self.engines):
            if self._live[w]:
                self._heartbeat(w, eng.load())

    def _on_heartbeat(self, _: Any) -> None:
        now = self.q.now
        self.router.expire(now)
        for w, eng in enumerate(self.engines):
            if not self._live[w]:
                continue
            load = eng.load()
            if self.config.heartbeat_interval_s > 0:
                self._heartbeat(w, load)
            self.fold.observe_load(self.names[w], now, kv_usage=load.kv_usage,
                                   queued_prefill_tokens=load.queued_prefill_tokens)
        if self._busy():
            self.q.schedule(now + self._hb_interval, "heartbeat")

    def _on_load_scrape(self, _: Any) -> None:
        """The policy's router reads every engine's load (only the router: the timeline keeps the
        heartbeat's cadence, so reports stay comparable across policies)."""
        now = self.q.now
        self._send_heartbeats(now)
        if self._busy():
            assert self._scrape_interval_s is not None  # scheduled only when set
            self.q.schedule(now + self._scrape_interval_s, "load_scrape")

    # ---------------------------------------------------------------- churn (sim/churn.py)

    def _on_churn(self, _: Any) -> None:
        now = self.q.now
        if not self._busy():
            return  # the run is over: nothing is left to disturb
        churn = self.config.churn
        live = [w for w, on in enumerate(self._live) if on]
        w = churn_victim(self._churn_k, live)
        self._churn_k += 1
        self.churn_events += 1
        if churn.kind == RESET:
            self._reset(w, now)
        else:
            self._restart(w, now)
        t = now + churn.every_s
        self.q.schedule(t, "churn")
        heapq.heappush(self._wake, t)

    def _reset(self, w: int, now: float) -> None:
        """vLLM's reset with ``reset_running_requests``: running requests are preempted (they
        recompute), the cache is emptied, ``AllBlocksCleared`` goes out on the event plane."""
        eng = self.engines[w]
        if not eng.reset_prefix_cache(reset_running_requests=True):
            logger.warning("worker %s: prefix cache not reset", self.names[w])
        self._publish_events(w, now)
        if not self._stepping[w] and eng.has_work():
            self._step(w)

    def _restart(self, w: int, now: float) -> None:
        """A new incarnation of worker ``w`` with an empty cache; the old one's requests are
        routed again or fail, as the live router's ``_worker_gone`` does."""
        target = self.targets[w]
        old = self.engines[w]
        self._retired_busy_s += old.counters.busy_s
        self._incarnation[w] += 1
        self._stepping[w] = False
        self._adds[w].clear()
        self.engines[w] = EmulatedEngine(profile_or_config=self._profiles[w],
                                         rng=random.Random(self._restart_rng.getrandbits(64)),
                                         **self.config.engine_overrides)
        # The fold learns the cache is gone (the new engine's events start from nothing).
        self.fold.observe_kv_events(self.names[w], [AllBlocksCleared()])
        orphans = self.router.unregister(target)
        max_retries = self.config.churn.max_retries
        for rec in orphans:
            fl = self._inflight.pop(rec.request_id, None)
            if fl is None:
                continue
            if fl.first_token_s is None and fl.retries < max_retries:
                try:
                    self._dispatch(fl.req, now, retry_of=fl, exclude=(target,))
                    self.retried += 1
                    continue
                except NoTargetsError:
                    pass  # a fleet of one: nowhere else to go
            self.failed += 1
        self.router.register(target, capacity_blocks=self.engines[w].config.num_gpu_blocks)
        self._release_waiting(now)

    def _on_join(self, w: int) -> None:
        """Scale-out: worker ``w`` registers, with an empty cache."""
        self._live[w] = True
        eng = self.engines[w]
        self.router.register(self.targets[w], capacity_blocks=eng.config.num_gpu_blocks)
        self.fold.register_worker(self.names[w])
        self._heartbeat(w, eng.load())
