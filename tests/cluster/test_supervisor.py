"""The supervisor with real child processes (small Python scripts)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from cluster.processes import pid_running, stop_process
from cluster.supervisor import ComponentFailed, ComponentSpec, Supervisor
from tests.waiting import eventually

pytestmark = pytest.mark.integration

# A child that spawns a grandchild in the same process group, records both pids, then sleeps.
SPAWNER = """
import subprocess, sys, time, pathlib
g = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
pathlib.Path(sys.argv[1]).write_text(f"{g.pid}")
print("up", flush=True)
time.sleep(60)
"""
# A child that ignores SIGTERM (only SIGKILL stops it).
STUBBORN = """
import signal, sys, time, pathlib
signal.signal(signal.SIGTERM, signal.SIG_IGN)
pathlib.Path(sys.argv[1]).write_text("armed")
time.sleep(60)
"""


def test_stop_kills_whole_process_groups_and_logs_each_component(tmp_path):
    sup = Supervisor(log_dir=tmp_path / "logs", stop_timeout_s=2.0)
    marker = tmp_path / "grandchild.pid"
    sup.start(ComponentSpec("spawner", "router", [sys.executable, "-c", SPAWNER, str(marker)], ready=marker.exists))
    sup.wait_ready("spawner", timeout_s=10)
    grandchild = int(marker.read_text())
    pid = sup.pid("spawner")
    assert pid_running(grandchild) and pid_running(pid)
    assert sup.failed() == []
    codes = sup.stop()
    assert codes == {"spawner": -15}
    assert not pid_running(pid)
    # SIGKILL to the group is delivered asynchronously to the orphaned grandchild.
    eventually(lambda: not pid_running(grandchild), what=f"grandchild {grandchild} gone")
    assert (tmp_path / "logs" / "spawner.log").read_text() == "up\n"


def test_sigterm_ignorers_are_killed_within_the_timeout(tmp_path):
    sup = Supervisor(log_dir=tmp_path, stop_timeout_s=0.5)
    marker = tmp_path / "armed"
    sup.start(ComponentSpec("stubborn", "worker", [sys.executable, "-c", STUBBORN, str(marker)], ready=marker.exists))
    sup.wait_ready("stubborn", timeout_s=10)
    t0 = time.monotonic()
    assert sup.stop() == {"stubborn": -9}
    assert time.monotonic() - t0 < 5


def test_early_exit_and_readiness_timeout_are_reported_with_the_log_tail(tmp_path):
    sup = Supervisor(log_dir=tmp_path, stop_timeout_s=1.0)
    sup.start(ComponentSpec("crash", "worker", [sys.executable, "-c", "print('boom'); raise SystemExit(3)"],
                            ready=lambda: False))
    with pytest.raises(ComponentFailed) as err:
        sup.wait_ready("crash", timeout_s=10)
    assert err.value.returncode == 3 and err.value.spec.role == "worker"
    assert "exited with code 3 before it was ready" in str(err.value) and "boom" in err.value.log_tail
    sup.start(ComponentSpec("slow", "monitor", [sys.executable, "-c", "import time; time.sleep(30)"],
                            ready=lambda: False))
    with pytest.raises(ComponentFailed, match="not ready after 0.3 s") as err:
        sup.wait_ready("slow", timeout_s=0.3)
    assert err.value.returncode is None
    assert [f.spec.name for f in sup.failed()] == ["crash"]
    with pytest.raises(ValueError):
        sup.start(ComponentSpec("slow", "monitor", [sys.executable, "-c", "pass"]))
    codes = sup.stop()
    assert codes == {"slow": -15, "crash": 3}


def test_restart_crashes_and_starts_a_new_process_appending_to_the_log(tmp_path):
    sup = Supervisor(log_dir=tmp_path, stop_timeout_s=1.0)
    script = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(60)"
    log = tmp_path / "w.log"
    sup.start(ComponentSpec("w", "worker", [sys.executable, "-c", script],
                            ready=lambda: log.read_text().count("pid") == 1))
    sup.wait_ready("w", timeout_s=10)
    old = sup.pid("w")
    assert sup.restart("w") == -9
    assert not pid_running(old) and sup.pid("w") != old and sup.names == ["w"]
    eventually(lambda: log.read_text().count("pid") >= 2, timeout_s=10, what="the restarted child's line",
               interval_s=0.02)
    assert log.read_text().split() == ["pid", str(old), "pid", str(sup.pid("w"))]
    assert sup.stop() == {"w": -15}


# A child that writes "<name> <unix time ns>" to a shared file when SIGTERM arrives, then exits.
RECORDER = """
import signal, sys, time
def bye(*_):
    with open(sys.argv[1], "a") as fh:
        fh.write(f"{sys.argv[2]} {time.time_ns()}\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, bye)
print("up", flush=True)
time.sleep(60)
"""


def test_stop_goes_newest_first_with_stop_last_components_after_the_rest(tmp_path):
    order = tmp_path / "order.txt"
    sup = Supervisor(log_dir=tmp_path, stop_timeout_s=5.0)
    for name, last in (("router", False), ("monitor", True), ("w0", False), ("w1", False)):
        log = tmp_path / f"{name}.log"
        sup.start(ComponentSpec(name, name, [sys.executable, "-c", RECORDER, str(order), name], stop_last=last,
                                ready=lambda log=log: "up" in log.read_text()))
        sup.wait_ready(name, timeout_s=10)
    assert sup.stop() == {"w1": 0, "w0": 0, "router": 0, "monitor": 0}
    stopped = [line.split()[0] for line in sorted(order.read_text().splitlines(), key=lambda ln: int(ln.split()[1]))]
    assert stopped == ["w1", "w0", "router", "monitor"]


def test_respec_changes_what_a_restart_runs(tmp_path):
    sup = Supervisor(log_dir=tmp_path, stop_timeout_s=1.0)
    log = tmp_path / "r.log"
    def says(word: str) -> ComponentSpec:
        script = f"import time; print({word!r}, flush=True); time.sleep(60)"
        return ComponentSpec("r", "router", [sys.executable, "-c", script])

    sup.start(says("first"))
    sup.respec("r", says("second"))
    with pytest.raises(ValueError):
        sup.respec("r", ComponentSpec("other", "router", []))
    eventually(lambda: "first" in log.read_text(), timeout_s=10, what="the first spec's line", interval_s=0.02)
    sup.restart("r")
    eventually(lambda: "second" in log.read_text(), timeout_s=10, what="the second spec's line", interval_s=0.02)
    assert log.read_text().split() == ["first", "second"]
    sup.stop()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_when_the_supervisor_is_killed_hard(tmp_path):
    import subprocess

    pid_file = tmp_path / "child.pid"
    parent = f"""
import sys, time, pathlib
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from cluster.supervisor import ComponentSpec, Supervisor
sup = Supervisor(log_dir={str(tmp_path)!r})
sup.start(ComponentSpec("c", "worker", [sys.executable, "-c", "import time; time.sleep(60)"]))
pathlib.Path({str(pid_file)!r}).write_text(str(sup.pid("c")))
time.sleep(60)
"""
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        eventually(pid_file.exists, timeout_s=15, what="the supervised child's pid file", interval_s=0.02)
        child = int(pid_file.read_text())
        assert pid_running(child)
        proc.kill()  # no chance to clean up
        proc.wait(timeout=5)
        eventually(lambda: not pid_running(child), what=f"child {child} gone with its parent", interval_s=0.02)
    finally:
        stop_process(proc, sig=signal.SIGKILL)
