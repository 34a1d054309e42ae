"""Progress reporting for suites: a rich progress bar on a terminal, nothing in tests.

A suite calls ``progress.step(description)`` once per unit of work after ``progress.start(total)``;
the CLI passes a :class:`RichProgress`, tests and library callers the default :class:`NullProgress`.
"""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


class NullProgress:
    """Counts steps and says nothing (the default)."""

    def __init__(self) -> None:
        self.total = 0
        self.done = 0

    def start(self, total: int, description: str = "") -> None:
        self.total, self.done = total, 0

    def step(self, description: str = "") -> None:
        self.done += 1

    def close(self) -> None:
        pass


class RichProgress(NullProgress):
    """A rich progress bar (on stderr, so ``--json`` output on stdout stays clean)."""

    def __init__(self, suite: str) -> None:
        super().__init__()
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self._bar = Progress(TextColumn(f"[bold]{suite}[/bold]"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("{task.description}"),
                             console=Console(stderr=True), transient=False)
        self._task = None

    def start(self, total: int, description: str = "") -> None:
        super().start(total, description)
        self._bar.start()
        self._task = self._bar.add_task(description, total=total)

    def step(self, description: str = "") -> None:
        super().step(description)
        if self._task is not None:
            self._bar.update(self._task, advance=1, description=description)

    def close(self) -> None:
        self._bar.stop()
