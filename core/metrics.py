"""The one metrics fold (DESIGN §8), shared by the live monitor and the simulator.

A :class:`MetricsFold` is a pure fold over records that carry their own
timestamps: it never reads a clock, so the monitor (wall clock) and the
simulator (virtual clock) compute every metric the same way. Folds merge
(one per worker, per router replica, per shard) and round-trip through JSON.

Definitions (one each):

* **token hit rate** = Σ cached prompt tokens / Σ prompt tokens, with the cached
  count reported by the engine (its truth, as vLLM's ``PrefixCacheStats``).
  **predicted hit rate** is the same ratio with the router's predicted overlap,
  over the requests that carry a prediction; the gap is a health signal.
* **cache status** of a request: ``miss`` (no cached token), ``hit`` (every full
  block the engine could reuse was cached: ``cached >= block_size *
  floor((prompt - 1) / block_size)``, the last prompt token is always computed),
  ``partial`` otherwise.
* **TPOT** = (e2e − TTFT) / (output tokens − 1), for requests with ≥ 2 output tokens.
* percentiles interpolate linearly between order statistics (numpy's default;
  :func:`core.quantiles.percentile`, the one definition). A fold made with
  ``relative_accuracy`` keeps DDSketches instead of every value: its quantiles
  are then within that relative error (see :mod:`core.quantiles`); counts,
  sums, means and maxima stay exact.
* **bounded memory**: with ``max_timeline_buckets`` the timeline never holds
  more buckets than that: when it would, the bucket width doubles and
  neighbouring buckets add up (a long run keeps its whole history, coarser).
* **load CV** = population std / mean of per-worker request counts over every
  registered worker (a worker that got nothing counts as 0).
* **infinite-cache upper bound**: requests in arrival order, a set of seen block
  hashes; a request hits its longest prefix of seen blocks (see
  :func:`infinite_cache_upper_bound`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import msgspec

from core.blocks import DEFAULT_BLOCK_SIZE
from core.events import AllBlocksCleared, BlockRemoved, BlockStored, KVEvent
from core.quantiles import Samples, new_samples, samples_from_json
from core.quantiles import percentile as percentile  # re-exported: the one definition lives in core.quantiles

logger = logging.getLogger(__name__)

CACHE_STATUSES = ("hit", "partial", "miss")
PERCENTILES = (50, 90, 99)


class RequestRecord(msgspec.Struct, tag="request", kw_only=True, frozen=True):
    """One finished (or failed) request, as the router or the simulator saw it: the one record of a
    request, folded by ``MetricsFold`` and, published by the router, carried on the metrics PUB
    (``bus/schema.py``'s ``MetricsRecord``) to the monitor.

    ``arrival_s`` is when the request was accepted (any clock, seconds: the router's wall clock,
    the simulator's virtual one); the other times are durations from arrival. ``queue_s``,
    ``prefill_s`` and ``preemptions`` are the engine's own measurements. A failed request has
    ``error`` (an ``ErrorCode`` value, ``bus/schema.py``) and, if it failed before any worker took
    it, no ``worker_id``; the fold takes successful ones only.
    """

    request_id: str
    worker_id: str | None
    arrival_s: float
    ttft_s: float
    e2e_s: float
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    predicted_cached_tokens: int | None = None  # None: the policy made no prediction
    queue_s: float = 0.0
    prefill_s: float = 0.0
    preemptions: int = 0
    policy: str = ""
    error: str | None = None

    @property
    def finish_s(self) -> float:
        return self.arrival_s + self.e2e_s


def cache_status(num_prompt_tokens: int, num_cached_tokens: int, block_size: int) -> str:
    """``hit``, ``partial`` or ``miss`` (see the module docstring)."""
    if num_cached_tokens <= 0:
        return "miss"
    reusable = block_size * ((num_prompt_tokens - 1) // block_size)
    return "hit" if num_cached_tokens >= reusable else "partial"


def _match_bucket(num_blocks: int) -> int:
    """Lower bound of the power-of-two bucket holding ``num_blocks`` (0, 1, 2, 4, 8, ...)."""
    return 0 if num_blocks <= 0 else 1 << (num_blocks.bit_length() - 1)


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def _cv(values: Sequence[float]) -> float:
    if not values:
        return math.nan
    mean = sum(values) / len(values)
    if mean == 0:
        return 0.0
    var = sum((v - mean) ** 2 for v in values) / len(values)
    return math.sqrt(var) / mean


class MetricsFold:
    """Accumulates request records, load samples and KV-event counts.

    ``block_size`` classifies cache status and match lengths; ``timeline_bucket_s``
    is the width of the time buckets behind the hit-rate and load-over-time plots.
    ``relative_accuracy`` (None: keep every value, exact) makes every latency
    distribution a bounded sketch; ``max_timeline_buckets`` (None: unbounded)
    caps the timeline by coarsening it. A fold that lives as long as a live
    monitor sets both; the simulator (finite runs, exact figures) sets neither.
    """

    def __init__(
        self,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        timeline_bucket_s: float = 10.0,
        relative_accuracy: float | None = None,
        max_timeline_buckets: int | None = None,
    ) -> None:
        if block_size <= 0 or timeline_bucket_s <= 0:
            raise ValueError("block_size and timeline_bucket_s must be positive")
        if max_timeline_buckets is not None and max_timeline_buckets < 2:
            raise ValueError("max_timeline_buckets must be at least 2")
        self.block_size = block_size
        self.timeline_bucket_s = timeline_bucket_s
        self.relative_accuracy = relative_accuracy
        self.max_timeline_buckets = max_timeline_buckets
        self.workers: dict[str, dict[str, float]] = {}
        self.ttft_s: Samples = new_samples(relative_accuracy)
        self.tpot_s: Samples = new_samples(relative_accuracy)
        self.e2e_s: Samples = new_samples(relative_accuracy)
        self.queue_s: Samples = new_samples(relative_accuracy)
        self.ttft_by_status: dict[str, Samples] = {s: new_samples(relative_accuracy) for s in CACHE_STATUSES}
        self.e2e_by_status: dict[str, Samples] = {s: new_samples(relative_accuracy) for s in CACHE_STATUSES}
        self.match_blocks_hist: dict[int, int] = {}
        self.event_lag_s: Samples = new_samples(relative_accuracy)
        self.counters: dict[str, float] = dict.fromkeys(_COUNTERS, 0)
        self.first_arrival_s = math.inf
        self.last_finish_s = -math.inf
        # bucket index -> {"prompt_tokens", "cached_tokens", "requests",
        #                  "per_worker": {w: [n_req, kv_usage_sum, n_samples, queued_prefill_sum]}}
        self.timeline: dict[int, dict[str, Any]] = {}

    # ---- inputs -------------------------------------------------------

    def register_worker(self, worker: str) -> None:
        """Make ``worker`` count in per-worker load (even if it never gets a request)."""
        self.workers.setdefault(worker, dict.fromkeys(_WORKER_FIELDS, 0))

    def _bucket(self, t: float) -> dict[str, Any]:
        idx = int(math.floor(t / self.timeline_bucket_s))
        b = self.timeline.get(idx)
        if b is None:
            if self.max_timeline_buckets is not None and len(self.timeline) >= self.max_timeline_buckets:
                self._coarsen_timeline()
                return self._bucket(t)
            b = self.timeline[idx] = _new_bucket()
        return b

    def _coarsen_timeline(self) -> None:
        """Double the bucket width: bucket ``i`` joins ``i // 2`` (floor(t / 2w) = floor(floor(t / w) / 2))."""
        self.timeline = _coarsened(self.timeline)
        self.timeline_bucket_s *= 2

    def add_request(self, rec: RequestRecord) -> None:
        """Fold one successful request (one with an ``error`` or no worker is refused: the fold's
        figures are of served requests; callers count failures themselves)."""
        worker = rec.worker_id
        if rec.error is not None or worker is None:
            raise ValueError(f"request {rec.request_id!r} failed ({rec.error}): the fold takes served requests only")
        self.register_worker(worker)
        w = self.workers[worker]
        w["requests"] += 1
        w["prompt_tokens"] += rec.prompt_tokens
        w["cached_tokens"] += rec.cached_tokens
        w["prefill_tokens_computed"] += rec.prompt_tokens - rec.cached_tokens
        c = self.counters
        c["requests"] += 1
        c["prompt_tokens"] += rec.prompt_tokens
        c["cached_tokens"] += rec.cached_tokens
        c["output_tokens"] += rec.output_tokens
        c["preemptions"] += rec.preemptions
        if rec.predicted_cached_tokens is not None:
            c["predicted_requests"] += 1
            c["predicted_prompt_tokens"] += rec.prompt_tokens
            c["predicted_cached_tokens"] += rec.predicted_cached_tokens
            c["predicted_engine_cached_tokens"] += rec.cached_tokens
        self.ttft_s.add(rec.ttft_s)
        self.e2e_s.add(rec.e2e_s)
        self.queue_s.add(rec.queue_s)
        if rec.output_tokens >= 2:
            self.tpot_s.add((rec.e2e_s - rec.ttft_s) / (rec.output_tokens - 1))
        status = cache_status(rec.prompt_tokens, rec.cached_tokens, self.block_size)
        self.ttft_by_status[status].add(rec.ttft_s)
        self.e2e_by_status[status].add(rec.e2e_s)
        bucket = _match_bucket(rec.cached_tokens // self.block_size)
        self.match_blocks_hist[bucket] = self.match_blocks_hist.get(bucket, 0) + 1
        self.first_arrival_s = min(self.first_arrival_s, rec.arrival_s)
        self.last_finish_s = max(self.last_finish_s, rec.arrival_s + rec.e2e_s)
        b = self._bucket(rec.arrival_s)
        b["prompt_tokens"] += rec.prompt_tokens
        b["cached_tokens"] += rec.cached_tokens
        b["requests"] += 1
        pw = b["per_worker"].setdefault(worker, [0, 0.0, 0, 0])
        pw[0] += 1

    def observe_load(self, worker: str, now: float, *, kv_usage: float, queued_prefill_tokens: int = 0) -> None:
        """A load sample (heartbeat): KV usage in [0, 1] and queued prefill tokens."""
        self.register_worker(worker)
        w = self.workers[worker]
        w["kv_usage_sum"] += kv_usage
        w["kv_usage_max"] = max(w["kv_usage_max"], kv_usage)
        w["load_samples"] += 1
        pw = self._bucket(now)["per_worker"].setdefault(worker, [0, 0.0, 0, 0])
        pw[1] += kv_usage
        pw[2] += 1
        pw[3] += queued_prefill_tokens

    def observe_kv_events(self, worker: str, events: Iterable[KVEvent]) -> None:
        """Count stored / removed blocks and cache resets from an engine's events."""
        self.register_worker(worker)
        w = self.workers[worker]
        c = self.counters
        for ev in events:
            if isinstance(ev, BlockStored):
                c["blocks_stored"] += len(ev.block_hashes)
            elif isinstance(ev, BlockRemoved):
                c["blocks_evicted"] += len(ev.block_hashes)
                w["blocks_evicted"] += len(ev.block_hashes)
            elif isinstance(ev, AllBlocksCleared):
                c["cache_clears"] += 1

    def observe_event_lag(self, lag_s: float) -> None:
        """Time from an event batch's ``ts`` to when the index applied it."""
        self.event_lag_s.add(lag_s)

    def count_gap(self, n: int = 1) -> None:
        """Sequence gaps detected on the event plane."""
        self.counters["event_gaps"] += n

    def count_replay(self, n: int = 1) -> None:
        """Replays requested after a gap."""
        self.counters["event_replays"] += n

    # ---- merge / serialise ---------------------------------------------

    def merge(self, other: MetricsFold) -> MetricsFold:
        """Fold ``other`` into this one and return self.

        Same block size and kind of samples (exact or sketches of one accuracy).
        Bucket widths may differ by a power of two (a bounded timeline coarsens):
        the finer timeline is coarsened to the wider width first.
        """
        if other.block_size != self.block_size or other.relative_accuracy != self.relative_accuracy:
            raise ValueError("cannot merge folds with different block_size or relative_accuracy")
        other_timeline = other.timeline
        if other.timeline_bucket_s != self.timeline_bucket_s:
            steps_mine = _doublings(self.timeline_bucket_s, other.timeline_bucket_s)
            steps_other = _doublings(other.timeline_bucket_s, self.timeline_bucket_s)
            if steps_mine is None and steps_other is None:
                raise ValueError("cannot merge folds whose timeline_bucket_s differ by other than a power of two")
            for _ in range(steps_mine or 0):
                self._coarsen_timeline()
            for _ in range(steps_other or 0):
                other_timeline = _coarsened(other_timeline)
        for name, w in other.workers.items():
            self.register_worker(name)
            mine = self.workers[name]
            for k, v in w.items():
                mine[k] = max(mine[k], v) if k == "kv_usage_max" else mine[k] + v
        for attr in _SAMPLE_ATTRS:
            getattr(self, attr).merge(getattr(other, attr))
        for s in CACHE_STATUSES:
            self.ttft_by_status[s].merge(other.ttft_by_status[s])
            self.e2e_by_status[s].merge(other.e2e_by_status[s])
        for blocks, n in other.match_blocks_hist.items():
            self.match_blocks_hist[blocks] = self.match_blocks_hist.get(blocks, 0) + n
        for k, v in other.counters.items():
            self.counters[k] += v
        self.first_arrival_s = min(self.first_arrival_s, other.first_arrival_s)
        self.last_finish_s = max(self.last_finish_s, other.last_finish_s)
        for idx, ob in other_timeline.items():
            _add_bucket(self.timeline.setdefault(idx, _new_bucket()), ob)
        if self.max_timeline_buckets is not None:
            while len(self.timeline) > self.max_timeline_buckets:
                self._coarsen_timeline()
        return self

    def to_dict(self) -> dict[str, Any]:
        """Everything, JSON-ready (raw samples or sketches included, so merges stay exact).

        An exact fold's distributions are lists of values; a bounded fold's are
        sketch objects (:meth:`core.quantiles.SketchSamples.to_json`), and it
        names its ``relative_accuracy`` and ``max_timeline_buckets``.
        """
        out: dict[str, Any] = {
            "block_size": self.block_size,
            "timeline_bucket_s": self.timeline_bucket_s,
        }
        if self.relative_accuracy is not None:
            out["relative_accuracy"] = self.relative_accuracy
        if self.max_timeline_buckets is not None:
            out["max_timeline_buckets"] = self.max_timeline_buckets
        return out | {
            "workers": {k: dict(v) for k, v in self.workers.items()},
            "ttft_s": self.ttft_s.to_json(),
            "tpot_s": self.tpot_s.to_json(),
            "e2e_s": self.e2e_s.to_json(),
            "queue_s": self.queue_s.to_json(),
            "ttft_by_status": {k: v.to_json() for k, v in self.ttft_by_status.items()},
            "e2e_by_status": {k: v.to_json() for k, v in self.e2e_by_status.items()},
            "match_blocks_hist": {str(k): v for k, v in sorted(self.match_blocks_hist.items())},
            "event_lag_s": self.event_lag_s.to_json(),
            "counters": dict(self.counters),
            "first_arrival_s": None if math.isinf(self.first_arrival_s) else self.first_arrival_s,
            "last_finish_s": None if math.isinf(self.last_finish_s) else self.last_finish_s,
            "timeline": {
                str(k): {**b, "per_worker": {w: list(v) for w, v in b["per_worker"].items()}}
                for k, b in sorted(self.timeline.items())
            },
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MetricsFold:
        """Inverse of :meth:`to_dict`."""
        f = cls(
            block_size=d["block_size"],
            timeline_bucket_s=d["timeline_bucket_s"],
            relative_accuracy=d.get("relative_accuracy"),
            max_timeline_buckets=d.get("max_timeline_buckets"),
        )
        f.workers = {k: dict(v) for k, v in d["workers"].items()}
        for attr in _SAMPLE_ATTRS:
            setattr(f, attr, samples_from_json(d[attr]))
        f.ttft_by_status = {k: samples_from_json(v) for k, v in d["ttft_by_status"].items()}
        f.e2e_by_status = {k: samples_from_json(v) for k, v in d["e2e_by_status"].items()}
        f.match_blocks_hist = {int(k): v for k, v in d["match_blocks_hist"].items()}
        f.counters = {**dict.fromkeys(_COUNTERS, 0), **d["counters"]}
        f.first_arrival_s = math.inf if d["first_arrival_s"] is None else d["first_arrival_s"]
        f.last_finish_s = -math.inf if d["last_finish_s"] is None else d["last_finish_s"]
        f.timeline = {
            int(k): {**b, "per_worker": {w: list(v) for w, v in b["per_worker"].items()}}
            for k, b in d["timeline"].items()
        }
        return f

    def stored_sizes(self) -> dict[str, int]:
        """How many values, bins and entries the fold holds, by container (what a bounded fold keeps flat)."""
        dists = [getattr(self, a) for a in _SAMPLE_ATTRS]
        dists += list(self.ttft_by_status.values()) + list(self.e2e_by_status.values())
        return {
            "distribution_values": sum(d.stored() for d in dists),
            "timeline_buckets": len(self.timeline),
            "timeline_worker_entries": sum(len(b["per_worker"]) for b in self.timeline.values()),
            "match_buckets": len(self.match_blocks_hist),
            "workers": len(self.workers),
        }

    # ---- results --------------------------------------------------------

    @property
    def duration_s(self) -> float:
        """From the first arrival to the last finish (0 when empty)."""
        return max(0.0, self.last_finish_s - self.first_arrival_s) if self.counters["requests"] else 0.0

    def summary(self) -> dict[str, Any]:
        """Flat headline metrics (NaN where undefined), sorted keys inside nested dicts."""
        c = self.counters
        out: dict[str, Any] = {
            "requests": int(c["requests"]),
            "token_hit_rate": _ratio(c["cached_tokens"], c["prompt_tokens"]),
            "predicted_hit_rate": _ratio(c["predicted_cached_tokens"], c["predicted_prompt_tokens"]),
            "prompt_tokens": int(c["prompt_tokens"]),
            "cached_tokens": int(c["cached_tokens"]),
            "prefill_tokens_computed": int(c["prompt_tokens"] - c["cached_tokens"]),
            "output_tokens": int(c["output_tokens"]),
        }
        distributions = (("ttft", self.ttft_s), ("tpot", self.tpot_s), ("e2e", self.e2e_s), ("queue", self.queue_s))
        for name, values in distributions:
            out[f"{name}_mean_s"] = values.mean()
            for q in PERCENTILES:
                out[f"{name}_p{q}_s"] = values.quantile(q)
        dur = self.duration_s
        out["duration_s"] = dur
        out["throughput_rps"] = _ratio(c["requests"], dur)
        out["prompt_tokens_per_s"] = _ratio(c["prompt_tokens"], dur)
        out["output_tokens_per_s"] = _ratio(c["output_tokens"], dur)
        out["by_cache_status"] = {}
        for st in CACHE_STATUSES:
            t = self.ttft_by_status[st]
            e = self.e2e_by_status[st]
            out["by_cache_status"][st] = {
                "requests": len(t),
                "ttft_p50_s": t.quantile(50),
                "ttft_p99_s": t.quantile(99),
                "e2e_p50_s": e.quantile(50),
                "e2e_p99_s": e.quantile(99),
            }
        names = sorted(self.workers)
        req_counts = [self.workers[n]["requests"] for n in names]
        out["load_cv"] = _cv(req_counts)
        out["prefill_load_cv"] = _cv([self.workers[n]["prefill_tokens_computed"] for n in names])
        mean_load = sum(req_counts) / len(req_counts) if req_counts else math.nan
        out["max_over_mean_load"] = _ratio(max(req_counts), mean_load) if req_counts else math.nan
        samples = sum(self.workers[n]["load_samples"] for n in names)
        out["kv_usage_mean"] = _ratio(sum(self.workers[n]["kv_usage_sum"] for n in names), samples)
        out["kv_usage_max"] = max((self.workers[n]["kv_usage_max"] for n in names), default=math.nan)
        out["blocks_stored"] = int(c["blocks_stored"])
        out["evictions"] = int(c["blocks_evicted"])
        out["eviction_rate_per_s"] = _ratio(c["blocks_evicted"], dur)
        out["cache_clears"] = int(c["cache_clears"])
        out["preemptions"] = int(c["preemptions"])
        lags = self.event_lag_s
        out["event_lag_p50_s"] = lags.quantile(50)
        out["event_lag_p99_s"] = lags.quantile(99)
        out["event_lag_max_s"] = lags.max()
        out["event_gaps"] = int(c["event_gaps"])
        out["event_replays"] = int(c["event_replays"])
        out["match_blocks_hist"] = {str(k): v for k, v in sorted(self.match_blocks_hist.items())}
        out["per_worker"] = {
            n: {
                "requests": int(self.workers[n]["requests"]),
                "token_hit_rate": _ratio(self.workers[n]["cached_tokens"], self.workers[n]["prompt_tokens"]),
                "prefill_tokens_computed": int(self.workers[n]["prefill_tokens_computed"]),
                "evictions": int(self.workers[n]["blocks_evicted"]),
            }
            for n in names
        }
        return out

    def timeline_series(self) -> dict[str, Any]:
        """Per time bucket: token hit rate, requests per worker, mean KV usage per worker."""
        idxs = sorted(self.timeline)
        names = sorted(self.workers)
        t = [i * self.timeline_bucket_s for i in idxs]
        hit = [_ratio(self.timeline[i]["cached_tokens"], self.timeline[i]["prompt_tokens"]) for i in idxs]
        reqs = {n: [self.timeline[i]["per_worker"].get(n, [0, 0, 0, 0])[0] for i in idxs] for n in names}
        kv = {}
        for n in names:
            row = []
            for i in idxs:
                pw = self.timeline[i]["per_worker"].get(n, [0, 0.0, 0, 0])
                row.append(_ratio(pw[1], pw[2]))
            kv[n] = row
        return {"t_s": t, "token_hit_rate": hit, "requests": reqs, "kv_usage": kv}


_SAMPLE_ATTRS = ("ttft_s", "tpot_s", "e2e_s", "queue_s", "event_lag_s")


def _new_bucket() -> dict[str, Any]:
    return {"prompt_tokens": 0, "cached_tokens": 0, "requests": 0, "per_worker": {}}


def _add_bucket(into: dict[str, Any], other: dict[str, Any]) -> None:
    for k in ("prompt_tokens", "cached_tokens", "requests"):
        into[k] += other[k]
    for wname, vals in other["per_worker"].items():
        mine = into["per_worker"].setdefault(wname, [0, 0.0, 0, 0])
        for i, v in enumerate(vals):
            mine[i] += v


def _coarsened(timeline: dict[int, dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The timeline at twice the bucket width (a new dict; ``timeline`` is left alone)."""
    out: dict[int, dict[str, Any]] = {}
    for idx in sorted(timeline):
        _add_bucket(out.setdefault(idx // 2, _new_bucket()), timeline[idx])
    return out


def _doublings(finer_s: float, wider_s: float) -> int | None:
    """How many doublings take ``finer_s`` to ``wider_s`` (None if none do)."""
    steps = 0
    width = finer_s
    while width < wider_s:
        width *= 2
        steps += 1
    return steps if steps and width == wider_s else None


_COUNTERS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "output_tokens",
    "preemptions",
    "predicted_requests",
    "predicted_prompt_tokens",
    "predicted_cached_tokens",
    "predicted_engine_cached_tokens",
    "blocks_stored",
    "blocks_evicted",
    "cache_clears",
    "event_gaps",
    "event_replays",
)
_WORKER_FIELDS = (
    "requests",
    "prompt_tokens",
    "cached_tokens",
    "prefill_tokens_computed",
    "kv_usage_sum",
    "kv_usage_max",
    "load_samples",
    "blocks_evicted",
)


def infinite_cache_upper_bound(
    requests: Iterable[tuple[Sequence[Hashable], int]],
    *,
    block_size: int,
    last_token_recomputed: bool = True,
) -> float:
    """Token hit rate of an infinite cache, requests in arrival order.

    ``requests`` yields ``(block_hashes, num_prompt_tokens)`` with chained hashes of
    the full blocks. A request hits its longest prefix of already seen blocks;
    with ``last_token_recomputed`` (vLLM semantics, what the engine reports) at
    most ``block_size * floor((prompt - 1) / block_size)`` tokens, else at most
    the prompt. Then all its blocks become seen. An entry with 0 prompt tokens
    only makes its blocks seen (the blocks a decode produced, which a later turn
    can reuse). NaN for no prompt tokens.
    """
    seen: set[Hashable] = set()
    hit_tokens = 0
    total = 0
    for hashes, n_tokens in requests:
        k = 0
        for h in hashes:
            if h not in seen:
                break
            k += 1
        cap = block_size * ((n_tokens - 1) // block_size) if last_token_recomputed else n_tokens
        hit_tokens += max(0, min(k * block_size, cap))
        total += n_tokens
        seen.update(hashes)
    return _ratio(hit_tokens, total)


def dense_timeline(timeline: dict[str, Any], bucket_s: float) -> dict[str, Any]:
    """A fold's ``timeline_series`` with every bucket between its first and last.

    The fold keeps only buckets that saw data, so plotting its lists as they are
    would join points across idle periods. Here a missing bucket has no hit rate
    and no KV sample (NaN: the line breaks there) and started no requests (0).
    """
    ts = timeline.get("t_s") or []
    if not ts:
        return {"t_s": [], "token_hit_rate": [], "requests": {}, "kv_usage": {}}
    first = round(ts[0] / bucket_s)
    pos = {round(t / bucket_s) - first: k for k, t in enumerate(ts)}
    n = round(ts[-1] / bucket_s) - first + 1

    def fill(values: list[Any], missing: float) -> list[float]:
        return [(math.nan if values[pos[i]] is None else float(values[pos[i]])) if i in pos else missing
                for i in range(n)]

    return {
        "t_s": [(first + i) * bucket_s for i in range(n)],
        "token_hit_rate": fill(timeline.get("token_hit_rate", []), math.nan),
        "requests": {w: fill(v, 0.0) for w, v in (timeline.get("requests") or {}).items()},
        "kv_usage": {w: fill(v, math.nan) for w, v in (timeline.get("kv_usage") or {}).items()},
    }
