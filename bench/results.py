"""What a benchmark suite returns and how it is written: JSON, a markdown table, plots.

A :class:`SuiteResult` holds named tables (lists of flat row dicts), the goals measured against
(as ratios, never pass/fail in a test) and free-text notes. :func:`write_result` writes
``<suite>.json`` and ``<suite>.md`` into the output folder and lets the suite draw its plots.

Statistics: :func:`percentile` is the project's one definition (:func:`core.quantiles.percentile`:
linear interpolation between the closest ranks, numpy's default); :func:`spread` summarises
repetitions as median (its 50th percentile) and min..max, which is what the reports quote.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from core.quantiles import percentile as percentile  # re-exported for the suites: the one definition

logger = logging.getLogger(__name__)


@dataclass
class Goal:
    """One goal of the issue: ``measured`` against ``target``; ``ratio`` = measured / target."""

    name: str
    measured: float
    target: float
    unit: str
    higher_is_better: bool
    note: str = ""

    @property
    def ratio(self) -> float:
        return self.measured / self.target if self.target else math.inf

    @property
    def met(self) -> bool:
        return self.measured >= self.target if self.higher_is_better else self.measured <= self.target

    def as_dict(self) -> dict:
        return {**asdict(self), "ratio": round(self.ratio, 3), "met": self.met}


@dataclass
class SuiteResult:
    suite: str
    command: str
    config: dict
    tables: dict[str, list[dict]] = field(default_factory=dict)
    goals: list[Goal] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    machine: dict = field(default_factory=lambda: machine_info())

    def as_dict(self) -> dict:
        return {"suite": self.suite, "command": self.command, "config": self.config, "machine": self.machine,
                "tables": self.tables, "goals": [g.as_dict() for g in self.goals], "notes": self.notes}


def machine_info() -> dict:
    try:
        load = os.getloadavg()
    except OSError:
        load = (0.0, 0.0, 0.0)
    return {"python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
            "loadavg_at_start": [round(x, 2) for x in load]}


def spread(values: Iterable[float]) -> dict:
    """Median and range of repeated measurements."""
    vals = sorted(v for v in values if not math.isnan(v))
    if not vals:
        return {"median": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"median": percentile(vals, 50), "min": vals[0], "max": vals[-1], "n": len(vals)}


def fmt_spread(s: dict, digits: int = 1, scale: float = 1.0) -> str:
    """``median (min–max)`` as text."""
    if not s.get("n"):
        return "–"
    f = f"{{:.{digits}f}}"
    med, lo, hi = (f.format(s[k] * scale) for k in ("median", "min", "max"))
    return med if s["n"] == 1 else f"{med} ({lo}–{hi})"


def spread_bars(rows: list[dict], *, name_key: str, panels: Sequence[tuple[str, str]], title: str, path: Path,
                highlight: str = "kvr", rotation: int = 45, width_in: float = 14.0) -> Path:
    """One bar panel per ``(key, label)``: the median of each row's spread, min–max as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r[name_key] for r in rows]
    fig, axes = plt.subplots(1, len(panels), figsize=(width_in, 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels, strict=True):
        med = [r[key]["median"] for r in rows]
        err = [[r[key]["median"] - r[key]["min"] for r in rows], [r[key]["max"] - r[key]["median"] for r in rows]]
        ax.bar(names, med, yerr=err, capsize=3, color=["tab:orange" if n == highlight else "tab:blue" for n in names])
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=rotation)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    cols = list(columns or rows[0].keys())
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def _cell(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return str(v)


def render_markdown(result: SuiteResult, display: dict[str, list[dict]] | None = None) -> str:
    """The report: command, goals, then each table (``display`` overrides a table's rows)."""
    out = [f"# kvr bench {result.suite}\n", f"Command: `{result.command}`\n",
           f"Machine: {result.machine.get('cpus')} CPUs, load average at start "
           f"{result.machine.get('loadavg_at_start')}, Python {result.machine.get('python')}\n"]
    if result.goals:
        out.append("## Goals\n")
        out.append(markdown_table([{"goal": g.name, "measured": f"{g.measured:.4g} {g.unit}",
                                    "target": f"{'≥' if g.higher_is_better else '≤'} {g.target:g} {g.unit}",
                                    "ratio": f"{g.ratio:.2f}", "met": "yes" if g.met else "no", "note": g.note}
                                   for g in result.goals]))
    for name, rows in result.tables.items():
        out.append(f"## {name}\n")
        out.append(markdown_table((display or {}).get(name, rows)))
    if result.notes:
        out.append("## Notes\n")
        out.extend(f"- {n}" for n in result.notes)
        out.append("")
    return "\n".join(out)


def write_result(result: SuiteResult, out_dir: str | Path, *,
                 plot: Callable[[SuiteResult, Path], list[Path]] | None = None,
                 display: dict[str, list[dict]] | None = None) -> list[Path]:
    """Write ``<suite>.json``, ``<suite>.md`` and the suite's plots; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{result.suite}.json", out / f"{result.suite}.md"]
    paths[0].write_text(json.dumps(result.as_dict(), indent=1, default=_json_default) + "\n")
    paths[1].write_text(render_markdown(result, display))
    if plot is not None:
        try:
            paths += plot(result, out)
        except Exception:  # a plot must never lose the numbers already written
            logger.exception("plots of %s failed", result.suite)
    return paths


def _json_default(o: object):
    if isinstance(o, float) and math.isnan(o):
        return None
    if isinstance(o, Path):
        return str(o)
    return str(o)
