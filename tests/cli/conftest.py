"""Every CLI test gets its own kvr state dir: no test reads or clobbers the user's running `kvr up`."""

from __future__ import annotations

import pytest

from cli.user_state import STATE_DIR_ENV


@pytest.fixture(autouse=True)
def state_dir(tmp_path, monkeypatch):
    """``KVR_STATE_DIR`` for this test (inherited by the processes it starts)."""
    path = tmp_path / "kvr-state"
    monkeypatch.setenv(STATE_DIR_ENV, str(path))
    for var in ("KVR_ROUTER", "KVR_REDIS_URL", "KVR_MONITOR_URL", "KVR_NAMESPACE", "KVR_CURVE_DIR"):
        monkeypatch.delenv(var, raising=False)
    return path
