"""``python -m cli._liar CLAIMS_FILE <kvr options> worker <worker options>``: ``kvr worker`` that
lies once ``CLAIMS_FILE`` appears (bench/liar.py; the fault suite's ``lying_worker`` case)."""

from __future__ import annotations

import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    from bench.liar import start_lying
    from cli.main import main as kvr
    from worker.runner import WorkerRunner

    args = list(sys.argv[1:] if argv is None else argv)
    claims_path = Path(args.pop(0))
    run = WorkerRunner.run

    def lying_run(self: WorkerRunner) -> None:
        start_lying(self, claims_path)
        run(self)

    WorkerRunner.run = lying_run  # type: ignore[method-assign]
    kvr.main(args=args, prog_name="kvr")


if __name__ == "__main__":
    main()
