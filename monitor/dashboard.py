"""A terminal dashboard (rich) of a monitor dump: readable at a glance.

:func:`render_dashboard` turns one dump into a rich renderable laid out for a
terminal's size (the headline first, then what fits); ``kvr dash`` refreshes
it from the monitor's ``/json`` endpoint or its dump file.
"""

from __future__ import annotations

import io
import json
import math
import urllib.request
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console, Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from bus.mirror_status import describe as describe_mirror
from monitor.dump import normalize_dump

SPARK = "▁▂▃▄▅▆▇█"


def fetch_dump(source: str, *, timeout_s: float = 2.0) -> dict[str, Any]:
    """A dump from an ``http(s)://`` URL of the monitor (``/json``) or a file path."""
    if source.startswith(("http://", "https://")):
        with urllib.request.urlopen(source, timeout=timeout_s) as resp:
            data = json.loads(resp.read())
        if isinstance(data, dict) and not data.get("label"):
            data["label"] = "live"  # not the URL's last path segment
        return normalize_dump(data, source=source)
    return normalize_dump(json.loads(Path(source).read_text()), source=source)


def sparkline(values: list[float | None], width: int = 40) -> str:
    """Unicode sparkline of values in [0, 1] (None/NaN as a space), the last ``width`` points."""
    out = []
    for v in values[-width:]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            out.append(" ")
        else:
            out.append(SPARK[min(len(SPARK) - 1, max(0, int(v * (len(SPARK) - 1) + 0.5)))])
    return "".join(out)


def _pct(v: Any) -> str:
    return "–" if v is None else f"{100 * v:.1f}%"


def _ms(v: Any) -> str:
    return "–" if v is None else f"{1000 * v:.1f}"


def _bar(v: Any, width: int = 10) -> Text:
    if v is None:
        return Text("–")
    filled = int(round(max(0.0, min(1.0, v)) * width))
    colour = "green" if v < 0.7 else "yellow" if v < 0.9 else "red"
    return Text("█" * filled, style=colour) + Text("░" * (width - filled), style="grey50") + Text(f" {100 * v:3.0f}%")


# The headline's request rate is over this much of the most recent series.
RATE_WINDOW_S = 10.0
# From this many columns the tables show every column (index health, lag, the
# event-plane counters); below it they drop to what a glance needs.
WIDE_MIN_COLS = 120


def request_rate(d: dict[str, Any], *, window_s: float = RATE_WINDOW_S) -> tuple[float | None, str]:
    """Completed requests per second and over what: the last ``window_s`` of the series, else the whole run."""
    series = d.get("series") or []
    if len(series) >= 2:
        last = series[-1]
        # The latest point at least window_s before the last (else the first): a span >= window_s when there is one.
        first = next((p for p in reversed(series) if p["t_s"] <= last["t_s"] - window_s), series[0])
        span = last["t_s"] - first["t_s"]
        if span > 0:
            return (last["requests"] - first["requests"]) / span, f"last {span:.0f} s"
    return d["summary"].get("throughput_rps"), "whole run"


def _ms_unit(v: Any) -> str:
    return "–" if v is None else f"{1000 * v:.1f} ms"


def _header(d: dict[str, Any], *, wide: bool) -> Panel:
    """The headline: request rate, token hit rate, TTFT p50/p99, errors; then counters and a hit-rate sparkline."""
    s = d["summary"]
    errors = sum(d.get("errors_by_code", {}).values())
    rate, rate_over = request_rate(d)
    figures = Table.grid(padding=(0, 3))
    heads = ("req/s", "token hit", "TTFT p50", "TTFT p99", "errors", "requests")
    for _ in heads:
        figures.add_column(justify="right")
    figures.add_row(*(Text(h, style="grey50") for h in heads))
    figures.add_row(
        Text("–" if rate is None else f"{rate:.2f}", style="bold"),
        Text(_pct(s.get("token_hit_rate")), style="bold cyan"),
        Text(_ms_unit(s.get("ttft_p50_s")), style="bold"),
        Text(_ms_unit(s.get("ttft_p99_s")), style="bold"),
        Text(str(errors), style="red bold" if errors else "green bold"),
        Text(str(s.get("requests", 0)), style="bold"),
    )
    up = (d.get("dumped_s") or 0) - (d.get("started_s") or d.get("dumped_s") or 0)
    more = Text(f"req/s: {rate_over}   predicted hit {_pct(s.get('predicted_hit_rate'))}   "
                f"evictions {s.get('evictions', 0)}   gaps {s.get('event_gaps', 0)}   "
                f"replays {s.get('event_replays', 0)}", style="grey50")
    if wide:
        more.append(f"   span {up:.0f} s   records {d.get('records', 0)}   bad frames {d.get('decode_errors', 0)}")
    if d.get("mirror") is not None:  # the router's Redis mirror (router/mirror_health.py)
        more.append(Text(f"   mirror {describe_mirror(d['mirror'])}",
                         style="grey50" if d["mirror"]["state"] == "ok" else "red bold"))
    routers = d.get("routers") or {}
    if len(routers) > 1:  # router replicas on one fleet: each, with the age of its last sample
        now = d.get("dumped_s") or 0
        more.append(Text("   routers " + ", ".join(f"{r} ({max(0.0, now - v['last_sample_s']):.0f} s)"
                                                   for r, v in sorted(routers.items())), style="grey50"))
    series = d.get("series", [])
    hits = [p.get("window_hit_rate") for p in series]
    lines = [figures, more, Text("hit rate  ", style="grey50") + Text(sparkline(hits, 60), style="cyan")]
    if wide:
        pred = [p.get("window_predicted_hit_rate") for p in series]
        lines.append(Text("predicted ", style="grey50") + Text(sparkline(pred, 60), style="blue"))
    return Panel(Group(*lines), title=f"[bold]{d.get('label') or 'kvr'}[/] · kvr monitor", title_align="left",
                 border_style="cyan")


def _latency(d: dict[str, Any], *, wide: bool) -> Table:
    s = d["summary"]
    t = _table("latency (ms)", wide=wide)
    for col in ("", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="right" if col else "left")
    for name in ("ttft", "tpot", "e2e", "queue"):
        t.add_row(name.upper() if name != "queue" else "queue",
                  *(_ms(s.get(f"{name}_{k}_s")) for k in ("mean", "p50", "p90", "p99")))
    for st, v in s.get("by_cache_status", {}).items():
        st_style = {"hit": "green", "partial": "yellow", "miss": "red"}[st]
        t.add_row(Text(f"TTFT {st} (n={v['requests']})", style=st_style),
                  "", _ms(v.get("ttft_p50_s")), "", _ms(v.get("ttft_p99_s")))
    return t


def _table(title: str, *, wide: bool) -> Table:
    """Boxed on a wide terminal; on a narrow one a header rule only (two columns and two lines fewer)."""
    if wide:
        return Table(title=title, expand=True)
    return Table(title=title, title_justify="left", title_style="bold", expand=True, box=box.SIMPLE_HEAD,
                 show_edge=False, pad_edge=False)


def _worker_rows(d: dict[str, Any]) -> list[tuple[str, dict[str, Any] | None, dict[str, Any]]]:
    """(name, live sample or None when gone, per-worker request totals), live targets first."""
    per = d["summary"].get("per_worker", {})
    live = d.get("workers", {})
    # Live rows are targets ("w1/0"); request counts are per worker ("w1").
    sampled = {w.get("worker", k) for k, w in live.items()}
    rows = [(k, live[k], per.get(live[k].get("worker", k), {})) for k in sorted(live)]
    return rows + [(k, None, per[k]) for k in sorted(per) if k not in sampled]


def _workers(d: dict[str, Any], *, wide: bool, max_rows: int | None = None) -> Table:
    t = _table("workers", wide=wide)
    if wide:
        cols = ("worker", "run/wait", "queued prefill", "KV in use", "cached blocks", "index", "lag ms",
                "gaps/replays/resets", "requests", "hit rate")
    else:
        cols = ("worker", "run/wait", "KV in use", "cached", "index", "req", "hit")
    for col in cols:
        t.add_column(col, justify="left" if col in ("worker", "KV in use", "index") else "right", no_wrap=True)
    rows = _worker_rows(d)
    shown = rows if max_rows is None or len(rows) <= max_rows else rows[: max(0, max_rows - 1)]
    for wid, w, p in shown:
        req, hit = str(p.get("requests", 0)), _pct(p.get("token_hit_rate"))
        if w is None:  # its samples stopped: only its request totals are left
            unknown = ["–"] * (len(cols) - 5)
            t.add_row(Text(wid, style="grey50"), "–", *([] if not wide else ["–"]), Text("gone", style="grey50"),
                      *unknown, req, hit)
            continue
        conf = w.get("confidence", "")
        conf_text = Text(conf, style="green" if conf == "fresh" else "yellow")
        trust = w.get("trust")
        if trust is not None and trust < 1.0:  # the router distrusts its claims (core/trust.py)
            conf_text = Text(f"{conf} trust {trust:.2f}", style="bold red")
        if wide:
            t.add_row(wid, f"{w['running']}/{w['waiting']}", str(w["queued_prefill_tokens"]), _bar(w.get("kv_usage")),
                      str(w["indexed_blocks"]), conf_text, _ms(w.get("event_lag_s")),
                      f"{w['gaps']}/{w['replays']}/{w['resets']}", req, hit)
        else:
            t.add_row(wid, f"{w['running']}/{w['waiting']}", _bar(w.get("kv_usage"), width=6),
                      str(w["indexed_blocks"]), conf_text, req, hit)
    if len(shown) < len(rows):
        t.add_row(Text(f"… {len(rows) - len(shown)} more (taller terminal)", style="grey50"))
    return t


def _recent(d: dict[str, Any], n: int, *, wide: bool) -> Table:
    t = _table("recent requests", wide=wide)
    cols = (("request", "worker", "prompt", "cached", "predicted", "TTFT ms", "e2e ms", "result") if wide
            else ("request", "worker", "cached/prompt", "TTFT ms", "result"))
    for col in cols:
        t.add_column(col, justify="left" if col in ("request", "worker", "result") else "right",
                     no_wrap=not wide, overflow="ellipsis")
    for r in d.get("recent_requests", [])[-n:] if n > 0 else []:
        cached = r["cached_tokens"]
        style = "red" if r.get("error") else "green" if cached else ""
        result = Text(r.get("error") or "ok", style=style)
        if wide:
            t.add_row(r["request_id"], r.get("worker_id") or "–", str(r["prompt_tokens"]),
                      Text(str(cached), style=style),
                      "–" if r["predicted_cached_tokens"] is None else str(r["predicted_cached_tokens"]),
                      _ms(r["ttft_s"]), _ms(r["e2e_s"]), result)
        else:
            t.add_row(r["request_id"], r.get("worker_id") or "–", Text(f"{cached}/{r['prompt_tokens']}", style=style),
                      _ms(r["ttft_s"]), result)
    return t


def _incidents(d: dict[str, Any], n: int, *, wide: bool) -> Table:
    t = _table("incidents", wide=wide)
    t.add_column("t (s)", justify="right", no_wrap=True)
    t.add_column("worker", no_wrap=True)
    t.add_column("kind", no_wrap=True)
    t.add_column("detail", no_wrap=not wide, overflow="ellipsis")
    t0 = d.get("started_s") or 0.0
    for inc in d.get("incidents", [])[-n:] if n > 0 else []:
        t.add_row(f"{inc['t_s'] - t0:.1f}", inc["worker_id"] or "(router)", inc["kind"], inc["detail"])
    return t


def match_histogram(d: dict[str, Any]) -> Text:
    """The prefix-match-length distribution as ``blocks: count`` pairs."""
    hist = d["summary"].get("match_blocks_hist", {})
    total = sum(hist.values()) or 1
    parts = []
    for k, v in sorted(hist.items(), key=lambda kv: int(kv[0])):
        lo = int(k)
        span = "0" if lo == 0 else str(lo) if lo == 1 else f"{lo}-{2 * lo - 1}"
        parts.append(f"{span}: {100 * v / total:.0f}%")
    return Text("match length (blocks)  " + ("   ".join(parts) or "–"), style="grey70")


def _height(renderable: Any, width: int) -> int:
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    return len(console.render_lines(renderable, console.options.update(width=width), pad=False))


def render_dashboard(d: dict[str, Any], *, width: int = 160, height: int | None = None, recent: int = 8,
                     incidents: int = 6) -> Group:
    """One frame of the dashboard, laid out for a ``width`` × ``height`` terminal.

    Panels go in order of importance — the headline (request rate, token hit
    rate, TTFT p50/p99, errors), per-worker load, latency, the match-length
    histogram, incidents, recent requests — each while it fits in ``height``
    lines (``None``: no limit); a table that does not fit whole shows its latest
    rows. Below ``WIDE_MIN_COLS`` columns the tables drop their secondary
    columns. Invariant: with a ``height``, the frame is at most ``height`` lines.
    """
    wide = width >= WIDE_MIN_COLS
    sections: list[tuple[str, Any, int]] = [  # (name, build(rows) or a renderable, fewest rows worth showing)
        ("workers", lambda n: _workers(d, wide=wide, max_rows=n), 1),
        ("latency", _latency(d, wide=wide), 0),
        ("match length", match_histogram(d), 0),
        ("incidents", lambda n: _incidents(d, min(n, incidents), wide=wide), 2),
        ("recent requests", lambda n: _recent(d, min(n, recent), wide=wide), 2),
    ]
    parts: list[Any] = [_header(d, wide=wide)]
    if height is None:
        parts += [s if not callable(s) else s(None if name == "workers" else 1 << 30) for name, s, _ in sections]
        return Group(*parts)
    left = height - _height(parts[0], width)
    skipped = []
    for name, build, fewest in sections:
        fitted = _fit(build, fewest, left - 1, width)  # one line kept for the note on what was left out
        if fitted is None:
            skipped.append(name)
            continue
        parts.append(fitted)
        left -= _height(fitted, width)
    if skipped and left >= 1:
        note = Text(f"more on a larger terminal: {', '.join(skipped)}", style="grey50", overflow="ellipsis",
                    no_wrap=True)
        parts.append(note)
    return Group(*parts)


def _fit(build: Any, fewest: int, lines: int, width: int) -> Any:
    """``build`` (a renderable, or rows → renderable) at the most rows that fit in ``lines``; None if none do."""
    if not callable(build):
        return build if _height(build, width) <= lines else None
    rows = max(lines, 0)  # a row takes at least a line
    while rows >= fewest and rows > 0:
        table = build(rows)
        if _height(table, width) <= lines:
            return table
        rows -= 1
    return None
