"""Monitor dumps on disk: atomic writes, validated reads.

A dump is the JSON of :meth:`monitor.state.MonitorState.dump`. Readers (dash,
plot, report) also accept any JSON object with a ``fold`` key holding
:meth:`core.metrics.MetricsFold.to_dict` (a simulator run, for instance): the
missing live-only parts read as empty.

A monitor's fold keeps its latency distributions as sketches (bounded memory,
quantiles within its ``relative_accuracy``); a simulator's keeps every value.
Read either through :meth:`core.metrics.MetricsFold.from_dict`, never the raw lists.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from core.metrics import MetricsFold
from monitor.state import DUMP_KIND, finite_or_none


class DumpError(ValueError):
    """The file is not a kvr dump (the message says why)."""


def write_dump(path: str | Path, data: dict[str, Any]) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a reader never sees half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh, allow_nan=False, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def normalize_dump(data: Any, *, source: str = "") -> dict[str, Any]:
    """Validate a parsed dump and fill the parts a fold-only JSON lacks."""
    if not isinstance(data, dict):
        raise DumpError(f"{source}: a dump is a JSON object")
    if data.get("light") and "summary" in data:
        # A dashboard's light dump: no fold to validate (dash reads only the summary and live parts).
        return {**data, "label": data.get("label") or "live"}
    if "fold" not in data:
        raise DumpError(f"{source}: no 'fold' key (not a kvr monitor or simulator dump)")
    try:
        fold = MetricsFold.from_dict(data["fold"])
    except (KeyError, TypeError, ValueError) as exc:
        raise DumpError(f"{source}: bad 'fold': {exc!r}") from None
    out = dict(data)
    out.setdefault("kind", DUMP_KIND)
    out.setdefault("label", Path(source).stem if source else "run")
    out.setdefault("summary", finite_or_none(fold.summary()))
    out.setdefault("timeline", finite_or_none(fold.timeline_series()))
    for key in ("series", "incidents", "recent_requests"):
        out.setdefault(key, [])
    for key in ("workers", "errors_by_code"):
        out.setdefault(key, {})
    if not out["label"]:
        out["label"] = Path(source).stem if source else "run"
    return out


def load_dump(path: str | Path) -> dict[str, Any]:
    """Read and validate one dump file (raises :class:`DumpError`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise DumpError(f"{path}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise DumpError(f"{path}: not JSON ({exc})") from None
    return normalize_dump(data, source=str(path))


def dump_fold(dump: dict[str, Any]) -> MetricsFold:
    """The dump's metrics fold."""
    return MetricsFold.from_dict(dump["fold"])
