"""eventually() and succeeds(): what they return, when they pump, how they fail."""

from __future__ import annotations

import pytest

from tests.waiting import eventually, succeeds


def test_eventually_returns_the_first_truthy_value_and_pumps_only_between_tries() -> None:
    values = iter([0, [], None, [3]])
    pumps: list[int] = []
    assert eventually(lambda: next(values), interval_s=0, pump=lambda: pumps.append(1)) == [3]
    assert pumps == [1, 1, 1]
    assert eventually(lambda: "ready", pump=lambda: pumps.append(1)) == "ready" and len(pumps) == 3


def test_eventually_names_what_it_waited_for() -> None:
    with pytest.raises(AssertionError, match=r"^the worker registered: not reached within 0\.05 s$"):
        eventually(lambda: False, timeout_s=0.05, what="the worker registered")
    state = {"n": 0}

    def pred() -> bool:
        state["n"] += 1
        return False

    with pytest.raises(AssertionError, match=r"^n=\d+: not reached"):
        eventually(pred, timeout_s=0.05, what=lambda: f"n={state['n']}")


def test_eventually_checks_once_more_after_a_stall_that_ate_the_whole_budget() -> None:
    """The condition came true during a stall between tries longer than the timeout: that is not
    a failure (a try always follows the wait, before the deadline is judged)."""
    import time

    came_true: list[int] = []

    def stall() -> None:
        time.sleep(0.1)  # the machine stalls past the deadline; meanwhile the condition came true
        came_true.append(1)

    assert eventually(lambda: bool(came_true), timeout_s=0.05, pump=stall, interval_s=0)


def test_succeeds_retries_the_given_errors_only() -> None:
    attempts = iter([ConnectionRefusedError(), ConnectionRefusedError(), "up"])

    def attempt() -> str:
        value = next(attempts)
        if isinstance(value, Exception):
            raise value
        return value

    assert succeeds(attempt, interval_s=0) == "up"
    with pytest.raises(KeyError):
        succeeds(lambda: {}["x"], timeout_s=0.05)
    with pytest.raises(AssertionError, match=r"^health: still failing after 0\.05 s") as failed:
        succeeds(lambda: (_ for _ in ()).throw(OSError("refused")), timeout_s=0.05, what="health", interval_s=0.01)
    assert isinstance(failed.value.__cause__, OSError)
