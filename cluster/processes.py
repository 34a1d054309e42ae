"""Stopping a child process: ask, wait, kill, reap — one definition for the harness, benchmarks and tests.

A child that ignores its stop signal must not outlive the caller, and a child whose pipes are full
must not deadlock the wait: :func:`stop_process` drains the pipes while it waits, sends SIGKILL
after ``timeout_s`` and always reaps.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import threading
from dataclasses import dataclass
from typing import IO, Any


@dataclass(frozen=True)
class Stopped:
    """How a child ended: exit code (negative: the signal that ended it), what was left in its
    pipes (None for a stream that was not a pipe) and whether SIGKILL was needed."""

    returncode: int | None
    stdout: Any
    stderr: Any
    killed: bool


def stop_process(proc: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout_s: float = 10.0,
                 kill_timeout_s: float = 5.0, group: bool = False) -> Stopped:
    """Send ``sig`` (if ``proc`` still runs), wait up to ``timeout_s``, then SIGKILL and reap.

    ``group``: signal the whole process group (``proc`` started with ``start_new_session=True``),
    and SIGKILL the group once the leader is gone, so nothing it spawned lingers. ``returncode`` is
    None only if even SIGKILL did not end it within ``kill_timeout_s``. The pipes are read to their
    end and closed; a stream a grandchild still holds open reads as None.
    """
    # Drain through the file objects, not their descriptors (as communicate() does): what the
    # caller's earlier readline() left in a stream's buffer belongs to the output too.
    readers = {name: _Reader(stream) for name in ("stdout", "stderr")
               if (stream := getattr(proc, name)) is not None and not stream.closed}
    if proc.poll() is None:
        _signal(proc, sig, group)
    killed = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        killed = True
        _signal(proc, signal.SIGKILL, group)
        try:
            proc.wait(timeout=kill_timeout_s)
        except subprocess.TimeoutExpired:
            pass
    if group:
        _signal(proc, signal.SIGKILL, group)
    out = {name: reader.result(kill_timeout_s) for name, reader in readers.items()}
    return Stopped(returncode=proc.returncode, stdout=out.get("stdout", _closed(proc.stdout)),
                   stderr=out.get("stderr", _closed(proc.stderr)), killed=killed)


class _Reader:
    """Reads one pipe to its end on a daemon thread (a full pipe must not block the child's exit)."""

    def __init__(self, stream: IO[Any]) -> None:
        self._stream = stream
        self._data: Any = None
        self._thread = threading.Thread(target=self._run, name="stop_process-reader", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._data = self._stream.read()
            self._stream.close()
        except (OSError, ValueError):  # closed under us
            pass

    def result(self, timeout_s: float) -> Any:
        self._thread.join(timeout_s)
        return None if self._thread.is_alive() else self._data


def _closed(stream: IO[Any] | None) -> Any:
    """What a pipe that was already read to its end and closed yields: empty, of the stream's type."""
    if stream is None:
        return None
    return "" if isinstance(stream, io.TextIOBase) else b""


def _signal(proc: subprocess.Popen[Any], sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(proc.pid, sig)
        elif proc.poll() is None:
            proc.send_signal(sig)
    except (ProcessLookupError, PermissionError):
        pass  # already gone


def pid_running(pid: int) -> bool:
    """True while a process ``pid`` exists and is not a zombie (one that exited and was not reaped
    yet is dead for every purpose here)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process: it exists
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return not os.path.isdir("/proc")  # gone since kill(0); or no /proc (macOS): kill(0) said it exists
    except OSError:
        return True
