"""Where a running ``kvr up`` can be found, and where runs are kept: the per-user state directory.

``state_dir()`` is ``$KVR_STATE_DIR`` if set, else ``$XDG_STATE_HOME/kvr``, else
``~/.local/state/kvr``. It holds::

    current.json               the running `kvr up`: endpoints, Redis URL, namespace, run dir, pid
    runs/up-<stamp>-<pid>/     a `kvr up` run without --run-dir: logs/, monitor.json, cluster.json
    runs/demo-<stamp>-<pid>/   a `kvr demo` run without --out: report.md, dumps, plots, logs

Invariants:

* ``current.json`` (and every ``cluster.json``) is written atomically with mode 0600 — its Redis
  URL may carry a password — so a reader never sees half of it and no other user can read it;
* only the ``kvr up`` that wrote ``current.json`` (its ``pid``) removes it; a record whose pid is
  no longer running is stale and is never used (the reason says so);
* of the runs of each kind, the newest :data:`KEEP_RUNS` are kept: creating a run prunes the older
  ones, never one whose ``kvr up`` is still running.

``kvr send``, ``kvr inspect``, ``kvr dash`` and ``kvr plot`` read ``current.json`` when given no
endpoint, Redis URL or dump; explicit flags and environment variables always win.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import click

from cluster.processes import pid_running

#: Overrides the state directory (tests isolate themselves with it).
STATE_DIR_ENV = "KVR_STATE_DIR"
CURRENT_FILE = "current.json"
#: Runs of each kind (up, demo) kept under ``runs/``; older ones are removed when a new one starts.
KEEP_RUNS = 10


def state_dir() -> Path:
    """The per-user kvr state directory (not created here)."""
    explicit = os.environ.get(STATE_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_STATE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".local" / "state"
    return base / "kvr"


def current_path() -> Path:
    return state_dir() / CURRENT_FILE


def runs_dir() -> Path:
    return state_dir() / "runs"


def write_private_json(path: Path, obj: dict) -> Path:
    """Write ``obj`` to ``path`` atomically, readable by this user only (0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(json.dumps(obj, indent=2) + "\n")
    os.chmod(tmp, 0o600)  # O_CREAT's mode only applies to a new file
    os.replace(tmp, path)
    return path


def _ensure_state_dir() -> Path:
    """The state directory, created private (0700) if missing; parents get the usual mode."""
    path = state_dir()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir(exist_ok=True, mode=0o700)
    return path


def publish(record: dict) -> Path:
    """Make ``record`` (a ``cluster.json`` object, with this process's ``pid``) the current cluster."""
    _ensure_state_dir()
    return write_private_json(current_path(), {**record, "pid": record.get("pid", os.getpid())})


def withdraw(pid: int | None = None) -> bool:
    """Remove ``current.json`` if process ``pid`` (default: this one) wrote it; True when removed."""
    pid = os.getpid() if pid is None else pid
    path = current_path()
    try:
        owner = json.loads(path.read_text()).get("pid")
    except (OSError, ValueError, AttributeError):
        return False
    if owner != pid:
        return False  # a later `kvr up` owns it now
    path.unlink(missing_ok=True)
    return True


class NoCluster(Exception):
    """No running ``kvr up`` was found; the message says why (missing, unreadable or stale file)."""


def running_cluster() -> dict:
    """The record of the running ``kvr up``, or :class:`NoCluster`."""
    path = current_path()
    try:
        record = json.loads(path.read_text())
    except FileNotFoundError:
        raise NoCluster(f"no `kvr up` is running (no {path})") from None
    except (OSError, ValueError) as exc:
        raise NoCluster(f"cannot read {path}: {exc}") from None
    pid = record.get("pid") if isinstance(record, dict) else None
    if not isinstance(pid, int):
        raise NoCluster(f"{path} has no pid: not written by `kvr up`")
    if not pid_running(pid):
        raise NoCluster(f"{path} is stale, ignored: the `kvr up` that wrote it (pid {pid}) is no longer running")
    return record


class NoClusterError(click.ClickException):
    """A command was given nothing to talk to and no ``kvr up`` is running (exit 2, one line)."""

    exit_code = 2


def require_cluster(*, instead: str) -> dict:
    """The running cluster's record, or a one-line error: ``instead`` says what to pass."""
    try:
        return running_cluster()
    except NoCluster as exc:
        raise NoClusterError(f"{exc}; pass {instead}, or start a cluster with `kvr up`") from None


def new_run_dir(kind: str) -> Path:
    """A fresh ``runs/<kind>-<stamp>-<pid>`` (created, 0700), after pruning that kind's older runs."""
    root = runs_dir()
    _ensure_state_dir()
    root.mkdir(exist_ok=True, mode=0o700)
    prune_runs(kind, keep=KEEP_RUNS - 1)
    path = root / f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    path.mkdir(mode=0o700)
    return path


def prune_runs(kind: str, *, keep: int = KEEP_RUNS) -> list[Path]:
    """Remove all but the newest ``keep`` runs of ``kind`` (skipping live ones); returns those removed."""
    root = runs_dir()
    if not root.is_dir():
        return []
    # Names start with a sortable timestamp: newest first.
    runs = sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(f"{kind}-")),
                  key=lambda p: p.name, reverse=True)
    removed = []
    for path in runs[max(0, keep):]:
        if _run_is_live(path):
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def _run_is_live(path: Path) -> bool:
    """The run's ``kvr up`` / ``kvr demo`` process (the ``-<pid>`` suffix) is still running."""
    pid = path.name.rsplit("-", 1)[-1]
    return pid.isdigit() and int(pid) != os.getpid() and pid_running(int(pid))
