"""Figures of a policy comparison. Functions return matplotlib figures; the CLI saves them.

* TTFT CDF per policy;
* token hit rate and load imbalance (CV of per-worker requests) over time per policy,
  and KV usage per worker over time for one policy;
* a rate sweep: TTFT p99 (and p50) against request rate per policy;
* a goodput search: TTFT p99 of every probe against its load per policy, the SLO as a
  horizontal line and each policy's goodput marked.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib import ticker  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from core.metrics import MetricsFold  # noqa: E402

logger = logging.getLogger(__name__)


def ttft_cdf(folds: dict[str, MetricsFold], *, title: str = "") -> Figure:
    """Empirical CDF of TTFT, one line per policy, log-scaled time."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, fold in folds.items():
        xs = sorted(fold.ttft_s)
        if not xs:
            continue
        n = len(xs)
        ax.step(xs, [(i + 1) / n for i in range(n)], where="post", label=name)
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: no corner of a CDF is always empty
    ax.set_title(title or "TTFT CDF per policy")
    fig.tight_layout()
    return fig


def _cv(values: list[float]) -> float:
    m = sum(values) / len(values) if values else 0.0
    if not m:
        return math.nan
    return math.sqrt(sum((v - m) ** 2 for v in values) / len(values)) / m


def over_time(folds: dict[str, MetricsFold], *, kv_policy: str | None = None, title: str = "") -> Figure:
    """Hit rate and load CV over time per policy; KV usage per worker of ``kv_policy``."""
    from core.metrics import dense_timeline

    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for name, fold in folds.items():
        # Idle buckets are NaN (no requests: no hit rate, no load CV), so lines break there.
        ts = dense_timeline(fold.timeline_series(), fold.timeline_bucket_s)
        axes[0].plot(ts["t_s"], ts["token_hit_rate"], label=name)
        per_bucket = list(zip(*ts["requests"].values(), strict=True)) if ts["requests"] else []
        axes[1].plot(ts["t_s"][: len(per_bucket)], [_cv(list(b)) for b in per_bucket], label=name)
    axes[0].set_ylabel("token hit rate")
    axes[0].legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over the data
    axes[1].set_ylabel("load CV (requests/worker)")
    kv_name = kv_policy if kv_policy in folds else next(iter(folds), None)
    if kv_name is not None:
        ts = dense_timeline(folds[kv_name].timeline_series(), folds[kv_name].timeline_bucket_s)
        for worker, series in ts["kv_usage"].items():
            axes[2].plot(ts["t_s"], series, label=worker, linewidth=0.8)
        axes[2].set_ylabel(f"KV in use ({kv_name})")
        axes[2].legend(fontsize="x-small", ncol=1 + len(ts["kv_usage"]) // 12, loc="upper left",
                       bbox_to_anchor=(1.0, 1.0))
    axes[2].set_xlabel("time (s)")
    for ax in axes:
        ax.grid(True, alpha=0.3)
    fig.suptitle(title or "hit rate and load over time")
    fig.tight_layout()
    return fig


def rate_sweep(sweep: list[dict[str, Any]], *, title: str = "") -> Figure:
    """TTFT p99 (solid) and p50 (dashed) against request rate, one colour per policy."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    policies = list(sweep[0]["policies"]) if sweep else []
    for i, name in enumerate(policies):
        rates = [pt["rate_per_s"] for pt in sweep]
        p99 = [pt["policies"][name]["ttft_p99_s"] for pt in sweep]
        p50 = [pt["policies"][name]["ttft_p50_s"] for pt in sweep]
        colour = f"C{i}"
        ax.plot(rates, p99, "o-", color=colour, label=f"{name} p99")
        ax.plot(rates, p50, "x--", color=colour, alpha=0.6, label=f"{name} p50")
    ax.set_yscale("log")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("TTFT (s)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: never over the data
    ax.set_title(title or "TTFT vs request rate")
    fig.tight_layout()
    return fig


def goodput(report: dict[str, Any], *, title: str = "") -> Figure:
    """TTFT p99 of each probe against its load (``sim.goodput`` report), one colour per policy:
    filled dots met the SLO, crosses did not; a star marks the goodput (the highest met
    load); the dashed line is the TTFT SLO."""
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    search = report["search"]
    for i, (name, row) in enumerate(report["policies"].items()):
        colour = f"C{i}"
        probes = sorted((p for p in row["probes"] if p["ttft_p99_s"] is not None), key=lambda p: p["load"])
        if not probes:
            continue
        ax.plot([p["load"] for p in probes], [p["ttft_p99_s"] for p in probes], "-", color=colour, alpha=0.5,
                linewidth=1)
        met = [p for p in probes if p["met"]]
        failed = [p for p in probes if not p["met"]]
        ax.plot([p["load"] for p in met], [p["ttft_p99_s"] for p in met], "o", color=colour, markersize=4)
        ax.plot([p["load"] for p in failed], [p["ttft_p99_s"] for p in failed], "x", color=colour, markersize=5)
        at = row["at_goodput"]
        label = f"{name}: {row['goodput']:.3g}" if at else f"{name}: none"
        if at:
            ax.plot([row["goodput"]], [at["ttft_p99_s"]], "*", color=colour, markersize=14, markeredgecolor="black",
                    markeredgewidth=0.6)
        ax.plot([], [], "*-", color=colour, label=label)  # legend entry: the policy and its goodput
    ax.axhline(search["slo"]["ttft_p99_s"], color="black", linestyle="--", linewidth=1,
               label=f"SLO TTFT p99 {search['slo']['ttft_p99_s']:g} s")
    ax.plot([], [], "o", color="grey", markersize=4, label="probe met the SLO")
    ax.plot([], [], "x", color="grey", markersize=5, label="probe failed it")
    ax.set_xscale("log")
    ax.set_yscale("log")
    # Loads double while bracketing: plain numbers read better than powers of ten.
    ax.xaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    from sim.goodput import LOAD_RATE, load_unit

    what = "request rate" if search["load"] == LOAD_RATE else "trace speed-up"
    ax.set_xlabel(f"{what} ({load_unit(search['load'])})")
    ax.set_ylabel("TTFT p99 (s)")
    ax.grid(True, which="both", alpha=0.3)
    # outside: never over the data
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0), title="goodput")
    ax.set_title(title or "goodput: TTFT p99 vs load")
    fig.tight_layout()
    return fig
