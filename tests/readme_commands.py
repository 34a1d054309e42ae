"""The shell commands in README.md's code blocks, as a user would type them.

``readme_commands`` returns each logical command of every ```bash block: backslash
continuations joined, trailing ``# comments`` and comment-only lines dropped. The
README test classifies each one (run as is, run shortened, run against a live
cluster, or skipped with a reason) and fails on any command it does not know, so
a command added to the README is either tested or explicitly excused.
"""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

_FENCE = re.compile(r"^```(\w*)\s*$")


def _strip_comment(line: str) -> str:
    """Drop a trailing ``# comment`` that is outside quotes (shell rules, enough for a README)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].rstrip()
    return line.rstrip()


def readme_commands(text: str | None = None) -> list[str]:
    """Every command line of the README's ``bash`` blocks, in order of appearance."""
    text = README.read_text() if text is None else text
    commands: list[str] = []
    in_bash = False
    pending = ""
    for raw in text.splitlines():
        fence = _FENCE.match(raw.strip())
        if fence:
            if in_bash:
                in_bash = False
            elif fence.group(1) in ("bash", "sh", "shell", "console"):
                in_bash = True
            continue
        if not in_bash:
            continue
        line = _strip_comment(raw)
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        if line:
            commands.append(line)
    return commands


def _cells(line: str) -> list[str] | None:
    """The cells of a table row (markdown ``|`` or box-drawn ``│``), or None for a non-row."""
    stripped = line.strip()
    if not stripped or stripped[0] not in "|│┃":
        return None
    cells = [c.strip() for c in re.split(r"[|│┃]", stripped.strip("|│┃"))]
    return cells if len(cells) >= 2 else None


def empty_tables(output: str) -> list[str]:
    """Tables whose every data row has only blank or dash cells (what the simulator printed
    when it rejected every request), each given by its first empty row.

    A table is a run of consecutive row lines; separator rows (``|---|``) and the header (the
    first row) are not data; the first cell of a row names it. One row without data in a table
    that has data elsewhere (``TTFT hit (n=0) | – |``) is an honest blank, not an empty table.
    """
    tables: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in output.splitlines() + [""]:
        cells = _cells(line)
        if cells is None:
            if current:
                tables.append(current)
            current = []
            continue
        if all(re.fullmatch(r":?-+:?", c) for c in cells if c) and any(cells):
            continue  # a separator row
        current.append(cells)
    bad = []
    for rows in tables:
        data = [r for r in rows[1:] if any(r)]
        blank = [r for r in data if all(c in ("", "-", "—", "–", "nan", "n/a") for c in r[1:])]
        if data and len(blank) == len(data):
            bad.append(" | ".join(blank[0]))
    return bad
