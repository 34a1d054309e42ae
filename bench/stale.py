"""``kvr bench stale``: recovery of the index and of the hit rate after each event-plane fault.

For each fault a fresh local cluster (``workers`` emulated workers, policy ``kvr``) serves a
steady Poisson shared-prefix workload. ``pre_s`` wall seconds after the load starts the fault is
injected on ``worker-0`` (or the shared component), and the run goes on for ``post_s``:

* ``drop``: ``drop_rate`` of worker-0's event batches are not sent live for ``fault_s`` (they stay
  replayable: the router must notice the gap and replay);
* ``worker_restart``: worker-0 is killed and started again (new epoch, seq back to 0, empty cache);
* ``clear``: worker-0's prefix cache is reset (``AllBlocksCleared``);
* ``router_restart``: the router is killed and started again (warm start from Redis, workers
  re-register);
* ``redis_restart``: Redis is killed and started again empty (the mirror must be rewritten).

Two clocks are measured from the fault:

* **index = truth**: every ``sample_s`` the bench reads each worker's cached blocks (the engine's
  own block pool, ``GET /kvr/cached_blocks``: external hash keys as the router indexes them) and
  the router's index as mirrored in Redis (the blocks hash of each target). Divergence = Jaccard
  distance of the two sets over all workers. Under steady load the two are never equal at one
  instant (a step's events are in flight for a few ms), so *recovered* = the first sample after
  the fault whose divergence is back at or below the 90th percentile of the pre-fault samples
  (at least 0.02). With Redis down a sample is "unknown" (not recovered).
* **hit rate back**: token hit rate of requests by finishing time; pre-fault level = the
  ``pre_window_s`` before the fault; recovered at the end of the first ``window_s`` rolling window
  whose hit rate is within ``hit_tolerance`` of that level.

Times are wall seconds (the engines run ``speedup`` × faster). The timeline plot shows both
curves per fault.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.live import WorkloadSpec, cluster_config
from bench.progress import NullProgress
from bench.results import SuiteResult, fmt_spread, percentile, spread

logger = logging.getLogger(__name__)

FAULTS = ("drop", "worker_restart", "clear", "router_restart", "redis_restart")


@dataclass
class StaleConfig:
    faults: tuple[str, ...] = FAULTS
    workers: int = 3
    speedup: float = 4.0
    rate_per_s: float = 4.0  # workload time
    groups: int = 12
    system_prompt_len: int = 1024
    question_len: int = 64
    output_len: int = 8
    pre_s: float = 12.0
    post_s: float = 15.0
    fault_s: float = 3.0  # how long a rate fault (drop) lasts
    drop_rate: float = 0.5
    sample_s: float = 0.2
    window_s: float = 2.0
    pre_window_s: float = 6.0
    hit_tolerance: float = 0.05
    request_timeout_s: float = 10.0
    repeats: int = 1
    seed: int = 0
    out_dir: str = ""

    @classmethod
    def quick(cls) -> StaleConfig:
        return cls(faults=("clear",), workers=1, speedup=20.0, rate_per_s=10.0, groups=2, system_prompt_len=128,
                   question_len=16, output_len=2, pre_s=2.0, post_s=2.0, window_s=0.5, pre_window_s=1.5)


# ---------------------------------------------------------------------------- load


class SteadyLoad(threading.Thread):
    """Poisson requests from a gsp workload (recycled), each with its own timeout; never blocks the bench."""

    def __init__(self, endpoint: str | list[str], cfg: StaleConfig, seed: int, *, curve=None) -> None:
        """``curve`` (bus/security.Curve): dial a router that has CURVE on. Several endpoints
        (router replicas): a ``ReplicaClient`` spreads the requests and fails over."""
        super().__init__(daemon=True, name="stale-load")
        self.endpoint = endpoint
        self.curve = curve
        self.cfg = cfg
        self.seed = seed
        self.records: list[tuple[float, int, int, bool]] = []  # (finish wall s, prompt, cached, error)
        self.lost = 0
        self.sent = 0
        self.error_codes: dict[str, int] = {}  # ErrorCode value -> requests that ended with it
        self.late_replies = self.unmatched_replies = self.connection_losses = 0  # the client's counters
        self._halt = threading.Event()
        self._drain_s = 0.0

    def stop(self, *, drain_s: float = 0.0) -> None:
        """Stop sending; with ``drain_s`` keep reading replies that long for the requests in flight
        (whatever is still unanswered then counts as lost)."""
        self._drain_s = drain_s
        self._halt.set()

    def run(self) -> None:
        import random

        from bus.client import RouterClient
        from bus.schema import GenerateRequest

        cfg = self.cfg
        spec = WorkloadSpec("gsp", {"num_groups": cfg.groups, "prompts_per_group": 64,
                                    "system_prompt_len": cfg.system_prompt_len, "question_len": cfg.question_len,
                                    "output_len": cfg.output_len}, cfg.rate_per_s)
        wl, _ = spec.build(self.seed)
        prompts = [r for i in range(wl.num_roots()) for r in wl.root_requests(i)]
        rnd = random.Random(self.seed)
        wall_rate = cfg.rate_per_s * cfg.speedup
        from bus.replica_client import ReplicaClient

        replicas = isinstance(self.endpoint, list) and len(self.endpoint) > 1
        client_cm = (ReplicaClient(endpoints=list(self.endpoint), curve=self.curve) if replicas else
                     RouterClient(endpoint=self.endpoint if isinstance(self.endpoint, str) else self.endpoint[0],
                                  curve=self.curve))
        with client_cm as client:
            sent: dict[str, float] = {}
            next_at = time.monotonic()
            k = 0
            drain_until = None
            while True:
                now = time.monotonic()
                if self._halt.is_set():
                    if drain_until is None:
                        drain_until = now + self._drain_s
                    if not sent or now >= drain_until:
                        if self._drain_s > 0:  # without a drain the in-flight ones were never waited for
                            self.lost += len(sent)
                        break
                    next_at = float("inf")  # draining: nothing new
                while now >= next_at:
                    req = prompts[k % len(prompts)]
                    rid = f"s{self.seed}-{k}"
                    client.send(GenerateRequest(request_id=rid, token_ids=list(req.token_ids),
                                                max_tokens=req.max_tokens))
                    sent[rid] = now
                    self.sent += 1
                    k += 1
                    next_at += rnd.expovariate(wall_rate)
                for res in client.poll(int(max(0.0, min(0.02, next_at - time.monotonic())) * 1000)):
                    sent.pop(res.request_id, None)
                    if res.completion is not None:
                        self.records.append((time.monotonic(), res.completion.prompt_tokens,
                                             res.completion.cached_tokens, False))
                    else:
                        self.records.append((time.monotonic(), 0, 0, True))
                        code = res.error.code.value
                        self.error_codes[code] = self.error_codes.get(code, 0) + 1
                self.late_replies, self.unmatched_replies = client.late_replies, client.unmatched_replies
                self.connection_losses = client.connection_losses
                cutoff = time.monotonic() - cfg.request_timeout_s
                for rid in [r for r, t in sent.items() if t < cutoff]:
                    del sent[rid]
                    client.pending.pop(rid, None)
                    self.lost += 1


# ---------------------------------------------------------------------------- index vs truth


def _get_json(url: str, timeout_s: float = 1.0):
    with urllib.request.urlopen(url, timeout=timeout_s) as resp:
        return json.loads(resp.read())


def divergence(cluster, client, namespace: str, urls: dict[str, str]) -> float | None:
    """Jaccard distance between the engines' cached blocks and the router's mirrored index (None: unknown).

    Worker HTTP URLs come from the registry in Redis (``urls`` keeps the last known one: the
    registry itself is gone for a while after a Redis restart; a restarted worker has a new one).
    """
    from bus import names

    union = diff = 0
    try:
        for wid in cluster.worker_ids:
            url = client.hget(names.worker_key(namespace, wid), "http_url")
            if url:
                urls[wid] = url.decode()
            if wid not in urls:
                return None
            truth = set(_get_json(f"{urls[wid]}/kvr/cached_blocks")["blocks"])
            index = {int(k) for k in client.hkeys(names.target_blocks_key(namespace, wid, 0))}
            union += len(truth | index)
            diff += len(truth ^ index)
    except Exception as exc:  # Redis or a worker away (the faults do that): unknown
        logger.debug("divergence unknown: %r", exc)
        return None
    return diff / union if union else 0.0


# ---------------------------------------------------------------------------- faults


def inject(cluster, fault: str, cfg: StaleConfig, client, namespace: str) -> None:
    from bus import names

    sup = cluster.supervisor
    if fault == "worker_restart":
        sup.restart("worker-0")
    elif fault == "router_restart":
        sup.restart("router")
    elif fault == "redis_restart":
        sup.restart("redis")
    elif fault in ("drop", "clear"):
        url = client.hget(names.worker_key(namespace, "worker-0"), "http_url").decode()
        if fault == "drop":
            _post(f"{url}/kvr/faults", {"drop_rate": cfg.drop_rate})
            threading.Timer(cfg.fault_s, lambda: _post(f"{url}/kvr/faults", {})).start()
        else:
            deadline = time.monotonic() + 5.0
            while not _post(f"{url}/reset_prefix_cache", {}) and time.monotonic() < deadline:
                time.sleep(0.01)  # refused while a request holds blocks, as vLLM: try again
    else:
        raise ValueError(f"unknown fault {fault!r}; known: {', '.join(FAULTS)}")


def _post(url: str, body: dict) -> bool:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=2.0) as resp:
            return resp.status == 200
    except OSError:
        return False


# ---------------------------------------------------------------------------- one run


def run_fault(cfg: StaleConfig, fault: str, run_dir: Path, seed: int) -> dict:
    from cluster.local import LocalCluster
    from router.mirror import make_redis_client

    ns = run_dir.name
    cluster = LocalCluster(cluster_config(workers=cfg.workers, policy="kvr", speedup=cfg.speedup, run_dir=run_dir,
                                          namespace=ns, seed=seed))
    with cluster:
        client = make_redis_client(cluster.redis_url, timeout_s=0.5)
        load = SteadyLoad(cluster.client_endpoint, cfg, seed)
        t0 = time.monotonic()
        load.start()
        samples: list[tuple[float, float | None]] = []
        urls: dict[str, str] = {}
        fault_at = None
        try:
            while time.monotonic() - t0 < cfg.pre_s + cfg.post_s:
                if fault_at is None and time.monotonic() - t0 >= cfg.pre_s:
                    fault_at = time.monotonic()
                    inject(cluster, fault, cfg, client, ns)
                samples.append((time.monotonic(), divergence(cluster, client, ns, urls)))
                time.sleep(cfg.sample_s)
        finally:
            load.stop()
            load.join(timeout=10)
            client.close()
    return analyse(cfg, fault, fault_at, samples, load.records, load.lost)


def analyse(cfg: StaleConfig, fault: str, fault_at: float, samples, records, lost: int) -> dict:
    """Recovery times and the timeline (seconds relative to the fault)."""
    pre = sorted(d for t, d in samples if t < fault_at and d is not None and t >= fault_at - cfg.pre_window_s)
    threshold = max(0.02, percentile(pre, 90) if pre else 0.02)
    index_s = next((t - fault_at for t, d in samples if t >= fault_at and d is not None and d <= threshold), None)
    peak = max((d for t, d in samples if t >= fault_at and d is not None), default=None)
    unknown_s = sum(cfg.sample_s for t, d in samples if t >= fault_at and d is None)

    def hit_rate(lo: float, hi: float) -> float | None:
        sel = [(p, c) for t, p, c, err in records if lo <= t < hi and not err]
        prompt = sum(p for p, _ in sel)
        return sum(c for _, c in sel) / prompt if prompt else None

    pre_hit = hit_rate(fault_at - cfg.pre_window_s, fault_at)
    timeline = []
    hit_s = None
    dip = None
    step = cfg.sample_s
    t = fault_at - cfg.pre_s + cfg.window_s
    end = max((r[0] for r in records), default=fault_at)
    while t <= end:
        h = hit_rate(t - cfg.window_s, t)
        timeline.append((round(t - fault_at, 3), h))
        if t >= fault_at and h is not None:
            dip = h if dip is None else min(dip, h)
            # A window counts once at least half of it is after the fault (resolution: window_s / 2).
            if hit_s is None and pre_hit is not None and t >= fault_at + cfg.window_s / 2 \
                    and h >= pre_hit - cfg.hit_tolerance:
                hit_s = t - fault_at
        t += step
    errors_after = sum(1 for t_, _, _, err in records if err and t_ >= fault_at)
    return {"fault": fault, "index_recovered_s": index_s, "index_threshold": threshold,
            "peak_divergence": peak, "index_unknown_s": unknown_s, "pre_hit_rate": pre_hit, "hit_dip": dip,
            "hit_recovered_s": hit_s, "errors_after_fault": errors_after, "lost_requests": lost,
            "requests": len(records),
            "divergence_timeline": [(round(t - fault_at, 3), d) for t, d in samples],
            "hit_timeline": timeline}


def run(cfg: StaleConfig, *, command: str = "kvr bench stale", progress=None) -> SuiteResult:
    progress = progress or NullProgress()
    root = Path(cfg.out_dir or tempfile.mkdtemp(prefix="kvr-bench-stale-"))
    progress.start(len(cfg.faults) * cfg.repeats, "starting")
    runs = []
    try:
        for rep in range(cfg.repeats):
            for fault in cfg.faults:
                r = run_fault(cfg, fault, root / f"stale-{fault.replace('_', '-')}-{rep}", cfg.seed + rep)
                r["rep"] = rep
                runs.append(r)
                progress.step(f"{fault}: index {_s(r['index_recovered_s'])}, hit rate {_s(r['hit_recovered_s'])}")
    finally:
        progress.close()
    result = SuiteResult("stale", command, {**asdict(cfg), "faults": list(cfg.faults)})
    rows = []
    for fault in cfg.faults:
        rs = [r for r in runs if r["fault"] == fault]
        rows.append({"fault": fault, "runs": len(rs),
                     "index_recovered_s": spread(r["index_recovered_s"] for r in rs
                                                 if r["index_recovered_s"] is not None),
                     "index_never_recovered": sum(1 for r in rs if r["index_recovered_s"] is None),
                     "peak_divergence": spread(r["peak_divergence"] for r in rs if r["peak_divergence"] is not None),
                     "pre_hit_rate": spread(r["pre_hit_rate"] for r in rs if r["pre_hit_rate"] is not None),
                     "hit_dip": spread(r["hit_dip"] for r in rs if r["hit_dip"] is not None),
                     "hit_recovered_s": spread(r["hit_recovered_s"] for r in rs if r["hit_recovered_s"] is not None),
                     "hit_never_recovered": sum(1 for r in rs if r["hit_recovered_s"] is None),
                     "errors_after_fault": spread(r["errors_after_fault"] for r in rs),
                     "lost_requests": spread(r["lost_requests"] for r in rs)})
    result.tables["recovery"] = rows
    result.tables["runs"] = runs
    result.notes.append(f"{cfg.workers} workers at speedup {cfg.speedup:g}, gsp {cfg.groups} groups × "
                        f"{cfg.system_prompt_len}-token system prompts, Poisson {cfg.rate_per_s:g} req/s of workload "
                        f"time; fault {cfg.pre_s:g} s after the load starts, {cfg.post_s:g} s observed; index sampled "
                        f"every {cfg.sample_s:g} s, hit rate in {cfg.window_s:g} s windows; times are wall seconds "
                        f"from the fault; logs in {root}")
    return result


def _s(x: float | None) -> str:
    return "never" if x is None else f"{x:.2f} s"


def display_tables(result: SuiteResult) -> dict[str, list[dict]]:
    rows = [{"fault": r["fault"], "runs": r["runs"],
             "index = truth after s": fmt_spread(r["index_recovered_s"], 2) + (
                 f" ({r['index_never_recovered']} never)" if r["index_never_recovered"] else ""),
             "peak divergence": fmt_spread(r["peak_divergence"], 3),
             "hit rate before": fmt_spread(r["pre_hit_rate"], 3), "lowest after": fmt_spread(r["hit_dip"], 3),
             "hit rate back after s": fmt_spread(r["hit_recovered_s"], 2) + (
                 f" ({r['hit_never_recovered']} never)" if r["hit_never_recovered"] else ""),
             "errors": fmt_spread(r["errors_after_fault"], 0), "lost": fmt_spread(r["lost_requests"], 0)}
            for r in result.tables["recovery"]]
    runs = [{k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in r.items()
             if k not in ("divergence_timeline", "hit_timeline")} for r in result.tables["runs"]]
    return {"recovery": rows, "runs": runs}


def plot(result: SuiteResult, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in result.tables["runs"] if r.get("rep", 0) == 0]
    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 2.4 * len(runs)), squeeze=False, sharex=True)
    for ax, r in zip(axes[:, 0], runs, strict=True):
        xs = [t for t, d in r["divergence_timeline"] if d is not None]
        ax.plot(xs, [d for t, d in r["divergence_timeline"] if d is not None], color="tab:red",
                label="index divergence")
        ax.set_ylabel("divergence", color="tab:red")
        ax.set_ylim(bottom=0)
        ax2 = ax.twinx()
        ax2.plot([t for t, h in r["hit_timeline"] if h is not None], [h for t, h in r["hit_timeline"] if h is not None],
                 color="tab:blue", label="token hit rate")
        ax2.set_ylim(0, 1)
        ax2.set_ylabel("hit rate", color="tab:blue")
        ax.axvline(0, color="black", linewidth=1)
        for key, style in (("index_recovered_s", "tab:red"), ("hit_recovered_s", "tab:blue")):
            if r[key] is not None:
                ax.axvline(r[key], color=style, linestyle="--", linewidth=1)
        ax.set_title(f"{r['fault']}: index back {_s(r['index_recovered_s'])}, hit rate back {_s(r['hit_recovered_s'])}",
                     fontsize=9)
    axes[-1, 0].set_xlabel("seconds from the fault (wall)")
    fig.tight_layout()
    path = out_dir / "stale_timeline.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]
