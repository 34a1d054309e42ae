"""PNG plots of monitor dumps (matplotlib, Agg backend, imported lazily).

One run (:func:`plot_run`): latency distribution, hit rate over time, recovery
timeline, block utilisation over time, latency by cache status, worker-load
heatmap. Several runs (:func:`plot_comparison`): the same quantities overlaid,
one colour per run. Times are seconds since the run's first record.

Missing data never fails a plot: a panel without data says so.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.metrics import CACHE_STATUSES, MetricsFold, dense_timeline
from core.quantiles import Samples, samples_from_json
from monitor.state import split_target

logger = logging.getLogger(__name__)

STATUS_COLOURS = {"hit": "#2a9d8f", "partial": "#e9c46a", "miss": "#e76f51"}
INCIDENT_COLOURS = {
    "gap": "#e76f51", "replay": "#f4a261", "reset": "#9b2226", "confidence": "#457b9d",
    "worker_seen": "#2a9d8f", "worker_gone": "#6c757d", "error": "#d00000", "stream_restart": "#7b2cbf",
    "trust": "#ff006e", "mirror": "#8d99ae",
}
_LANE_STEP = 0.8 / len(INCIDENT_COLOURS)


def incident_lane(kind: str) -> float:
    """A kind's offset inside its worker's row of the incidents panel: incidents of different kinds
    at the same time (a worker seen again as its stream replays) sit one above the other instead of
    one hiding the other. Unknown kinds share the middle."""
    kinds = list(INCIDENT_COLOURS)
    i = kinds.index(kind) if kind in INCIDENT_COLOURS else (len(kinds) - 1) / 2
    return (i - (len(kinds) - 1) / 2) * _LANE_STEP


RUN_COLOURS = ("#e76f51", "#2a9d8f", "#264653", "#e9c46a", "#8338ec", "#3a86ff")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False,
                         "axes.spines.right": False, "font.size": 10})
    return plt


def _save(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)  # laid out by its builder
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this dump", ha="center", va="center", transform=ax.transAxes, color="grey")


def _t0(dump: dict[str, Any]) -> float:
    fold = dump.get("fold") or {}  # a light dump has none
    candidates = [dump.get("started_s"), fold.get("first_arrival_s")]
    if dump.get("series"):
        candidates.append(dump["series"][0]["t_s"])
    vals = [v for v in candidates if v is not None]
    return min(vals) if vals else 0.0


def _since_start(bucket_starts_s: list[float], t0: float) -> list[float]:
    """The fold's bucket starts as seconds since the run's start.

    Buckets are aligned to multiples of their width, so the first one usually began
    before the run did: it is clipped to the run's start (as the heatmap's first bin
    is), else a short run's only point sits seconds before 0.
    """
    return [max(t, t0) - t0 for t in bucket_starts_s]


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _hit_rate_series(dump: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """(t, actual, predicted): the live series if any, else the fold's time buckets.

    A point without requests (an idle interval) is NaN in both lists, so a line
    drawn through them breaks there instead of bridging the idle period.
    """
    t0 = _t0(dump)
    series = dump.get("series", [])
    if any(p.get("window_requests") for p in series):
        idle = [not p.get("window_requests") for p in series]
        return ([p["t_s"] - t0 for p in series],
                [math.nan if i else _nan(p["window_hit_rate"]) for p, i in zip(series, idle, strict=True)],
                [math.nan if i else _nan(p.get("window_predicted_hit_rate"))
                 for p, i in zip(series, idle, strict=True)])
    tl = dense_timeline(dump.get("timeline") or {}, _bucket_s(dump))
    return _since_start(tl["t_s"], t0), tl["token_hit_rate"], [math.nan] * len(tl["t_s"])


def _bucket_s(dump: dict[str, Any]) -> float:
    """The width of the fold's time buckets (plots read full dumps: ``load_dump`` requires the fold)."""
    return float(dump["fold"]["timeline_bucket_s"])


def _legend_above(ax, handles=None, labels=None, **kw) -> None:
    """A legend in a row above the axes: it never covers the data. Set the axes' title first: it moves up."""
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles, labels, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncols=max(1, len(handles)),
              frameon=False, fontsize=8, borderaxespad=0.2, **kw)
    if ax.get_title():
        ax.set_title(ax.get_title(), pad=22)


def _legend_right(ax, **kw) -> None:
    """A legend to the right of the axes: it never covers the data (none for a panel with nothing labelled)."""
    if kw.get("handles") is None and not ax.get_legend_handles_labels()[0]:
        return
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, **kw)


def _cdf(ax, samples: Samples, label: str, colour: str) -> None:
    """Empirical CDF in ms (a sketch's: one step per bin, within its relative accuracy)."""
    values, counts = samples.weighted()
    n = len(samples)
    xs = [v * 1000 for v in values]
    ys = [c / n for c in itertools.accumulate(counts)]
    ax.step(xs, ys, where="post", label=f"{label} (n={n})", color=colour)


# ----------------------------------------------------------------------------- one run


def latency_distribution_figure(dump: dict[str, Any]):
    plt = _plt()
    fold = MetricsFold.from_dict(dump["fold"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if fold.ttft_s:
        values, counts = fold.ttft_s.weighted()
        ax1.hist([v * 1000 for v in values], weights=counts, bins=40, color="#264653", alpha=0.85)
        ax1.set_xlabel("TTFT (ms)")
        ax1.set_ylabel("requests")
        _cdf(ax2, fold.ttft_s, "TTFT", "#264653")
        _cdf(ax2, fold.e2e_s, "end-to-end", "#e76f51")
        ax2.set_xlabel("latency (ms)")
        ax2.set_ylabel("fraction of requests")
    else:
        _no_data(ax1, "requests")
        _no_data(ax2, "requests")
    ax1.set_title("TTFT distribution", pad=22)  # level with the CDF's, above its legend
    ax2.set_title("Latency CDF")
    if fold.ttft_s:
        _legend_above(ax2)
    fig.suptitle(f"{dump['label']}: latency distribution")
    fig.tight_layout()
    return fig


def hit_rate_over_time_figure(dump: dict[str, Any]):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    t, actual, predicted = _hit_rate_series(dump)
    if any(not math.isnan(v) for v in actual):
        ax.plot(t, [100 * v for v in actual], marker=".", color="#2a9d8f", label="token hit rate (engine)")
        if any(not math.isnan(v) for v in predicted):
            ax.plot(t, [100 * v for v in predicted], ls="--", color="#264653", label="predicted (router)")
        ax.set_ylim(-2, 102)
    else:
        _no_data(ax, "requests")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(f"{dump['label']}: cache hit rate over time (gaps: no requests)")
    if ax.lines:
        _legend_above(ax)
    fig.tight_layout()
    return fig


def _row_name(name: str) -> str:
    """Incident row of a worker or target: rank-0 targets share their worker's row."""
    worker, rank = split_target(name)
    return worker if rank == 0 else name


def recovery_timeline_figure(dump: dict[str, Any]):
    """Hit rate and errors, the router's index per worker, and event-plane incidents, over time."""
    plt = _plt()
    fig, (ax1, ax_idx, ax2) = plt.subplots(3, 1, figsize=(10, 8), sharex=True,
                                           gridspec_kw={"height_ratios": [2, 1.4, 1.3]})
    t0 = _t0(dump)
    t, actual, predicted = _hit_rate_series(dump)
    has_hits = any(not math.isnan(v) for v in actual)
    if has_hits:
        ax1.plot(t, [100 * v for v in actual], marker=".", markersize=4, color="#2a9d8f", label="hit rate (engine)")
        if any(not math.isnan(v) for v in predicted):
            ax1.plot(t, [100 * v for v in predicted], ls="--", color="#264653", label="predicted (router)")
        ax1.set_ylim(-2, 102)
    handles, labels = ax1.get_legend_handles_labels()
    series = dump.get("series", [])
    if any(p.get("window_errors") for p in series):
        axe = ax1.twinx()
        axe.bar([p["t_s"] - t0 for p in series], [p.get("window_errors", 0) for p in series],
                width=0.8 * _step(series), color="#d00000", alpha=0.35, label="errors")
        axe.set_ylabel("errors per interval")
        more_handles, more_labels = axe.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax1.set_ylabel("hit rate (%)")
    if handles:
        _legend_above(ax1, handles, labels)
    if not has_hits:
        _no_data(ax1, "requests")
    ti, idx = _per_worker_over_time(dump, "indexed_blocks")
    for w, vals in idx.items():
        ax_idx.plot(ti, vals, label=_row_name(w))
    if idx:
        _legend_right(ax_idx)
    else:
        _no_data(ax_idx, "index sizes")
    ax_idx.set_ylabel("indexed blocks")
    ax_idx.set_title("the router's index per worker (drops on a restart or reset, then rebuilds)", fontsize=9)
    incidents = dump.get("incidents", [])
    workers = sorted({_row_name(i["worker_id"]) for i in incidents} | {_row_name(w) for w in dump.get("workers", {})})
    rows = {w: k for k, w in enumerate(workers)}
    seen_kinds = set()
    for inc in incidents:
        kind = inc["kind"]
        ax2.scatter(inc["t_s"] - t0, rows[_row_name(inc["worker_id"])] + incident_lane(kind),
                    color=INCIDENT_COLOURS.get(kind, "black"), marker="|", s=60, linewidths=2,
                    label=None if kind in seen_kinds else kind)
        seen_kinds.add(kind)
    if incidents:
        ax2.set_yticks(range(len(workers)), [w or "(router)" for w in workers])
        ax2.set_ylim(-0.6, len(workers) - 0.4)
        _legend_right(ax2)
    else:
        _no_data(ax2, "incidents")
    ax2.set_xlabel("time (s)")
    ax2.set_title("incidents: errors, gaps, replays, resets, restarts, confidence and trust changes", fontsize=9)
    fig.suptitle(f"{dump['label']}: recovery timeline")
    fig.tight_layout()
    return fig


def _step(series: list[dict[str, Any]]) -> float:
    if len(series) < 2:
        return 1.0
    return max(1e-3, (series[-1]["t_s"] - series[0]["t_s"]) / (len(series) - 1))


def _per_worker_over_time(dump: dict[str, Any], key: str) -> tuple[list[float], dict[str, list[float]]]:
    t0 = _t0(dump)
    series = dump.get("series", [])
    if series:
        workers = sorted({w for p in series for w in p.get(key, {})})
        return [p["t_s"] - t0 for p in series], {w: [_nan(p.get(key, {}).get(w)) for p in series] for w in workers}
    tl = dense_timeline(dump.get("timeline") or {}, _bucket_s(dump))
    tl_key = {"kv_usage": "kv_usage", "running": "requests"}.get(key)
    if tl_key and tl.get(tl_key):
        return _since_start(tl["t_s"], t0), tl[tl_key]
    return [], {}


def block_utilisation_series(dump: dict[str, Any]) -> dict[str, Any]:
    """What the two block-utilisation panels draw, per worker, in one unit where possible.

    * ``in_use_pct``: blocks referenced by running or waiting requests, % of the
      worker's KV cache (the engine's ``kv_cache_usage``);
    * ``cached``: blocks holding a cached prefix (the router's index of the
      worker): in use *or* idle but kept for reuse. In % of the same capacity
      (``cached_unit == "%"``) when every worker's capacity is known, else in
      blocks (``cached_unit == "blocks"``).

    With prefix caching a finished request's blocks stay cached but are no longer
    in use: a cache that is full (right) while little is in use (left) is normal.
    """
    t, kv = _per_worker_over_time(dump, "kv_usage")
    t_idx, idx = _per_worker_over_time(dump, "indexed_blocks")
    live = dump.get("workers", {})
    capacity = {w: int(live.get(w, {}).get("num_gpu_blocks") or 0) for w in idx}
    in_pct = bool(idx) and all(capacity.values())
    cached = {w: [100 * v / capacity[w] for v in vals] for w, vals in idx.items()} if in_pct else idx
    return {"t_s": t, "in_use_pct": {w: [100 * v for v in vals] for w, vals in kv.items()},
            "cached_t_s": t_idx, "cached": cached, "cached_unit": "%" if in_pct else "blocks",
            "capacity_blocks": {w: c for w, c in capacity.items() if c}}


def block_utilisation_figure(dump: dict[str, Any]):
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.4), sharex=True)
    u = block_utilisation_series(dump)
    workers = sorted(set(u["in_use_pct"]) | set(u["cached"]))
    colour = {w: f"C{k % 10}" for k, w in enumerate(workers)}  # one colour per worker in both panels
    for w, vals in u["in_use_pct"].items():
        ax1.plot(u["t_s"], vals, color=colour[w], label=w)
    if u["in_use_pct"]:
        ax1.set_ylim(-2, 102)
    else:
        _no_data(ax1, "load samples")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("blocks in use (% of the worker's KV cache)")
    ax1.set_title("in use by running requests", fontsize=10)
    for w, vals in u["cached"].items():
        cap = u["capacity_blocks"].get(w)
        ax2.plot(u["cached_t_s"], vals, color=colour[w], label=f"{w} ({cap} blocks)" if cap else w)
    if not u["cached"]:
        _no_data(ax2, "index sizes")
    elif u["cached_unit"] == "%":
        ax2.set_ylim(-2, max(102, 2 + max((v for vals in u["cached"].values() for v in vals if not math.isnan(v)),
                                          default=0)))
        ax2.set_ylabel("blocks cached (% of the worker's KV cache)")
    else:
        ax2.set_ylabel("blocks cached (count; capacity not reported)")
    ax2.set_xlabel("time (s)")
    ax2.set_title("cached: in use or idle, kept for reuse (router's index)", fontsize=10)
    if workers:
        _legend_right(ax2)
    fig.suptitle(f"{dump['label']}: KV blocks over time: in use vs cached")
    fig.text(0.5, 0.01, "A finished request's blocks stay cached (right) but leave 'in use' (left): "
             "a full cache with little in use is normal with prefix caching.",
             ha="center", va="bottom", fontsize=8, color="#555555")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return fig


def latency_by_cache_status_figure(dump: dict[str, Any]):
    plt = _plt()
    fold = MetricsFold.from_dict(dump["fold"])
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [(st, fold.ttft_by_status[st]) for st in CACHE_STATUSES if len(fold.ttft_by_status[st])]
    if data:
        box = ax.bxp([_box_stats(d) for _, d in data], patch_artist=True, showfliers=False)
        ax.set_xticks(range(1, len(data) + 1), [f"{st}\n(n={len(d)})" for st, d in data])
        for patch, (st, _) in zip(box["boxes"], data, strict=True):
            patch.set_facecolor(STATUS_COLOURS[st])
        for k, (_, d) in enumerate(data, start=1):
            ax.scatter([k], [d.mean() * 1000], color="black", marker="D", s=18, zorder=3)
    else:
        _no_data(ax, "requests")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"{dump['label']}: TTFT by cache status (box: quartiles, ◆ mean)")
    fig.tight_layout()
    return fig


def _box_stats(samples: Samples) -> dict[str, float]:
    """A box in ms: quartiles, whiskers at 1.5 IQR clipped to the data (matplotlib's rule, from quantiles)."""
    q1, med, q3 = (samples.quantile(q) * 1000 for q in (25, 50, 75))
    iqr = q3 - q1
    return {"med": med, "q1": q1, "q3": q3, "whislo": max(samples.min() * 1000, q1 - 1.5 * iqr),
            "whishi": min(samples.max() * 1000, q3 + 1.5 * iqr), "fliers": []}


def worker_load_grid(dump: dict[str, Any]) -> tuple[list[float], list[str], list[list[float]]]:
    """(bin edges in s since the run's start, workers, requests started per second per worker and bin).

    Bins are the fold's time buckets with every idle bucket in between, clipped to
    the run: the first starts at the run's first record (0), the last ends at its
    last. A clipped bin's rate is over its clipped width, so it compares with the rest.
    """
    width = _bucket_s(dump)
    tl = dense_timeline(dump.get("timeline") or {}, width)
    if not tl["t_s"] or not tl["requests"]:
        return [], [], []
    t0 = _t0(dump)
    end = max(dump.get("last_record_s") or 0.0, t0)
    edges = _since_start(tl["t_s"], t0)
    last = tl["t_s"][-1] + width
    edges.append((min(last, end) if end > tl["t_s"][-1] else last) - t0)
    workers = sorted(tl["requests"])
    # Bin k spans edges[k]..edges[k + 1]: one more edge than bins.
    grid = [[n / max(hi - lo, 1e-9) for n, lo, hi in zip(tl["requests"][w], edges[:-1], edges[1:], strict=True)]
            for w in workers]
    return edges, workers, grid


def worker_load_heatmap_figure(dump: dict[str, Any]):
    """Requests started per worker over time (the fold's timeline)."""
    plt = _plt()
    edges, workers, grid = worker_load_grid(dump)
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(1, len(workers))))
    if workers:
        ax.grid(False)
        mesh = ax.pcolormesh(edges, [k - 0.5 for k in range(len(workers) + 1)], grid, cmap="viridis", vmin=0)
        ax.set_ylim(len(workers) - 0.5, -0.5)
        ax.set_yticks(range(len(workers)), workers)
        ax.set_xlim(edges[0], edges[-1])
        fig.colorbar(mesh, ax=ax, label="requests / s")
        ax.set_xlabel("time (s)")
    else:
        _no_data(ax, "requests")
    ax.set_title(f"{dump['label']}: worker load (requests started per s, {_bucket_s(dump):g} s bins)")
    fig.tight_layout()
    return fig


# Each builds a matplotlib figure of one dump; ``plot_run`` saves them as ``<name>.png``.
RUN_FIGURES = {
    "latency_distribution": latency_distribution_figure,
    "hit_rate_over_time": hit_rate_over_time_figure,
    "recovery_timeline": recovery_timeline_figure,
    "block_utilisation": block_utilisation_figure,
    "latency_by_cache_status": latency_by_cache_status_figure,
    "worker_load_heatmap": worker_load_heatmap_figure,
}
RUN_PLOTS = tuple(RUN_FIGURES)


def plot_run(dump: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Every single-run plot of ``dump`` into ``out_dir`` (``<name>.png``)."""
    out_dir = Path(out_dir)
    return {name: _save(build(dump), out_dir / f"{name}.png") for name, build in RUN_FIGURES.items()}


# ----------------------------------------------------------------------------- several runs


def plot_comparison(dumps: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Side-by-side plots of several runs: TTFT CDFs, hit rate over time, mean TTFT hits vs misses."""
    from monitor.results import run_results

    plt = _plt()
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, d in enumerate(dumps):
        ttft = samples_from_json(d["fold"]["ttft_s"])
        if len(ttft):
            _cdf(ax, ttft, d["label"], RUN_COLOURS[k % len(RUN_COLOURS)])
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF by run")
    _legend_right(ax)
    fig.tight_layout()
    out["compare_ttft_cdf"] = _save(fig, out_dir / "compare_ttft_cdf.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, d in enumerate(dumps):
        t, actual, _ = _hit_rate_series(d)
        ax.plot(t, [100 * v for v in actual], marker=".", color=RUN_COLOURS[k % len(RUN_COLOURS)], label=d["label"])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("token hit rate (%)")
    ax.set_title("Cache hit rate over time by run")
    _legend_right(ax)
    fig.tight_layout()
    out["compare_hit_rate"] = _save(fig, out_dir / "compare_hit_rate.png")

    results = [run_results(d) for d in dumps]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = [r.label for r in results]
    xs = range(len(results))
    w = 0.38
    hit = [1000 * _zero(r.ttft_mean_hit_s) for r in results]
    miss = [1000 * _zero(r.ttft_mean_miss_s) for r in results]
    ax1.bar([x - w / 2 for x in xs], hit, w, color=STATUS_COLOURS["hit"], label="cache hits")
    ax1.bar([x + w / 2 for x in xs], miss, w, color=STATUS_COLOURS["miss"], label="cache misses")
    ax1.set_xticks(list(xs), labels)
    ax1.set_ylabel("mean TTFT (ms)")
    ax1.set_title("Mean TTFT: hits vs misses")
    ax1.set_ylim(0, 1.2 * max(hit + miss + [1e-9]))
    _legend_above(ax1)
    means = [1000 * _zero(r.ttft_mean_s) for r in results]
    bars = ax2.bar(list(xs), means, color=[RUN_COLOURS[k % len(RUN_COLOURS)] for k in xs])
    for bar, r in zip(bars, results, strict=True):
        ax2.annotate(f"{100 * _zero(r.token_hit_rate):.0f}% hit", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=9)
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("mean TTFT (ms)")
    ax2.set_title("Mean TTFT (label: token hit rate)", pad=22)  # level with the left title, above its legend
    fig.tight_layout()
    out["compare_mean_ttft"] = _save(fig, out_dir / "compare_mean_ttft.png")
    return out


def _zero(v: float) -> float:
    return 0.0 if v is None or math.isnan(v) else v
