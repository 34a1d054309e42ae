"""The results table of a run (the seed's table), from a dump's metrics fold.

One row per metric, one column per run, so runs compare side by side. Every
number comes from the shared fold; the definitions here are only *views*:

* **hit** requests are those with any cached prompt token (cache status
  ``hit`` or ``partial``), **miss** requests have none;
* **improvement** (within a run) = 1 − mean TTFT of hits / mean TTFT of misses;
* **mean match length** = cached prompt tokens / block size / requests (blocks);
* **prefix match success** = share of requests with any cached token;
* **block utilisation** = mean KV usage over all load samples.

Comparing runs, the first run is the baseline: ``vs baseline`` = this run's
mean TTFT relative to the baseline's (negative = faster).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from core.metrics import MetricsFold
from core.quantiles import Samples


def _mean(*parts: Samples) -> float:
    """The mean of the union of ``parts`` (exact: counts and sums are exact in a sketch too)."""
    n = sum(len(p) for p in parts)
    return sum(p.total() for p in parts) / n if n else math.nan


@dataclass(frozen=True)
class RunResults:
    """Headline numbers of one run."""

    label: str
    requests: int
    errors: int
    token_hit_rate: float
    predicted_hit_rate: float
    ttft_mean_s: float
    ttft_p50_s: float
    ttft_p99_s: float
    e2e_mean_s: float
    ttft_mean_hit_s: float
    ttft_mean_miss_s: float
    hit_improvement: float
    block_utilisation: float
    mean_match_blocks: float
    prefix_match_success: float
    throughput_rps: float
    load_cv: float
    evictions: int


def run_results(dump: dict[str, Any]) -> RunResults:
    """The results of one dump (see :func:`monitor.dump.load_dump`)."""
    fold = MetricsFold.from_dict(dump["fold"])
    s = fold.summary()
    hits = (fold.ttft_by_status["hit"], fold.ttft_by_status["partial"])
    misses = fold.ttft_by_status["miss"]
    n = s["requests"]
    hit_mean, miss_mean = _mean(*hits), _mean(misses)
    return RunResults(
        label=dump.get("label") or "run",
        requests=n,
        errors=int(sum(dump.get("errors_by_code", {}).values())),
        token_hit_rate=s["token_hit_rate"],
        predicted_hit_rate=s["predicted_hit_rate"],
        ttft_mean_s=s["ttft_mean_s"],
        ttft_p50_s=s["ttft_p50_s"],
        ttft_p99_s=s["ttft_p99_s"],
        e2e_mean_s=s["e2e_mean_s"],
        ttft_mean_hit_s=hit_mean,
        ttft_mean_miss_s=miss_mean,
        hit_improvement=1 - hit_mean / miss_mean if miss_mean and not math.isnan(miss_mean) else math.nan,
        block_utilisation=s["kv_usage_mean"],
        mean_match_blocks=fold.counters["cached_tokens"] / fold.block_size / n if n else math.nan,
        prefix_match_success=sum(len(h) for h in hits) / n if n else math.nan,
        throughput_rps=s["throughput_rps"],
        load_cv=s["load_cv"],
        evictions=s["evictions"],
    )


def _pct(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{100 * v:.1f}%"


def _ms(v: float) -> str:
    return "–" if v is None or math.isnan(v) else f"{1000 * v:.1f} ms"


def _num(fmt: str) -> Callable[[float], str]:
    return lambda v: "–" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)


#: (row title, attribute, formatter) in table order; the first rows are the seed's table.
ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("Total requests", "requests", _num("d")),
    ("Token hit rate", "token_hit_rate", _pct),
    ("Mean TTFT, cache hits", "ttft_mean_hit_s", _ms),
    ("Mean TTFT, cache misses", "ttft_mean_miss_s", _ms),
    ("Improvement (hits vs misses)", "hit_improvement", _pct),
    ("Block utilisation (mean KV usage)", "block_utilisation", _pct),
    ("Mean match length (blocks)", "mean_match_blocks", _num(".2f")),
    ("Prefix match success", "prefix_match_success", _pct),
    ("Mean TTFT, all", "ttft_mean_s", _ms),
    ("p50 TTFT", "ttft_p50_s", _ms),
    ("p99 TTFT", "ttft_p99_s", _ms),
    ("Mean end-to-end latency", "e2e_mean_s", _ms),
    ("Predicted hit rate (router)", "predicted_hit_rate", _pct),
    ("Throughput (requests/s)", "throughput_rps", _num(".2f")),
    ("Load CV (requests per worker)", "load_cv", _num(".3f")),
    ("Evicted blocks", "evictions", _num("d")),
    ("Errors", "errors", _num("d")),
]


def relative_change(value: float, baseline: float) -> float:
    """``value / baseline − 1`` (NaN when undefined)."""
    if baseline is None or value is None or math.isnan(baseline) or math.isnan(value) or baseline == 0:
        return math.nan
    return value / baseline - 1


def table_rows(results: Sequence[RunResults]) -> tuple[list[str], list[list[str]]]:
    """``(header, rows)`` of the comparison table; a ``vs <first>`` row per extra run."""
    header = ["Metric"] + [r.label for r in results]
    rows = [[title] + [fmt(getattr(r, attr)) for r in results] for title, attr, fmt in ROWS]
    if len(results) > 1:
        base = results[0]
        for attr, title in (("ttft_mean_s", "Mean TTFT"), ("ttft_p99_s", "p99 TTFT")):
            rows.append(
                [f"{title} vs {base.label}"]
                + ["baseline"]
                + [_signed_pct(relative_change(getattr(r, attr), getattr(base, attr))) for r in results[1:]]
            )
    return header, rows


def _signed_pct(v: float) -> str:
    return "–" if math.isnan(v) else f"{100 * v:+.1f}%"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table (first column left, numbers right)."""
    out = ["| " + " | ".join(header) + " |", "|" + "|".join([":---"] + ["---:"] * (len(header) - 1)) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)
