"""Start, watch and stop a set of child processes, one log file each.

Invariants:
* every child runs in its own session (process group), so stopping it also
  stops whatever it spawned — nothing is orphaned;
* on Linux every child also gets SIGTERM if the supervising *thread* dies
  (``PR_SET_PDEATHSIG``), so even a SIGKILLed ``kvr up`` leaves nothing behind
  (start components from a thread that outlives them: the main thread);
* :meth:`Supervisor.stop` always returns, within ``stop_timeout_s`` plus a
  SIGKILL round: SIGTERM to every group in reverse start order, then SIGKILL
  to whatever is still alive;
* Python children never import from the current directory (``PYTHONSAFEPATH``);
* a child that exits while it should be running is reported by
  :meth:`Supervisor.failed` with its exit code and the tail of its log.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass
class ComponentSpec:
    """One child process: its ``name`` (unique, names the log file), ``role`` and command line.

    ``ready`` is polled after start until it returns True (no readiness check when ``None``).
    ``stop_last``: stopped after every other component, whatever the start order (the monitor,
    so it records what the router reports while the rest shut down).
    """

    name: str
    role: str
    argv: list[str]
    env: Mapping[str, str] = field(default_factory=dict)
    ready: Callable[[], bool] | None = None
    stop_last: bool = False


class ComponentFailed(RuntimeError):
    """A component exited or never became ready."""

    def __init__(self, spec: ComponentSpec, reason: str, *, returncode: int | None, log_tail: str = "") -> None:
        self.spec = spec
        self.returncode = returncode
        self.log_tail = log_tail
        msg = f"{spec.name} ({spec.role}) {reason}"
        if log_tail:
            msg += f"; last log lines:\n{log_tail}"
        super().__init__(msg)


@dataclass
class _Child:
    spec: ComponentSpec
    proc: subprocess.Popen
    log_path: Path


def tail(path: Path, lines: int = 15) -> str:
    """The last ``lines`` lines of a log file ('' if unreadable)."""
    try:
        with path.open("rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - 8192))
            return "\n".join(fh.read().decode(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class Supervisor:
    """Children of this process with logs under ``log_dir``."""

    def __init__(self, *, log_dir: str | Path, stop_timeout_s: float = 10.0,
                 base_env: Mapping[str, str] | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.stop_timeout_s = stop_timeout_s
        # PYTHONSAFEPATH (Python >= 3.11, like -P): a Python child never puts the current directory
        # on sys.path, so a folder named like a kvr package (cli/, core/, bus/) where the user runs
        # `kvr up` cannot shadow kvr's own modules in `python -m cli.main`.
        self._base_env = {**(os.environ if base_env is None else base_env), "PYTHONSAFEPATH": "1"}
        self._children: list[_Child] = []
        self._stopping = False

    @property
    def names(self) -> list[str]:
        return [c.spec.name for c in self._children]

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def pid(self, name: str) -> int:
        return self._child(name).proc.pid

    def _child(self, name: str) -> _Child:
        for c in self._children:
            if c.spec.name == name:
                return c
        raise KeyError(name)

    def start(self, spec: ComponentSpec) -> None:
        """Start one child (its output goes to ``<log_dir>/<name>.log``)."""
        if spec.name in self.names:
            raise ValueError(f"component {spec.name!r} already started")
        log_path = self.log_path(spec.name)
        with log_path.open("ab") as log:
            proc = subprocess.Popen(
                spec.argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env={**self._base_env, **spec.env}, start_new_session=True,
                preexec_fn=_die_with_parent if sys.platform.startswith("linux") else None,
            )
        self._children.append(_Child(spec, proc, log_path))
        logger.info("started %s (pid %d): %s", spec.name, proc.pid, " ".join(spec.argv))

    def wait_ready(self, name: str, *, timeout_s: float, poll_s: float = 0.05) -> None:
        """Poll the component's ``ready`` until True; raise :class:`ComponentFailed` on exit or timeout."""
        child = self._child(name)
        if child.spec.ready is None:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            rc = child.proc.poll()
            if rc is not None:
                raise ComponentFailed(child.spec, f"exited with code {rc} before it was ready",
                                      returncode=rc, log_tail=tail(child.log_path))
            try:
                if child.spec.ready():
                    return
            except Exception as exc:  # a readiness probe failing is "not ready yet"
                logger.debug("readiness of %s: %r", name, exc)
            if time.monotonic() > deadline:
                raise ComponentFailed(child.spec, f"not ready after {timeout_s:g} s",
                                      returncode=None, log_tail=tail(child.log_path))
            time.sleep(poll_s)

    def failed(self) -> list[ComponentFailed]:
        """Children that exited on their own (empty while all run)."""
        out = []
        for c in self._children:
            rc = c.proc.poll()
            if rc is not None:
                out.append(ComponentFailed(c.spec, f"exited with code {rc}", returncode=rc, log_tail=tail(c.log_path)))
        return out

    def signal(self, name: str, sig: int) -> None:
        """Send ``sig`` to one component's process group (fault injection, SIGUSR1 dumps)."""
        _killpg(self._child(name).proc, sig)

    def stop_one(self, name: str, *, timeout_s: float | None = None) -> int | None:
        """Stop one component (SIGTERM, then SIGKILL) and forget it; returns its exit code."""
        child = self._child(name)
        codes = self._stop([child], timeout_s if timeout_s is not None else self.stop_timeout_s)
        self._children.remove(child)
        return codes[name]

    def respec(self, name: str, spec: ComponentSpec) -> None:
        """What a later :meth:`restart` of ``name`` runs: a component that bound port 0 comes back
        on the ports it resolved (its peers dial those)."""
        if spec.name != name:
            raise ValueError(f"spec {spec.name!r} is not for {name!r}")
        self._child(name).spec = spec

    def restart(self, name: str, *, sig: int | None = None, timeout_s: float = 10.0) -> int | None:
        """Send ``sig`` (default SIGKILL: a crash) to a component's group, reap it and start it again.

        Returns the old process's exit code. The log file is appended to, so it
        tells the whole story of the component.
        """
        child = self._child(name)
        _killpg(child.proc, signal.SIGKILL if sig is None else sig)
        try:
            code = child.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _killpg(child.proc, signal.SIGKILL)
            code = child.proc.wait()
        _killpg(child.proc, signal.SIGKILL)  # whatever it spawned
        self._children.remove(child)
        self.start(child.spec)
        return code

    def stop(self) -> dict[str, int | None]:
        """Stop everything, newest first (``stop_last`` components after the rest); returns each
        component's exit code."""
        newest_first = list(reversed(self._children))
        order = [c for c in newest_first if not c.spec.stop_last] + [c for c in newest_first if c.spec.stop_last]
        codes = self._stop(order, self.stop_timeout_s)
        self._children.clear()
        return codes

    def _stop(self, children: Sequence[_Child], timeout_s: float) -> dict[str, int | None]:
        for c in children:
            if c.proc.poll() is None:
                _killpg(c.proc, signal.SIGTERM)
            # Wait per child so later groups see their dependencies still up while they drain.
            try:
                c.proc.wait(timeout=max(0.0, timeout_s / max(1, len(children))))
            except subprocess.TimeoutExpired:
                pass
        deadline = time.monotonic() + timeout_s
        for c in children:
            try:
                c.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop within %g s: SIGKILL", c.spec.name, timeout_s)
        codes: dict[str, int | None] = {}
        for c in children:
            # SIGKILL the group even if the leader exited: a grandchild may still hold it.
            _killpg(c.proc, signal.SIGKILL)
            try:
                codes[c.spec.name] = c.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                codes[c.spec.name] = None
        return codes


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent thread exits (Linux; best effort elsewhere)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def _killpg(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
