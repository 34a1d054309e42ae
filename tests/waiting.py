"""Polling until a condition holds: the one helper tests use instead of hand-written deadline loops.

Tests that wait on another thread or process cannot know when it will get there; a busy 2-core
machine may stall either side for hundreds of milliseconds. :func:`eventually` polls a predicate
on the monotonic clock, tries it again after every wait before judging the deadline (so a stall
that eats the whole budget does not fail a condition that did hold), and fails with a message
naming what was awaited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def eventually(pred: Callable[[], T], *, timeout_s: float = 5.0, what: str | Callable[[], str] = "condition",
               interval_s: float = 0.01, pump: Callable[[], object] | None = None) -> T:
    """Call ``pred`` until it returns something truthy, and return that.

    ``pump`` runs between tries (drive fakes that have no thread of their own, drain a socket):
    a condition that already holds returns without pumping. ``interval_s`` is the sleep between
    tries (0 when ``pump`` blocks by itself).
    Raises AssertionError after ``timeout_s`` seconds, naming ``what`` (a callable is called
    then, so the message can show the state that was reached). Exceptions from ``pred`` propagate.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what() if callable(what) else what}: not reached within {timeout_s:g} s")
        if pump is not None:
            pump()
        if interval_s > 0:
            time.sleep(interval_s)


def succeeds(attempt: Callable[[], T], *, timeout_s: float = 5.0, what: str = "attempt", interval_s: float = 0.05,
             retry_on: type[BaseException] | tuple[type[BaseException], ...] = OSError) -> T:
    """Call ``attempt`` until it returns without raising ``retry_on``; return its value.

    For services that are still starting (a port not bound yet refuses connections). The last
    error is chained to the AssertionError raised after ``timeout_s`` seconds.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return attempt()
        except retry_on as exc:
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what}: still failing after {timeout_s:g} s ({exc!r})") from exc
        time.sleep(interval_s)
