"""Policy comparison: run one workload under several policies and tabulate the results.

The JSON report has exactly this shape (NaN becomes null)::

    {"upper_bound": 0.88,
     "policies": {"kvr": {"token_hit_rate": ..., "ttft_p50_s": ..., "ttft_p99_s": ..., ...}, ...}}

and with a rate sweep ``{"upper_bound": ..., "sweep": [{"rate_per_s": r, "policies": {...}}, ...]}``.
Nothing in it depends on wall time, so the same seed gives the same bytes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

from sim.cluster import ClusterConfig, RunResult, SimCluster
from sim.rejections import Rejections
from sim.workload import ArrivalProcess, Workload

logger = logging.getLogger(__name__)

#: Columns of a policy row, in table order.
ROW_KEYS = (
    "token_hit_rate",
    "predicted_hit_rate",
    "hit_rate_vs_bound",
    "ttft_p50_s",
    "ttft_p90_s",
    "ttft_p99_s",
    "tpot_p50_s",
    "tpot_p99_s",
    "e2e_p50_s",
    "e2e_p99_s",
    "throughput_rps",
    "output_tokens_per_s",
    "load_cv",
    "kv_usage_mean",
    "busy_fraction",
    "evictions",
    "preemptions",
    "requests",
    "unfinished",
    "rejected",
    "failed",
    "upper_bound",
)


def policy_row(result: RunResult) -> dict[str, Any]:
    """The headline numbers of one run (``ROW_KEYS``)."""
    s = result.fold.summary()
    row = {k: s[k] for k in ROW_KEYS if k in s}
    row["upper_bound"] = result.upper_bound
    row["hit_rate_vs_bound"] = s["token_hit_rate"] / result.upper_bound if result.upper_bound else math.nan
    row["unfinished"] = result.unfinished
    row["rejected"] = result.rejected
    row["failed"] = result.failed
    row["busy_fraction"] = result.busy_fraction
    return {k: row[k] for k in ROW_KEYS}


def run_policies(
    *,
    make_workload: Callable[[], Workload],
    make_arrivals: Callable[[], ArrivalProcess],
    policies: Sequence[str],
    config: ClusterConfig,
    seed: int,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, RunResult]:
    """One run per policy, each on a freshly built (identical) workload and arrival process."""
    out: dict[str, RunResult] = {}
    for name in policies:
        cb = (lambda done, total, _n=name: progress(_n, done, total)) if progress else None
        cluster = SimCluster(workload=make_workload(), arrivals=make_arrivals(), policy=name, config=config, seed=seed,
                             progress=cb)
        out[name] = cluster.run()
        logger.info("policy %s: %d requests", name, out[name].requests)
    return out


def comparison_report(results: dict[str, RunResult]) -> dict[str, Any]:
    """``{"upper_bound", "policies"}``; the bound is the largest over the runs (closed-loop
    workloads can arrive in a different order under different policies)."""
    bounds = [r.upper_bound for r in results.values() if not math.isnan(r.upper_bound)]
    return {
        "upper_bound": max(bounds) if bounds else math.nan,
        "policies": {name: policy_row(r) for name, r in results.items()},
    }


def rejection_runs(results: dict[str, RunResult]) -> dict[str, tuple[int, Rejections]]:
    """``policy -> (requests, rejections)``, the input of ``sim.rejections.rejection_message``."""
    return {name: (r.requests, r.rejections) for name, r in results.items()}


def to_json(report: dict[str, Any]) -> str:
    """Deterministic JSON: NaN/inf as null, insertion order kept."""
    return json.dumps(_finite(report), indent=2)


def _finite(x: Any) -> Any:
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


_TABLE_COLUMNS = (
    ("token_hit_rate", "hit", "{:.3f}"),
    ("predicted_hit_rate", "pred hit", "{:.3f}"),
    ("ttft_p50_s", "TTFT p50 s", "{:.3f}"),
    ("ttft_p90_s", "p90", "{:.3f}"),
    ("ttft_p99_s", "p99", "{:.3f}"),
    ("tpot_p50_s", "TPOT p50 ms", "ms"),
    ("throughput_rps", "req/s", "{:.2f}"),
    ("load_cv", "load CV", "{:.2f}"),
    ("busy_fraction", "busy", "{:.2f}"),
    ("evictions", "evictions", "{:d}"),
    ("preemptions", "preempt", "{:d}"),
    ("rejected", "rejected", "{:d}"),
)


def _fmt(v: Any, fmt: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if fmt == "ms":
        return f"{v * 1000:.1f}"
    return fmt.format(v)


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the text table (one row per policy, then the upper bound)."""
    header = ["policy"] + [label for _, label, _ in _TABLE_COLUMNS]
    rows = []
    for name, row in report["policies"].items():
        rows.append([name] + [_fmt(row.get(k), f) for k, _, f in _TABLE_COLUMNS])
    rows.append(["upper bound (∞ cache)", _fmt(report["upper_bound"], "{:.3f}")] + [""] * (len(_TABLE_COLUMNS) - 1))
    return header, rows


def markdown_table(report: dict[str, Any]) -> str:
    """The table as GitHub markdown (for docs/benchmarks.md)."""
    header, rows = table_rows(report)
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(header))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def config_dict(config: ClusterConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)
