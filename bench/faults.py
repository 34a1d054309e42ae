"""The fault suite (``pytest -m faults``, ``kvr bench faults``): every fault a kvr cluster meets, counted.

Each case runs a fresh supervised :class:`cluster.local.LocalCluster` (real ``redis-server``,
router and ``workers`` emulated workers as processes, loopback only) under the steady Poisson
workload of ``bench/stale.py`` (:class:`bench.stale.SteadyLoad`), injects one fault ``pre_s``
after the load starts, keeps the load on for ``post_s`` after the fault has *ended*, then stops
sending and drains. Measured per case:

* **sent / completed / errored / lost**: every request the load sent ends in exactly one terminal
  reply (a result or an explicit error); *lost* = still unanswered ``drain_s`` after the load
  stopped; the client's ``unmatched_replies`` (a second terminal, or a reply nobody asked for)
  must stay 0;
* **crashed**: components the supervisor saw exit, other than the one killed on purpose;
* **recovery to exact index**: seconds from the fault's end to the first *conclusive* sample in
  which the router's index (as mirrored in Redis: the blocks hash of each target) equals every
  live worker's cached blocks (``GET /kvr/cached_blocks``, the engine's block pool) exactly, and a
  dead worker has no entries. A sample is conclusive when the workers' truth read before and after
  the index read (``settle_s`` apart) is the same: under load a step's events are in flight for a
  few ms, and a sample that straddles a step says nothing;
* **recovery to prior hit rate**: seconds from the fault's end until a ``window_s`` window of
  finished requests has a token hit rate within ``hit_tolerance`` of the ``pre_window_s`` before
  the fault (None: not within the run);
* at the end, with the load drained, the index must equal the truth exactly (``exact_within_s``).

When a fault *ends* (``fault_end``) is per case: a restart ends when the component is back (a
worker registered with the router, the router serving every worker, Redis answering PING); a rate
fault when its rate is set back to 0; a SIGKILLed worker that stays dead when the router has
declared it dead (its heartbeat timeout: by design nothing reveals the death earlier).
"""

from __future__ import annotations

import json
import logging
import random
import signal
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path

from bench.live import cluster_config
from bench.progress import NullProgress
from bench.results import SuiteResult
from bench.stale import StaleConfig, SteadyLoad, _get_json, _post

logger = logging.getLogger(__name__)

CASES = ("worker_kill", "worker_restart", "router_restart", "redis_restart", "redis_down", "redis_oom", "drop",
         "dup_reorder",
         "slow_subscriber", "client_disconnect", "worker_stall", "rogue_publisher", "router_stall", "impostor_hello",
         "impostor_hello_curve", "duplicate_worker", "lying_worker",
         "worker_stall_http", "client_disconnect_http", "router_replica_kill")
#: Cases allowed longer than ``exact_within_s`` to an exact index: after a 5 s router stall the router
#: reads 5 s of KV events, requests and resent streams at once (1.2-1.3 s seen on two shared cores).
EXACT_WITHIN_S = {"router_stall": 3.0,
                  # 16 streams of 1500 tokens decode on past the fault's end, storing a block every 16
                  # tokens each: most samples straddle a step (inconclusive) until they finish (1.66 s seen).
                  "worker_stall_http": 3.0,
                  # The survivor writes the mirror once the dead replica's writer lease (the
                  # heartbeat timeout, 1.5 s here) expires; the fault ends sooner than that.
                  "router_replica_kill": 3.0}
#: Cases whose cluster runs with CURVE on (keys in RUN_DIR/keys, one extra authorised worker key).
CURVE_CASES = ("impostor_hello_curve",)
IMPOSTOR_KEY = "worker-impostor"
#: Cases whose cluster runs two router replicas (the load spreads over both; the first is killed).
REPLICA_CASES = ("router_replica_kill",)
#: The extra worker of the ``lying_worker`` case (bench/liar.py, run by cli/_liar.py), beside the cluster's honest ones.
LIAR_ID = "liar"

#: Error codes each case may end requests with (anything else fails the case); the rest: none.
ALLOWED_ERRORS = {
    "worker_kill": {"worker_died"},
    "worker_restart": {"worker_died"},
    "worker_stall": {"worker_died"},
    "router_restart": {"router_restarted", "no_workers"},
    # A request that had streamed from the killed replica ends so (one that had not fails over).
    "router_replica_kill": {"router_restarted"},
    # A stream truly lost on a replaced link would end explicitly so; none is expected (resent).
    "router_stall": {"worker_died"},
    "worker_stall_http": {"worker_died"},
}


@dataclass
class FaultsConfig:
    cases: tuple[str, ...] = CASES
    workers: int = 2
    speedup: float = 20.0
    rate_per_s: float = 1.0  # workload time: rate × speedup requests per wall second
    groups: int = 4
    system_prompt_len: int = 256
    question_len: int = 32
    output_len: int = 16  # streamed tokens: a kill lands mid-stream
    heartbeat_s: float = 0.5  # router heartbeat interval (× liveness 3 = the death timeout)
    pre_s: float = 3.0
    post_s: float = 2.0
    fault_s: float = 2.0  # how long a rate fault (drop, duplicate/reorder, slow subscriber, rogue) lasts
    redis_down_s: float = 3.0
    router_stall_s: float = 5.0  # SIGSTOP of the router: past the workers' 1.5 s timeout, they reconnect
    stall_requests: int = 20  # long requests streaming across the router stall
    stall_max_tokens: int = 3000  # ~6 s of decoding for 20 of them at speedup 20: before, during and after
    lie_before_s: float = 2.0  # lying_worker: the liar's share while it still tells the truth, over this long
    lie_after_s: float = 3.0  # and after the router distrusted it, over this long
    lie_detect_s: float = 10.0  # the downgrade must come within this long of the first lie
    http_requests: int = 8  # worker_stall_http: streamed HTTP requests per wave (two waves); client_disconnect_http
    http_max_tokens: int = 1500  # seconds of decoding at speedup 20: still streaming when the worker stops
    disconnect_max_tokens: int = 8000  # client_disconnect_http: far more than the clients wait for
    slow_hwm: int = 8  # the workers' KV-event PUB high-water mark in the slow_subscriber case
    slow_sndbuf: int = 65_536  # and kernel send buffer (the OS's default holds MBs on loopback)
    drop_rate: float = 0.2  # of event batches, for fault_s: at 0.05 a 2 s window dropped none on some seeds
    duplicate_rate: float = 0.1
    reorder_rate: float = 0.1
    sample_s: float = 0.1
    settle_s: float = 0.03
    exact_within_s: float = 1.0
    window_s: float = 1.0
    pre_window_s: float = 2.0
    hit_tolerance: float = 0.05
    drain_s: float = 10.0
    request_timeout_s: float = 30.0
    seed: int = 0
    out_dir: str = ""

    def load_config(self) -> StaleConfig:
        return StaleConfig(speedup=self.speedup, rate_per_s=self.rate_per_s, groups=self.groups,
                           system_prompt_len=self.system_prompt_len, question_len=self.question_len,
                           output_len=self.output_len, request_timeout_s=self.request_timeout_s)


@dataclass
class CaseResult:
    case: str
    sent: int = 0
    completed: int = 0
    errored: int = 0
    lost: int = 0
    error_codes: dict = field(default_factory=dict)
    unmatched_replies: int = 0
    late_replies: int = 0
    connection_losses: int = 0
    crashed: list = field(default_factory=list)  # components that exited, other than the one killed on purpose
    fault_s: float = 0.0  # fault start → fault end (wall seconds)
    index_exact_s: float | None = None  # fault end → first conclusive exact sample (None: not while observed)
    observed_s: float = 0.0  # fault end → load stopped: how long the recovery was watched under load
    exact_after_drain: bool = False
    inconclusive_samples: int = 0
    hit_before: float | None = None
    hit_recovered_s: float | None = None
    notes: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- index vs truth


class Truth:
    """Reads the workers' cached blocks (their HTTP URLs from the registry) and the mirrored index."""

    def __init__(self, cluster, namespace: str) -> None:
        from router.mirror import make_redis_client

        self.cluster = cluster
        self.ns = namespace
        self.redis = make_redis_client(cluster.redis_url, timeout_s=0.3)
        self.urls: dict[str, str] = {}

    def close(self) -> None:
        self.redis.close()

    def _truth(self, live: list[str]) -> dict[str, set[int]]:
        from bus import names

        out = {}
        for wid in live:
            url = self.redis.hget(names.worker_key(self.ns, wid), "http_url")
            if url:
                self.urls[wid] = url.decode()
            out[wid] = set(_get_json(f"{self.urls[wid]}/kvr/cached_blocks", timeout_s=1.0)["blocks"])
        return out

    def sample(self, *, dead: tuple[str, ...] = (), settle_s: float = 0.03) -> bool | None:
        """True: index == truth for every live worker and empty for the dead; False: not; None: inconclusive."""
        from bus import names

        live = [w for w in self.cluster.worker_ids if w not in dead]
        try:
            before = self._truth(live)
            time.sleep(settle_s)  # events of a step that ended just before `before` reach the index
            index = {w: {int(k) for k in self.redis.hkeys(names.target_blocks_key(self.ns, w, 0))}
                     for w in self.cluster.worker_ids}
            after = self._truth(live)
        except Exception as exc:  # Redis or a worker away (the faults do that): unknown
            logger.debug("index sample unknown: %r", exc)
            return None
        if before != after:
            return None
        return all(index[w] == before[w] for w in live) and not any(index[w] for w in dead)


class Sampler(threading.Thread):
    """Samples :meth:`Truth.sample` every ``sample_s`` into ``samples`` [(t, result)]."""

    def __init__(self, truth: Truth, cfg: FaultsConfig) -> None:
        super().__init__(daemon=True, name="faults-sampler")
        self.truth, self.cfg = truth, cfg
        self.dead: tuple[str, ...] = ()
        self.samples: list[tuple[float, bool | None]] = []
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()

    def run(self) -> None:
        while not self._halt.is_set():
            t = time.monotonic()
            self.samples.append((t, self.truth.sample(dead=self.dead, settle_s=self.cfg.settle_s)))
            self._halt.wait(max(0.0, self.cfg.sample_s - (time.monotonic() - t)))


# ---------------------------------------------------------------------------- helpers


def _router_metrics(port: int) -> dict[str, float]:
    """The router's Prometheus gauges and counters from its HTTP front (labelled ones summed over labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as resp:
        text = resp.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            try:
                out[name] = out.get(name, 0.0) + float(value)
            except ValueError:
                pass
    return out


def _wait(pred, timeout_s: float, what: str, poll_s: float = 0.05) -> float:
    """Poll ``pred`` until True; returns the time it became True (raises TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if pred():
                return time.monotonic()
        except Exception as exc:  # a component still coming back
            logger.debug("waiting for %s: %r", what, exc)
        time.sleep(poll_s)
    raise TimeoutError(f"{what} not within {timeout_s:g} s")


def _router_mirror(port: int) -> str:
    """The router's Redis mirror health as its ``/health`` says it (``ok``, ``degraded (cause since ...)``)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1.0) as resp:
        lines = resp.read().decode().splitlines()
    return next((line.removeprefix("mirror: ") for line in lines if line.startswith("mirror: ")), "")


def _redis_oom(truth: Truth, cfg: FaultsConfig, notes: dict, http_port: int) -> float:
    """Redis at its memory limit (noeviction): every write the mirror makes is refused for ``fault_s``.

    The limit is set just under what Redis uses, so the refusal starts at once (deterministic, however
    much the mirror holds); the router must route on from memory, report ``out_of_memory`` while it
    lasts, and be ``ok`` again (its mirror rewritten and read back) once the limit is lifted.
    """
    r = truth.redis
    before = r.config_get("maxmemory*")
    r.config_set("maxmemory-policy", "noeviction")
    r.config_set("maxmemory", max(1, int(r.info("memory")["used_memory"]) - 1024))
    try:
        _wait(lambda: _router_mirror(http_port).startswith("degraded"), cfg.fault_s + 5,
              "the router to report its mirror degraded")
        notes["health_during"] = _router_mirror(http_port)
        time.sleep(cfg.fault_s)
    finally:
        r.config_set("maxmemory", before.get("maxmemory", "0"))
        r.config_set("maxmemory-policy", before.get("maxmemory-policy", "noeviction"))
    end = time.monotonic()
    try:
        notes["health_ok_after_s"] = round(_wait(lambda: _router_mirror(http_port) == "ok", 10,
                                                 "the router to report its mirror ok") - end, 2)
    except TimeoutError:
        notes["health_ok_after_s"] = None
    notes["health_after"] = _router_mirror(http_port)
    return end


def _router_serves_all(port: int, n: int) -> bool:
    return _router_metrics(port).get("kvr_router_workers") == n


def _worker_url(truth: Truth, wid: str) -> str:
    from bus import names

    return truth.redis.hget(names.worker_key(truth.ns, wid), "http_url").decode()


def _set_faults(truth: Truth, plan: dict) -> None:
    for wid in truth.cluster.worker_ids:
        if not _post(f"{_worker_url(truth, wid)}/kvr/faults", plan):
            raise RuntimeError(f"{wid} refused the fault plan {plan}")


# ---------------------------------------------------------------------------- faults


def inject(case: str, cluster, cfg: FaultsConfig, truth: Truth, sampler: Sampler, http_port: int) -> tuple[float, dict]:
    """Inject ``case``; return when the fault has ended: (fault end, notes)."""
    sup = cluster.supervisor
    n = len(cluster.worker_ids)
    timeout = cfg.heartbeat_s * 3
    notes: dict = {}
    if case == "worker_kill":
        return _worker_kill(cluster, cfg, sampler, notes, http_port), notes
    if case == "worker_restart":
        cluster.restart_worker("worker-0", crash=False, wait=True, timeout_s=15)
        return _wait(lambda: _router_serves_all(http_port, n), 10, "the router to serve every worker"), notes
    if case == "router_replica_kill":
        return _router_replica_kill(cluster, cfg, sampler, notes, http_port), notes
    if case == "router_restart":
        sup.restart("router")
        return _wait(lambda: _router_serves_all(http_port, n), 15, "the restarted router to serve every worker"), notes
    if case == "redis_restart":
        sup.restart("redis")
        from bus.redis_server import ping

        return _wait(lambda: ping(cluster.redis_url), 10, "Redis to answer again"), notes
    if case == "redis_down":
        # Unreachable but alive (a partition, a stalled host): connections hang rather than refuse.
        sup.signal("redis", signal.SIGSTOP)
        time.sleep(cfg.redis_down_s)
        sup.signal("redis", signal.SIGCONT)
        return time.monotonic(), notes
    if case == "redis_oom":
        return _redis_oom(truth, cfg, notes, http_port), notes
    if case in ("drop", "dup_reorder"):
        plan = ({"drop_rate": cfg.drop_rate} if case == "drop"
                else {"duplicate_rate": cfg.duplicate_rate, "reorder_rate": cfg.reorder_rate})
        _set_faults(truth, plan)
        time.sleep(cfg.fault_s)
        _set_faults(truth, {})
        return time.monotonic(), notes
    if case == "slow_subscriber":
        return _slow_subscriber(cluster, cfg, truth, notes), notes
    if case == "client_disconnect":
        return _client_disconnect(cluster, cfg, notes), notes
    if case == "worker_stall":
        # Alive, socket open, silent: SIGSTOP past the heartbeat timeout, then let it run again.
        # What it runs at the stop: the steady load's short streams (ZMQ) if any (none in 3 of 3 runs:
        # 16 tokens last ~tens of ms); streams in flight across a stall, through HTTP: worker_stall_http.
        notes["victim_running_at_stop"] = _engines_busy(truth, ["worker-0"])
        sup.signal("worker-0", signal.SIGSTOP)
        _wait(lambda: _router_metrics(http_port).get("kvr_router_workers") == n - 1, timeout + 5,
              "the router to declare the stalled worker dead")
        notes["declared_dead"] = True
        sup.signal("worker-0", signal.SIGCONT)
        return _wait(lambda: _router_serves_all(http_port, n), 15, "the stalled worker to register again"), notes
    if case == "rogue_publisher":
        return _rogue(cluster, cfg, truth, notes, http_port), notes
    if case == "router_stall":
        return _router_stall(cluster, cfg, notes, http_port), notes
    if case in ("impostor_hello", "impostor_hello_curve"):
        return _impostor(cluster, cfg, truth, notes, http_port, curve=case in CURVE_CASES), notes
    if case == "duplicate_worker":
        return _duplicate_worker(cluster, cfg, notes, http_port), notes
    if case == "lying_worker":
        return _lying_worker(cluster, cfg, truth, notes, http_port), notes
    if case == "worker_stall_http":
        return _worker_stall_http(cluster, cfg, notes, http_port), notes
    if case == "client_disconnect_http":
        return _client_disconnect_http(cluster, cfg, truth, notes, http_port), notes
    raise ValueError(f"unknown fault case {case!r}; known: {', '.join(CASES)}")


def _router_replica_kill(cluster, cfg: FaultsConfig, sampler: Sampler, notes: dict, http_port: int) -> float:
    """SIGKILL the first of two router replicas under the load (spread over both by a
    ReplicaClient); it stays dead. ``http_port`` is the survivor's: it must keep every worker, and
    the load must lose nothing (requests the dead replica had not answered fail over). The dead
    replica held the mirror's writer lease: the survivor takes it once it expires (the heartbeat
    timeout) and rewrites the mirror, so the index is exact again within about that long."""
    n = len(cluster.worker_ids)
    before = _router_metrics(http_port).get("kvr_router_requests_total", 0.0)
    cluster.supervisor.signal("router", signal.SIGKILL)
    notes["killed"] = ["router"]  # on purpose: not a crash (sampler.dead is for workers: the truth is unchanged)
    # Ends once the survivor has served more requests with every worker still registered.
    end = _wait(lambda: (_router_metrics(http_port).get("kvr_router_requests_total", 0.0) > before + 5
                         and _router_serves_all(http_port, n)), 10, "the surviving replica to serve on")
    notes["survivor_workers"] = _router_metrics(http_port).get("kvr_router_workers")
    return end


def _worker_kill(cluster, cfg: FaultsConfig, sampler: Sampler, notes: dict, http_port: int) -> float:
    """SIGKILL the worker that is streaming a long request (a side client's), mid-stream; it stays dead."""
    import zmq

    from bus.client import RouterClient
    from bus.schema import GenerateRequest

    n = len(cluster.worker_ids)
    ctx = zmq.Context()
    side = RouterClient(endpoint=cluster.client_endpoint, ctx=ctx)
    try:
        for i in range(4):
            side.send(GenerateRequest(request_id=f"long-{i}", token_ids=[3 + i] * 48, max_tokens=2000))
        victim = None
        deadline = time.monotonic() + 5
        while victim is None and time.monotonic() < deadline:
            side.poll(10)
            victim = next((r.routed.worker_id for r in side.pending.values() if r.token_ids and r.routed), None)
        if victim is None:
            raise RuntimeError("no long request streaming within 5 s")
        notes["victim"] = victim
        notes["victim_streaming"] = sum(1 for r in side.pending.values()
                                        if r.token_ids and r.routed and r.routed.worker_id == victim)
        cluster.supervisor.signal(victim, signal.SIGKILL)
        sampler.dead = (victim,)
        # Ends when the router declares it dead (its heartbeat timeout): nothing reveals it sooner.
        end = _wait(lambda: _router_metrics(http_port).get("kvr_router_workers") == n - 1,
                    cfg.heartbeat_s * 3 + 5, f"the router to declare {victim} dead")
        for rid in list(side.pending):  # the survivors' long requests: cut short, not part of the fault
            side.cancel(rid)
        outcomes: dict[str, int] = {}
        deadline = time.monotonic() + 5
        while side.pending and time.monotonic() < deadline:
            for r in side.poll(20):
                key = "completed" if r.completion is not None else r.error.code.value
                outcomes[key] = outcomes.get(key, 0) + 1
        notes["long_requests"] = outcomes
        notes["long_requests_unanswered"] = len(side.pending)
    finally:
        side.close()
        ctx.term()
    return end


def _slow_subscriber(cluster, cfg: FaultsConfig, truth: Truth, notes: dict) -> float:
    """A second subscriber on worker-0's KV events that stops reading (tiny HWM and kernel buffer).

    Its queue at the publisher (``--events-hwm``) overflows and ZMQ drops batches *for it*: seen
    as holes in the seqs it finally reads. The router's subscription on the same PUB must neither
    stall the engine nor lose anything (a batch it misses too is replayed)."""
    import zmq

    from bus import names

    endpoint = truth.redis.hget(names.worker_key(truth.ns, "worker-0"), "events_endpoint").decode()
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, 1)
    sub.setsockopt(zmq.RCVBUF, 4096)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    time.sleep(0.2)  # connected and subscribed (ZMQ's slow joiner) before the burst
    # Not reading, while worker-0 publishes a burst: short requests straight to its HTTP API, each
    # with new blocks (their events reach every subscriber, the router's included).
    url = _worker_url(truth, "worker-0")
    burst_until = time.monotonic() + cfg.fault_s

    def burst(k: int) -> None:
        i = 0
        while time.monotonic() < burst_until:
            rnd = random.Random(k * 1_000_003 + i)  # a new prompt: new blocks, a big BlockStored
            body = {"prompt": [rnd.randrange(1, 30_000) for _ in range(1920)], "max_tokens": 1}
            ok = _post(f"{url}/v1/completions", body)
            notes["burst_requests"] = notes.get("burst_requests", 0) + 1
            notes["burst_refused"] = notes.get("burst_refused", 0) + (not ok)
            i += 1

    threads = [threading.Thread(target=burst, args=(k,), daemon=True) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    received = 0
    seqs = []
    quiet_until = time.monotonic() + 0.5
    while time.monotonic() < quiet_until:  # now read it all (what the buffers held, then live)
        try:
            frames = sub.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            time.sleep(0.005)
            continue
        received += 1
        if len(frames) == 3 and len(frames[1]) == 8:
            seqs.append(int.from_bytes(frames[1], "big"))
    # Every batch the router applied by now was published while the slow subscriber was connected.
    applied = int(truth.redis.hget(names.target_stream_key(truth.ns, "worker-0", 0), "seq") or -1)
    sub.close(linger=0)
    ctx.term()
    notes["slow_subscriber_received"] = received
    notes["published_meanwhile"] = applied - min(seqs) + 1 if seqs else 0
    # Batches the PUB dropped for it (its HWM overflowed); the last few ms' may still have been in flight.
    notes["slow_subscriber_dropped"] = notes["published_meanwhile"] - len(set(seqs))
    notes["slow_subscriber_seqs"] = seqs[:3] + seqs[-3:]
    return time.monotonic()


def _client_disconnect(cluster, cfg: FaultsConfig, notes: dict) -> float:
    """A second client starts long streamed requests and closes its socket mid-stream."""
    import zmq

    from bus.client import RouterClient
    from bus.schema import GenerateRequest

    ctx = zmq.Context()
    client = RouterClient(endpoint=cluster.client_endpoint, ctx=ctx)
    n = 8
    for i in range(n):
        client.send(GenerateRequest(request_id=f"gone-{i}", token_ids=[7 + i] * 64, max_tokens=200))
    streaming = 0
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and streaming == 0:
        client.poll(20)
        streaming = sum(1 for r in client.pending.values() if r.token_ids)
    notes["disconnected_streaming"] = streaming
    notes["disconnected_requests"] = len(client.pending)
    client.close()  # mid-stream: no cancel, the socket just goes
    ctx.term()
    return time.monotonic()


def _rogue(cluster, cfg: FaultsConfig, truth: Truth, notes: dict, http_port: int) -> float:
    """An unregistered process: worker messages without Hello on the worker port, and a PUB of
    made-up KV events under worker-0's topic on its own port."""
    import zmq

    from bus import names
    from bus.codec import encode
    from bus.publisher import EventPublisher
    from bus.schema import Completion, Heartbeat, TokenChunk
    from core.events import BlockStored

    before = _router_metrics(http_port).get("kvr_router_unknown_peer_messages_total", 0.0)
    topic = truth.redis.hget(names.worker_key(truth.ns, "worker-0"), "topic")
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    dealer.connect(cluster.worker_endpoint)
    pub = EventPublisher(endpoint="tcp://127.0.0.1:0", replay_endpoint="tcp://127.0.0.1:0", bind=True,
                         topic=topic.decode() if topic else "", ctx=ctx)
    end = time.monotonic() + cfg.fault_s
    i = 0
    while time.monotonic() < end:
        dealer.send(encode(Heartbeat(sender_id="worker-0")))
        dealer.send(encode(TokenChunk(request_id=f"router-{i + 1}", token_ids=[1], text="x")))
        dealer.send(encode(Completion(f"router-{i + 1}", "worker-0", 16, 16, 1)))
        pub.publish([BlockStored(block_hashes=[10_000 + i], parent_block_hash=None, token_ids=list(range(16)),
                                 block_size=16, lora_id=None, medium=None, lora_name=None)], ts=time.time())
        i += 1
        time.sleep(0.02)
    pub.close()
    dealer.close(linger=0)
    ctx.term()
    notes["rogue_messages"] = 3 * i

    def counted() -> float:
        return _router_metrics(http_port).get("kvr_router_unknown_peer_messages_total", 0.0) - before

    try:  # the router's stats snapshot is refreshed once per second
        _wait(lambda: counted() >= 3 * i, 3.0, "the router to count every rogue message")
    except TimeoutError:
        pass
    notes["unknown_peer_messages"] = counted()
    return time.monotonic()


def _client_curve(cluster):
    """The cluster's client key (CURVE cases), else None."""
    keys = Path(cluster.run_dir) / "keys"
    if not (keys / "client.key_secret").exists():
        return None
    from bus.security import load_curve

    return load_curve(keys, name="client")


def _router_stall(cluster, cfg: FaultsConfig, notes: dict, http_port: int) -> float:
    """SIGSTOP the router for ``router_stall_s`` while long requests stream; then SIGCONT.

    The workers time it out (1.5 s) and reconnect on new connections: what their old DEALERs
    still queued is gone, and so are Dispatches the router sent to them. Every long request must
    end with *all* its tokens (as many as ``Completion.output_tokens``) or an explicit error."""
    import zmq

    from bus.client import RouterClient
    from bus.schema import GenerateRequest

    n = len(cluster.worker_ids)
    before = _router_metrics(http_port).get("kvr_router_worker_links_replaced_total", 0.0)
    ctx = zmq.Context()
    side = RouterClient(endpoint=cluster.client_endpoint, ctx=ctx)
    try:
        results = [side.send(GenerateRequest(request_id=f"stall-{i}", token_ids=[11 + i] * 48,
                                             max_tokens=cfg.stall_max_tokens)) for i in range(cfg.stall_requests)]
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and sum(1 for r in results if r.token_ids) < len(results) // 2:
            side.poll(10)
        notes["streaming_at_stall"] = sum(1 for r in results if r.token_ids and not r.done)
        cluster.supervisor.signal("router", signal.SIGSTOP)
        time.sleep(cfg.router_stall_s)
        cluster.supervisor.signal("router", signal.SIGCONT)
        # Ends when every worker has said Hello on its new connection (and had it taken over).
        end = _wait(lambda: _router_metrics(http_port).get("kvr_router_worker_links_replaced_total", 0.0) - before >= n,
                    10, "every worker to reconnect to the router")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not all(r.done for r in results):
            side.poll(20)
    finally:
        side.close()
        ctx.term()
    outcomes: dict[str, int] = {}
    for r in results:
        if not r.done:
            key = "unanswered"
        elif r.error is not None:
            key = r.error.code.value
        elif len(r.token_ids) == r.completion.output_tokens:
            key = "complete"
        else:
            key = "missing_tokens" if len(r.token_ids) < r.completion.output_tokens else "extra_tokens"
        outcomes[key] = outcomes.get(key, 0) + 1
    notes["long_requests"] = outcomes
    notes["long_tokens_received"] = sum(len(r.token_ids) for r in results)
    counters = _router_metrics(http_port)
    for name in ("worker_links_replaced", "requests_lost_with_link", "repeated_chunks_dropped", "reply_stream_gaps",
                 "incomplete_completions"):
        notes[name] = counters.get(f"kvr_router_{name}_total", 0.0) - (before if name == "worker_links_replaced" else 0)
    return end


def _registry_hello(truth: Truth, wid: str):
    """A Hello for ``wid`` built from what the Redis registry says of it (as anyone with Redis could)."""
    import secrets

    from bus import names
    from bus.schema import Hello

    reg = {k.decode(): v.decode() for k, v in truth.redis.hgetall(names.worker_key(truth.ns, wid)).items()}
    return Hello(worker_id=wid, epoch=int(reg["epoch"]), model=reg["model"], block_size=int(reg["block_size"]),
                 num_gpu_blocks=int(reg["num_gpu_blocks"]), events_endpoint=reg["events_endpoint"],
                 replay_endpoint=reg["replay_endpoint"] or None, topic=reg["topic"], dp_size=int(reg["dp_size"]),
                 http_url=reg["http_url"] or None, profile=reg["profile"], engine=reg["engine"],
                 link_token=secrets.token_hex(16))  # the real one is never stored: a guess


def _impostor(cluster, cfg: FaultsConfig, truth: Truth, notes: dict, http_port: int, *, curve: bool) -> float:
    """A process claims worker-0 with its id, epoch and endpoints copied from the Redis registry,
    beats for ``fault_s`` and answers any Dispatch with made-up text. With ``curve`` it holds an
    authorised worker key, another one than worker-0 registered with."""
    import zmq

    from bus.codec import encode, router_decoder
    from bus.schema import Completion, Dispatch, Heartbeat, Refused, TokenChunk, Welcome

    hello = _registry_hello(truth, "worker-0")
    ctx = zmq.Context()
    dealer = ctx.socket(zmq.DEALER)
    dealer.setsockopt(zmq.LINGER, 0)
    if curve:
        from bus.security import load_curve

        load_curve(Path(cluster.run_dir) / "keys", name=IMPOSTOR_KEY).dial(dealer)
    dealer.connect(cluster.worker_endpoint)
    decoder = router_decoder()
    got: dict[str, int] = {}
    dispatches = 0
    end = time.monotonic() + cfg.fault_s
    next_hello = 0.0
    while time.monotonic() < end:
        now = time.monotonic()
        if now >= next_hello:  # says Hello again and again, as the operator's impostor did
            dealer.send(encode(hello))
            next_hello = now + 0.5
        dealer.send(encode(Heartbeat(sender_id="worker-0", epoch=hello.epoch)))
        while dealer.poll(0):
            msg = decoder.decode(dealer.recv())
            kind = type(msg).__name__ if not isinstance(msg, Refused) else f"Refused:{msg.code}"
            got[kind] = got.get(kind, 0) + 1
            if isinstance(msg, Dispatch):
                dispatches += 1
                dealer.send(encode(TokenChunk(msg.request_id, [1], "impostor", seq=0)))
                dealer.send(encode(Completion(msg.request_id, "worker-0", len(msg.token_ids), 0, 1, chunks=1)))
        time.sleep(0.05)
    dealer.close(linger=0)
    ctx.term()
    notes["impostor_received"] = got
    notes["impostor_dispatches"] = dispatches
    notes["impostor_welcomed"] = got.get(Welcome.__name__, 0)
    time.sleep(1.1)  # the stats snapshot behind /metrics
    m = _router_metrics(http_port)
    notes["rejected_hello_duplicate_id"] = m.get("kvr_router_rejected_hello_duplicate_id_total", 0.0)
    notes["rejected_hello_key_mismatch"] = m.get("kvr_router_rejected_hello_key_mismatch_total", 0.0)
    notes["workers"] = m.get("kvr_router_workers")
    return time.monotonic()


def _duplicate_worker(cluster, cfg: FaultsConfig, notes: dict, http_port: int) -> float:
    """A second ``kvr worker --id worker-0`` beside the live one: it must exit non-zero with one
    line, and the live one keep its registration (no flapping)."""
    import subprocess

    before = _router_metrics(http_port)
    spec = cluster.worker_spec("worker-0")
    t0 = time.monotonic()
    proc = subprocess.run(spec.argv, capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
    notes["duplicate_exit_code"] = proc.returncode
    notes["duplicate_ran_s"] = round(time.monotonic() - t0, 2)
    notes["duplicate_last_line"] = (proc.stderr.strip().splitlines() or [""])[-1]
    time.sleep(1.1)  # the stats snapshot behind /metrics
    after = _router_metrics(http_port)
    for name in ("rejected_hello_duplicate_id", "worker_links_replaced"):
        key = f"kvr_router_{name}_total"
        notes[name] = after.get(key, 0.0) - before.get(key, 0.0)
    notes["workers"] = after.get("kvr_router_workers")
    return time.monotonic()


def _load_prompts(cfg: FaultsConfig) -> list[list[int]]:
    """The prompts the steady load sends (bench/stale.py's ``SteadyLoad``: the same workload and seed)."""
    from bench.live import WorkloadSpec

    lc = cfg.load_config()
    spec = WorkloadSpec("gsp", {"num_groups": lc.groups, "prompts_per_group": 64,
                                "system_prompt_len": lc.system_prompt_len, "question_len": lc.question_len,
                                "output_len": lc.output_len}, lc.rate_per_s)
    wl, _ = spec.build(cfg.seed)
    return [list(r.token_ids) for i in range(wl.num_roots()) for r in wl.root_requests(i)]


def _liar_claims(cluster) -> Path:
    return Path(cluster.run_dir) / "liar-claims.json"


def _start_liar(cluster, http_port: int, n_honest: int) -> None:
    """One more worker, ``LIAR_ID``: ``kvr worker`` run by cli/_liar.py (bench/liar.py; honest until its claims
    file appears)."""
    import sys

    from cluster.supervisor import ComponentSpec

    spec = cluster.worker_spec(LIAR_ID)
    if spec.argv[1:3] != ["-m", "cli.main"]:
        raise RuntimeError(f"unexpected worker command line {spec.argv[:3]}")
    argv = [sys.executable, "-m", "cli._liar", str(_liar_claims(cluster)), *spec.argv[3:]]
    cluster.supervisor.start(ComponentSpec(LIAR_ID, "worker", argv))
    _wait(lambda: _router_serves_all(http_port, n_honest + 1), 30, "the router to register the liar")


def _served(truth: Truth, wids: list[str]) -> dict[str, float]:
    """Requests each worker finished so far (its vLLM-style ``/metrics``: ``vllm:request_success_total``)."""
    out = {}
    for wid in wids:
        with urllib.request.urlopen(f"{_worker_url(truth, wid)}/metrics", timeout=1.0) as resp:
            text = resp.read().decode()
        out[wid] = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                       if line.startswith("vllm:request_success_total{"))
    return out


def _share(before: dict[str, float], after: dict[str, float], wid: str) -> tuple[float | None, int]:
    """``wid``'s share of the requests finished between two ``_served`` readings, and their number."""
    total = sum(after[w] - before[w] for w in after)
    return (None if total <= 0 else round((after[wid] - before[wid]) / total, 3)), int(total)


def _target_trust(port: int) -> dict[str, float]:
    """``kvr_router_target_trust`` per worker id (rank 0), from the router's ``/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=1.0) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line.startswith("kvr_router_target_trust{"):
            labels, _, value = line.rpartition(" ")
            wid = labels.split('worker="', 1)[1].split('"', 1)[0]
            out[wid] = float(value)
    return out


def _lying_worker(cluster, cfg: FaultsConfig, truth: Truth, notes: dict, http_port: int) -> float:
    """The liar (registered since the cluster started, honest so far) starts claiming every prompt of
    the load while caching nothing (bench/liar.py). The router must distrust it within seconds, from
    the closed loop alone, after which it draws no more than its fair share.

    Shares are of requests *finished* by each worker (its ``vllm:request_success_total``): honest
    (``lie_before_s`` before the lie), lying while trusted (the lie → the downgrade seen on
    ``/metrics``), distrusted (the ``lie_after_s`` after it). Ends at the downgrade (the fault is
    contained then, though the liar goes on lying to the end of the case)."""
    wids = [*cluster.worker_ids, LIAR_ID]
    fair = 1 / len(wids)
    m0 = _router_metrics(http_port)
    c0 = _served(truth, wids)
    time.sleep(cfg.lie_before_s)
    c1 = _served(truth, wids)
    _liar_claims(cluster).write_text(json.dumps(_load_prompts(cfg)))
    lie_at = time.monotonic()
    try:
        end = _wait(lambda: _router_metrics(http_port).get("kvr_router_trust_downgrades_total", 0.0)
                    > m0.get("kvr_router_trust_downgrades_total", 0.0), cfg.lie_detect_s,
                    "the router to distrust the liar")
        notes["downgraded_after_s"] = round(end - lie_at, 2)
    except TimeoutError:
        end = time.monotonic()
        notes["downgraded_after_s"] = None
    c2 = _served(truth, wids)
    notes["trust_after_downgrade"] = _target_trust(http_port)
    time.sleep(cfg.lie_after_s)
    c3 = _served(truth, wids)
    notes["fair_share"] = round(fair, 3)
    for phase, (a, b) in {"honest": (c0, c1), "lying_trusted": (c1, c2), "distrusted": (c2, c3)}.items():
        share, total = _share(a, b, LIAR_ID)
        notes[f"liar_share_{phase}"] = share
        notes[f"requests_{phase}"] = total
    m1 = _router_metrics(http_port)
    for name in ("trust_downgrades", "trust_recoveries"):
        key = f"kvr_router_{name}_total"
        notes[name] = m1.get(key, 0.0) - m0.get(key, 0.0)
    notes["trust_at_end"] = _target_trust(http_port)
    return end


class RawHttp(threading.Thread):
    """One ``POST`` on a raw socket, read to the end as bytes (``Connection: close``): what a client
    gets on the wire, before any HTTP library would mend or refuse it. :meth:`outcome` judges it."""

    def __init__(self, port: int, path: str, body: dict, *, timeout_s: float) -> None:
        super().__init__(daemon=True, name="faults-raw-http")
        self.port, self.path, self.body, self.timeout_s = port, path, body, timeout_s
        self.buf = bytearray()
        self.error: str | None = None
        self.closed_by_us = False
        self._sock = None

    def run(self) -> None:
        import socket

        data = json.dumps(self.body).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nHost: 127.0.0.1:{self.port}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n").encode()
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=self.timeout_s) as sock:
                self._sock = sock
                sock.sendall(head + data)
                while True:
                    chunk = sock.recv(65536)
                    if not chunk:
                        return
                    self.buf += chunk
        except OSError as exc:
            if not self.closed_by_us:
                self.error = f"{type(exc).__name__}: {exc}"

    def close(self) -> None:
        """The client leaves: its socket closes mid-request."""
        import socket

        self.closed_by_us = True
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def header(self, name: str) -> str | None:
        head = bytes(self.buf).split(b"\r\n\r\n", 1)[0].decode("latin-1")
        for line in head.split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                return value.strip()
        return None

    def events(self) -> int:
        return bytes(self.buf).count(b"data: ")

    def outcome(self) -> str:
        """``complete``, ``error:<type>`` (an explicit error: a status or an SSE error event), or
        ``malformed:<why>`` / ``unanswered``: one status line, a strictly valid chunked body, and a
        stream that ends with ``[DONE]`` after its usage (or after an error event)."""
        raw = bytes(self.buf)
        if not raw:
            return "unanswered" if self.error is None else f"malformed:{self.error}"
        if raw.count(b"HTTP/1.") != 1:
            return "malformed:second_status_line"
        head, sep, body = raw.partition(b"\r\n\r\n")
        status = head.split(b"\r\n", 1)[0].split(b" ")
        if not sep or len(status) < 2 or not status[1].isdigit():
            return "malformed:status_line"
        if (self.header("Transfer-Encoding") or "").lower() == "chunked":
            decoded = _dechunk(body)
            if decoded is None:
                return "malformed:chunked_encoding"
            body = decoded
        if status[1] != b"200":
            try:
                return f"error:{json.loads(body)['error']['type']}"
            except (ValueError, KeyError, TypeError):
                return f"malformed:status_{status[1].decode()}_body"
        if not self.body.get("stream"):
            try:
                return "complete" if json.loads(body)["usage"]["completion_tokens"] > 0 else "malformed:no_tokens"
            except (ValueError, KeyError, TypeError):
                return "malformed:json_body"
        events = [e for e in body.split(b"\n\n") if e.strip()]
        if not events or events[-1] != b"data: [DONE]":
            return "malformed:no_done"
        try:
            items = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
        except ValueError:
            return "malformed:sse_event"
        if items and "error" in items[-1]:
            return f"error:{items[-1]['error'].get('type')}"
        if len(items) < 2 or "usage" not in items[-1] or items[-2]["choices"][0]["finish_reason"] is None:
            return "malformed:no_finish"
        return "complete"


def _dechunk(body: bytes) -> bytes | None:
    """A chunked body decoded strictly (None: not valid chunked encoding, or cut before its last chunk)."""
    out = bytearray()
    i = 0
    while True:
        j = body.find(b"\r\n", i)
        if j < 0:
            return None
        try:
            size = int(body[i:j].split(b";", 1)[0], 16)
        except ValueError:
            return None
        i = j + 2
        if size == 0:
            return bytes(out) if body[i:].startswith(b"\r\n") or body[i:] == b"" else None
        if body[i + size:i + size + 2] != b"\r\n":
            return None
        out += body[i:i + size]
        i += size + 2


def _http_body(cfg: FaultsConfig, i: int, *, stream: bool, max_tokens: int | None = None) -> dict:
    body = {"prompt": [13 + i] * 48 + [i], "max_tokens": max_tokens or cfg.http_max_tokens, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    return body


def _worker_stall_http(cluster, cfg: FaultsConfig, notes: dict, http_port: int) -> float:
    """SIGSTOP the worker streaming the most HTTP responses (streamed through the router's HTTP front),
    past the heartbeat timeout; a second wave is sent at the stop, so some requests wait on the
    stopped worker without a token and are retried elsewhere (a second ``Routed``). Every HTTP
    response must be one well-formed response: complete, or ended by an SSE error event."""
    n = len(cluster.worker_ids)
    before = _router_metrics(http_port)
    clients = [RawHttp(http_port, "/v1/completions", _http_body(cfg, i, stream=True), timeout_s=60)
               for i in range(cfg.http_requests)]
    for c in clients:
        c.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not any(c.events() >= 2 for c in clients):
        time.sleep(0.01)
    streaming: dict[str, int] = {}
    for c in clients:
        if c.events() >= 2:
            wid = c.header("x-kvr-worker") or "?"
            streaming[wid] = streaming.get(wid, 0) + 1
    if not streaming:
        raise RuntimeError("no HTTP response streaming within 5 s")
    victim = max(streaming, key=lambda w: streaming[w])
    cluster.supervisor.signal(victim, signal.SIGSTOP)
    notes["victim"], notes["streaming_on_victim_at_stop"] = victim, streaming[victim]
    second = [RawHttp(http_port, "/v1/completions", _http_body(cfg, 100 + i, stream=True), timeout_s=60)
              for i in range(cfg.http_requests)]
    for c in second:
        c.start()
    try:
        _wait(lambda: _router_metrics(http_port).get("kvr_router_workers") == n - 1, cfg.heartbeat_s * 3 + 5,
              "the router to declare the stalled worker dead")
    finally:
        cluster.supervisor.signal(victim, signal.SIGCONT)
    end = _wait(lambda: _router_serves_all(http_port, n), 15, "the stalled worker to register again")
    for c in clients + second:
        c.join(timeout=30)
    outcomes: dict[str, int] = {}
    for c in clients + second:
        key = "unanswered" if c.is_alive() else c.outcome()
        outcomes[key] = outcomes.get(key, 0) + 1
    notes["http_responses"] = outcomes
    after = _router_metrics(http_port)
    for name in ("retries", "incomplete_completions", "reply_stream_gaps"):
        key = f"kvr_router_{name}_total"
        notes[name] = after.get(key, 0.0) - before.get(key, 0.0)
    return end


def _engines_busy(truth: Truth, wids: list[str]) -> float:
    """Requests running or waiting in the engines, summed (their ``/metrics`` gauges)."""
    total = 0.0
    for wid in wids:
        with urllib.request.urlopen(f"{_worker_url(truth, wid)}/metrics", timeout=1.0) as resp:
            for line in resp.read().decode().splitlines():
                if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                    total += float(line.rpartition(" ")[2])
    return total


def _client_disconnect_http(cluster, cfg: FaultsConfig, truth: Truth, notes: dict, http_port: int) -> float:
    """Non-streamed HTTP requests with long outputs (``disconnect_max_tokens``) whose clients close their
    connections while the engines run them, and half as many streamed ones alongside (a front that
    finds out by a failed write must not log a traceback). The front must cancel each at the
    router, the router at its worker: measured as how long the engines' running + waiting requests
    stay above what the steady load alone keeps there (sampled every 20 ms) after the clients left."""
    wids = list(cluster.worker_ids)
    cancelled_before = _router_metrics(http_port).get("kvr_router_error_cancelled_total", 0.0)
    baseline = 0.0
    until = time.monotonic() + 0.5
    while time.monotonic() < until:  # the steady load's own requests in the engines
        baseline = max(baseline, _engines_busy(truth, wids))
        time.sleep(0.02)
    clients = [RawHttp(http_port, "/v1/completions",
                       _http_body(cfg, 200 + i, stream=i >= cfg.http_requests, max_tokens=cfg.disconnect_max_tokens),
                       timeout_s=60)
               for i in range(cfg.http_requests + cfg.http_requests // 2)]
    for c in clients:
        c.start()
    # As many in the engines as were abandoned (not baseline + that: the steady load's share comes and goes).
    _wait(lambda: _engines_busy(truth, wids) >= len(clients), 5, "the engines to run the long HTTP requests",
          poll_s=0.02)
    time.sleep(0.2)  # mid-decode
    notes["engines_busy_before_leaving"] = _engines_busy(truth, wids)
    gone = time.monotonic()
    for c in clients:
        c.close()
    try:  # the cancel path works: the first abandoned request is gone (little of the steady load's noise in it)
        first = _wait(lambda: _engines_busy(truth, wids) <= baseline + len(clients) - 1, 30,
                      "the engines to stop an abandoned request", poll_s=0.02)
        notes["first_abandoned_stopped_s"] = round(first - gone, 3)
    except TimeoutError:
        notes["first_abandoned_stopped_s"] = None
    try:  # all of them: an upper bound (the steady load's own requests come and go meanwhile)
        stopped = _wait(lambda: _engines_busy(truth, wids) <= baseline, 30,
                        "the engines to stop the abandoned requests", poll_s=0.02)
        notes["engines_ran_after_clients_left_s"] = round(stopped - gone, 3)
    except TimeoutError:
        notes["engines_ran_after_clients_left_s"] = None
    notes["steady_baseline_busy"] = baseline
    notes["abandoned_requests"] = len(clients)
    notes["abandoned_streamed"] = sum(1 for c in clients if c.body["stream"])
    # A non-streamed request answers only at its end: a reply means it was not stopped.
    notes["abandoned_with_a_reply"] = sum(1 for c in clients if c.buf and not c.body["stream"])
    for c in clients:
        c.join(timeout=5)

    def cancelled() -> float:
        return _router_metrics(http_port).get("kvr_router_error_cancelled_total", 0.0) - cancelled_before

    try:  # the stats snapshot behind /metrics is refreshed about once a second (later on a busy loop)
        _wait(lambda: cancelled() >= len(clients), 3.0, "the router to count every cancel")
    except TimeoutError:
        pass
    notes["cancelled_at_router"] = cancelled()
    return time.monotonic()


# ---------------------------------------------------------------------------- one case


def _hit_rate(records, lo: float, hi: float) -> float | None:
    sel = [(p, c) for t, p, c, err in records if lo <= t < hi and not err]
    prompt = sum(p for p, _ in sel)
    return sum(c for _, c in sel) / prompt if prompt else None


def run_case(cfg: FaultsConfig, case: str, run_dir: Path) -> CaseResult:
    from bus.redis_server import free_loopback_port
    from cluster.local import LocalCluster
    from cluster.supervisor import ComponentFailed

    ns = run_dir.name
    http_port = free_loopback_port()
    router_args = ["--http-port", str(http_port), "--heartbeat-interval", f"{cfg.heartbeat_s:g}",
                   "--request-timeout", f"{cfg.request_timeout_s:g}"]
    # A small PUB high-water mark, so that a subscriber that stops reading overflows it within the case.
    worker_args = (["--events-hwm", str(cfg.slow_hwm), "--events-sndbuf", str(cfg.slow_sndbuf)]
                   if case == "slow_subscriber" else [])
    if case in CURVE_CASES:
        from bus.security import generate_keys

        keys = run_dir / "keys"
        generate_keys(keys, ("router", "worker", "client", IMPOSTOR_KEY))
        router_args += ["--curve-dir", str(keys)]
        worker_args += ["--curve-dir", str(keys)]
    replica_http_port = free_loopback_port() if case in REPLICA_CASES else None
    for attempt in range(2):
        config = cluster_config(workers=cfg.workers, policy="kvr", speedup=cfg.speedup, run_dir=run_dir, namespace=ns,
                                seed=cfg.seed, router_args=router_args, worker_args=worker_args)
        if replica_http_port is not None:
            config.routers = 2  # router-1 serves its own HTTP front: the survivor's metrics are read there
            config.replica_router_args = [*router_args[:1], str(replica_http_port), *router_args[2:]]
        cluster = LocalCluster(config)
        try:
            cluster.start()
            break
        except ComponentFailed as exc:
            # Free ports are picked by binding port 0 and letting go: another process can take one
            # before the component binds it. Not a fault of the system under test: pick again.
            if attempt or "Address already in use" not in str(exc):
                raise
            logger.warning("port taken at start, starting the cluster again: %s", exc)
            http_port = free_loopback_port()
            router_args[1] = str(http_port)
    out = CaseResult(case)
    try:
        if case == "lying_worker":
            _start_liar(cluster, http_port, len(cluster.worker_ids))
        truth = Truth(cluster, ns)
        load = SteadyLoad(cluster.client_endpoints, cfg.load_config(), cfg.seed, curve=_client_curve(cluster))
        sampler = Sampler(truth, cfg)
        load.start()
        sampler.start()
        try:
            time.sleep(cfg.pre_s)
            replays_before = _safe_metrics(http_port).get("kvr_router_target_replays", 0.0)
            start = time.monotonic()
            end, out.notes = inject(case, cluster, cfg, truth, sampler,
                                    http_port if replica_http_port is None else replica_http_port)
            if replica_http_port is not None:
                http_port = replica_http_port  # the killed replica's front is gone: read the survivor's
            out.fault_s = end - start
            time.sleep(cfg.post_s)
            out.observed_s = time.monotonic() - end
        finally:
            load.stop(drain_s=cfg.drain_s)
            load.join(timeout=cfg.drain_s + 5)
            sampler.stop()
            sampler.join(timeout=5)
        # Quiet now: the index must equal the truth exactly, every sample conclusive.
        try:
            _wait(lambda: truth.sample(dead=sampler.dead, settle_s=cfg.settle_s) is True, cfg.exact_within_s,
                  "index == truth after the drain", poll_s=0.05)
            out.exact_after_drain = True
        except TimeoutError:
            out.exact_after_drain = False
        if case in ("client_disconnect", "client_disconnect_http"):
            # The router ends the abandoned requests too (its pending table drains).
            try:
                _wait(lambda: _router_metrics(http_port).get("kvr_router_pending_requests") == 0, 5,
                      "the router's pending table to drain")
                out.notes["router_pending_drained"] = True
            except TimeoutError:
                out.notes["router_pending_drained"] = False
        expected_dead = set(sampler.dead) | set(out.notes.get("killed", ()))
        out.crashed = sorted(f.spec.name for f in cluster.supervisor.failed() if f.spec.name not in expected_dead)
        # The router's stats snapshot (behind /metrics) is refreshed every second: let it catch up
        # with the end of the drain before reading the counters.
        time.sleep(1.1)
        metrics = _safe_metrics(http_port)
        out.notes["router_counters"] = {k.removeprefix("kvr_router_").removesuffix("_total"): v
                                        for k, v in metrics.items() if k.endswith("_total")}
        # A fault must never make the router log a traceback (e.g. BrokenPipe writing to a client gone).
        log = cluster.supervisor.log_path("router" if replica_http_port is None else "router-1")
        out.notes["router_log_tracebacks"] = log.read_text(errors="replace").count("Traceback") if log.exists() else 0
        out.notes["stream_gaps"] = metrics.get("kvr_router_target_gaps", 0.0)  # summed over live targets
        out.notes["stream_resets"] = metrics.get("kvr_router_target_resets", 0.0)
        # Replays since just before the fault (every subscription starts with one: the slow joiner's).
        out.notes["stream_replays"] = metrics.get("kvr_router_target_replays", 0.0) - replays_before
        truth.close()
    finally:
        cluster.stop()
    out.sent = load.sent
    out.errored = sum(1 for r in load.records if r[3])
    out.completed = len(load.records) - out.errored
    out.lost = load.lost
    out.error_codes = dict(load.error_codes)
    out.unmatched_replies, out.late_replies = load.unmatched_replies, load.late_replies
    out.connection_losses = load.connection_losses
    after = [(t, ok) for t, ok in sampler.samples if t >= end]
    out.inconclusive_samples = sum(1 for _, ok in after if ok is None)
    out.index_exact_s = next((t - end for t, ok in after if ok), None)
    out.hit_before = _hit_rate(load.records, start - cfg.pre_window_s, start)
    if out.hit_before is not None:
        t = end + cfg.window_s / 2
        last = max((r[0] for r in load.records), default=end)
        while t <= last:
            h = _hit_rate(load.records, t - cfg.window_s, t)
            if h is not None and h >= out.hit_before - cfg.hit_tolerance:
                out.hit_recovered_s = t - end
                break
            t += cfg.sample_s
    return out


def _safe_metrics(port: int) -> dict[str, float]:
    try:
        return _router_metrics(port)
    except OSError:
        return {}


# ---------------------------------------------------------------------------- suite


TABLE_COLUMNS = ("fault", "sent", "completed", "errored", "lost", "crashed", "index exact after s",
                 "hit rate back after s", "errors")


def table_row(r: CaseResult) -> dict:
    def s(x):
        return f"not within {r.observed_s:.1f}" if x is None else f"{x:.2f}"

    return {"fault": r.case, "sent": r.sent, "completed": r.completed, "errored": r.errored, "lost": r.lost,
            "crashed": ", ".join(r.crashed) or "none", "index exact after s": s(r.index_exact_s),
            "hit rate back after s": s(r.hit_recovered_s),
            "errors": ", ".join(f"{k} {v}" for k, v in sorted(r.error_codes.items())) or "-"}


def render_table(rows: list[CaseResult]) -> str:
    lines = ["| " + " | ".join(TABLE_COLUMNS) + " |", "|" + "---|" * len(TABLE_COLUMNS)]
    for r in rows:
        row = table_row(r)
        lines.append("| " + " | ".join(str(row[c]) for c in TABLE_COLUMNS) + " |")
    return "\n".join(lines)


def write_table(rows: list[CaseResult], out_dir: str | Path, *, command: str) -> list[Path]:
    """``faults.json`` (every field) and ``faults.md`` (the table) in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    order = {c: i for i, c in enumerate(CASES)}
    rows = sorted(rows, key=lambda r: order.get(r.case, len(order)))
    jpath, mpath = out / "faults.json", out / "faults.md"
    jpath.write_text(json.dumps({"command": command, "cases": [asdict(r) for r in rows]}, indent=1, default=str))
    mpath.write_text(f"# Faults\n\n`{command}`\n\n{render_table(rows)}\n")
    return [jpath, mpath]


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    def s(x):
        return "never" if x is None else f"{x:.2f}"

    details = [{"fault": r["case"], "fault lasted s": s(r["fault_s"]), "exact after drain": r["exact_after_drain"],
                "inconclusive samples": r["inconclusive_samples"], "hit rate before": s(r["hit_before"]),
                "connection losses seen": r["connection_losses"], "late replies": r["late_replies"],
                "notes": json.dumps({k: v for k, v in r["notes"].items() if k != "router_counters"}, default=str)}
               for r in result.tables["runs"]]
    return {"faults": result.tables["faults"], "runs": details}


def run(cfg: FaultsConfig, *, command: str = "kvr bench faults", progress=None) -> SuiteResult:
    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-faults-"))
    progress.start(len(cfg.cases), "starting")
    rows = []
    try:
        for i, case in enumerate(cfg.cases):
            r = run_case(cfg, case, root / f"faults-{case.replace('_', '-')}-{i}")
            rows.append(r)
            progress.step(f"{case}: lost {r.lost}, index exact after {r.index_exact_s}")
    finally:
        progress.close()
    result = SuiteResult("faults", command, {**asdict(cfg), "cases": list(cfg.cases)})
    result.tables["faults"] = [table_row(r) for r in rows]
    result.tables["runs"] = [asdict(r) for r in rows]
    result.notes.append(f"{cfg.workers} workers at speedup {cfg.speedup:g}, Poisson {cfg.rate_per_s * cfg.speedup:g} "
                        f"req/s wall, heartbeat {cfg.heartbeat_s:g} s × 3; fault {cfg.pre_s:g} s after the load "
                        f"starts, load on {cfg.post_s:g} s after it ends; logs in {root}")
    return result
