"""PNG plots of monitor dumps (matplotlib, Agg backend, imported lazily).

One run (:func:`plot_run`): latency distribution, hit rate over time, recovery
timeline, block utilisation over time, latency by cache status, worker-load
heatmap. Several runs (:func:`plot_comparison`): the same quantities overlaid,
one colour per run. Times are seconds since the run's first record.

Missing data never fails a plot: a panel without data says so.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from core.metrics import CACHE_STATUSES, MetricsFold
from monitor.state import split_target

logger = logging.getLogger(__name__)

STATUS_COLOURS = {"hit": "#2a9d8f", "partial": "#e9c46a", "miss": "#e76f51"}
INCIDENT_COLOURS = {
    "gap": "#e76f51", "replay": "#f4a261", "reset": "#9b2226", "confidence": "#457b9d",
    "worker_seen": "#2a9d8f", "worker_gone": "#6c757d", "error": "#d00000", "stream_restart": "#7b2cbf",
}
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
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _no_data(ax, what: str) -> None:
    ax.text(0.5, 0.5, f"no {what} in this dump", ha="center", va="center", transform=ax.transAxes, color="grey")


def _t0(dump: dict[str, Any]) -> float:
    fold = dump["fold"]
    candidates = [dump.get("started_s"), fold.get("first_arrival_s")]
    if dump.get("series"):
        candidates.append(dump["series"][0]["t_s"])
    vals = [v for v in candidates if v is not None]
    return min(vals) if vals else 0.0


def _nan(v: Any) -> float:
    return math.nan if v is None else float(v)


def _hit_rate_series(dump: dict[str, Any]) -> tuple[list[float], list[float], list[float]]:
    """(t, actual, predicted) — the live series if any, else the fold's time buckets."""
    t0 = _t0(dump)
    pts = [p for p in dump.get("series", []) if p.get("window_requests")]
    if pts:
        return ([p["t_s"] - t0 for p in pts], [_nan(p["window_hit_rate"]) for p in pts],
                [_nan(p.get("window_predicted_hit_rate")) for p in pts])
    tl = dump.get("timeline") or {}
    t = [v - t0 for v in tl.get("t_s", [])]
    return t, [_nan(v) for v in tl.get("token_hit_rate", [])], [math.nan] * len(t)


def _cdf(ax, values: Sequence[float], label: str, colour: str) -> None:
    xs = sorted(v * 1000 for v in values)
    ys = [(i + 1) / len(xs) for i in range(len(xs))]
    ax.step(xs, ys, where="post", label=f"{label} (n={len(xs)})", color=colour)


# ----------------------------------------------------------------------------- one run


def plot_latency_distribution(dump: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fold = MetricsFold.from_dict(dump["fold"])
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    if fold.ttft_s:
        ax1.hist([v * 1000 for v in fold.ttft_s], bins=40, color="#264653", alpha=0.85)
        ax1.set_xlabel("TTFT (ms)")
        ax1.set_ylabel("requests")
        _cdf(ax2, fold.ttft_s, "TTFT", "#264653")
        _cdf(ax2, fold.e2e_s, "end-to-end", "#e76f51")
        ax2.set_xlabel("latency (ms)")
        ax2.set_ylabel("fraction of requests")
        ax2.legend(loc="lower right")
    else:
        _no_data(ax1, "requests")
        _no_data(ax2, "requests")
    ax1.set_title("TTFT distribution")
    ax2.set_title("Latency CDF")
    fig.suptitle(f"{dump['label']}: latency distribution")
    return _save(fig, path)


def plot_hit_rate_over_time(dump: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4))
    t, actual, predicted = _hit_rate_series(dump)
    if t:
        ax.plot(t, [100 * v for v in actual], marker=".", color="#2a9d8f", label="token hit rate (engine)")
        if any(not math.isnan(v) for v in predicted):
            ax.plot(t, [100 * v for v in predicted], ls="--", color="#264653", label="predicted (router)")
        ax.set_ylim(-2, 102)
        ax.legend(loc="lower right")
    else:
        _no_data(ax, "requests")
    ax.set_xlabel("time (s)")
    ax.set_ylabel("hit rate (%)")
    ax.set_title(f"{dump['label']}: cache hit rate over time")
    return _save(fig, path)


def _row_name(name: str) -> str:
    """Incident row of a worker or target: rank-0 targets share their worker's row."""
    worker, rank = split_target(name)
    return worker if rank == 0 else name


def plot_recovery_timeline(dump: dict[str, Any], path: Path) -> Path:
    """Hit rate and errors, the router's index per worker, and event-plane incidents, over time."""
    plt = _plt()
    fig, (ax1, ax_idx, ax2) = plt.subplots(3, 1, figsize=(10, 8), sharex=True,
                                           gridspec_kw={"height_ratios": [2, 1.4, 1.3]})
    t0 = _t0(dump)
    t, actual, predicted = _hit_rate_series(dump)
    if t:
        ax1.plot(t, [100 * v for v in actual], color="#2a9d8f", label="hit rate (engine)")
        if any(not math.isnan(v) for v in predicted):
            ax1.plot(t, [100 * v for v in predicted], ls="--", color="#264653", label="predicted (router)")
    series = dump.get("series", [])
    if any(p.get("window_errors") for p in series):
        axe = ax1.twinx()
        axe.bar([p["t_s"] - t0 for p in series], [p.get("window_errors", 0) for p in series],
                width=0.8 * _step(series), color="#d00000", alpha=0.35, label="errors")
        axe.set_ylabel("errors per interval")
    ax1.set_ylabel("hit rate (%)")
    if t:
        ax1.legend(loc="lower left")
    else:
        _no_data(ax1, "requests")
    ti, idx = _per_worker_over_time(dump, "indexed_blocks")
    for w, vals in idx.items():
        ax_idx.plot(ti, vals, label=_row_name(w))
    if idx:
        ax_idx.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
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
        ax2.scatter(inc["t_s"] - t0, rows[_row_name(inc["worker_id"])], color=INCIDENT_COLOURS.get(kind, "black"),
                    marker="|", s=250, linewidths=2, label=None if kind in seen_kinds else kind)
        seen_kinds.add(kind)
    if incidents:
        ax2.set_yticks(range(len(workers)), [w or "(router)" for w in workers])
        ax2.set_ylim(-0.6, len(workers) - 0.4)
        ax2.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    else:
        _no_data(ax2, "incidents")
    ax2.set_xlabel("time (s)")
    ax2.set_title("incidents: errors, gaps, replays, resets, restarts, confidence changes", fontsize=9)
    fig.suptitle(f"{dump['label']}: recovery timeline")
    return _save(fig, path)


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
    tl = dump.get("timeline") or {}
    tl_key = {"kv_usage": "kv_usage", "running": "requests"}.get(key)
    if tl_key and tl.get(tl_key):
        return [v - t0 for v in tl["t_s"]], {w: [_nan(v) for v in vals] for w, vals in tl[tl_key].items()}
    return [], {}


def plot_block_utilisation(dump: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    t, kv = _per_worker_over_time(dump, "kv_usage")
    for w, vals in kv.items():
        ax1.plot(t, [100 * v for v in vals], label=w)
    if kv:
        ax1.set_ylim(-2, 102)
        ax1.legend(fontsize=8)
    else:
        _no_data(ax1, "load samples")
    ax1.set_xlabel("time (s)")
    ax1.set_ylabel("KV blocks in use (%)")
    ax1.set_title("block utilisation per worker")
    t, idx = _per_worker_over_time(dump, "indexed_blocks")
    for w, vals in idx.items():
        ax2.plot(t, vals, label=w)
    if idx:
        ax2.legend(fontsize=8)
    else:
        _no_data(ax2, "index sizes")
    ax2.set_xlabel("time (s)")
    ax2.set_ylabel("blocks")
    ax2.set_title("blocks in the router's index per worker")
    fig.suptitle(f"{dump['label']}: block utilisation over time")
    return _save(fig, path)


def plot_latency_by_cache_status(dump: dict[str, Any], path: Path) -> Path:
    plt = _plt()
    fold = MetricsFold.from_dict(dump["fold"])
    fig, ax = plt.subplots(figsize=(7, 4))
    data = [(st, [v * 1000 for v in fold.ttft_by_status[st]]) for st in CACHE_STATUSES if fold.ttft_by_status[st]]
    if data:
        box = ax.boxplot([d for _, d in data], patch_artist=True, showfliers=False)
        ax.set_xticks(range(1, len(data) + 1), [f"{st}\n(n={len(d)})" for st, d in data])
        for patch, (st, _) in zip(box["boxes"], data):
            patch.set_facecolor(STATUS_COLOURS[st])
        for k, (_, d) in enumerate(data, start=1):
            ax.scatter([k], [sum(d) / len(d)], color="black", marker="D", s=18, zorder=3)
    else:
        _no_data(ax, "requests")
    ax.set_ylabel("TTFT (ms)")
    ax.set_title(f"{dump['label']}: TTFT by cache status (box: quartiles, ◆ mean)")
    return _save(fig, path)


def plot_worker_load_heatmap(dump: dict[str, Any], path: Path) -> Path:
    """Requests started per worker per time bucket (the fold's timeline)."""
    plt = _plt()
    tl = dump.get("timeline") or {}
    reqs = tl.get("requests") or {}
    fig, ax = plt.subplots(figsize=(10, 1.2 + 0.45 * max(1, len(reqs))))
    if reqs and tl.get("t_s"):
        workers = sorted(reqs)
        grid = [reqs[w] for w in workers]
        t0 = _t0(dump)
        ts = tl["t_s"]
        width = dump["fold"]["timeline_bucket_s"]
        ax.grid(False)
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest", vmin=0,
                       extent=(ts[0] - t0, ts[-1] - t0 + width, len(workers) - 0.5, -0.5))
        ax.set_yticks(range(len(workers)), workers)
        fig.colorbar(im, ax=ax, label=f"requests per {width:g} s")
        ax.set_xlabel("time (s)")
    else:
        _no_data(ax, "requests")
    ax.set_title(f"{dump['label']}: worker load (requests per bucket)")
    return _save(fig, path)


RUN_PLOTS = {
    "latency_distribution": plot_latency_distribution,
    "hit_rate_over_time": plot_hit_rate_over_time,
    "recovery_timeline": plot_recovery_timeline,
    "block_utilisation": plot_block_utilisation,
    "latency_by_cache_status": plot_latency_by_cache_status,
    "worker_load_heatmap": plot_worker_load_heatmap,
}


def plot_run(dump: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Every single-run plot of ``dump`` into ``out_dir`` (``<name>.png``)."""
    out_dir = Path(out_dir)
    return {name: fn(dump, out_dir / f"{name}.png") for name, fn in RUN_PLOTS.items()}


# ----------------------------------------------------------------------------- several runs


def plot_comparison(dumps: Sequence[dict[str, Any]], out_dir: str | Path) -> dict[str, Path]:
    """Side-by-side plots of several runs: TTFT CDFs, hit rate over time, mean TTFT hits vs misses."""
    from monitor.results import run_results

    plt = _plt()
    out_dir = Path(out_dir)
    out: dict[str, Path] = {}
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, d in enumerate(dumps):
        ttft = d["fold"]["ttft_s"]
        if ttft:
            _cdf(ax, ttft, d["label"], RUN_COLOURS[k % len(RUN_COLOURS)])
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator

    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
    ax.set_xlabel("TTFT (ms, log scale)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF by run")
    ax.legend(loc="lower right")
    out["compare_ttft_cdf"] = _save(fig, out_dir / "compare_ttft_cdf.png")

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for k, d in enumerate(dumps):
        t, actual, _ = _hit_rate_series(d)
        ax.plot(t, [100 * v for v in actual], marker=".", color=RUN_COLOURS[k % len(RUN_COLOURS)], label=d["label"])
    ax.set_ylim(-2, 102)
    ax.set_xlabel("time since start (s)")
    ax.set_ylabel("token hit rate (%)")
    ax.set_title("Cache hit rate over time by run")
    ax.legend(loc="lower right")
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
    ax1.legend(loc="upper center", ncols=2, fontsize=8)
    means = [1000 * _zero(r.ttft_mean_s) for r in results]
    bars = ax2.bar(list(xs), means, color=[RUN_COLOURS[k % len(RUN_COLOURS)] for k in xs])
    for bar, r in zip(bars, results):
        ax2.annotate(f"{100 * _zero(r.token_hit_rate):.0f}% hit", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                     ha="center", va="bottom", fontsize=9)
    ax2.set_xticks(list(xs), labels)
    ax2.set_ylabel("mean TTFT (ms)")
    ax2.set_title("Mean TTFT (label: token hit rate)")
    out["compare_mean_ttft"] = _save(fig, out_dir / "compare_mean_ttft.png")
    return out


def _zero(v: float) -> float:
    return 0.0 if v is None or math.isnan(v) else v
