"""A clock the test moves: what services that take ``clock=`` read instead of ``time.monotonic``.

Time passes only when the test says so, so a stall of a busy machine (the test thread, a service
thread) can never make a heartbeat look missed or a timeout fire early.
"""

from __future__ import annotations


class ManualClock:
    """Returns ``t``; :meth:`advance` moves it. Reads from another thread see a whole float."""

    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> float:
        self.t += seconds
        return self.t
