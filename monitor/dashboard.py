"""A terminal dashboard (rich) of a monitor dump: readable at a glance.

:func:`render_dashboard` turns one dump into a rich renderable; ``kvr dash``
refreshes it from the monitor's ``/json`` endpoint or its dump file.
"""

from __future__ import annotations

import json
import math
import urllib.request
from pathlib import Path
from typing import Any

from rich.console import Group
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

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


def _header(d: dict[str, Any]) -> Panel:
    s = d["summary"]
    errors = sum(d.get("errors_by_code", {}).values())
    up = (d.get("dumped_s") or 0) - (d.get("started_s") or d.get("dumped_s") or 0)
    t = Text()
    t.append(f"{d.get('label') or 'kvr'}  ", style="bold")
    t.append(f"requests {s.get('requests', 0)}   ")
    t.append("errors ")
    t.append(str(errors), style="red bold" if errors else "green")
    t.append(f"   token hit rate {_pct(s.get('token_hit_rate'))}", style="bold cyan")
    t.append(f"   predicted {_pct(s.get('predicted_hit_rate'))}")
    rps = s.get("throughput_rps")
    t.append(f"   {rps:.2f} req/s" if rps is not None else "   – req/s")
    t.append(f"   evictions {s.get('evictions', 0)}   gaps {s.get('event_gaps', 0)}   replays {s.get('event_replays', 0)}")
    t.append(f"   span {up:.0f} s   records {d.get('records', 0)}   bad frames {d.get('decode_errors', 0)}", style="grey50")
    series = d.get("series", [])
    hits = [p.get("window_hit_rate") for p in series]
    pred = [p.get("window_predicted_hit_rate") for p in series]
    body = Group(t, Text("hit rate  ", style="grey50") + Text(sparkline(hits), style="cyan"),
                 Text("predicted ", style="grey50") + Text(sparkline(pred), style="blue"))
    return Panel(body, title="kvr monitor", border_style="cyan")


def _latency(d: dict[str, Any]) -> Table:
    s = d["summary"]
    t = Table(title="latency (ms)", expand=True)
    for col in ("", "mean", "p50", "p90", "p99"):
        t.add_column(col, justify="right" if col else "left")
    for name in ("ttft", "tpot", "e2e", "queue"):
        t.add_row(name.upper() if name != "queue" else "queue", *(_ms(s.get(f"{name}_{k}_s")) for k in ("mean", "p50", "p90", "p99")))
    for st, v in s.get("by_cache_status", {}).items():
        t.add_row(Text(f"TTFT {st} (n={v['requests']})", style={"hit": "green", "partial": "yellow", "miss": "red"}[st]),
                  "", _ms(v.get("ttft_p50_s")), "", _ms(v.get("ttft_p99_s")))
    return t


def _workers(d: dict[str, Any]) -> Table:
    t = Table(title="workers", expand=True)
    for col in ("worker", "run/wait", "queued prefill", "KV usage", "indexed", "index", "lag ms", "gaps/replays/resets",
                "requests", "hit rate"):
        t.add_column(col, justify="left" if col in ("worker", "KV usage", "index") else "right")
    per = d["summary"].get("per_worker", {})
    live = d.get("workers", {})
    # Live rows are targets ("w1/0"); request counts are per worker ("w1").
    sampled = {w.get("worker", k) for k, w in live.items()}
    rows = [(k, live[k], per.get(live[k].get("worker", k), {})) for k in sorted(live)]
    rows += [(k, None, per[k]) for k in sorted(per) if k not in sampled]
    for wid, w, p in rows:
        if w is None:
            t.add_row(Text(wid, style="grey50"), "–", "–", Text("gone", style="grey50"), "–", "–", "–", "–",
                      str(p.get("requests", 0)), _pct(p.get("token_hit_rate")))
            continue
        conf = w.get("confidence", "")
        t.add_row(
            wid, f"{w['running']}/{w['waiting']}", str(w["queued_prefill_tokens"]), _bar(w.get("kv_usage")),
            str(w["indexed_blocks"]), Text(conf, style="green" if conf == "fresh" else "yellow"),
            _ms(w.get("event_lag_s")), f"{w['gaps']}/{w['replays']}/{w['resets']}",
            str(p.get("requests", 0)), _pct(p.get("token_hit_rate")),
        )
    return t


def _recent(d: dict[str, Any], n: int) -> Table:
    t = Table(title="recent requests", expand=True)
    for col in ("request", "worker", "prompt", "cached", "predicted", "TTFT ms", "e2e ms", "result"):
        t.add_column(col, justify="left" if col in ("request", "worker", "result") else "right")
    for r in d.get("recent_requests", [])[-n:]:
        cached = r["cached_tokens"]
        style = "red" if r.get("error") else "green" if cached else None
        t.add_row(r["request_id"], r.get("worker_id") or "–", str(r["prompt_tokens"]), Text(str(cached), style=style or ""),
                  str(r["predicted_cached_tokens"]) if r["predicted_cached_tokens"] >= 0 else "–",
                  _ms(r["ttft_s"]), _ms(r["e2e_s"]), Text(r.get("error") or "ok", style=style or ""))
    return t


def _incidents(d: dict[str, Any], n: int) -> Table:
    t = Table(title="incidents", expand=True)
    t.add_column("t (s)", justify="right")
    t.add_column("worker")
    t.add_column("kind")
    t.add_column("detail")
    t0 = d.get("started_s") or 0.0
    for inc in d.get("incidents", [])[-n:]:
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


def render_dashboard(d: dict[str, Any], *, recent: int = 8, incidents: int = 6) -> Group:
    """One frame of the dashboard."""
    return Group(_header(d), _latency(d), match_histogram(d), _workers(d), _recent(d, recent), _incidents(d, incidents))
