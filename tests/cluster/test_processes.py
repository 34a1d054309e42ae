"""stop_process: ask, wait, kill, reap — and never deadlock on a child's full pipe."""

from __future__ import annotations

import signal
import subprocess
import sys

from cluster.processes import pid_running, stop_process
from tests.waiting import eventually


def _spawn(setup: str, then: str = "time.sleep(60)", **kw) -> subprocess.Popen:
    """A Python child that runs ``setup``, says it is ready, then runs ``then``."""
    code = f"import signal, sys, time\n{setup}\nprint('ready', flush=True)\n{then}"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)
    assert proc.stdout.readline() == "ready\n"  # its signal handlers are in place
    return proc


def test_a_child_that_exits_on_sigterm_is_reaped_with_its_stderr() -> None:
    proc = _spawn("def bye(*_): sys.stderr.write('bye'); sys.exit(3)\n"
                  "signal.signal(signal.SIGTERM, bye)")
    stopped = stop_process(proc, timeout_s=10)
    assert (stopped.returncode, stopped.stderr, stopped.stdout, stopped.killed) == (3, "bye", "", False)
    assert proc.returncode == 3


def test_a_child_that_ignores_its_signal_is_killed_after_the_timeout() -> None:
    proc = _spawn("signal.signal(signal.SIGINT, signal.SIG_IGN)")
    stopped = stop_process(proc, sig=signal.SIGINT, timeout_s=0.5)
    assert (stopped.returncode, stopped.killed) == (-signal.SIGKILL, True)


def test_a_child_blocked_on_a_full_pipe_does_not_deadlock_the_stop() -> None:
    # 1 MiB to stderr, then exit once SIGTERM came: a plain wait() would block on the pipe forever.
    proc = _spawn("stop = []\nsignal.signal(signal.SIGTERM, lambda *_: stop.append(1))",
                  "import os\ndata = b'x' * (1 << 20)\n"
                  "while data: data = data[os.write(2, data):]\n"  # a signal may cut one write short
                  "while not stop: time.sleep(0.01)")
    stopped = stop_process(proc, timeout_s=10)
    assert (stopped.returncode, len(stopped.stderr), stopped.killed) == (0, 1 << 20, False)


def test_a_stopped_child_can_be_stopped_again() -> None:
    proc = _spawn("")
    assert stop_process(proc).returncode == -signal.SIGTERM
    again = stop_process(proc, sig=signal.SIGKILL)
    assert (again.returncode, again.killed) == (-signal.SIGTERM, False)


def test_group_stops_what_the_child_spawned() -> None:
    proc = _spawn("import subprocess\n"
                  "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])",
                  "print(c.pid, flush=True); time.sleep(60)", start_new_session=True)
    grandchild = int(proc.stdout.readline())
    assert pid_running(grandchild)
    stopped = stop_process(proc, timeout_s=10, group=True)
    assert stopped.returncode == -signal.SIGTERM
    # SIGTERM and SIGKILL went to the group; delivery is asynchronous, and init reaps the orphan.
    eventually(lambda: not pid_running(grandchild), timeout_s=5, what=f"grandchild {grandchild} gone")


def test_output_the_caller_left_in_a_streams_buffer_is_kept() -> None:
    # One write of two lines: readline() returns the first and keeps the second in its buffer.
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('first\\nsecond', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "first\n"
    stopped = stop_process(proc)
    assert (stopped.stdout, stopped.stderr, stopped.returncode) == ("second\n", None, -signal.SIGTERM)
