"""Goodput: the highest offered load at which a fleet still meets a latency SLO.

The load is one number ``x``: the Poisson request rate of a synthetic workload (roots/s), or
the speed-up of a trace's timestamps. Each *probe* is one full simulator run at ``x`` with the
same seed, so a probe is a pure function of ``x`` and the search is deterministic.

**The SLO predicate** (:func:`slo_verdict`, the one definition): a probe meets the SLO iff

* TTFT p99 ≤ ``ttft_p99_s`` (NaN, i.e. no finished request, fails), and
* TPOT p99 ≤ ``tpot_p99_s`` when one is given (NaN passes: no request decoded ≥ 2 tokens), and
* no request was rejected or failed (its worker restarted: ``sim/churn.py``) and none was
  left unfinished, and
* the fleet sustained ≥ ``min_throughput_fraction`` (95 %) of the offered throughput.

The last clause keeps an overloaded fleet from passing because the run ended before its
queue got long enough to break the latency bound. Offered throughput is the finished
requests over the *arrival span* A (first to last request the router received, follow-ups
included, as realised in this run, so the arrival process's noise cancels); achieved
throughput is the same requests over the *completion span* C (first arrival to last
finish: the ``throughput_rps`` of the comparison tables). The fraction is A / C. An
overloaded fleet (offered ρ > 1 times its capacity) ends with a backlog, C ≈ ρ·A, fraction
≈ 1/ρ. A healthy one still pays one end-to-end latency L of drain, C ≈ A + L, so a run must
be long: with A < 19·L the clause fails however light the load. That is deliberate: a
burst that ends before any queue builds (the limit of a short workload at a high rate) says
nothing about a sustained rate, and the goodput must never overstate one. When the
``throughput`` clause is what binds (``Probe.failed``), lengthen the workload.

**The search** (:func:`find_goodput`) assumes the predicate is monotone in ``x`` (met at ``x``
⇒ met below ``x``). Bracketing: from ``start``, double while met (at most ``max_doublings``
times) or halve until met (at most ``max_halvings`` times; none met: no goodput). Then one
*check* probe at twice the first failing load (skipped if already probed), and bisection of
[met, failed] at the midpoint until ``failed − met ≤ tolerance × met``. The goodput is the
highest met load, so the true threshold lies in [goodput, goodput × (1 + tolerance)).
Any met probe above the reported goodput (the check probe can be one) shows the predicate
is not monotone there; it is reported in ``non_monotone``, never silently used.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sim.cluster import RunResult

logger = logging.getLogger(__name__)

#: Default fraction of the offered throughput a fleet must sustain.
MIN_THROUGHPUT_FRACTION = 0.95
#: Default relative tolerance of the bisection.
DEFAULT_TOLERANCE = 0.05
#: Bracketing limits: at most ``start × 2**MAX_DOUBLINGS`` up, ``start / 2**MAX_HALVINGS`` down.
MAX_DOUBLINGS = 20
MAX_HALVINGS = 6

# Names of the SLO clauses a probe can fail (``Probe.failed``).
TTFT = "ttft_p99"
TPOT = "tpot_p99"
REJECTED = "rejected"
UNFINISHED = "unfinished"
THROUGHPUT = "throughput"


@dataclass(frozen=True, kw_only=True)
class Slo:
    ttft_p99_s: float
    tpot_p99_s: float | None = None
    min_throughput_fraction: float = MIN_THROUGHPUT_FRACTION

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_p99_s": self.ttft_p99_s, "tpot_p99_s": self.tpot_p99_s,
                "min_throughput_fraction": self.min_throughput_fraction}


@dataclass(frozen=True, kw_only=True)
class ProbeStats:
    """What the SLO predicate and the report need from one run."""

    ttft_p99_s: float
    tpot_p99_s: float
    token_hit_rate: float
    #: Finished requests / (first arrival .. last finish), as the comparison tables print it.
    throughput_rps: float
    requests: int
    rejected: int
    unfinished: int
    arrival_span_s: float
    completion_span_s: float

    @property
    def sustained_fraction(self) -> float:
        """A / C (module docstring): 0 when nothing finished or every request arrived at once."""
        if self.completion_span_s <= 0:
            return 0.0
        return self.arrival_span_s / self.completion_span_s

    def to_dict(self) -> dict[str, Any]:
        return {"ttft_p99_s": self.ttft_p99_s, "tpot_p99_s": self.tpot_p99_s, "token_hit_rate": self.token_hit_rate,
                "throughput_rps": self.throughput_rps, "sustained_fraction": self.sustained_fraction,
                "requests": self.requests, "rejected": self.rejected, "unfinished": self.unfinished,
                "arrival_span_s": self.arrival_span_s, "completion_span_s": self.completion_span_s}


def probe_stats(result: RunResult) -> ProbeStats:
    """The probe's numbers from one simulator run."""
    fold = result.fold
    s = fold.summary()
    if s["requests"]:
        # Both spans start at the fold's first arrival; the last arrival counts rejected
        # requests too (they fail the SLO anyway).
        arrival_s = max(0.0, result.last_arrival_s - fold.first_arrival_s)
        completion_s = fold.duration_s
    else:
        arrival_s = completion_s = 0.0
    return ProbeStats(ttft_p99_s=s["ttft_p99_s"], tpot_p99_s=s["tpot_p99_s"], token_hit_rate=s["token_hit_rate"],
                      throughput_rps=s["throughput_rps"], requests=result.requests,
                      # Every request that ended with an error, as the live bench counts them:
                      # the engine's rejections and those lost with a restarted worker.
                      rejected=result.rejected + result.failed,
                      unfinished=result.unfinished, arrival_span_s=arrival_s, completion_span_s=completion_s)


def slo_verdict(stats: ProbeStats, slo: Slo) -> list[str]:
    """The SLO clauses ``stats`` fails, in a fixed order; empty iff the SLO is met."""
    failed = []
    if not stats.ttft_p99_s <= slo.ttft_p99_s:  # NaN fails
        failed.append(TTFT)
    if slo.tpot_p99_s is not None and stats.tpot_p99_s > slo.tpot_p99_s:  # NaN passes
        failed.append(TPOT)
    if stats.rejected:
        failed.append(REJECTED)
    if stats.unfinished:
        failed.append(UNFINISHED)
    if not stats.sustained_fraction >= slo.min_throughput_fraction:
        failed.append(THROUGHPUT)
    return failed


@dataclass(frozen=True, kw_only=True)
class Probe:
    load: float
    stats: ProbeStats
    failed: tuple[str, ...]

    @property
    def met(self) -> bool:
        return not self.failed

    def to_dict(self) -> dict[str, Any]:
        return {"load": self.load, "met": self.met, "failed": list(self.failed), **self.stats.to_dict()}


@dataclass(kw_only=True)
class GoodputSearch:
    """One policy's search. ``goodput`` None: no probed load met the SLO (lowest: ``floor``)."""

    goodput: float | None
    #: Every probe in the order it ran.
    probes: list[Probe] = field(default_factory=list)
    #: False when even ``start × 2**max_doublings`` met (the goodput is only a lower bound).
    bracketed: bool = True
    #: The lowest load probed (the search's floor when nothing met).
    floor: float = math.nan

    @property
    def at_goodput(self) -> Probe | None:
        return next((p for p in self.probes if p.load == self.goodput), None)

    @property
    def non_monotone(self) -> list[float]:
        """Loads above the goodput that met the SLO (the monotonicity assumption failed)."""
        if self.goodput is None:
            return sorted(p.load for p in self.probes if p.met)
        return sorted(p.load for p in self.probes if p.met and p.load > self.goodput)

    def to_dict(self) -> dict[str, Any]:
        at = self.at_goodput
        return {"goodput": self.goodput, "bracketed": self.bracketed, "floor": self.floor,
                "at_goodput": at.to_dict() if at else None, "probes_count": len(self.probes),
                "non_monotone": self.non_monotone, "probes": [p.to_dict() for p in self.probes]}


def find_goodput(
    run: Callable[[float], ProbeStats],
    *,
    slo: Slo,
    start: float,
    tolerance: float = DEFAULT_TOLERANCE,
    max_doublings: int = MAX_DOUBLINGS,
    max_halvings: int = MAX_HALVINGS,
) -> GoodputSearch:
    """The highest load meeting ``slo`` (module docstring); ``run(load)`` is one probe."""
    if not start > 0:
        raise ValueError("start must be positive")
    if not 0 < tolerance < 1:
        raise ValueError("tolerance must be in (0, 1)")
    out = GoodputSearch(goodput=None)
    seen: dict[float, Probe] = {}

    def probe(load: float) -> Probe:
        if load not in seen:
            stats = run(load)
            seen[load] = Probe(load=load, stats=stats, failed=tuple(slo_verdict(stats, slo)))
            out.probes.append(seen[load])
            logger.info("probe %g: %s", load, "met" if seen[load].met else ",".join(seen[load].failed))
        return seen[load]

    lo: float | None = None
    hi: float | None = None
    if probe(start).met:
        lo = start
        for _ in range(max_doublings):
            if probe(lo * 2).met:
                lo *= 2
            else:
                hi = lo * 2
                break
    else:
        hi = start
        for _ in range(max_halvings):
            if probe(hi / 2).met:
                lo = hi / 2
                break
            hi /= 2
    out.floor = min(seen)
    if lo is None:
        return out
    out.goodput = lo
    if hi is None:
        out.bracketed = False
        return out
    probe(hi * 2)  # the check probe: met would contradict monotonicity (reported, not used)
    while hi - lo > tolerance * lo:
        mid = (lo + hi) / 2
        if probe(mid).met:
            lo = mid
        else:
            hi = mid
    out.goodput = lo
    return out


# ---- report -----------------------------------------------------------------

#: What the load means, by input kind (JSON ``search.load`` and the table's unit).
LOAD_RATE = "rate_per_s"
LOAD_SPEEDUP = "speedup"


def load_unit(load: str) -> str:
    """The unit of a load: a workload's rate counts roots (a conversation, a fan-out), as
    ``--rate`` does; a trace's speed-up divides its timestamps."""
    return "roots/s" if load == LOAD_RATE else "× speed-up"


def goodput_report(searches: dict[str, GoodputSearch], *, load: str, slo: Slo, start: float, tolerance: float,
                   seed: int) -> dict[str, Any]:
    """The JSON report: the search's settings, then per policy its result, every probe and
    its goodput over the first policy's (``vs_first``); ``kvr_vs_best_other`` when kvr ran
    with other policies (None where a goodput is missing)."""
    names = list(searches)
    first = searches[names[0]].goodput if names else None
    policies = {}
    for name, s in searches.items():
        policies[name] = {**s.to_dict(), "vs_first": _ratio(s.goodput, first)}
    report: dict[str, Any] = {
        "search": {"load": load, "slo": slo.to_dict(), "start": start, "tolerance": tolerance, "seed": seed},
        "policies": policies,
    }
    others = [n for n in names if n != "kvr"]
    if "kvr" in searches and others:
        best = max(others, key=lambda n: -math.inf if searches[n].goodput is None else searches[n].goodput)
        report["kvr_vs_best_other"] = {"policy": best, "ratio": _ratio(searches["kvr"].goodput, searches[best].goodput)}
    return report


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _num(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return fmt.format(v)


def goodput_table(report: dict[str, Any]) -> str:
    """The report as a GitHub markdown table, one row per policy ("none": no load met)."""
    unit = load_unit(report["search"]["load"])
    names = list(report["policies"])
    header = ["policy", f"goodput ({unit})", "served req/s", "TTFT p99 s", "TPOT p99 ms", "hit", "probes",
              f"vs {names[0]}" if names else "vs first"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for name, row in report["policies"].items():
        at = row["at_goodput"] or {}
        if row["goodput"] is None:
            rate = "none"
        else:
            rate = ("≥ " if not row["bracketed"] else "") + f"{row['goodput']:.3g}"
        cells = [name, rate, _num(at.get("throughput_rps"), "{:.2f}"), _num(at.get("ttft_p99_s"), "{:.3f}"),
                 _num(at["tpot_p99_s"] * 1000 if at.get("tpot_p99_s") is not None else None, "{:.1f}"),
                 _num(at.get("token_hit_rate"), "{:.3f}"), str(row["probes_count"]), _num(row["vs_first"], "{:.2f}×")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Notes under the table: kvr against the best other policy, non-monotone probes,
    unbracketed searches, policies without a goodput (one line each)."""
    out = []
    unit = load_unit(report["search"]["load"])
    kv = report.get("kvr_vs_best_other")
    if kv is not None and kv["ratio"] is not None:
        out.append(f"kvr / best other policy ({kv['policy']}): {kv['ratio']:.2f}×")
    for name, row in report["policies"].items():
        if row["non_monotone"]:
            loads = ", ".join(f"{x:.3g}" for x in row["non_monotone"])
            out.append(f"{name}: not monotone: the SLO was met at {loads} {unit}, above the goodput "
                       f"{row['goodput']:.3g}")
        if not row["bracketed"]:
            out.append(f"{name}: the SLO was still met at {row['goodput']:.3g} {unit}, the search's ceiling")
    none = [n for n, row in report["policies"].items() if row["goodput"] is None]
    if none:
        floor = min(report["policies"][n]["floor"] for n in none)
        out.append(f"no load meets the SLO for {', '.join(none)} (lowest probed: {floor:.3g} {unit})")
    return out
