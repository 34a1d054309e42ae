"""The machine-readable ready line of a long-running component (router, worker, monitor).

Once every socket of the process is bound and serving, it prints one JSON line on stdout (logs
go to stderr) and, with ``--ready-file PATH``, writes the same object to PATH (atomically:
a reader never sees half of it; removed again at exit)::

    {"event": "ready", "component": "worker", "id": "worker-0", "pid": 4242,
     "endpoints": {"events": "tcp://127.0.0.1:40123", "replay": "tcp://127.0.0.1:40124",
                   "http": "http://127.0.0.1:40125"}}

``endpoints`` holds every bound socket, ports resolved (a port 0 asked for shows the one the
OS picked). Ready means listening: a worker registers with its router after this.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import click


def ready_file_option(func):
    return click.option(
        "--ready-file", type=click.Path(dir_okay=False), default=None,
        help="Write the ready line's JSON object (every bound endpoint, resolved ports) to this file once "
             "listening; removed at exit.",
    )(func)


def clear_ready_file(path: str | None) -> None:
    """Remove a ready file (a stale one from an earlier run before starting; ours at exit)."""
    if path:
        Path(path).unlink(missing_ok=True)


def announce_ready(*, component: str, component_id: str, endpoints: Mapping[str, str | None],
                   ready_file: str | None = None) -> dict:
    """Print the ready line and write the ready file; returns the object."""
    record = {"event": "ready", "component": component, "id": component_id, "pid": os.getpid(),
              "endpoints": {name: ep for name, ep in endpoints.items() if ep is not None}}
    line = json.dumps(record)
    if ready_file:
        path = Path(ready_file)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(line + "\n")
        os.replace(tmp, path)
    try:
        click.echo(line)
    except OSError:  # stdout closed: the ready file (if any) still says it
        pass
    return record
