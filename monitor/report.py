"""A markdown report of one or more runs: the results table side by side, then the plots."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from monitor.plots import RUN_PLOTS, plot_comparison, plot_run
from monitor.results import markdown_table, run_results, table_rows

logger = logging.getLogger(__name__)

PLOT_TITLES = {
    "latency_distribution": "Latency distribution",
    "hit_rate_over_time": "Cache hit rate over time",
    "recovery_timeline": "Recovery timeline",
    "block_utilisation": "Block utilisation over time",
    "latency_by_cache_status": "Latency by cache status",
    "worker_load_heatmap": "Worker load",
    "compare_ttft_cdf": "TTFT distribution, all runs",
    "compare_hit_rate": "Cache hit rate over time, all runs",
    "compare_mean_ttft": "Mean TTFT, hits vs misses, all runs",
}


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", label).strip("-") or "run"


def unique_labels(dumps: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Copies of ``dumps`` whose labels are unique (``name``, ``name-2``, ...)."""
    seen: dict[str, int] = {}
    out = []
    for d in dumps:
        label = d.get("label") or "run"
        seen[label] = seen.get(label, 0) + 1
        out.append({**d, "label": label if seen[label] == 1 else f"{label}-{seen[label]}"})
    return out


def write_report(dumps: Sequence[dict[str, Any]], out_dir: str | Path, *, title: str = "kvr run report",
                 notes: str = "", plots: bool = True) -> Path:
    """Write ``report.md`` and (unless ``plots`` is False) its PNGs into ``out_dir``; returns the report's path."""
    if not dumps:
        raise ValueError("a report needs at least one dump")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dumps = unique_labels(dumps)
    results = [run_results(d) for d in dumps]
    header, rows = table_rows(results)
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += ["## Results", "", markdown_table(header, rows), ""]
    lines += [
        "Hits are requests with any cached prompt token (engine-reported); improvement = 1 − mean TTFT of hits / "
        "mean TTFT of misses; match length = cached tokens / block size per request; block utilisation = mean KV "
        "usage of the workers' heartbeats. Metrics are computed by `core/metrics.py`, the fold the simulator uses.",
        "",
    ]
    if len(dumps) > 1 and plots:
        lines += ["## All runs", ""]
        for name, path in plot_comparison(dumps, out_dir / "plots").items():
            lines += [f"### {PLOT_TITLES[name]}", "",
                      f"![{PLOT_TITLES[name]}]({path.relative_to(out_dir).as_posix()})", ""]
    for d in dumps:
        paths = plot_run(d, out_dir / "plots" / _slug(d["label"])) if plots else {}
        lines += [f"## Run: {d['label']}", ""]
        incidents = d.get("incidents", [])
        errors = d.get("errors_by_code", {})
        if errors:
            lines += ["Errors by code: " + ", ".join(f"`{k}` {v}" for k, v in sorted(errors.items())), ""]
        kinds: dict[str, int] = {}
        for inc in incidents:
            kinds[inc["kind"]] = kinds.get(inc["kind"], 0) + 1
        if kinds:
            lines += ["Incidents: " + ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())), ""]
        trust = [i for i in incidents if i["kind"] == "trust"]  # rare and telling: each one listed
        if trust:
            t0 = d.get("started_s") or trust[0]["t_s"]
            lines += ["Trust changes (closed loop, core/trust.py):", ""]
            lines += [f"- t = {i['t_s'] - t0:.1f} s, `{i['worker_id']}`: {i['detail']}" for i in trust] + [""]
        for name in RUN_PLOTS if plots else ():
            rel = paths[name].relative_to(out_dir).as_posix()
            lines += [f"### {PLOT_TITLES[name]}", "", f"![{d['label']}: {PLOT_TITLES[name]}]({rel})", ""]
    path = out_dir / "report.md"
    path.write_text("\n".join(lines))
    logger.info("report written to %s", path)
    return path
