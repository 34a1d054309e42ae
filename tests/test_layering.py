"""The import direction, and core/ and sim/ pure.

* ``core`` ← ``bus`` ← ``router``, ``worker``, ``monitor`` ← ``cluster``, ``bench`` ← ``cli``, and
  ``core`` ← ``sim``: a package imports only from itself and the packages to its left (function-level
  imports included);
* ``core/`` and ``sim/`` have no sockets, Redis, asyncio, transport layer or clock.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN_MODULES = {"zmq", "redis", "asyncio", "socket", "time", "bus", "router", "worker", "monitor", "cli",
                     "cluster", "fakeredis", "threading", "subprocess"}
# Clock reads that must not appear even through another name.
FORBIDDEN_CALLS = {("datetime", "now"), ("datetime", "utcnow"), ("date", "today"), ("os", "urandom")}


def _python_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"{package}/ has no modules"
    return files


def _violations(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in FORBIDDEN_MODULES:
                    found.append(f"{path.name}:{node.lineno} imports {alias.name}")
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module.split(".")[0] in FORBIDDEN_MODULES:
                found.append(f"{path.name}:{node.lineno} imports from {node.module}")
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
            if (node.value.id, node.attr) in FORBIDDEN_CALLS:
                found.append(f"{path.name}:{node.lineno} reads {node.value.id}.{node.attr}")
    return found


@pytest.mark.parametrize("package", ["core", "sim"])
def test_pure_packages_do_no_io_and_read_no_clock(package: str) -> None:
    problems = [v for f in _python_files(package) for v in _violations(f)]
    assert problems == []


def test_the_checker_catches_a_clock_read(tmp_path: Path) -> None:
    bad = tmp_path / "bad.py"
    bad.write_text("import time\nfrom redis import Redis\nimport datetime\nx = datetime.now\n")
    assert len(_violations(bad)) == 3


PACKAGES = ("core", "sim", "bus", "router", "worker", "monitor", "cluster", "bench", "cli")
#: What each package may import from (besides itself).
MAY_IMPORT = {
    "core": set(),
    "sim": {"core"},
    "bus": {"core"},
    "router": {"core", "bus"},
    "worker": {"core", "bus"},
    "monitor": {"core", "bus"},
    "cluster": {"core", "bus", "router", "worker", "monitor", "sim"},
    "bench": {"core", "bus", "router", "worker", "monitor", "sim", "cluster"},
    "cli": {"core", "bus", "router", "worker", "monitor", "sim", "cluster", "bench"},
}


def _first_party_imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    out = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        out += [(node.lineno, n) for n in names if n.split(".")[0] in PACKAGES]
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_imports_point_down_the_layers(package: str) -> None:
    allowed = MAY_IMPORT[package] | {package}
    wrong = [f"{f.relative_to(ROOT)}:{line} imports {name}" for f in _python_files(package)
             for line, name in _first_party_imports(f) if name.split(".")[0] not in allowed]
    assert wrong == []


def test_the_direction_checker_sees_function_level_imports(tmp_path: Path) -> None:
    mod = tmp_path / "m.py"
    mod.write_text("import os\n\ndef f():\n    from router.mirror import RedisMirror\n    import cli.main\n")
    assert _first_party_imports(mod) == [(4, "router.mirror"), (5, "cli.main")]

